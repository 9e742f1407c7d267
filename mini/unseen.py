"""Degradations with settings of our own, unlike the synthetic ones the prompts were trained on.

Users' degradations are never the training ones, so the miniature's claims are checked on these too. Each function
maps a clean image [3, H, W] in [0, 1] and a seeded generator to a degraded one; every parameter differs in kind
or range from `data.DEGRADATIONS`:

    noise     signal-dependent (Poisson-Gaussian) noise, sigma = sqrt(0.01 x + 0.02^2), then 8-bit rounding
              (training: white Gaussian noise of one sigma in 15..50/255)
    blur      defocus: a uniform disc of radius 2.5 px (training: Gaussian, sigma 1..3)
    haze      a flat, bluish veil: one transmission 0.45 for the whole image, airlight (0.75, 0.8, 0.9)
              (training: depth-dependent transmission, grey airlight 0.75..0.95)
    rain      fewer, longer, brighter vertical streaks (density 0.0015, length 40 px, slant 5 deg, brightness 0.95)
    lowlight  a linear exposure cut to 0.12 with a gamma of 1.2, Gaussian read noise 0.01
              (training: scale 0.15..0.4, gamma 1.5..2.5, shot + read noise)
    snow      big flakes only (sigma 3 px, density 0.002) and a strong veil (0.3)
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import data


def noise(x: Tensor, generator: torch.Generator) -> Tensor:
    sigma = torch.sqrt(0.01 * x.clamp(0, 1) + 0.02**2)
    noisy = x + sigma * torch.randn(x.shape, generator=generator)
    return noisy.clamp(0, 1).mul(255).round().div(255)


def blur(x: Tensor, generator: torch.Generator, radius: float = 2.5) -> Tensor:
    r = math.ceil(radius)
    grid = torch.arange(-r, r + 1, dtype=torch.float32)
    disc = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).float()
    kernel = (disc / disc.sum())[None, None].expand(3, 1, -1, -1)
    return F.conv2d(F.pad(x[None], (r, r, r, r), mode="replicate"), kernel, groups=3)[0]


def haze(x: Tensor, generator: torch.Generator) -> Tensor:
    transmission, airlight = 0.45, torch.tensor([0.75, 0.8, 0.9])[:, None, None]
    return x * transmission + airlight * (1 - transmission)


def rain(x: Tensor, generator: torch.Generator) -> Tensor:
    _, height, width = x.shape
    drops = (torch.rand(1, 1, height, width, generator=generator) < 0.0015).float()
    kernel = data._line_kernel(40, 95)
    streaks = (0.95 * data._filter(drops, kernel / kernel.max())[0]).clamp(0, 1)
    return 1 - (1 - x) * (1 - streaks)


def lowlight(x: Tensor, generator: torch.Generator) -> Tensor:
    dark = 0.12 * x.clamp(0, 1) ** 1.2
    return dark + 0.01 * torch.randn(x.shape, generator=generator)


def snow(x: Tensor, generator: torch.Generator) -> Tensor:
    _, height, width = x.shape
    flakes = (torch.rand(1, 1, height, width, generator=generator) < 0.002).float()
    flakes = flakes * (0.7 + 0.3 * torch.rand(1, 1, height, width, generator=generator))
    peak = data._gaussian_kernel(3.0).max() ** 2
    mask = (data._gaussian_blur(flakes, 3.0) / peak).clamp(0, 1)[0]
    return (x * 0.7 + 0.9 * 0.3) * (1 - mask) + mask


UNSEEN = {"noise": noise, "blur": blur, "haze": haze, "rain": rain, "lowlight": lowlight, "snow": snow}
