"""The restoration's geometry and the evaluation's numbers, on inputs that really take the padded, tiled and
chunked paths, with exact expectations: a stand-in autoencoder that is an exact, invertible pixel code (8x8
blocks folded into channels) and velocities whose answer is known make every output a pure function of the
padding, the tiles and the chunks, so a shifted, zero-padded, mis-tiled or mis-chunked restoration fails by far
more than the tolerance. The evaluation's figures are recomputed from the files it read and wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import media
import metrics
import restore
from model import tiling

ROOT = Path(__file__).resolve().parents[1]
DOWN = 8


class PixelCode:
    """A stand-in backbone whose "latent" is the pixels with each 8x8 block folded into channels: [B, 3, H, W] ->
    [B, 192, H/8, W/8] (videos [B, 3, F, H, W] frame by frame, no compression in time). Exactly invertible, so
    what the sampler returns is what comes out. Records the last latent it encoded and the tile arguments."""

    def __init__(self):
        self.vae = SimpleNamespace(downscale=DOWN, spatial_factor=DOWN)
        self.spec = None  # no backbone table entry: the options' defaults (no grid shift)
        self.encoded, self.tiles = [], []

    def encode(self, pixels, tile=None):
        self.tiles.append(("encode", tile))
        if pixels.ndim == 5:
            b, c, f, h, w = pixels.shape
            z = F.pixel_unshuffle(pixels.transpose(1, 2).reshape(b * f, c, h, w), DOWN)
            latent = z.reshape(b, f, *z.shape[1:]).transpose(1, 2)
        else:
            latent = F.pixel_unshuffle(pixels, DOWN)
        self.encoded.append(latent)
        return latent.double()

    def decode(self, latent, tile=None):
        self.tiles.append(("decode", tile))
        if latent.ndim == 5:
            b, c, f, h, w = latent.shape
            x = F.pixel_shuffle(latent.transpose(1, 2).reshape(b * f, c, h, w), DOWN)
            return x.reshape(b, f, *x.shape[1:]).transpose(1, 2).float()
        return F.pixel_shuffle(latent, DOWN).float()


def options(**overrides) -> restore.RestoreOptions:
    return restore.RestoreOptions(**{"steps": 4, "tile": 1024, **overrides})


def toward(target_fn, seen=None):
    """The velocity whose clean estimate is target_fn(x) at every step: v = (x - target_fn(x)) / t."""

    def velocity(x, t):
        if seen is not None:
            seen.append(tuple(x.shape[-2:]))
        return (x - target_fn(x)) / t.reshape(-1, *([1] * (x.ndim - 1)))

    return velocity


def pointwise(x):
    return 0.6 * x + 0.1 * torch.sin(3 * x)


# ---------------------------------------------------------------------------------------------- padding


def test_pad_to_16_reflects_at_the_bottom_and_right_only():
    image = torch.rand(3, 40, 57, generator=torch.Generator().manual_seed(0))
    padded = restore.pad_to_16(image)
    rows = list(range(40)) + [38 - k for k in range(8)]  # reflection without repeating the edge row
    cols = list(range(57)) + [55 - k for k in range(7)]
    assert torch.equal(padded, image[:, rows][:, :, cols])
    assert restore.pad_to_16(torch.zeros(3, 32, 48)).shape == (3, 32, 48)  # already a multiple: unchanged


def test_restore_image_pads_by_reflection_and_crops_what_it_padded():
    """The clean estimate is a 3x3 box blur of the degraded latent, so the last visible rows and columns see the
    padding: the output must be the blur of the reflect-padded image, cropped at the bottom and right."""
    image = data.toy_images(1, 40, 56, seed=1)[0]
    bb = PixelCode()
    kernel = torch.full((192, 1, 3, 3), 1 / 9, dtype=torch.float64)

    def blurred(latent):
        return F.conv2d(latent, kernel, padding=1, groups=192)

    out = restore.restore_image(bb, toward(lambda x: blurred(bb.encoded[-1].double())), image, options())
    assert out.shape == image.shape
    padded = image[:, list(range(40)) + [38 - k for k in range(8)]][:, :, list(range(56)) + [54 - k for k in range(8)]]
    expected = ((F.pixel_shuffle(blurred(F.pixel_unshuffle(padded[None].double() * 2 - 1, DOWN)), DOWN)[0] + 1) / 2)
    expected = expected.clamp(0, 1)[:, :40, :56].float()
    assert (out - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- tiles


def test_tiled_restoration_of_a_pointwise_model_equals_the_whole():
    """A velocity acting pixel by pixel gives the same answer on any tiling; the image (100x136, padded to
    112x144 = a 14x18 latent) is larger than the 64-pixel tile (8 latent pixels), so it is really tiled."""
    image = data.toy_images(1, 100, 136, seed=2)[0]
    whole_seen, tiled_seen = [], []
    bb = PixelCode()
    whole = restore.restore_image(bb, toward(pointwise, whole_seen), image, options(tile=4096))
    assert bb.tiles == [("encode", None), ("decode", None)]
    bb = PixelCode()
    tiled = restore.restore_image(bb, toward(pointwise, tiled_seen), image, options(tile=64))
    assert bb.tiles == [("encode", 64), ("decode", 64)]  # the autoencoder is tiled too
    assert set(whole_seen) == {(14, 18)}
    assert len(tiled_seen) > 4 * options().steps and max(max(s) for s in tiled_seen) <= 8
    assert (tiled - whole).abs().max() <= 1e-5
    assert (whole - image).abs().max() > 0.05  # the model did change the image


def test_tiles_overlap_by_a_quarter_of_the_tile():
    """A 64x460 image (a 8x58 latent) in 256-pixel tiles (32 latent pixels): with the documented overlap of a
    quarter tile (8 latent pixels) the 58 columns need 3 tiles per step; a 1-pixel overlap would need 2."""
    image = data.toy_images(1, 64, 460, seed=3)[0]
    seen = []
    restore.restore_image(PixelCode(), toward(pointwise, seen), image, options(steps=2, tile=256))
    assert seen == [(8, 32)] * 3 * 2


# ---------------------------------------------------------------------------------------------- chunks


def test_chunked_video_of_a_pointwise_model_equals_one_chunk():
    """17 frames of 20x36 (padded to 32x48) in 9-frame chunks overlapping by 4 (3 chunks, really blended) give
    what one covering chunk gives, frame by frame and pixel by pixel, when the model acts pixel by pixel on its
    input; a chunk placed at the wrong frames or cropped at the wrong corner would not."""
    video = data.toy_videos(1, 17, 20, 36, seed=4)[0]
    video = video * torch.linspace(0.3, 1, 17)[None, :, None, None]  # every frame different
    bb = PixelCode()
    of_input = toward(lambda x: pointwise(bb.encoded[-1].double()))  # the chunk being restored: its own input
    chunked = restore.restore_video(bb, of_input, video, options(chunk_frames=9, chunk_overlap=4))
    assert [tuple(z.shape[2:]) for z in bb.encoded] == [(9, 4, 6)] * 3
    bb = PixelCode()
    of_input = toward(lambda x: pointwise(bb.encoded[-1].double()))
    single = restore.restore_video(bb, of_input, video, options(chunk_frames=17))
    assert [z.shape[2] for z in bb.encoded] == [17]
    assert chunked.shape == video.shape
    assert (chunked - single).abs().max() <= 1e-5
    by_hand = ((pointwise(video.double() * 2 - 1) + 1) / 2).clamp(0, 1)  # the code is exact and pixel-local
    assert (single - by_hand).abs().max() <= 1e-5
    assert (single - video).abs().max() > 0.05


def test_video_chunks_cross_fade_over_the_requested_overlap():
    """Chunk i's restoration is offset by 0.1 i (in latent units, 0.05 i in pixels): the video must be the
    pointwise restoration plus the chunks' offsets cross-faded over `chunk_overlap` = 4 frames."""
    video = data.toy_videos(1, 17, 16, 16, seed=5)[0]
    bb = PixelCode()
    shifted = toward(lambda x: pointwise(bb.encoded[-1].double()) + 0.1 * (len(bb.encoded) - 1))
    out = restore.restore_video(bb, shifted, video, options(chunk_frames=9, chunk_overlap=4))
    bb = PixelCode()
    plain = restore.restore_video(bb, toward(lambda x: pointwise(bb.encoded[-1].double())), video,
                                  options(chunk_frames=17))
    length, starts = restore.chunk_plan(17, 9, 4)
    offsets = tiling.blend_chunks({i: torch.full((3, length, 16, 16), 0.05 * i) for i in range(len(starts))},
                                  starts, length, 4)
    assert (out - (plain + offsets)).abs().max() <= 1e-5
    cut = tiling.blend_chunks({i: torch.full((3, length, 16, 16), 0.05 * i) for i in range(len(starts))},
                              starts, length, 1)
    assert (cut - offsets).abs().max() > 0.01  # a 1-frame fade would fail the check


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for i, image in enumerate(data.toy_images(2, 32, 48, seed=7)):
        media.write_image(root / "clean" / f"{i}.png", image)
        media.write_image(root / "degraded" / f"{i}.png", data.DEGRADATIONS["noise"](image, torch.Generator().manual_seed(i)))
    return root


@pytest.mark.parametrize("resize", [False, True], ids=["native", "resize-512"])
def test_evaluation_figures_are_those_of_the_files(tmp_path, pairs, resize):
    """Every figure of results.json (sample.py --eval) recomputed from the files: input_* from the degraded input
    (not the restoration), the others from the restored images written with --save-images; --resize-512
    measures both after metrics.resize_to(..., 512)."""
    out = tmp_path / "results"
    subprocess.run([sys.executable, "sample.py", "--preset", "tiny", "--eval", str(pairs), "--steps", "1",
                    "--save-images", "-o", str(out), *(["--resize-512"] if resize else [])],
                   cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    rows = json.loads((out / "results.json").read_text())["items"]
    assert [row["name"] for row in rows] == ["0.png", "1.png"]
    size = (lambda x: metrics.resize_to(x, 512)) if resize else (lambda x: x)
    for row in rows:
        clean = media.read_image(pairs / "clean" / row["name"])
        degraded = media.read_image(pairs / "degraded" / row["name"])
        restored = media.read_image(out / "images" / row["name"])
        # exact for the 8-bit files; the restoration is measured before its 8-bit rounding, which a resize
        # carries through (a few 1e-4 dB)
        for name, pred, tol in (("input_", degraded, 1e-9), ("", restored, 1e-2 if resize else 1e-9)):
            p, c = size(pred), size(clean)
            assert row[f"{name}psnr"] == pytest.approx(metrics.psnr(p, c), abs=tol)
            assert row[f"{name}ssim"] == pytest.approx(metrics.ssim(p, c), abs=tol / 10)
            assert row[f"{name}psnr_y"] == pytest.approx(metrics.psnr(p, c, channel="y"), abs=tol)
            assert row[f"{name}ssim_y"] == pytest.approx(metrics.ssim(p, c, channel="y"), abs=tol / 10)
        assert abs(row["psnr"] - row["input_psnr"]) > 0.01  # restored and input differ: the check can fail
        assert abs(metrics.psnr(metrics.resize_to(degraded, 512), metrics.resize_to(clean, 512))
                   - metrics.psnr(degraded, clean)) > 0.1  # the resize changes the figure
