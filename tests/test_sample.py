"""sample.py, the command line, on the tiny preset and on fake official snapshots: sizes, frame counts and rates
kept; bad inputs fail cleanly; ranks share work exactly; a prompt trained at another T0 is named. (The
restoration itself, tiles and chunks: test_restore.py.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from snapshots import make_flux_snapshot, make_wan_snapshot, official_configs

import backbone
import data
import defaults
import media
import prompts
import sample
import training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    media.write_image(root / "odd.png", data.toy_images(1, 40, 56, seed=1)[0])  # not a multiple of 16
    media.write_video(root / "clip.mp4", data.toy_videos(1, 9, 32, 48, seed=2)[0], fps=12)
    media.write_video(root / "long.mp4", data.toy_videos(1, 14, 32, 32, seed=3)[0], fps=24)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A deep prompt trained for a few steps on each tiny backbone (on the tiny preset's toy pairs)."""
    root = tmp_path_factory.mktemp("prompts")
    for kind in ("flux", "wan"):
        spec = backbone.BACKBONES[f"tiny-{kind}"]
        dataset = data.toy_dataset(kind == "wan", "noise", spec.train_size, spec.train_frames)
        options = training.TrainOptions(prompt_len=spec.prompt_len, steps=2, batch=2, lr=0.1, log_every=100)
        training.train(backbone.tiny(kind), dataset, options, root / kind)
    return root


def cli(*argv):
    sample.main([str(a) for a in argv])


def test_image_keeps_its_size_and_side_by_side_doubles_width(tmp_path, inputs, trained):
    cli("--preset", "tiny", "--image", inputs / "odd.png", "--prompt", trained / "flux" / "prompt.safetensors",
        "--steps", 3, "-o", tmp_path / "out.png")
    assert media.read_image(tmp_path / "out.png").shape == (3, 40, 56)
    cli("--preset", "tiny", "--image", inputs / "odd.png", "--steps", 2, "--side-by-side", "-o", tmp_path / "sbs.png")
    pair = media.read_image(tmp_path / "sbs.png")
    assert pair.shape == (3, 40, 112)
    assert torch.allclose(pair[:, :, :56], media.read_image(inputs / "odd.png"), atol=1 / 255)


def test_video_keeps_frames_rate_and_size(tmp_path, inputs, trained):
    cli("--preset", "tiny", "--video", inputs / "clip.mp4", "--prompt", trained / "wan" / "prompt.safetensors",
        "--steps", 2, "-o", tmp_path / "out.mp4")
    out = media.read_video(tmp_path / "out.mp4")
    assert out.frames.shape == (3, 9, 32, 48) and out.fps == 12
    cli("--preset", "tiny", "--video", inputs / "long.mp4", "--steps", 2, "--chunk-frames", 9, "--chunk-overlap", 4,
        "-o", tmp_path / "long.mp4")
    long = media.read_video(tmp_path / "long.mp4")
    assert long.frames.shape == (3, 14, 32, 32) and long.fps == 24


def test_folder_of_images(tmp_path, inputs):
    folder = tmp_path / "in"
    for i, image in enumerate(data.toy_images(2, 32, 48, seed=4)):
        media.write_image(folder / f"{i}.png", image)
    cli("--preset", "tiny", "--image", folder, "--steps", 2, "-o", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]


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
def test_bad_input_gives_one_clear_error_and_no_file(tmp_path, inputs, trained, capsys, argv, message):
    write_gray_and_alpha(tmp_path)
    argv = [a.format(tmp=tmp_path, media=inputs, prompts=trained) for a in argv]
    out = tmp_path / "out" / ("o.mp4" if "--video" in argv else "o.png")
    with pytest.raises(SystemExit) as exit_:
        cli("--preset", "tiny", *argv, "--steps", 1, "-o", out)
    assert message in str(exit_.value) and str(exit_.value).startswith("sample.py: error:")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def paired(folder: Path, count: int = 3) -> Path:
    for i, image in enumerate(data.toy_images(count, 32, 48, seed=7)):
        media.write_image(folder / "clean" / f"{i}.png", image)
        media.write_image(folder / "degraded" / f"{i}.png", data.DEGRADATIONS["noise"](image, torch.Generator().manual_seed(i)))
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


def test_official_snapshots_text_prompting_and_token_baseline(tmp_path, monkeypatch, inputs):
    snapshot = make_flux_snapshot(tmp_path / "FLUX.1-dev")
    official_configs(monkeypatch, snapshot)
    cache = tmp_path / "cache"
    bb = backbone.load("flux", snapshot, torch.float32, "cpu", text_cache=cache)
    assert bb.config == "flux-dev" and bb.txt.shape == (1, 512, 32) and bb.token_site is None

    base = ["--image", inputs / "odd.png", "--flux", snapshot, "--text-cache", cache, "--steps", 2]
    cli(*base, "-o", tmp_path / "empty.png")
    cli(*base, "--text", "a sharp clean photo", "-o", tmp_path / "text.png")
    assert not torch.equal(media.read_image(tmp_path / "empty.png"), media.read_image(tmp_path / "text.png"))

    with_encoders = backbone.load("flux", snapshot, torch.float32, "cpu", text_cache=cache, keep_text_encoders=True)
    options = training.TrainOptions(prompt_len=4, site="token", steps=2, batch=1)
    training.train(with_encoders, data.Synthetic(inputs, "blur", (32, 32)), options, tmp_path / "token")
    saved, meta = prompts.load_prompt(tmp_path / "token" / "prompt.safetensors")
    assert meta["site"] == "token" and saved.t5.shape == (1, 4, 32) and saved.clip.shape == (1, 4, 32)
    cli(*base, "--prompt", tmp_path / "token" / "prompt.safetensors", "-o", tmp_path / "token.png")
    assert media.read_image(tmp_path / "token.png").shape == (3, 40, 56)


def test_official_wan_snapshot_restores_video(tmp_path, monkeypatch, inputs):
    snapshot = make_wan_snapshot(tmp_path / "Wan2.1-T2V-1.3B")
    official_configs(monkeypatch)
    bb = backbone.load("wan", snapshot, torch.float32, "cpu", text_cache=tmp_path / "cache")
    assert bb.config == "wan2.1-t2v-1.3b" and bb.txt.shape == (1, 226, 32)
    assert bb.txt[0, 1:].abs().sum() == 0  # the empty prompt is one token (</s>); the rest is zero padding
    cli("--video", inputs / "clip.mp4", "--wan", snapshot, "--text-cache", tmp_path / "cache", "--steps", 2,
        "-o", tmp_path / "out.mp4")
    assert media.read_video(tmp_path / "out.mp4").frames.shape == (3, 9, 32, 48)


def test_prompt_trained_at_another_t0_is_named(tmp_path, inputs, trained, capsys):
    cli("--preset", "tiny", "--image", inputs / "odd.png", "--prompt", trained / "flux" / "prompt.safetensors",
        "--steps", 1, "--t0", 0.3, "-o", tmp_path / "out.png")
    assert "sample.py: warning: prompt.safetensors was trained at T0 0.4; sampling at T0 0.3" in capsys.readouterr().err
    cli("--preset", "tiny", "--image", inputs / "odd.png", "--prompt", trained / "flux" / "prompt.safetensors",
        "--steps", 1, "-o", tmp_path / "same.png")
    assert "warning" not in capsys.readouterr().err


def test_a_prompt_is_sampled_at_its_own_t0_unless_t0_is_given(tmp_path, inputs, trained, capsys):
    prompt, meta = prompts.load_prompt(trained / "flux" / "prompt.safetensors")
    prompts.save_prompt(prompt, tmp_path / "low.safetensors", {**meta, "t0": 0.15})
    run = ("--preset", "tiny", "--image", inputs / "odd.png", "--prompt", tmp_path / "low.safetensors", "--steps", 2)
    cli(*run, "-o", tmp_path / "own.png")
    assert "warning" not in capsys.readouterr().err
    cli(*run, "--t0", 0.15, "-o", tmp_path / "given.png")
    cli(*run, "--t0", 0.4, "-o", tmp_path / "backbone.png")
    assert "trained at T0 0.15; sampling at T0 0.4" in capsys.readouterr().err
    own, given = media.read_image(tmp_path / "own.png"), media.read_image(tmp_path / "given.png")
    assert torch.equal(own, given) and not torch.equal(own, media.read_image(tmp_path / "backbone.png"))


def test_backbone_by_name_is_the_same_backbone(tmp_path, inputs):
    cli("--preset", "tiny", "--image", inputs / "odd.png", "--steps", 2, "-o", tmp_path / "preset.png")
    cli("--backbone", "tiny-flux", "--image", inputs / "odd.png", "--steps", 2, "-o", tmp_path / "named.png")
    assert torch.equal(media.read_image(tmp_path / "preset.png"), media.read_image(tmp_path / "named.png"))
    with pytest.raises(SystemExit, match="videos are restored with Wan2.1, not tiny-flux"):
        cli("--backbone", "tiny-flux", "--video", inputs / "clip.mp4", "-o", tmp_path / "v.mp4")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--text", "a photo"], "--text needs an official snapshot"),
    (["--tile", "100"], "multiple of 32"),
    (["--chunk-frames", "8"], "4k\\+1"),
])
def test_requests_are_refused_before_any_model_loads(tmp_path, inputs, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        cli("--image", inputs / "odd.png", *argv, "-o", tmp_path / "out.png")
    assert re.search(message, capsys.readouterr().err + str(exit_.value))


def test_t0_defaults_to_the_backbone_table(tmp_path):
    import train  # the same default on both command lines

    assert backbone.BACKBONES["mini-wan"].t0 == 0.2
    assert all(spec.t0 == defaults.T0 for name, spec in backbone.BACKBONES.items() if name != "mini-wan")
    for name, t0 in (("mini-wan", 0.2), ("mini-flux", defaults.T0)):
        args = train.parse_args(["--backbone", name, "--data", str(tmp_path), "--synthetic", "--degradation", "haze",
                                 "--out", str(tmp_path / "run")])
        assert args.t0 == t0
        spec = backbone.BACKBONES[name]
        assert sample.restore_options(sample.parse_args(["--image", "x.png"]), spec.kind, spec.t0).t0 == t0
    given = train.parse_args(["--backbone", "mini-wan", "--data", str(tmp_path), "--synthetic", "--degradation",
                              "haze", "--t0", "0.3", "--out", str(tmp_path / "run")])
    assert given.t0 == 0.3
    assert sample.restore_options(sample.parse_args(["--image", "x.png", "--t0", "0.3"]), "wan", 0.2).t0 == 0.3


def test_frame_noise_is_the_backbones_unless_given():
    args = sample.parse_args(["--video", "x.mp4"])
    assert sample.restore_options(args, "wan", 0.2, "shared").frame_noise == "shared"
    assert sample.restore_options(args, "wan").frame_noise == "independent"
    args = sample.parse_args(["--video", "x.mp4", "--frame-noise", "independent"])
    assert sample.restore_options(args, "wan", 0.2, "shared").frame_noise == "independent"


def test_oversized_and_looping_inputs_are_refused_before_any_model(tmp_path, capsys, monkeypatch):
    """A header claiming 12000x12000 (a 1 KB file) and a frame over --max-pixels are refused from the header;
    a symbolic link loop is named as one. No backbone is loaded for any of them."""
    import struct
    import zlib

    media.write_image(tmp_path / "small.png", data.toy_images(1, 16, 16, seed=0)[0])
    body = bytearray((tmp_path / "small.png").read_bytes())
    body[16:24] = struct.pack(">II", 12000, 12000)
    body[29:33] = struct.pack(">I", zlib.crc32(bytes(body[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(body))
    media.write_video(tmp_path / "wide.mp4", data.toy_videos(1, 5, 64, 96, seed=0)[0], fps=12)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, message in [(["--image", tmp_path / "bomb.png"], "12000x12000 (WxH) is 144.0 million pixels"),
                          (["--video", tmp_path / "wide.mp4", "--max-pixels", 5000], "96x64 (WxH)"),
                          (["--image", tmp_path / "loop"], "too many levels of symbolic links")]:
        with pytest.raises(SystemExit) as exit_:
            cli("--preset", "tiny", *argv, "-o", tmp_path / "out" / ("o.mp4" if "--video" in argv else "o.png"))
        assert str(exit_.value).startswith("sample.py: error:") and message in str(exit_.value), exit_.value
    assert not (tmp_path / "out").exists()


def test_sigterm_leaves_no_half_written_output(tmp_path, inputs):
    import signal
    import time

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "sample.py", "--preset", "tiny", "--video", str(inputs / "long.mp4"),
                                "--steps", "1000", "-o", str(out / "o.mp4")], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    line = ""
    while "restoring with" not in line:
        line = process.stderr.readline()
        assert line, "sample.py ended before restoring"
    deadline = time.time() + 60
    while not any(out.glob(".o.*.tmp.mp4")) and time.time() < deadline:  # the writer's temporary file is open
        time.sleep(0.05)
    assert any(out.glob(".o.*.tmp.mp4"))
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 1 and "sample.py: stopped" in rest and "Traceback" not in rest
    assert list(out.iterdir()) == []
