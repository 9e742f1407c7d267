"""Training and evaluation data: synthetic degradations and paired (clean, degraded) datasets.

Conventions (media.py reads and writes the files):

- an image is a float32 tensor [3, H, W] with values in [0, 1] (RGB);
- a video is a float32 tensor [3, F, H, W] in [0, 1]: channels first, frames second;
- every random choice is drawn from an explicit `torch.Generator` argument, never from the global RNG, so a
  crop or a degradation is a pure function of (inputs, generator state).

Sections: degradations (`DEGRADATIONS`), datasets (`PairedFolders`, `Manifest`, `Synthetic`), each with
`pair(index, generator) -> (clean, degraded)`, and the tiny preset's toy data (`toy_images`, `toy_videos`).

    clean = media.read_image("photo.png")                      # [3, H, W]
    hazy = DEGRADATIONS["haze"](clean, torch.Generator().manual_seed(0))
    pairs = PairedFolders("data/rain", size=512)               # root/clean/*.png and root/degraded/*.png
    clean, degraded = pairs.pair(0, torch.Generator().manual_seed(0))  # two [3, 512, 512] crops
"""

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import defaults
import manifests
import media
from media import describe, hw_text

# ========================================================================================== degradations
#
# Each degradation is f(x, generator) -> float32 tensor of x's shape in [0, 1], for an image [3, H, W] or a video
# [3, F, H, W]. Parameters are drawn once per call from the ranges in the docstrings, so every frame of a clip
# gets the same degradation; per-pixel randomness (noise, rain drops) is fresh for every frame. Sizes are in
# pixels of the tensor given, independent of its size. Random numbers are drawn on the generator's device.


def _frames_of(x: Tensor) -> Tensor:
    """Image [3, H, W] -> [1, 3, H, W]; video [3, F, H, W] -> [F, 3, H, W] (frames as a batch)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4) or x.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W] or a video [3, F, H, W] (float), got {describe(x)}")
    return x.float().unsqueeze(0) if x.ndim == 3 else x.float().transpose(0, 1)


def _like(frames: Tensor, x: Tensor) -> Tensor:
    """Inverse of `_frames_of`, clamped to [0, 1]."""
    frames = frames.clamp(0, 1)
    return frames.squeeze(0) if x.ndim == 3 else frames.transpose(0, 1).contiguous()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _rand(generator: torch.Generator, *shape: int, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def _randn(generator: torch.Generator, *shape: int, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device)


def _gaussian_kernel(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian [2r + 1], r = ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _filter(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter every channel of x [N, C, H, W] with a 2-D kernel [kh, kw] (odd sizes), edges replicated."""
    channels, (kh, kw) = x.shape[1], kernel.shape
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    weight = kernel.to(x).expand(channels, 1, kh, kw)
    return F.conv2d(x, weight, groups=channels)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of x [N, C, H, W]: a row pass then a column pass."""
    kernel = _gaussian_kernel(sigma)
    return _filter(_filter(x, kernel[None, :]), kernel[:, None])


def _line_kernel(length: float, angle: float) -> Tensor:
    """A normalised 2-D kernel holding an anti-aliased line segment of `length` pixels through its centre at
    `angle` degrees (counter-clockwise from the +x axis): the blur of a straight, uniform motion."""
    size = 2 * math.ceil(length / 2) + 1
    centre = size // 2
    t = torch.linspace(-length / 2, length / 2, 8 * size)
    cols = centre + t * math.cos(math.radians(angle))
    rows = centre - t * math.sin(math.radians(angle))  # image rows grow downwards
    kernel = torch.zeros(size + 1, size + 1)
    r0, c0 = rows.floor().long(), cols.floor().long()
    fr, fc = rows - r0, cols - c0
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        kernel.index_put_((r0 + dr, c0 + dc), weight, accumulate=True)  # bilinear splat of the line's points
    kernel = kernel[:size, :size]
    return kernel / kernel.sum()


def _smooth_field(generator: torch.Generator, height: int, width: int, cells: int, like: Tensor) -> Tensor:
    """A smooth random field [1, 1, H, W] in [0, 1]: a cells x cells Gaussian grid, bilinearly upsampled."""
    grid = _randn(generator, 1, 1, cells, cells, like=like)
    field = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)
    return (field - field.min()) / (field.max() - field.min())


def gaussian_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    """Additive white Gaussian noise, sigma ~ U[15/255, 50/255] (the usual denoising levels 15..50)."""
    frames = _frames_of(x)
    sigma = _uniform(generator, 15 / 255, 50 / 255)
    return _like(frames + sigma * _randn(generator, *frames.shape, like=frames), x)


def gaussian_blur(x: Tensor, generator: torch.Generator) -> Tensor:
    """Isotropic Gaussian blur, sigma ~ U[1, 3] pixels (separable, edges replicated)."""
    frames = _frames_of(x)
    return _like(_gaussian_blur(frames, _uniform(generator, 1.0, 3.0)), x)


def motion_blur(x: Tensor, generator: torch.Generator) -> Tensor:
    """Linear motion blur: a line kernel of length ~ U[7, 25] pixels at angle ~ U[0, 180) degrees."""
    frames = _frames_of(x)
    length, angle = _uniform(generator, 7, 25), _uniform(generator, 0, 180)
    return _like(_filter(frames, _line_kernel(length, angle)), x)


def haze(x: Tensor, generator: torch.Generator) -> Tensor:
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d).

    Depth proxy d in [0, 1]: 0.6 * a vertical ramp (far = 1 at the top row, near = 0 at the bottom, like a
    landscape) + 0.4 * a smooth random field (4 x 4 grid, bilinear), rescaled to [0, 1]. beta ~ U[1, 2.5]
    (transmission down to exp(-2.5) = 0.08 at the farthest point); airlight A ~ U[0.75, 0.95], gray with a
    per-channel tint ~ U[-0.03, 0.03]. A video shares one depth map (a static scene).
    """
    frames = _frames_of(x)
    height, width = frames.shape[-2:]
    beta = _uniform(generator, 1.0, 2.5)
    airlight = _uniform(generator, 0.75, 0.95) + (_rand(generator, 3, like=frames) * 0.06 - 0.03)
    ramp = torch.linspace(1, 0, height, device=frames.device)[:, None].expand(height, width)
    depth = 0.6 * ramp + 0.4 * _smooth_field(generator, height, width, 4, like=frames)
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    transmission = torch.exp(-beta * depth)
    return _like(frames * transmission + airlight[:, None, None] * (1 - transmission), x)


def rain(x: Tensor, generator: torch.Generator) -> Tensor:
    """Rain streaks: sparse drops smeared along one slanted direction into thin bright lines, screen-blended.

    Per clip: drop density ~ U[0.002, 0.008] per pixel, streak length ~ U[10, 30] pixels, slant ~ U[-25, 25]
    degrees from vertical, brightness ~ U[0.6, 0.9]; each drop has intensity ~ U[0.5, 1]. Drop positions are
    redrawn for every frame of a video (real rain falls farther than a streak's length between frames).
    Composite: I = 1 - (1 - J)(1 - R).
    """
    frames = _frames_of(x)
    count, _, height, width = frames.shape
    density, length = _uniform(generator, 0.002, 0.008), _uniform(generator, 10, 30)
    slant, brightness = _uniform(generator, -25, 25), _uniform(generator, 0.6, 0.9)
    drops = (_rand(generator, count, 1, height, width, like=frames) < density).float()
    drops = drops * (0.5 + 0.5 * _rand(generator, count, 1, height, width, like=frames))
    kernel = _line_kernel(length, 90 + slant)
    streaks = _filter(drops, kernel / kernel.max())  # each pixel of a streak ~ its drop's intensity
    streaks = (brightness * _gaussian_blur(streaks, 0.5)).clamp(0, 1)  # soften to ~1-2 pixel width
    return _like(1 - (1 - frames) * (1 - streaks), x)


def lowlight(x: Tensor, generator: torch.Generator) -> Tensor:
    """Low light: y = s * x ** gamma plus sensor noise with variance a * y + b ** 2 (shot + read noise).

    gamma ~ U[1.5, 2.5], s ~ U[0.15, 0.4], a ~ U[5e-4, 5e-3], b ~ U[0.005, 0.02].
    """
    frames = _frames_of(x)
    gamma, scale = _uniform(generator, 1.5, 2.5), _uniform(generator, 0.15, 0.4)
    shot, read = _uniform(generator, 5e-4, 5e-3), _uniform(generator, 0.005, 0.02)
    dark = scale * frames.clamp(0, 1) ** gamma
    noise = torch.sqrt(shot * dark + read ** 2) * _randn(generator, *frames.shape, like=frames)
    return _like(dark + noise, x)


def snow(x: Tensor, generator: torch.Generator) -> Tensor:
    """Snow: a whitish veil plus soft bright flakes in three layers of growing size.

    Per clip: veil strength v ~ U[0.05, 0.2] towards white 0.9; layer k in (0, 1, 2) has flake radius
    (Gaussian sigma) (0.7, 1.4, 2.5)[k] * U[0.8, 1.2] pixels and density U[0.002, 0.006] / 2**k per pixel,
    each flake with opacity ~ U[0.6, 1]. In a video the flakes of a layer keep their places and drift down by
    (k + 1) * U[0.5, 1.5] pixels and sideways by U[-0.5, 0.5] pixels per frame (wrapping at the borders):
    bigger flakes are nearer and move faster.
    Composite: I = (J (1 - v) + 0.9 v)(1 - m) + m, m = the flake opacity map.
    """
    frames = _frames_of(x)
    count, _, height, width = frames.shape
    veil = _uniform(generator, 0.05, 0.2)
    base_density = _uniform(generator, 0.002, 0.006)
    mask = torch.zeros(count, 1, height, width, device=frames.device)
    for layer, base_sigma in enumerate((0.7, 1.4, 2.5)):
        sigma = base_sigma * _uniform(generator, 0.8, 1.2)
        fall, drift = (layer + 1) * _uniform(generator, 0.5, 1.5), _uniform(generator, -0.5, 0.5)
        flakes = (_rand(generator, 1, 1, height, width, like=frames) < base_density / 2 ** layer).float()
        flakes = flakes * (0.6 + 0.4 * _rand(generator, 1, 1, height, width, like=frames))
        moved = torch.cat([flakes.roll((round(fall * f), round(drift * f)), dims=(2, 3)) for f in range(count)])
        peak = _gaussian_kernel(sigma).max() ** 2  # a single blurred flake then peaks at its opacity
        mask = torch.maximum(mask, (_gaussian_blur(moved, sigma) / peak).clamp(0, 1))
    veiled = frames * (1 - veil) + 0.9 * veil
    return _like(veiled * (1 - mask) + mask, x)


def jpeg(x: Tensor, generator: torch.Generator) -> Tensor:
    """JPEG compression artefacts: quality ~ integer U{10, ..., 40}, through Pillow in memory, frame by frame
    (one quality for a whole clip). Pixels are rounded to 8 bits first."""
    frames = _frames_of(x)
    quality = int(torch.randint(10, 41, (), generator=generator, device=generator.device))
    out = []
    for frame in frames:
        buffer = io.BytesIO()
        pixels = frame.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1).float().div(255))
    return _like(torch.stack(out).to(frames.device), x)


DEGRADATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "motion-blur": motion_blur,
    "haze": haze,
    "rain": rain,
    "lowlight": lowlight,
    "snow": snow,
    "jpeg": jpeg,
}
ORDER = ("haze", "snow", "rain", "motion-blur", "blur", "lowlight", "noise", "jpeg")  # physical order of a mixture


def combined(names: Sequence[str]) -> str:
    """The name of several degradations applied together, in physical order (`ORDER`: the scene's haze, snow
    and rain first, then the lens's blur, the exposure and the sensor's noise): ["lowlight", "haze"] ->
    "haze+lowlight"."""
    unknown = [n for n in names if n not in DEGRADATIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"unknown degradation {unknown[0]!r}; choose from {sorted(DEGRADATIONS)}" if unknown else
                         f"need distinct degradation names, got {list(names)}")
    return "+".join(sorted(names, key=ORDER.index))


def degrade(x: Tensor, name: str, generator: torch.Generator) -> Tensor:
    """x [3, H, W] or [3, F, H, W] degraded by `name`: one of DEGRADATIONS, or several joined by "+" (each applied
    in `ORDER` and clamped to [0, 1], drawing from `generator` in turn)."""
    for part in combined(name.split("+")).split("+"):
        x = DEGRADATIONS[part](x, generator).clamp(0, 1)
    return x

# ============================================================================================== datasets
#
# A dataset yields (clean, degraded) pairs at the training size: images [3, h, w], videos [3, frames, h, w].
# `pair(index, generator)` draws, in this order, the clip's start frame (videos), the crop's top-left corner,
# and (Synthetic only) the degradation's parameters, all from `generator`. Nothing is ever resized: a source
# smaller than the crop raises ValueError. `size=None` returns whole images/frames (e.g. for evaluation).


def _check_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    return height, width


def _check_frames(frames: int | None) -> int | None:
    if frames is not None and not defaults.is_clip_length(frames):
        raise ValueError(f"frames must be 4k+1 (1, 5, 9, ..., 33, ...) for the video VAE, got {frames}")
    return frames


def _random_int(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator, device=generator.device))


def _crop(tensors: Sequence[Tensor], size: tuple[int, int] | None, generator: torch.Generator,
          names: Sequence[str]) -> list[Tensor]:
    """One random crop [.., h, w] at the same place in each tensor [..., H, W]; they must have one size."""
    height, width = tensors[0].shape[-2:]
    for tensor, name in zip(tensors, names):
        if tensor.shape[-2:] != tensors[0].shape[-2:]:
            raise ValueError(f"pair of different sizes: {names[0]} is {hw_text(tensors[0])} but {name} is "
                             f"{hw_text(tensor)}")
    if size is None:
        return list(tensors)
    if height < size[0] or width < size[1]:
        raise ValueError(f"{names[0]}: {hw_text(tensors[0])} is smaller than the crop {size[0]}x{size[1]} (HxW); "
                         f"use a smaller size or larger sources (nothing is resized)")
    top, left = _random_int(generator, height - size[0]), _random_int(generator, width - size[1])
    return [tensor[..., top:top + size[0], left:left + size[1]].contiguous() for tensor in tensors]


def _clip_length(source: Path | list[Path]) -> int:
    return len(source) if isinstance(source, list) else media.video_length(source)


def _random_start(lengths: Sequence[int], frames: int, generator: torch.Generator, names: Sequence[str]) -> int:
    """A random first frame for a `frames`-long clip taken at the same place from videos of equal length."""
    for length, name in zip(lengths, names):
        if length != lengths[0]:
            raise ValueError(f"pair of different lengths: {names[0]} has {lengths[0]} frames but {name} has {length}")
    if lengths[0] < frames:
        raise ValueError(f"{names[0]}: {lengths[0]} frames, shorter than the clip of {frames} frames")
    return _random_int(generator, lengths[0] - frames)


def _describe_source(source: Path | list[Path]) -> str:
    return f"frames {source[0]} ... ({len(source)} files)" if isinstance(source, list) else str(source)


def _read_pair(clean: Path | list[Path], degraded: Path | list[Path], size: tuple[int, int] | None,
               frames: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Read a (clean, degraded) pair of images (frames None) or video clips and crop both at one place."""
    names = [_describe_source(clean), _describe_source(degraded)]
    if frames is None:
        images = [media.read_image(clean), media.read_image(degraded)]
        clean_image, degraded_image = _crop(images, size, generator, names)
        return clean_image, degraded_image
    start = _random_start([_clip_length(clean), _clip_length(degraded)], frames, generator, names)
    clips = [media.read_clip(clean, start, frames), media.read_clip(degraded, start, frames)]
    clean_clip, degraded_clip = _crop(clips, size, generator, names)
    return clean_clip, degraded_clip


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} pairs")


class PairedFolders:
    """Pairs stored as `root/degraded/NAME` and `root/clean/NAME`.

    Images (frames None): image files, paired by file name without its suffix (so a degraded `0001.jpg` pairs
    with a clean `0001.png`). Videos (frames = 4k+1): video files paired by name without suffix, or frame
    sub-folders paired by folder name. Unpaired names raise ValueError listing a few of them.
    """

    def __init__(self, root: str | os.PathLike, size: int | tuple[int, int] | None, frames: int | None = None):
        root = Path(root)
        self.size, self.frames = _check_size(size), _check_frames(frames)
        lister = media.list_images if frames is None else media.list_videos
        degraded, clean = (self._by_name(lister(root / side)) for side in ("degraded", "clean"))
        only_degraded, only_clean = sorted(degraded.keys() - clean.keys()), sorted(clean.keys() - degraded.keys())
        if only_degraded or only_clean:
            raise ValueError(f"{root}: unpaired files: in degraded/ only {only_degraded[:5]} "
                             f"({len(only_degraded)} in all), in clean/ only {only_clean[:5]} ({len(only_clean)})")
        self.pairs = [(clean[name], degraded[name]) for name in sorted(clean)]  # (clean, degraded) paths

    @staticmethod
    def _by_name(paths: list[Path]) -> dict[str, Path]:
        named: dict[str, Path] = {}
        for path in paths:
            name = path.name if path.is_dir() else path.stem
            if name in named:
                raise ValueError(f"{path.parent}: two files named {name!r}: {named[name].name}, {path.name}")
            named[name] = path
        return named

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(clean, degraded) crops: [3, h, w] each, or [3, frames, h, w] for videos."""
        _check_index(index, len(self))
        clean, degraded = self.pairs[index]
        return _read_pair(clean, degraded, self.size, self.frames, generator)


@dataclass
class ManifestItem:
    """One manifest entry: paths (a list of frame paths for video), degradation and dataset names."""

    degraded: Path | list[Path]
    clean: Path | list[Path]
    degradation: str
    dataset: str


class Manifest:
    """The paper authors' JSON manifests: a list of {"image_path", "target_path", "degradation", "dataset"}.

    `image_path` is the degraded input, `target_path` the clean target; for video both are lists of frame image
    paths of equal length (`pair` then needs `frames`, 4k+1, the clip length to cut). Relative paths resolve against the manifest's folder,
    or against `relative_to` when given (the authors' own manifests are relative to their working directory).
    `items[i].degradation` and `items[i].dataset` name each pair (evaluation groups by dataset); with
    `lenient` a missing `degradation` (four of the authors' manifests) reads as "unknown".
    """

    def __init__(self, path: str | os.PathLike, size: int | tuple[int, int] | None, frames: int | None = None,
                 relative_to: str | os.PathLike | None = None, lenient: bool = False):
        path = Path(path)
        self.relative_to, self.lenient = relative_to, lenient
        self.size, self.frames = _check_size(size), _check_frames(frames)
        try:
            entries = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read this JSON manifest ({err})") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: a manifest must be a non-empty JSON list of entries")
        self.items = [self._item(entry, i, path) for i, entry in enumerate(entries)]

    def _item(self, entry: object, i: int, path: Path) -> ManifestItem:
        keys = ("image_path", "target_path", "degradation", "dataset")
        required = [key for key in keys if not (self.lenient and key == "degradation")]
        if not isinstance(entry, dict) or any(key not in entry for key in required):
            raise ValueError(f"{path}: entry {i} must be an object with keys {required}, got {entry!r:.200}")
        entry = {"degradation": "unknown", **entry}
        folder = path.parent if self.relative_to is None else Path(self.relative_to)
        if all(isinstance(entry[key], str) for key in keys[:2]):
            degraded, clean = folder / entry["image_path"], folder / entry["target_path"]
        elif all(isinstance(entry[key], list) and entry[key] for key in keys[:2]):
            degraded = [folder / p for p in entry["image_path"]]
            clean = [folder / p for p in entry["target_path"]]
        else:
            raise ValueError(f"{path}: entry {i}: image_path and target_path must both be paths (images) or both "
                             f"non-empty lists of frame paths (videos)")
        return ManifestItem(degraded, clean, str(entry["degradation"]), str(entry["dataset"]))

    def __len__(self) -> int:
        return len(self.items)

    def pair(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(clean, degraded) crops: [3, h, w] each, or [3, frames, h, w] for videos."""
        _check_index(index, len(self))
        item = self.items[index]
        if (self.frames is None) != isinstance(item.degraded, Path):
            kind = "an image" if isinstance(item.degraded, Path) else "a video (lists of frame paths)"
            raise ValueError(f"manifest entry {index} is {kind}, but clips of "
                             f"{'frames=None (images)' if self.frames is None else f'{self.frames} frames'} were asked for")
        return _read_pair(item.clean, item.degraded, self.size, self.frames, generator)


class Synthetic:
    """Clean images or videos degraded on the fly by `DEGRADATIONS[degradation]`.

    `sources`: a folder (its images, its sub-folders' too; for video, its video files and frame sub-folders), or a list whose
    elements are paths (image files; for video, video files or frame folders) or tensors ([3, H, W]; for video
    [3, F, H, W]). The clean source is cropped first (start frame, then corner), then degraded with the same
    generator, so the pair is a pure function of (index, generator state). Several degradations (a list) make a
    mixture, as for an all-in-one prompt: each pair draws one of them uniformly (after the crop) and applies it.
    A name may join several with "+" ("haze+lowlight": both, in physical order; `degrade`).
    """

    def __init__(
        self,
        sources: str | os.PathLike | Sequence[str | os.PathLike | Tensor],
        degradation: str | Sequence[str],
        size: int | tuple[int, int] | None,
        frames: int | None = None,
    ):
        names = [degradation] if isinstance(degradation, str) else list(degradation)
        if not names:
            raise ValueError(f"Synthetic needs a degradation; choose from {sorted(DEGRADATIONS)}")
        for name in names:
            combined(name.split("+"))  # ValueError for an unknown one
        self.degradations = [DEGRADATIONS[name] if name in DEGRADATIONS else  # a single one: unclamped, as ever
                             lambda x, generator, name=name: degrade(x, name, generator) for name in names]
        self.size, self.frames = _check_size(size), _check_frames(frames)
        if isinstance(sources, (str, os.PathLike)):
            sources = media.list_images(sources, recursive=True) if frames is None else media.list_videos(sources)
        if not sources:
            raise ValueError("Synthetic needs at least one clean source")
        self.sources = [self._source(s) for s in sources]

    def _source(self, source: str | os.PathLike | Tensor) -> Path | Tensor:
        if not isinstance(source, Tensor):
            return Path(source)
        ndim, shape = (3, "[3, H, W]") if self.frames is None else (4, "[3, F, H, W]")
        if not source.is_floating_point() or source.ndim != ndim or source.shape[0] != 3:
            raise ValueError(f"Synthetic sources: expected float tensors {shape}, got {describe(source)}")
        return source

    def __len__(self) -> int:
        return len(self.sources)

    def pair(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(clean, degraded): [3, h, w] each, or [3, frames, h, w] for videos."""
        _check_index(index, len(self))
        clean = self._clean(self.sources[index], generator)
        if len(self.degradations) == 1:  # no draw: a single degradation's pairs are as they always were
            return clean, self.degradations[0](clean, generator)
        choice = int(torch.randint(len(self.degradations), (), generator=generator, device=generator.device))
        return clean, self.degradations[choice](clean, generator)

    def _clean(self, source: Path | Tensor, generator: torch.Generator) -> Tensor:
        name = f"source tensor {describe(source)}" if isinstance(source, Tensor) else str(source)
        if self.frames is None:
            image = source if isinstance(source, Tensor) else media.read_image(source)
            return _crop([image], self.size, generator, [name])[0]
        if isinstance(source, Tensor):
            start = _random_start([source.shape[1]], self.frames, generator, [name])
            clip = source[:, start:start + self.frames]
        else:
            start = _random_start([media.video_length(source)], self.frames, generator, [name])
            clip = media.read_clip(source, start, self.frames)
        return _crop([clip], self.size, generator, [name])[0]


# ---------------------------------------------------------------------------------------------- toy data


def toy_images(count: int, height: int, width: int, seed: int = 0) -> list[Tensor]:
    """`count` procedural clean images [3, H, W] for the tiny preset: smooth colour fields with a few sharp-edged
    discs and bars on top, so that noise, blur and the rest visibly degrade them. Deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    like = torch.empty(0)
    images = []
    rows = torch.linspace(0, 1, height)[:, None]
    cols = torch.linspace(0, 1, width)[None, :]
    for _ in range(count):
        image = torch.cat([_smooth_field(generator, height, width, 3, like)[0] for _ in range(3)])
        for _ in range(4):
            colour = _rand(generator, 3, 1, 1, like=like)
            r, c, radius = (_uniform(generator, 0.1, 0.9) for _ in range(3))
            if _uniform(generator, 0, 1) < 0.5:
                mask = (rows - r) ** 2 + (cols - c) ** 2 < (0.25 * radius) ** 2
            else:
                mask = ((rows - r).abs() < 0.05 * radius + 0.02) & ((cols - c).abs() < 0.4 * radius)
            image = torch.where(mask, colour, image)
        images.append(image.clamp(0, 1))
    return images


def toy_videos(count: int, frames: int, height: int, width: int, seed: int = 0) -> list[Tensor]:
    """`count` procedural clean videos [3, F, H, W]: a wider toy image, panned one pixel per frame."""
    videos = []
    for image in toy_images(count, height, width + frames, seed):
        videos.append(torch.stack([image[:, :, f : f + width] for f in range(frames)], dim=1))
    return videos


def toy_dataset(video: bool, degradation: str | Sequence[str], size: tuple[int, int], frames: int | None = None,
                seed: int = 0) -> Synthetic:
    """The tiny preset's training pairs: 8 toy images of 64 x 64 (video: 4 toy videos of 2 x `frames` frames)
    degraded on the fly by `degradation`, or by "noise" when it names none of DEGRADATIONS (e.g. "unnamed")."""
    names = [degradation] if isinstance(degradation, str) else list(degradation)
    chosen = degradation if names and all(name in DEGRADATIONS for name in names) else "noise"
    sources = toy_videos(4, 2 * frames, 64, 64, seed=seed) if video else toy_images(8, 64, 64, seed=seed)
    return Synthetic(sources, chosen, size, frames)


# ========================================================================================== command line


def main(argv: list[str] | None = None) -> None:
    """`python data.py manifest --layout NAME DIR -o test.json`: a test manifest from a dataset's layout."""
    parser = argparse.ArgumentParser(description="Datasets: write a test manifest from a dataset's on-disk layout.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("manifest", help="a JSON manifest from a known layout (manifests.py lists them)",
                               description=manifests.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    make.add_argument("--layout", required=True, choices=list(manifests.LAYOUTS))
    make.add_argument("root", type=Path, help="the dataset's folder")
    make.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write (never overwritten)")
    make.add_argument("--degradation", help="the entries' degradation (default: the layout's; pair: required)")
    make.add_argument("--sigma", type=float, help="noise layouts: Gaussian noise std in 8-bit levels, e.g. 25")
    make.add_argument("--seed", type=int, default=0, help="noise layouts: seed of image i's noise is SEED + i")
    args = parser.parse_args(argv)
    try:
        if args.output.exists():
            raise ValueError(f"{args.output} exists; choose another output file")
        entries = manifests.build(args.layout, args.root, args.output, args.degradation, args.sigma, args.seed)
        manifests.write(entries, args.output)
    except ValueError as err:
        sys.exit(f"data.py: error: {err}")
    datasets = sorted({entry["dataset"] for entry in entries})
    print(f"wrote {args.output}: {len(entries)} pairs ({', '.join(datasets)})")


if __name__ == "__main__":
    main()
