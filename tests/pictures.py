"""Natural test pictures: crops of skimage's astronaut photo (CC0), still and panning."""

import torch
from skimage import data as skdata


def natural(height: int, width: int, top: int = 40, left: int = 150) -> torch.Tensor:
    """A crop of skimage's astronaut photo (CC0) as [3, H, W] in [0, 1] (8-bit values)."""
    pixels = skdata.astronaut()[top:top + height, left:left + width]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def moving(frames: int, height: int, width: int) -> torch.Tensor:
    """A natural video [3, F, H, W]: the astronaut crop panning 3 pixels per frame."""
    return torch.stack([natural(height, width, left=150 + 3 * f) for f in range(frames)], dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()
