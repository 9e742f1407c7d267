"""Overlapping tiles with linear cross-fades: bounded memory for big images and long videos.

Used by the FLUX autoencoder (`encode`/`decode` with `tile=`), by restore.py for the transformer's velocity on
large latents, and (in one dimension, over frames: `blend_chunks`) for long videos restored in overlapping
chunks. Sizes are in
"units" (e.g. latent pixels or frames); where two neighbours overlap by exactly `overlap` their ramps add to 1,
and the blended result is always normalised by the summed weights, so there is no seam and nothing is lost at
the borders.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by at least `overlap`.

    The fewest tiles that achieve this, spread evenly; a single tile (of size `length`) if one is enough.
    """
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [i * (length - tile) // (count - 1) for i in range(count)]


def blend_window(start: int, size: int, length: int, overlap: int, scale: int, device: torch.device) -> Tensor:
    """1-D weights for one tile's output, [size * scale]: 1 inside, ramping linearly to 0 over `overlap` at each
    edge that borders another tile (not at the image border). Positions are in tile units; `scale` output
    pixels per unit. Where two tiles overlap by exactly `overlap`, their ramps add up to 1."""
    pos = (torch.arange(size * scale, device=device, dtype=torch.float32) + 0.5) / scale  # pixel centres
    rise = (pos / overlap).clamp(max=1.0) if start > 0 else torch.ones_like(pos)
    fall = ((size - pos) / overlap).clamp(max=1.0) if start + size < length else torch.ones_like(pos)
    return torch.minimum(rise, fall)


def in_units(tile: int, overlap: int, factor: int) -> tuple[int, int]:
    """Tile and overlap in pixels -> in latent pixels of a VAE that downsamples by `factor` (checked)."""
    if tile % factor or overlap % factor or not (factor <= overlap <= tile // 2):
        raise ValueError(f"tile and overlap must be multiples of {factor} with {factor} <= overlap <= tile / 2; "
                         f"got tile={tile}, overlap={overlap}")
    return tile // factor, overlap // factor


def run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, in_scale: int, out_scale: int
) -> Tensor:
    """Apply a fully convolutional `fn` to overlapping spatial tiles of x [..., H, W] and blend the outputs.

    x is an image batch [B, C, H, W] or a video batch [B, C, F, H, W]: only the last two axes are tiled, and fn
    may change the others (a video VAE maps F frames to (F - 1) / 4 + 1 latent frames, each tile with its own
    causal cache). Sizes are in "units" (latent pixels): x has `in_scale` pixels per unit and fn(x) `out_scale`,
    so the encoder runs with (in_scale=f, out_scale=1) and the decoder with (1, f). Tiles are `tile` units square
    (cropped to the image), neighbours overlap by >= `overlap` units. Each tile's output is weighted by
    `blend_window` in both directions and the weighted sum is divided by the summed weights, so
    overlaps cross-fade linearly with no visible seam. With a single tile this is exactly fn(x).

    The result is close to, not equal to, fn(x): GroupNorm statistics and attention are per tile.
    Memory: one tile's activations plus the float32 output accumulators.
    """
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    out = weight_sum = None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            rows, cols = min(tile, height), min(tile, width)
            crop = x[..., top * in_scale : (top + rows) * in_scale, left * in_scale : (left + cols) * in_scale]
            y = fn(crop)
            if out is None:
                shape = (*y.shape[:-2], height * out_scale, width * out_scale)
                out = torch.zeros(shape, device=y.device, dtype=torch.float32)
                weight_sum = torch.zeros(shape[-2:], device=y.device, dtype=torch.float32)
            w = torch.outer(
                blend_window(top, rows, height, overlap, out_scale, y.device),
                blend_window(left, cols, width, overlap, out_scale, y.device),
            )
            region = (
                slice(top * out_scale, (top + rows) * out_scale),
                slice(left * out_scale, (left + cols) * out_scale),
            )
            out[(..., *region)] += y.float() * w
            weight_sum[region] += w
    return (out / weight_sum).to(x.dtype)


def blend_chunks(chunks: dict[int, Tensor], starts: list[int], length: int, overlap: int) -> Tensor:
    """Chunks [C, length, H, W] starting at frames `starts` -> one video [C, F, H, W], cross-faded linearly over
    each overlap (weights normalised, so frames covered by one chunk are that chunk's exactly)."""
    frames = starts[-1] + length
    out = torch.zeros(chunks[0].shape[0], frames, *chunks[0].shape[2:])
    weight = torch.zeros(frames)
    overlap = max(1, min(overlap, length - 1))
    for index, start in enumerate(starts):
        w = blend_window(start, length, frames, overlap, 1, torch.device("cpu"))
        out[:, start : start + length] += chunks[index] * w[None, :, None, None]
        weight[start : start + length] += w
    return out / weight[None, :, None, None]
