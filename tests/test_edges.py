"""Issue 16, safe at the edges: files keep the umask, user errors are one line before any model loads, inputs
and results are never overwritten, folder runs and evaluations survive a bad file, EXIF orientation, resume
refusals, training data checked first, stale temp files, SIGTERM, and the small ones. Tiny preset, seconds each."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import media
import restore
import runtime
import sample

ROOT = Path(__file__).resolve().parent.parent


def picture(path: Path, h: int = 32, w: int = 32, seed: int = 0) -> Path:
    media.write_image(path, data.toy_images(1, h, w, seed=seed)[0])
    return path


def run_main(main, capsys, argv) -> tuple[int, object]:
    """A command line's main in this process: (exit status, what it printed; a SystemExit message on stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    return code, capsys.readouterr()


def run_sample(capsys, *argv) -> tuple[int, str]:
    """sample.main in this process: (exit status, stderr)."""
    code, captured = run_main(sample.main, capsys, argv)
    return code, captured.err


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: what is checked must be checked before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(sample.backbones, "load", refuse)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ (1) umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_file_keeps_the_umask_and_an_existing_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with runtime.atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
        (tmp_path / "b.png").write_bytes(b"")
        os.chmod(tmp_path / "b.png", 0o640)
        picture(tmp_path / "b.png")  # overwriting keeps the file's own mode
        assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_sample_output_is_readable_by_the_group_under_umask_022(tmp_path, capsys):
    src = picture(tmp_path / "in.png")
    old = os.umask(0o022)
    try:
        code, err = run_sample(capsys, "--preset", "tiny", "--image", src, "--steps", 1, "-o", tmp_path / "o.png")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------ (6) checks before the model


@pytest.mark.parametrize("case, message", [
    ("tif", "writes .png"), ("folder", "an existing folder"), ("missing", "no such file"),
    ("steps", "steps >= 1"), ("t0", "T0"), ("under-a-file", "is a file"), ("folder-out-is-file", "an existing file"),
])
def test_sample_user_errors_are_one_line_before_any_model_loads(tmp_path, capsys, no_model, case, message):
    src = picture(tmp_path / "in.png")
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    argv = {"tif": ["--image", src, "-o", tmp_path / "out.tif"],
            "folder": ["--image", src, "-o", tmp_path / "dir"],
            "missing": ["--image", tmp_path / "nope.png"],
            "steps": ["--image", src, "--steps", 0],
            "t0": ["--image", src, "--t0", 1.5],
            "under-a-file": ["--image", src, "-o", tmp_path / "plain.txt" / "o.png"],
            "folder-out-is-file": ["--image", tmp_path / "dir", "-o", tmp_path / "plain.txt"]}[case]
    code, err = run_sample(capsys, "--preset", "tiny", *argv)
    assert code != 0
    assert message in one_error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sample_refuses_an_unwritable_folder_before_the_model(tmp_path, capsys, no_model):
    (tmp_path / "ro").mkdir(mode=0o555)
    code, err = run_sample(capsys, "--preset", "tiny", "--image", picture(tmp_path / "in.png"),
                           "-o", tmp_path / "ro" / "o.png")
    assert code != 0 and "not writable" in one_error_line(err)


# ------------------------------------------------------------------------------------ (3) inputs never overwritten


def test_sample_never_overwrites_its_input(tmp_path, capsys, no_model):
    src = picture(tmp_path / "in.png")
    before = src.read_bytes()
    code, err = run_sample(capsys, "--preset", "tiny", "--image", src, "-o", src)
    assert code != 0 and "is the input" in one_error_line(err)
    folder = tmp_path / "photos"
    picture(folder / "a.png")
    code, err = run_sample(capsys, "--preset", "tiny", "--image", folder, "-o", folder)
    assert code != 0 and "input folder" in one_error_line(err)
    assert src.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_equal_stems_in_a_folder_give_distinct_outputs(tmp_path, capsys):
    folder = tmp_path / "photos"
    picture(folder / "x.png", seed=1)
    media.write_image(folder / "x.jpg", data.toy_images(1, 32, 32, seed=2)[0])
    code, err = run_sample(capsys, "--preset", "tiny", "--image", folder, "--steps", 1, "-o", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_jpg.png", "x_png.png"]
    assert restore.distinct_stems([Path("a/x.png"), Path("b/x.png")], ["d1", "d2"]) == ["d1_x", "d2_x"]


def manifest(tmp_path: Path, entries: list[tuple[str, str]]) -> Path:
    """A JSON manifest of (dataset, file name) pairs, each its own folder with in/ and target/ images."""
    rows = []
    for number, (dataset, name) in enumerate(entries):
        clean = picture(tmp_path / dataset / "target" / name, seed=number)
        degraded = picture(tmp_path / dataset / "in" / name, seed=number + 10)
        rows.append({"image_path": str(degraded), "target_path": str(clean), "degradation": "noise",
                     "dataset": dataset})
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    return path


def test_eval_save_images_keeps_equal_names_of_two_datasets(tmp_path, capsys):
    path = manifest(tmp_path, [("kodak", "1.png"), ("cbsd", "1.png")])
    code, err = run_sample(capsys, "--preset", "tiny", "--eval", path, "--steps", 1, "--save-images",
                           "-o", tmp_path / "res")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "res" / "images").iterdir()) == ["cbsd_1.png", "kodak_1.png"]
    rows = json.loads((tmp_path / "res" / "results.json").read_text())["items"]
    assert [row["image"] for row in rows] == ["kodak_1.png", "cbsd_1.png"]


# ------------------------------------------------------------------------------ (2) folder runs continue, summary


def test_a_folder_run_restores_every_good_file_and_names_each_bad_one(tmp_path, capsys):
    folder = tmp_path / "photos"
    picture(folder / "a.png")
    (folder / "b.png").write_bytes(b"garbage, not a PNG")
    picture(folder / "c.png", seed=3)
    code, err = run_sample(capsys, "--preset", "tiny", "--image", folder, "--steps", 1, "-o", tmp_path / "out")
    assert code != 0 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    bad = [line for line in err.splitlines() if "error:" in line]
    assert len(bad) == 1 and "b.png" in bad[0] and "cannot read" in bad[0]
    assert "restored 2 of 3 images" in err and "failed: b.png" in err


# ---------------------------------------------------------------------------- (8) one bad eval item is recorded


def test_one_bad_evaluation_item_is_recorded_and_the_rest_written(tmp_path, capsys):
    path = manifest(tmp_path, [("set", "1.png"), ("set", "2.png"), ("set", "3.png")])
    (tmp_path / "set" / "in" / "2.png").write_bytes(b"truncated")
    code, err = run_sample(capsys, "--preset", "tiny", "--eval", path, "--steps", 1, "-o", tmp_path / "res")
    assert code != 0 and "Traceback" not in err and "2.png" in err
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert [("error" in row) for row in results["items"]] == [False, True, False]
    assert "cannot read" in results["items"][1]["error"]
    assert results["summary"]["set"]["count"] == 2


# ------------------------------------------------------------------------------------------ (4) EXIF orientation


def test_exif_orientation_is_applied_on_read(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # 8 high, 16 wide, a bright left column
    stored[:, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a phone held upright
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    image = media.read_image(tmp_path / "phone.jpg")
    assert image.shape == (3, 16, 8)  # upright: 16 high, 8 wide
    assert image[:, 0].mean() > 0.9 and image[:, -1].mean() < 0.1  # the left column became the top row


# --------------------------------------------------------------------------------------- (10) image modes


def test_opaque_rgba_is_read_as_rgb_and_16_bit_rgb_like_the_rest(tmp_path):
    rgb = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 5 % 256).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)]), "RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(media.read_image(tmp_path / "opaque.png"), torch.from_numpy(rgb).permute(2, 0, 1) / 255)
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 254, np.uint8)]), "RGBA").save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match="alpha"):
        media.read_image(tmp_path / "alpha.png")
    deep = rgb.astype(np.uint16) * 256 + 200  # 16 bits a channel; Pillow keeps the high byte, as for any RGB file
    rows = b"".join(b"\x00" + deep[y].astype(">u2").tobytes() for y in range(8))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (tmp_path / "deep.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
                                        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert torch.equal(media.read_image(tmp_path / "deep.png"), torch.from_numpy(rgb).permute(2, 0, 1) / 255)


# ------------------------------------------------------------------------------------------------ training

import train  # noqa: E402
import weights  # noqa: E402


def run_train(capsys, *argv) -> tuple[int, str]:
    """train.main in this process: (exit status, stderr and stdout)."""
    code, captured = run_main(train.main, capsys, argv)
    return code, captured.err + captured.out


TINY = ("--preset", "tiny", "--backbone", "flux", "--batch", 1, "--log-every", 1)


@pytest.fixture
def no_train_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(train.backbones, "load", refuse)


@pytest.mark.parametrize("flag, value", [("--save-every", 0), ("--log-every", 0), ("--t-power", 0),
                                         ("--t-power", -1), ("--prompt-len", 0), ("--steps", 0)])
def test_train_refuses_non_positive_settings_in_one_line(tmp_path, capsys, no_train_model, flag, value):
    code, err = run_train(capsys, *TINY, "--steps", 2, "--out", tmp_path / "run", flag, value)
    assert code != 0 and flag in one_error_line(err)


def test_train_refuses_an_existing_run_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(capsys, *TINY, "--steps", 2, "--out", out)[0] == 0
    checkpoint = (out / "checkpoint.safetensors").read_bytes()
    log = (out / "log.jsonl").read_text()
    code, err = run_train(capsys, *TINY, "--steps", 2, "--seed", 1, "--out", out)
    assert code != 0 and "--resume" in one_error_line(err)
    assert (out / "checkpoint.safetensors").read_bytes() == checkpoint and (out / "log.jsonl").read_text() == log
    code, err = run_train(capsys, *TINY, "--steps", 2, "--seed", 1, "--out", out, "--overwrite")
    assert code == 0, err
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # a fresh log, not appended


def test_resume_applies_a_changed_lr_and_refuses_a_changed_setup(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(capsys, *TINY, "--steps", 1, "--out", out)[0] == 0
    code, err = run_train(capsys, *TINY, "--steps", 2, "--out", out, "--resume", "--lr", 0.5)
    assert code == 0, err
    meta = {k: json.loads(v) for k, v in weights.read_metadata(out / "checkpoint.safetensors").items()}
    assert meta["step"] == 2 and meta["args"]["lr"] == 0.5
    assert [group["lr"] for group in meta["param_groups"]] == [0.5] * len(meta["param_groups"])
    for flag, value in [("--t-power", 2), ("--size", "48 48"), ("--degradation", "haze"), ("--seed", 3),
                        ("--t0", 0.5), ("--batch", 2), ("--prompt-len", 3)]:
        code, err = run_train(capsys, *TINY, "--steps", 3, "--out", out, "--resume", flag, *str(value).split())
        assert code != 0 and "different run set-up" in one_error_line(err), flag
        assert flag.lstrip("-").replace("-", "_") in err


def test_training_data_is_checked_before_step_one(tmp_path, capsys, no_train_model):
    root = tmp_path / "pairs"
    for name in ("a", "b", "c"):
        picture(root / "clean" / f"{name}.png", 48, 48)
        picture(root / "degraded" / f"{name}.png", 48, 48)
    (root / "degraded" / "b.png").write_bytes((root / "degraded" / "b.png").read_bytes()[:60])  # truncated
    code, err = run_train(capsys, *TINY, "--data", root, "--size", 32, 32, "--steps", 2, "--out", tmp_path / "r")
    assert code != 0 and "b.png" in one_error_line(err)
    picture(root / "degraded" / "b.png", 48, 48)
    picture(root / "clean" / "c.png", 16, 48)
    picture(root / "degraded" / "c.png", 16, 48)
    code, err = run_train(capsys, *TINY, "--data", root, "--size", 32, 32, "--steps", 2, "--out", tmp_path / "r")
    assert code != 0 and "c.png" in one_error_line(err) and "smaller than the training crop" in err


# ---------------------------------------------------------------------------------- (9) leftovers and SIGTERM


def test_stale_temp_files_of_our_naming_are_cleaned_on_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.a1b2c3d4.tmp.safetensors", out / ".log.zz_9xy00.tmp.jsonl"]
    fresh = out / ".prompt.q1w2e3r4.tmp.safetensors"  # a writer still at work: recent, kept
    mine = [out / ".notes.tmp", out / "x.tmp.png"]  # not our pattern: the user's, kept
    for path in [*stale, fresh, *mine]:
        path.write_bytes(b"half")
    for path in stale:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert run_train(capsys, *TINY, "--steps", 1, "--out", out)[0] == 0
    assert not any(path.exists() for path in stale)
    assert fresh.exists() and all(path.exists() for path in mine)
    assert not [p for p in out.iterdir() if ".tmp" in p.name and p not in (fresh, *mine)]


def test_sigterm_during_training_writes_a_final_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", *map(str, TINY), "--steps", "100000", "--save-every", "100000",
               "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # a progress line per step: training has begun (no sleeping on the clock)
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err and "Traceback" not in err
    meta = {k: json.loads(v) for k, v in weights.read_metadata(out / "checkpoint.safetensors").items()}
    steps = len((out / "log.jsonl").read_text().splitlines())
    assert meta["step"] == steps >= 3
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------- (10) the small ones


def test_a_corrupt_or_unwritable_text_cache_entry_is_recomputed(tmp_path, capsys):
    import text

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return [{"t5": torch.full((1, 2), float(len(t)))} for t in texts]

    key = {"backbone": "flux", "snapshot": "x"}
    first = text._with_cache(["ab", "abc"], tmp_path / "cache", key, encode)
    entry = sorted((tmp_path / "cache").iterdir())[0]
    entry.write_bytes(b"not a safetensors file")  # a torn write of another tool, a full disk, ...
    again = text._with_cache(["ab", "abc"], tmp_path / "cache", key, encode)
    assert len(calls) == 2 and len(calls[1]) == 1  # only the corrupt entry encoded again
    assert all(torch.equal(a["t5"], b["t5"]) for a, b in zip(first, again))
    assert "encoding this text again" in capsys.readouterr().err
    (tmp_path / "file").write_text("a file where the cache folder would be")
    kept = text._with_cache(["ab"], tmp_path / "file" / "cache", key, encode)  # cannot be written: still right
    assert torch.equal(kept[0]["t5"], first[0]["t5"]) and "not cached" in capsys.readouterr().err


def test_a_prompt_file_without_tensors_and_a_malformed_index_are_one_line_errors(tmp_path, capsys, no_model):
    import prompts

    weights.save_safetensors({"unrelated": torch.zeros(1)}, tmp_path / "p.safetensors",
                             metadata={"format": prompts.FORMAT, "backbone": "flux", "config": "tiny-flux",
                                       "site": "deep"})
    with pytest.raises(ValueError, match="not a complete prompt file"):
        prompts.load_prompt(tmp_path / "p.safetensors")
    code = subprocess.run([sys.executable, "prompts.py", "show", str(tmp_path / "p.safetensors")], cwd=ROOT,
                          capture_output=True, text=True)
    assert code.returncode != 0 and one_error_line(code.stderr).startswith("prompts.py: error:")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(weights.CheckpointError, match="not a valid shard index"):
        weights.read_state_dict(tmp_path / "model.safetensors.index.json")


@pytest.mark.parametrize("script", ["data.py", "weights.py", "prompts.py"])
def test_every_command_line_prints_its_help(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage:") and len(done.stdout.splitlines()) > 3


def test_weights_show_lists_tensors_and_refuses_a_missing_file_in_one_line(tmp_path):
    weights.save_safetensors({"a.weight": torch.zeros(2, 3)}, tmp_path / "m.safetensors", metadata={"k": "v"})
    done = subprocess.run([sys.executable, "weights.py", "show", str(tmp_path / "m.safetensors")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "a.weight: [2, 3] torch.float32" in done.stdout and "k: v" in done.stdout
    done = subprocess.run([sys.executable, "weights.py", "show", str(tmp_path / "no.safetensors")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no such checkpoint" in one_error_line(done.stderr)


def test_a_full_disk_is_one_error_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full)
    code, err = run_train(capsys, *TINY, "--steps", 1, "--out", tmp_path / "run")
    assert code != 0 and "No space left" in one_error_line(err)
    assert not [p for p in (tmp_path / "run").iterdir() if p.suffix == ".safetensors" or ".tmp" in p.name]

    def full_image(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    source = picture(tmp_path / "in.png")
    monkeypatch.setattr(Image.Image, "save", full_image)
    code, err = run_sample(capsys, "--preset", "tiny", "--image", source, "--steps", 1, "-o", tmp_path / "o.png")
    assert code != 0 and "No space left" in one_error_line(err) and not (tmp_path / "o.png").exists()
