"""The paper authors' inference and evaluation protocol, as an option beside this project's ("ours").

A line-by-line audit of the authors' public inference code found the method itself equal to ours (prompt
injection, empty-prompt context, T0 / t_min / steps, the sampler algebra, no clamping, averaged prompts); what
differs is the protocol around it. `PROTOCOLS` is the one table of those differences; sample.py's `--protocol
paper` sets every row, and each row is also its own flag:

    part            ours (default)                      paper
    size            native size (padded to 16, cropped)  resized to PAPER_SIZE[kind] (PIL bicubic, aspect not
                                                          kept), the output stays that size
    frames          all, in overlapping 4k+1 chunks       the first min(n, 33) frames, one pass (4k+1 kept)
    timesteps       continuous t fed to the DiT          t rounded to the nearest scheduler time (see below)
    dtype           bfloat16 GPU / float32 CPU           float16 DiT under autocast, VAE float32
    VAE encode      posterior mean                       latent_dist.sample(), generator seeded 123
    start noise     seed (video chunk i: mix_seed)        one generator seeded 42 on every call
    evaluation      8-bit PSNR/SSIM (11x11 Gaussian)     beside ours: float PSNR, SSIM as scikit-image's
                                                          default, at 512 x 512 (bicubic, no antialias)
    manifests       paths relative to the manifest,      paths relative to the working directory,
                    degradation required, equal sizes    degradation optional, size mismatches resized

Rounded timesteps. The bridge's algebra keeps the continuous t (bridge.py is unchanged); only the time the DiT
sees is rounded, through `rounded_velocity`. The grids, with 1000 training steps and no shift (shift 1.0):

    FLUX  (flow-matching Euler): sigmas k / 1000, k = 1..1000; the nearest one, cast to float16
          (the DiT multiplies by 1000: t = 0.4 -> 399.90, 0.3790 -> 378.91, ..., 1e-4 -> 1.0)
    Wan   (UniPC, flow sigmas):  sigmas 0.999 k / 1000, k = 1..1000 (1 - linspace(1, 1/1000, 1001), last dropped);
          the nearest one, times 1000, truncated to an integer (399, 378, ..., 20, 0), fed as integer / 1000
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import bridge

TRAIN_STEPS = 1000  # the schedulers' num_train_timesteps
PAPER_SIZE = {"flux": (1024, 1024), "wan": (480, 832)}  # (H, W) every input is resized to
PAPER_FRAMES = 33  # the first min(n, 33) frames, restored in one pass
PAPER_SEED = 42  # start noise: one generator seeded 42 on every call
PAPER_VAE_SEED = 123  # latent_dist.sample()'s generator
PAPER_DTYPE = "float16"  # DiT and text encoders under autocast; the VAE stays float32
EVAL_SIZE = 512  # their metrics: pred and target resized to 512 x 512 (bicubic without antialias, clamped)


@dataclass(frozen=True)
class Protocol:
    """One protocol: every part that differs between ours and the authors' (the module docstring's table)."""

    size_policy: str  # "native" | "paper": PAPER_SIZE[kind]
    first_frames: int | None  # videos: only the first min(n, first_frames) frames, one pass (None: all)
    timesteps: str  # "continuous" | "scheduler": rounded to the nearest scheduler time
    dtype: str | None  # the DiT's dtype (None: runtime.default_dtype's choice); "float16" also autocasts
    vae_sample_seed: int | None  # None: the posterior mean; else latent_dist.sample() seeded so
    fixed_noise_seed: int | None  # None: --seed (video chunk i: defaults.mix_seed); else this seed every call
    eval_paper_metrics: bool  # also their PSNR / SSIM at EVAL_SIZE
    manifest_paths: str  # "manifest" (relative to the manifest's folder) | "cwd" (to the working directory)
    lenient_manifests: bool  # degradation optional; a degraded/target size mismatch resized to the target


PROTOCOLS = {
    "ours": Protocol("native", None, "continuous", None, None, None, False, "manifest", False),
    "paper": Protocol("paper", PAPER_FRAMES, "scheduler", PAPER_DTYPE, PAPER_VAE_SEED, PAPER_SEED, True, "cwd",
                      True),
}

# ---------------------------------------------------------------------------------------------- timesteps


def flux_sigmas() -> Tensor:
    """FLUX's flow-matching Euler grid at shift 1: k / 1000 for k = 1000 .. 1 [1000], float64."""
    return torch.arange(TRAIN_STEPS, 0, -1, dtype=torch.float64) / TRAIN_STEPS


def wan_sigmas() -> Tensor:
    """Wan's UniPC flow grid at shift 1 over all 1000 steps: 1 - linspace(1, 1/1000, 1001), flipped, the
    final 0 dropped -> 0.999 k / 1000 for k = 1000 .. 1 [1000], float64."""
    alphas = torch.linspace(1, 1 / TRAIN_STEPS, TRAIN_STEPS + 1, dtype=torch.float64)
    return (1 - alphas).flip(0)[:-1]


def _nearest(grid: Tensor, t: Tensor) -> Tensor:
    """The grid value nearest to each t [B] (ties: the larger grid value, the first in the descending grid)."""
    index = (grid[None, :] - t.double()[:, None]).abs().argmin(dim=1)
    return grid[index.cpu()].to(t.device)


def scheduler_time(kind: str, t: Tensor) -> Tensor:
    """The time the authors feed the DiT for continuous t [B] in [0, 1], as float32 t [B] (the DiT's x1000
    then gives FLUX 399.90, Wan 399 for t = 0.4)."""
    if kind == "flux":
        return _nearest(flux_sigmas(), t).to(torch.float16).float()
    if kind == "wan":
        return torch.floor(_nearest(wan_sigmas(), t) * TRAIN_STEPS).float() / TRAIN_STEPS
    raise ValueError(f"no scheduler grid for backbone kind {kind!r}")


def rounded_velocity(velocity: bridge.VelocityFn, kind: str) -> bridge.VelocityFn:
    """`velocity` seeing t rounded to the scheduler's grid (`scheduler_time`); the caller's t is unchanged."""
    return lambda x, t: velocity(x, scheduler_time(kind, t))


def autocast_velocity(velocity: bridge.VelocityFn, dtype: torch.dtype) -> bridge.VelocityFn:
    """`velocity` run under torch.autocast(dtype) on its input's device; the result back in float32."""

    def autocast(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=dtype):
            return velocity(x, t).float()

    return autocast


# ---------------------------------------------------------------------------------------------- sizes


def resize_like_pil(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """pixels [3, H, W] or a video [3, F, H, W] in [0, 1] -> [..., size[0], size[1]]: each image rounded to
    8 bits and resized by PIL's bicubic filter (antialiased when shrinking), as the authors' loader does to the
    files it reads; the aspect ratio is not kept. A frame already of that size comes back unchanged (8-bit)."""
    height, width = size
    frames = pixels[:, None] if pixels.ndim == 3 else pixels
    out = []
    for i in range(frames.shape[1]):
        levels = frames[:, i].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        resized = np.asarray(Image.fromarray(levels).resize((width, height), Image.Resampling.BICUBIC))
        out.append(torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255)
    stacked = torch.stack(out, dim=1)
    return stacked[:, 0] if pixels.ndim == 3 else stacked


def eval_resize(pixels: Tensor, size: int = EVAL_SIZE) -> Tensor:
    """Their metric resize: [..., H, W] -> [..., size, size], bicubic WITHOUT antialias, clamped to [0, 1]."""
    height, width = pixels.shape[-2:]
    planes = pixels.reshape(1, -1, height, width).float()
    resized = torch.nn.functional.interpolate(planes, size=(size, size), mode="bicubic", align_corners=False)
    return resized.clamp(0, 1).reshape(*pixels.shape[:-2], size, size)
