"""sample.py on the tiny preset and on fake official snapshots: sizes, frame counts and rates kept; prompts,
tiles and chunks behave as identities where they should; bad inputs fail cleanly; ranks share work exactly."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from snapshots import make_flux_snapshot, make_wan_snapshot, official_configs

import backbone
import bridge
import data
import prompts
import sample
import tiling
import train

ROOT = Path(__file__).resolve().parents[1]


def sample_args(**overrides) -> Namespace:
    values = dict(steps=3, t0=0.4, t_min=1e-4, seed=0, rank=0, world=1, chunk_frames=9, chunk_overlap=4)
    return Namespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    data.write_image(root / "odd.png", data.toy_images(1, 40, 56, seed=1)[0])  # not a multiple of 16
    data.write_video(root / "clip.mp4", data.toy_videos(1, 9, 32, 48, seed=2)[0], fps=12)
    data.write_video(root / "long.mp4", data.toy_videos(1, 14, 32, 32, seed=3)[0], fps=24)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A deep prompt trained for a few steps on each tiny backbone."""
    root = tmp_path_factory.mktemp("prompts")
    for kind in ("flux", "wan"):
        train.main(["--preset", "tiny", "--backbone", kind, "--steps", "2", "--batch", "2", "--lr", "0.1",
                    "--out", str(root / kind), "--log-every", "100"])
    return root


def cli(*argv):
    sample.main([str(a) for a in argv])


def test_image_keeps_its_size_and_side_by_side_doubles_width(tmp_path, media, trained):
    cli("--preset", "tiny", "--image", media / "odd.png", "--prompt", trained / "flux" / "prompt.safetensors",
        "--steps", 3, "-o", tmp_path / "out.png")
    assert data.read_image(tmp_path / "out.png").shape == (3, 40, 56)
    cli("--preset", "tiny", "--image", media / "odd.png", "--steps", 2, "--side-by-side", "-o", tmp_path / "sbs.png")
    pair = data.read_image(tmp_path / "sbs.png")
    assert pair.shape == (3, 40, 112)
    assert torch.allclose(pair[:, :, :56], data.read_image(media / "odd.png"), atol=1 / 255)


def test_video_keeps_frames_rate_and_size(tmp_path, media, trained):
    cli("--preset", "tiny", "--video", media / "clip.mp4", "--prompt", trained / "wan" / "prompt.safetensors",
        "--steps", 2, "-o", tmp_path / "out.mp4")
    out = data.read_video(tmp_path / "out.mp4")
    assert out.frames.shape == (3, 9, 32, 48) and out.fps == 12
    cli("--preset", "tiny", "--video", media / "long.mp4", "--steps", 2, "--chunk-frames", 9, "--chunk-overlap", 4,
        "-o", tmp_path / "long.mp4")
    long = data.read_video(tmp_path / "long.mp4")
    assert long.frames.shape == (3, 14, 32, 32) and long.fps == 24


def test_folder_of_images(tmp_path, media):
    folder = tmp_path / "in"
    for i, image in enumerate(data.toy_images(2, 32, 48, seed=4)):
        data.write_image(folder / f"{i}.png", image)
    cli("--preset", "tiny", "--image", folder, "--steps", 2, "-o", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]


def test_zero_gate_prompt_is_the_plain_pretrained_bridge(media):
    bb = backbone.tiny("flux")
    image = data.read_image(media / "odd.png")
    prompt = bb.new_prompt("deep", 8)  # gates at 0: untrained
    plain = sample.restore_image(bb, bb.velocity, image, sample_args(), 256, "plain")
    gated = sample.restore_image(bb, lambda x, t: bb.velocity(x, t, prompt), image, sample_args(), 256, "zero")
    assert torch.equal(plain, gated)
    with torch.no_grad():
        prompt.alphas.fill_(20.0)  # P ~ N(0, 0.02^2): the gate must open wide to move a random tiny model
    opened = sample.restore_image(bb, lambda x, t: bb.velocity(x, t, prompt), image, sample_args(), 256, "open")
    assert (opened - plain).abs().max() > 1e-3


def test_tiles_covering_the_image_change_nothing():
    bb = backbone.tiny("flux")
    latent = torch.randn(1, 16, 16, 24)
    t = torch.full((1,), 0.3)
    with torch.no_grad():  # the tiled velocity with one covering tile is exactly the velocity
        assert torch.equal(sample.tiled_velocity(bb.velocity, 24, 4)(latent, t), bb.velocity(latent, t))
    image = data.toy_images(1, 64, 128, seed=5)[0]
    whole = sample.restore_image(bb, bb.velocity, image, sample_args(steps=2), 256, "whole")
    tiled = sample.restore_image(bb, bb.velocity, image, sample_args(steps=2), 64, "tiled")  # 2 tiles, 16-px fades
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.25  # each tile sees less context: close, not equal


def test_tiles_that_disagree_leave_no_seam():
    """Each tile's velocity is a different constant (its crop's mean): across the tiles' cross-fades the result
    may change by at most (spread of the constants) / overlap per pixel; a hard seam would jump by the spread."""
    latent = torch.randn(1, 16, 40, 56) + torch.linspace(0, 8, 56)
    velocity = sample.tiled_velocity(lambda x, t: torch.zeros_like(x) + x.mean(), tile=16, overlap=6)
    out = velocity(latent, torch.zeros(1))
    starts = [(r, c) for r in tiling.tile_starts(40, 16, 6) for c in tiling.tile_starts(56, 16, 6)]
    means = torch.tensor([latent[..., r : r + 16, c : c + 16].mean() for r, c in starts])
    step = max((out[..., 1:] - out[..., :-1]).abs().max(), (out[..., 1:, :] - out[..., :-1, :]).abs().max())
    assert step <= (means.max() - means.min()) / 6 + 1e-5
    assert (means.max() - means.min()) > 3 * step  # the tiles really disagree


def test_chunk_plan():
    assert sample.chunk_plan(33, 33, 8) == (33, [0])
    assert sample.chunk_plan(10, 33, 8) == (9, [0, 1])
    assert sample.chunk_plan(1, 33, 8) == (1, [0])
    length, starts = sample.chunk_plan(100, 33, 8)
    assert length == 33 and starts[0] == 0 and starts[-1] + length == 100
    assert all(b - a <= length - 8 for a, b in zip(starts, starts[1:]))


def test_video_chunks_covering_the_clip_change_nothing():
    bb = backbone.tiny("wan")
    video = data.toy_videos(1, 9, 16, 16, seed=6)[0]
    single = sample.restore_video(bb, bb.velocity, video, sample_args(chunk_frames=9), "single")
    covering = sample.restore_video(bb, bb.velocity, video, sample_args(chunk_frames=33), "covering")
    assert torch.equal(single, covering)
    long = data.toy_videos(1, 17, 16, 16, seed=6)[0]
    chunked = sample.restore_video(bb, bb.velocity, long, sample_args(chunk_frames=9, chunk_overlap=4), "chunked")
    assert chunked.shape == long.shape and torch.isfinite(chunked).all()


def test_chunks_that_disagree_blend_without_jumps():
    length, starts = sample.chunk_plan(40, 9, 4)
    chunks = {i: torch.full((3, length, 2, 2), float(i % 2)) for i in range(len(starts))}  # alternate 0 and 1
    video = sample.blend_chunks(chunks, starts, length, 4)
    assert video.shape == (3, 40, 2, 2)
    assert (video[:, 1:] - video[:, :-1]).abs().max() <= 1 / 4 + 1e-6  # a hard cut would jump by 1
    assert torch.equal(video[:, :2], chunks[0][:, :2])  # frames only one chunk covers are that chunk's


def write_gray_and_alpha(folder: Path) -> None:
    Image.fromarray(np.full((32, 32), 128, np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(np.full((32, 32, 4), 128, np.uint8), "RGBA").save(folder / "alpha.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "frames").mkdir()


@pytest.mark.parametrize("argv,message", [
    (["--image", "{tmp}/gray.png"], "grayscale"),
    (["--image", "{tmp}/alpha.png"], "alpha"),
    (["--image", "{tmp}/broken.png"], "broken.png"),
    (["--image", "{tmp}/missing.png"], "missing.png"),
    (["--video", "{tmp}/frames"], "frames"),
    (["--image", "{media}/odd.png", "--prompt", "{prompts}/wan/prompt.safetensors"], "trained for wan"),
])
def test_bad_input_gives_one_clear_error_and_no_file(tmp_path, media, trained, capsys, argv, message):
    write_gray_and_alpha(tmp_path)
    argv = [a.format(tmp=tmp_path, media=media, prompts=trained) for a in argv]
    out = tmp_path / "out" / ("o.mp4" if "--video" in argv else "o.png")
    with pytest.raises(SystemExit) as exit_:
        cli("--preset", "tiny", *argv, "--steps", 1, "-o", out)
    assert message in str(exit_.value) and str(exit_.value).startswith("sample.py: error:")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def paired(folder: Path, count: int = 3) -> Path:
    for i, image in enumerate(data.toy_images(count, 32, 48, seed=7)):
        data.write_image(folder / "clean" / f"{i}.png", image)
        data.write_image(folder / "degraded" / f"{i}.png", data.DEGRADATIONS["noise"](image, torch.Generator().manual_seed(i)))
    return folder


def test_eval_writes_results_and_two_ranks_equal_one(tmp_path):
    pairs = paired(tmp_path / "pairs")
    common = ["sample.py", "--preset", "tiny", "--eval", str(pairs), "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "-o", str(tmp_path / "one")], cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                    "-o", str(tmp_path / "two")], cwd=ROOT, env=env, check=True)
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert one["items"] == two["items"] and one["summary"] == two["summary"]
    assert [row["name"] for row in one["items"]] == ["0.png", "1.png", "2.png"]
    row = one["items"][0]
    assert {"psnr", "ssim", "psnr_y", "ssim_y", "input_psnr"} <= row.keys()
    assert "| paired | 3 |" in (tmp_path / "one" / "results.md").read_text()


def test_official_snapshots_text_prompting_and_token_baseline(tmp_path, monkeypatch, media):
    snapshot = make_flux_snapshot(tmp_path / "FLUX.1-dev")
    official_configs(monkeypatch, snapshot)
    cache = tmp_path / "cache"
    bb = backbone.load("flux", snapshot, torch.float32, "cpu", text_cache=cache)
    assert bb.config == "flux-dev" and bb.txt.shape == (1, 512, 32) and bb.token_site is None

    base = ["--image", media / "odd.png", "--flux", snapshot, "--text-cache", cache, "--steps", 2]
    cli(*base, "-o", tmp_path / "empty.png")
    cli(*base, "--text", "a sharp clean photo", "-o", tmp_path / "text.png")
    assert not torch.equal(data.read_image(tmp_path / "empty.png"), data.read_image(tmp_path / "text.png"))

    train.main(["--backbone", "flux", "--weights", str(snapshot), "--site", "token", "--prompt-len", "4",
                "--steps", "2", "--batch", "1", "--size", "32", "32", "--synthetic", "--degradation", "blur",
                "--data", str(media), "--text-cache", str(cache), "--out", str(tmp_path / "token")])
    saved, meta = prompts.load_prompt(tmp_path / "token" / "prompt.safetensors")
    assert meta["site"] == "token" and saved.t5.shape == (1, 4, 32) and saved.clip.shape == (1, 4, 32)
    cli(*base, "--prompt", tmp_path / "token" / "prompt.safetensors", "-o", tmp_path / "token.png")
    assert data.read_image(tmp_path / "token.png").shape == (3, 40, 56)


def test_official_wan_snapshot_restores_video(tmp_path, monkeypatch, media):
    snapshot = make_wan_snapshot(tmp_path / "Wan2.1-T2V-1.3B")
    official_configs(monkeypatch)
    bb = backbone.load("wan", snapshot, torch.float32, "cpu", text_cache=tmp_path / "cache")
    assert bb.config == "wan2.1-t2v-1.3b" and bb.txt.shape == (1, 226, 32)
    assert bb.txt[0, 1:].abs().sum() == 0  # the empty prompt is one token (</s>); the rest is zero padding
    cli("--video", media / "clip.mp4", "--wan", snapshot, "--text-cache", tmp_path / "cache", "--steps", 2,
        "-o", tmp_path / "out.mp4")
    assert data.read_video(tmp_path / "out.mp4").frames.shape == (3, 9, 32, 48)
