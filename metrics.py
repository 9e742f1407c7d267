"""Full-reference quality metrics for restored images and videos: PSNR, SSIM, LPIPS, and per-dataset tables.

Restoration papers report PSNR and SSIM under a handful of unwritten conventions, and a different convention
easily moves PSNR by more than the gap between two methods. The ones used here, step by step:

1. Protocol resize (optional, done by the caller). The paper measures "after resizing to 512x512":
   `resize_to(x, 512)` is a bicubic, antialiased resize of the last two axes to 512 x 512 (the aspect ratio is
   NOT kept), clamped to [0, 1]. Apply it to prediction and target alike, before the metric.
2. Quantise. Inputs are float tensors in [0, 1]. They are clamped to [0, 1] and rounded to 8 bits,
   `round(x * 255)` (`quantise`), exactly the values `media.write_image` would store in a PNG. Metrics are
   computed on these integer levels 0..255 (held as float64), as papers do when they measure saved images.
3. Colour. `channel="rgb"` measures the three RGB channels. `channel="y"` measures the ITU-R BT.601 luma of the
   8-bit RGB, in studio range [16, 235] and NOT re-rounded:
       Y = 16 + 65.481 R + 128.553 G + 24.966 B,   R, G, B = levels / 255 in [0, 1]
   (MATLAB's `rgb2ycbcr` and BasicSR's `rgb2ycbcr(y_only=True)` as its PSNR/SSIM code uses it).
4. Border. `crop_border=c` drops c pixels at every edge before measuring (common for super-resolution; 0 here
   by default).
5. PSNR = 10 log10(255^2 / MSE), the MSE taken over all pixels and all measured channels at once (not an
   average of per-channel PSNRs); data range 255 on the 8-bit levels, which is the same number as range 1 on
   levels / 255. Identical images have MSE 0 and PSNR = inf (float('inf'), no warning).
   Equals `skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=255)` on the 8-bit arrays.
6. SSIM (Wang et al. 2004): local statistics under an 11 x 11 Gaussian window (sigma 1.5, the separable kernel
   exp(-k^2 / (2 sigma^2)), k = -5..5, normalised), population (not sample) covariances, K1 = 0.01,
   K2 = 0.03, data range L = 255 (C1 = (K1 L)^2, C2 = (K2 L)^2):
       SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
   filtered without padding ("valid": the map is (H - 10) x (W - 10)), averaged over the map, then over the
   channels for RGB. Equals `skimage.metrics.structural_similarity(target, pred, gaussian_weights=True,
   sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)`: skimage filters with reflected
   edges but then crops (win_size - 1) // 2 = 5 pixels off the SSIM map, which leaves exactly the valid part.
   Images need at least 11 x 11 pixels after the border crop.
7. Shapes. An image [3, H, W]; a batch [B, 3, H, W] with `video=False`; a video [3, F, H, W] (the layout of
   `data.py`) with `video=True`. 4-D inputs must pass `video`, since [3, 3, H, W] could be either. Every
   image/frame is scored on its own and the result is the plain mean of the per-image (per-frame) scores --
   the usual "average PSNR over the test set", not a PSNR of pooled errors. A batch or video holding one
   identical pair therefore averages to inf.

LPIPS (Zhang et al. 2018, v0.1, AlexNet) is optional: `load_lpips(paths)` needs the real weights and refuses
without them; it is never computed with random weights (see `LPIPS`).

    restored, clean = resize_to(restored, 512), resize_to(clean, 512)
    row = {"dataset": "rain100L", "psnr": psnr(restored, clean, channel="y"), "ssim": ssim(restored, clean)}
    print(markdown_table(summarise(rows)))
"""

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from media import describe
from weights import CheckpointError, build, read_state_dict

Channel = Literal["rgb", "y"]

# SSIM constants of Wang et al. 2004.
SSIM_RADIUS = 5  # 11 x 11 window: skimage's int(3.5 * sigma + 0.5) for sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0  # metrics are computed on 8-bit levels

# ================================================================================================ pixels


def quantise(x: Tensor) -> Tensor:
    """Float tensor (any shape) in [0, 1] -> the same shape of 8-bit levels {0, ..., 255} as float64.

    Clamp to [0, 1], multiply by 255 and round half to even in float32 -- the same values `media.write_image`
    stores -- then widen to float64 so that the metric arithmetic is exact enough to match skimage.
    """
    return x.detach().float().clamp(0, 1).mul(255).round().double()


def rgb_to_y(levels: Tensor) -> Tensor:
    """RGB levels [..., 3, H, W] in [0, 255] -> BT.601 luma [..., 1, H, W] in [16, 235] (not rounded)."""
    r, g, b = (levels / 255).unbind(-3)
    return (16 + 65.481 * r + 128.553 * g + 24.966 * b).unsqueeze(-3)


def resize_to(image: Tensor, size: int = 512) -> Tensor:
    """Resize the last two axes of `image` [..., H, W] (an image [3, H, W], a video [3, F, H, W], a batch)
    to size x size: bicubic with antialiasing (`F.interpolate(mode="bicubic", antialias=True)`, PIL's filter
    when shrinking), then clamped to [0, 1] (bicubic overshoots at edges). The aspect ratio is not kept.

    Computed in float32 (float64 stays float64) and returned in the input's dtype.
    """
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.ndim < 3:
        raise ValueError(f"resize_to: expected a float tensor [..., H, W] with channels, got {describe(image)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"resize_to: size must be a positive int, got {size!r}")
    height, width = image.shape[-2:]
    planes = image.reshape(1, -1, height, width).to(torch.promote_types(image.dtype, torch.float32))
    resized = F.interpolate(planes, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 1).reshape(*image.shape[:-2], size, size).to(image.dtype)


def _frames(pred: Tensor, target: Tensor, video: bool | None) -> tuple[Tensor, Tensor]:
    """Check a (pred, target) pair and return both as frames [N, 3, H, W] (not yet quantised).

    3-D: an image [3, H, W]. 4-D: a batch [B, 3, H, W] (video=False) or a video [3, F, H, W] (video=True); a
    4-D tensor cannot tell which by itself (both are [3, 3, H, W] for three images or three frames), so
    `video` must be given for it.
    """
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor in [0, 1], got {describe(x)}")
        if x.isnan().any():
            raise ValueError(f"{name} holds NaN values (clamping cannot give them a meaning)")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {list(pred.shape)} and {list(target.shape)}")
    shape = list(pred.shape)
    if pred.numel() == 0:
        raise ValueError(f"pred and target are empty: {shape}")
    if pred.ndim == 3 and shape[0] == 3 and not video:
        return pred[None], target[None]
    if pred.ndim == 4 and video is None:
        raise ValueError(f"got a 4-D tensor {shape}: pass video=False for a batch [B, 3, H, W] or video=True for "
                         "a video [3, F, H, W]")
    if pred.ndim == 4 and video and shape[0] == 3:
        return pred.transpose(0, 1), target.transpose(0, 1)
    if pred.ndim == 4 and not video and shape[1] == 3:
        return pred, target
    expected = "a video [3, F, H, W]" if video else "an image [3, H, W] or a batch [B, 3, H, W]"
    raise ValueError(f"expected {expected} (video={video}), got {shape}")


def _measured(pred: Tensor, target: Tensor, channel: Channel, crop_border: int, video: bool | None,
              min_size: int) -> tuple[Tensor, Tensor]:
    """Frames [N, C, h, w] of 8-bit levels (float64) ready to measure: C = 3 (rgb) or 1 (y), borders cropped."""
    if channel not in ("rgb", "y"):
        raise ValueError(f'channel must be "rgb" or "y", got {channel!r}')
    pred, target = _frames(pred, target, video)
    height, width = pred.shape[-2:]
    if not isinstance(crop_border, int) or crop_border < 0 or min(height, width) - 2 * crop_border < min_size:
        raise ValueError(f"crop_border={crop_border!r} must be an int >= 0 leaving at least {min_size} x {min_size} "
                         f"pixels of the {height} x {width} frames")
    c = crop_border
    pred, target = (quantise(x[..., c:height - c, c:width - c]) for x in (pred, target))
    if channel == "y":
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    return pred, target


# ================================================================================================ PSNR, SSIM


def psnr(
    pred: Tensor, target: Tensor, channel: Channel = "rgb", crop_border: int = 0, video: bool | None = None
) -> float:
    """PSNR in dB of `pred` against `target` (see the module docstring for every convention).

    pred, target: float in [0, 1], an image [3, H, W], a batch [B, 3, H, W] with `video=False`, or a video
    [3, F, H, W] with `video=True` (4-D inputs must say which); the mean over images/frames is returned.
    inf for identical (8-bit) images.
    """
    pred, target = _measured(pred, target, channel, crop_border, video, min_size=1)
    scores = []
    for p, t in zip(pred, target):
        mse = (p - t).square().mean().item()
        scores.append(math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse))
    return sum(scores) / len(scores)


def _gaussian_window() -> Tensor:
    """The normalised 1-D SSIM Gaussian [11] in float64."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return window / window.sum()


def _blur_valid(x: Tensor) -> Tensor:
    """Separable 11 x 11 Gaussian filtering of x [..., h, w] without padding -> [..., h - 10, w - 10]:
    a weighted sum of 11 shifted copies along the columns, then along the rows."""
    window = _gaussian_window().tolist()
    taps = 2 * SSIM_RADIUS + 1
    height, width = x.shape[-2:]
    x = sum(weight * x[..., k:width - taps + 1 + k] for k, weight in enumerate(window))
    return sum(weight * x[..., k:height - taps + 1 + k, :] for k, weight in enumerate(window))


def _ssim_map(x: Tensor, y: Tensor) -> Tensor:
    """Per-channel SSIM maps of x, y [C, h, w] (8-bit levels) -> [C, h - 10, w - 10] (valid filtering)."""
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.stack([x, y, x * x, y * y, x * y])).unbind(0)
    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(
    pred: Tensor, target: Tensor, channel: Channel = "rgb", crop_border: int = 0, video: bool | None = None
) -> float:
    """SSIM of `pred` against `target` (Wang et al. 2004; see the module docstring for every convention).

    Same inputs as `psnr`; frames need at least 11 x 11 pixels after `crop_border`. Returns the mean over
    images/frames of the per-image SSIM (itself the mean over channels for RGB). 1.0 for identical images.
    """
    pred, target = _measured(pred, target, channel, crop_border, video, min_size=2 * SSIM_RADIUS + 1)
    scores = [_ssim_map(p, t).mean(dim=(1, 2)).mean().item() for p, t in zip(pred, target)]
    return sum(scores) / len(scores)


def grid_step_ratio(image: Tensor, grid: int) -> float:
    """How much sharper luma steps are across the lines of a `grid`-pixel grid than elsewhere, for image [3, H, W].

    On the 8-bit BT.601 luma Y (as for `channel="y"`), the absolute steps between horizontal and vertical
    neighbours are split into those that cross a grid line (between pixel k*grid - 1 and k*grid) and the rest;
    the ratio of their means is returned (about 1 for a photo: a grid means nothing to it).
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"expected a float image [3, H, W] in [0, 1], got {describe(image)}")
    if grid < 2 or min(image.shape[-2:]) < 2 * grid:
        raise ValueError(f"the image must hold two {grid}-pixel cells each way, got {list(image.shape)}")
    y = rgb_to_y(quantise(image))[0]
    across, inside = [], []
    for steps in ((y[:, 1:] - y[:, :-1]).abs(), (y[1:] - y[:-1]).abs().T):  # [rows, cols - 1] step k: k -> k+1
        on_line = (torch.arange(1, steps.shape[1] + 1) % grid) == 0
        across.append(steps[:, on_line])
        inside.append(steps[:, ~on_line])
    inside_mean = torch.cat([s.flatten() for s in inside]).mean().item()
    return torch.cat([s.flatten() for s in across]).mean().item() / max(inside_mean, 1e-12)


def block_texture(pred: Tensor, target: Tensor, grid: int = 8) -> float:
    """The block texture a restoration adds on the `grid`-pixel token grid (autoencoder factor x patch size):
    `grid_step_ratio(pred) - grid_step_ratio(target)`, images [3, H, W] or videos [3, F, H, W] (mean over frames).
    0: steps across the grid lines are as common in `pred` as in the clean `target`; 0.2: 20% sharper there."""
    if pred.ndim == 4:
        pairs = list(zip(pred.transpose(0, 1), target.transpose(0, 1)))
        return sum(block_texture(p, t, grid) for p, t in pairs) / len(pairs)
    return grid_step_ratio(pred, grid) - grid_step_ratio(target, grid)


# ================================================================================================ LPIPS

# LPIPS v0.1 maps images from [-1, 1] through (x - shift) / scale per RGB channel before the backbone.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Indices in `LPIPS.features` of the ReLUs whose outputs are compared (AlexNet relu1 .. relu5).
ALEXNET_TAPS = (1, 4, 7, 9, 11)
LPIPS_WEIGHTS_HELP = (
    "LPIPS needs real weights: the AlexNet features (torchvision's alexnet-owt-7be5be79.pth, keys "
    "features.{0,3,6,8,10}.{weight,bias}) and the LPIPS v0.1 linear layers (the lpips package's "
    "weights/v0.1/alex.pth, keys lin{0..4}.model.1.weight), as those two files or one file holding both key sets "
    "(.safetensors or .pth)"
)


class LPIPSUnavailable(RuntimeError):
    """LPIPS was asked for but its weights were not given or not loaded."""


class LinearHead(nn.Module):
    """A learned non-negative weighting of one layer's channels: 1x1 conv C -> 1, no bias.

    `model.0` was a dropout used only while the LPIPS authors trained the heads; it holds no weights, so an
    identity stands in for it and the checkpoint key stays `lin{i}.model.1.weight`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet backbone. Attribute names are the checkpoint keys (see LPIPS_WEIGHTS_HELP).

    distance = sum over the 5 taps l of  mean_{h,w}  w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2
    with f_l the backbone's relu-l output, |.| the L2 norm over channels at each pixel (+ 1e-10), and w_l >= 0
    the learned per-channel weights of `lin{l}`.

    The parameters are created on the meta device: a fresh LPIPS holds no numbers at all, so it cannot quietly
    score with random initial weights. Use `load_lpips(paths)`; tests may `to_empty` it and fill it.
    """

    def __init__(self):
        super().__init__()
        with torch.device("meta"):
            # torchvision's AlexNet `features` indices (its last max-pool, index 12, is not needed).
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),  # 0, 1: relu1 [64, H/4]
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),  # 3, 4: relu2 [192]
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),  # 6, 7: relu3 [384]
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),  # 8, 9: relu4 [256]
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),  # 10, 11: relu5 [256]
            )
            self.lin0, self.lin1, self.lin2 = LinearHead(64), LinearHead(192), LinearHead(384)
            self.lin3, self.lin4 = LinearHead(256), LinearHead(256)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target [B, 3, H, W] in [0, 1] (H, W >= 31, or relu5 is empty) -> distances [B]."""
        if self.lin0.model[1].weight.is_meta:
            raise LPIPSUnavailable("this LPIPS has no weights loaded; use load_lpips(paths). " + LPIPS_WEIGHTS_HELP)
        if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
            raise ValueError(f"LPIPS expects pred and target [B, 3, H, W] of one shape, got "
                             f"{describe(pred)} and {describe(target)}")
        weight = self.lin0.model[1].weight
        shift = torch.tensor(LPIPS_SHIFT, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
        scale = torch.tensor(LPIPS_SCALE, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
        x = (torch.cat([pred, target]).to(weight) * 2 - 1 - shift) / scale  # both images in one backbone pass
        heads = iter((self.lin0, self.lin1, self.lin2, self.lin3, self.lin4))
        distance = 0
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in ALEXNET_TAPS:
                a, b = (f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in x.chunk(2))
                distance = distance + next(heads)((a - b).square()).mean(dim=(2, 3))
        return distance.flatten()

    @torch.no_grad()
    def score(self, pred: Tensor, target: Tensor, video: bool | None = None) -> float:
        """Mean LPIPS over images/frames, with the same inputs, clamping and 8-bit quantisation as `psnr`."""
        pred, target = _frames(pred, target, video)
        scores = [self(quantise(p[None]) / 255, quantise(t[None]) / 255).item() for p, t in zip(pred, target)]
        return sum(scores) / len(scores)


def load_lpips(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None, device: torch.device | str = "cpu"
) -> LPIPS:
    """An LPIPS with real weights read from `paths` (the key sets of LPIPS_WEIGHTS_HELP, in one or more files).

    The files' keys are merged; torchvision's unused `classifier.*` keys are dropped; any other missing, extra
    or mis-shaped key is a CheckpointError. No paths -> LPIPSUnavailable: LPIPS is never computed without them.
    """
    state = _merged_weights(paths, "LPIPS", "--lpips-weights", LPIPS_WEIGHTS_HELP)
    return build(lambda _: LPIPS(), None, state, device=device)


def _merged_weights(paths: str | os.PathLike | Sequence[str | os.PathLike] | None, metric: str, flag: str,
                    help_text: str) -> dict[str, Tensor]:
    """The float32 tensors of one or more weight files, merged; the backbone's ImageNet `classifier.*` keys
    (AlexNet's, VGG's: not part of the metric) dropped; a key in two files is a CheckpointError; no paths ->
    LPIPSUnavailable (a learned metric is never computed with random weights)."""
    if not paths:
        raise LPIPSUnavailable(f"{metric} is unavailable: no weights given (e.g. {flag} PATH). "
                               + help_text + ". It is never computed with random weights.")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    state: dict[str, Tensor] = {}
    for path in paths:
        for key, value in read_state_dict(path).items():
            if key.startswith("classifier."):
                continue
            if key in state:
                raise CheckpointError(f"{path}: key {key} is also in an earlier {metric} weight file")
            state[key] = value.float()
    return state


# ================================================================================================ the authors'

# The paper authors' PSNR and SSIM (protocol.py): on float RGB in [0, 1] (no 8-bit rounding), SSIM as
# scikit-image's default structural_similarity(target, pred, data_range=1, channel_axis=-1): a 7 x 7 uniform
# window, SAMPLE covariances (N / (N - 1), N = 49), K1 = 0.01, K2 = 0.03, the map cropped 3 pixels at every
# edge (which is exactly the valid part of the filtering), averaged over the map, then over the channels.
PAPER_SSIM_WINDOW = 7


def _float_frames(pred: Tensor, target: Tensor, video: bool | None, min_size: int = 1) -> tuple[Tensor, Tensor]:
    pred, target = _frames(pred, target, video)
    if min(pred.shape[-2:]) < min_size:
        raise ValueError(f"need frames of at least {min_size} x {min_size} pixels, got {list(pred.shape[-2:])}")
    return pred.detach().double(), target.detach().double()


def paper_psnr(pred: Tensor, target: Tensor, video: bool | None = None) -> float:
    """The authors' PSNR: 10 log10(1 / MSE) on float RGB in [0, 1], mean over images/frames (inf if equal)."""
    pred, target = _float_frames(pred, target, video)
    scores = []
    for p, t in zip(pred, target):
        mse = (p - t).square().mean().item()
        scores.append(math.inf if mse == 0 else 10 * math.log10(1 / mse))
    return sum(scores) / len(scores)


def _box_valid(x: Tensor, size: int) -> Tensor:
    """Mean over size x size windows of x [..., h, w] without padding -> [..., h - size + 1, w - size + 1]."""
    height, width = x.shape[-2:]
    x = sum(x[..., k:width - size + 1 + k] for k in range(size)) / size
    return sum(x[..., k:height - size + 1 + k, :] for k in range(size)) / size


def paper_ssim(pred: Tensor, target: Tensor, video: bool | None = None) -> float:
    """The authors' SSIM (scikit-image's default on float RGB, data range 1): mean over images/frames."""
    size = PAPER_SSIM_WINDOW
    pred, target = _float_frames(pred, target, video, min_size=size)
    norm = size * size / (size * size - 1)  # sample covariance
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    scores = []
    for x, y in zip(pred, target):
        mu_x, mu_y, xx, yy, xy = _box_valid(torch.stack([x, y, x * x, y * y, x * y]), size).unbind(0)
        var_x, var_y, cov = norm * (xx - mu_x**2), norm * (yy - mu_y**2), norm * (xy - mu_x * mu_y)
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        scores.append(ssim_map.mean(dim=(1, 2)).mean().item())
    return sum(scores) / len(scores)


# ================================================================================================ DISTS

# DISTS (Ding et al. 2020): VGG16 features with its max-pools replaced by L2 pooling; at the image and after
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision `features` indices below), per channel,
#   structure S1 = (2 mu_x mu_y + c) / (mu_x^2 + mu_y^2 + c),  texture S2 = (2 cov_xy + c) / (var_x + var_y + c)
# (spatial means, population variances, c = 1e-6), and
#   DISTS = 1 - sum_channels (alpha S1 + beta S2),  alpha, beta >= 0 learned, divided by their joint sum.
DISTS_TAPS = (3, 8, 15, 22, 29)
DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)
DISTS_MEAN, DISTS_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation into VGG
DISTS_C = 1e-6
DISTS_WEIGHTS_HELP = (
    "DISTS needs real weights: the VGG16 features (torchvision's vgg16-397923af.pth, keys "
    "features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}) and DISTS's alpha and beta ([1, 1475, 1, 1] "
    "each, the DISTS_pytorch package's weights.pt), as those two files or one holding both"
)


class L2Pool(nn.Module):
    """DISTS's replacement for max-pooling: sqrt(hanning-3x3 blur of x^2, stride 2, padding 1) per channel."""

    def forward(self, x: Tensor) -> Tensor:
        taps = torch.tensor([0.5, 1.0, 0.5], dtype=x.dtype, device=x.device)
        kernel = (taps[:, None] * taps[None, :]) / 4  # normalised: sums to 1
        kernel = kernel.expand(x.shape[1], 1, 3, 3)
        return (F.conv2d(x.square(), kernel, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS with attribute names = the checkpoint keys (DISTS_WEIGHTS_HELP); meta parameters until loaded, so it
    never scores with random weights (`load_dists`)."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        with torch.device("meta"):
            for block in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
                if layers:
                    layers.append(L2Pool())  # where VGG16 max-pools: features 4, 9, 16, 23
                for out in block:
                    layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
                    width = out
            self.features = nn.Sequential(*layers)
            self.alpha = nn.Parameter(torch.empty(1, sum(DISTS_CHANNELS), 1, 1))
            self.beta = nn.Parameter(torch.empty(1, sum(DISTS_CHANNELS), 1, 1))

    def taps(self, x: Tensor) -> list[Tensor]:
        """x [B, 3, H, W] in [0, 1] -> [x, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
        mean = torch.tensor(DISTS_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(DISTS_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out, h = [x], (x - mean) / std
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in DISTS_TAPS:
                out.append(h)
        return out

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target [B, 3, H, W] in [0, 1] -> distances [B]."""
        if self.alpha.is_meta:
            raise LPIPSUnavailable("this DISTS has no weights loaded; use load_dists(paths). " + DISTS_WEIGHTS_HELP)
        if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
            raise ValueError(f"DISTS expects pred and target [B, 3, H, W] of one shape, got "
                             f"{describe(pred)} and {describe(target)}")
        total = self.alpha.sum() + self.beta.sum()
        alphas = (self.alpha / total).split(DISTS_CHANNELS, dim=1)
        betas = (self.beta / total).split(DISTS_CHANNELS, dim=1)
        both = self.taps(torch.cat([pred, target]).to(self.alpha))
        similarity = 0
        for f, alpha, beta in zip(both, alphas, betas):
            x, y = f.chunk(2)
            mu_x, mu_y = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
            var_x, var_y = (x - mu_x).square().mean(dim=(2, 3), keepdim=True), (y - mu_y).square().mean(dim=(2, 3), keepdim=True)
            cov = (x * y).mean(dim=(2, 3), keepdim=True) - mu_x * mu_y
            s1 = (2 * mu_x * mu_y + DISTS_C) / (mu_x**2 + mu_y**2 + DISTS_C)
            s2 = (2 * cov + DISTS_C) / (var_x + var_y + DISTS_C)
            similarity = similarity + (alpha * s1 + beta * s2).sum(dim=(1, 2, 3))
        return 1 - similarity

    @torch.no_grad()
    def score(self, pred: Tensor, target: Tensor, video: bool | None = None) -> float:
        """Mean DISTS over images/frames (inputs clamped to [0, 1])."""
        pred, target = _frames(pred, target, video)
        scores = [self(p[None].float().clamp(0, 1), t[None].float().clamp(0, 1)).item() for p, t in zip(pred, target)]
        return sum(scores) / len(scores)


def load_dists(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None, device: torch.device | str = "cpu"
) -> DISTS:
    """A DISTS with real weights read from `paths` (DISTS_WEIGHTS_HELP's key sets, in one or more files); the
    same rules as `load_lpips` (no paths: LPIPSUnavailable; a wrong key set: CheckpointError)."""
    state = _merged_weights(paths, "DISTS", "--dists-weights", DISTS_WEIGHTS_HELP)
    return build(lambda _: DISTS(), None, state, device=device)


# ================================================================================================ no-reference


def no_reference(names: Sequence[str], device: torch.device | str = "cpu") -> dict[str, Callable[[Tensor], float]]:
    """The paper's no-reference metrics (e.g. "clipiqa+", "musiq") through the optional package pyiqa, never a
    runtime requirement: ValueError when it is not installed. {name: score(x)} with x an image [3, H, W] or a
    video [3, F, H, W] in [0, 1] (the mean over frames). pyiqa fetches its own weights."""
    try:
        import pyiqa  # optional: only for these metrics
    except ImportError:
        raise ValueError("no-reference metrics need the optional package pyiqa (pip install pyiqa), which is not "
                         "installed") from None

    def scorer(model):
        def score(x: Tensor) -> float:
            frames = x[None] if x.ndim == 3 else x.transpose(0, 1)
            with torch.no_grad():
                return sum(float(model(f[None].clamp(0, 1).to(device))) for f in frames) / len(frames)
        return score

    return {name: scorer(pyiqa.create_metric(name, device=device)) for name in names}


# ================================================================================================ tables


def summarise(rows: Iterable[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Per-dataset means: rows {"dataset": str, "psnr": float, "ssim": float, ...} ->
    {dataset: {"count": n, "psnr": mean, "ssim": mean, ...}} in order of first appearance.

    Every numeric (int/float, not bool) field other than "dataset" is a metric; other fields (paths,
    degradation names) are ignored. All rows of one dataset must carry the same metrics. An inf PSNR
    (an identical pair) makes its dataset's mean inf.
    """
    groups: dict[str, list[Mapping[str, object]]] = {}
    for row in rows:
        if not isinstance(row.get("dataset"), str):
            raise ValueError(f"every row needs a string 'dataset', got {row!r}")
        groups.setdefault(row["dataset"], []).append(row)
    summary = {}
    for dataset, group in groups.items():
        names = [k for k, v in group[0].items() if k != "dataset" and _is_number(v)]
        for row in group:
            found = [k for k, v in row.items() if k != "dataset" and _is_number(v)]
            if set(found) != set(names):
                raise ValueError(f"dataset {dataset!r}: rows carry different metrics ({names} vs {found})")
        summary[dataset] = {"count": len(group)}
        summary[dataset].update({name: sum(float(row[name]) for row in group) / len(group) for name in names})
    return summary


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def markdown_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table of `summarise`'s output: one row per dataset, columns count then each metric in order of
    first appearance; PSNRs (any column named *psnr*) with 2 decimals, other metrics with 4; "-" where a dataset
    lacks a metric."""
    metrics = list(dict.fromkeys(k for values in summary.values() for k in values if k != "count"))
    lines = ["| dataset | count | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for dataset, values in summary.items():
        cells = [f"{values[m]:.{2 if 'psnr' in m else 4}f}" if m in values else "-" for m in metrics]
        lines.append(f"| {dataset} | {int(values['count'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
