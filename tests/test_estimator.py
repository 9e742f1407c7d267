"""estimator.py and `--prompt auto`: the degradation estimator learns, the prompt bank round-trips and refuses
foreign, mis-shaped and tampered files, the weighted velocity is the hand-computed mix, and sample.py restores
blind end to end on the tiny preset (images, video, --eval)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import backbone
import data
import estimator
import media
import prompts
import restore
import weights

NAMES = ["noise", "haze", "lowlight"]
ROOT = Path(__file__).resolve().parent.parent


def sample_py(*argv, check=True) -> subprocess.CompletedProcess:
    """sample.py as a user runs it (nothing imports the command lines)."""
    result = subprocess.run([sys.executable, "sample.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode:
        raise AssertionError(result.stderr)
    return result


def toy_estimator(names=NAMES, fitted=False):
    if fitted:
        return estimator.fit(data.toy_images(24, 64, 64, seed=3), names, count=720, epochs=12, crop=64, batch=32,
                             size=32, detail=32, width=8)
    torch.manual_seed(0)
    return estimator.Estimator(names, size=32, detail=32, width=8)


def make_prompts(folder, kind="flux", names=NAMES):
    """One deep prompt per name for the tiny backbone of `kind`, with non-zero gates (so each changes the model)."""
    bb = backbone.tiny(kind)
    files = []
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        prompt = bb.new_prompt("deep", 4)
        with torch.no_grad():
            prompt.prompts.normal_(0, 1)
            prompt.alphas.fill_(0.5)
        files.append(folder / f"{name}.safetensors")
        prompts.save_prompt(prompt, files[-1], {"backbone": bb.kind, "config": bb.config, "site": "deep",
                                                "degradation": name, "t0": 0.4})
    return bb, files


@pytest.fixture(scope="module")
def fitted():
    return toy_estimator(fitted=True)


def held_out(names, count=6):
    cleans = data.toy_images(count, 64, 64, seed=99)
    return [(estimator.degrade(c, [n], torch.Generator().manual_seed(i)), [n])
            for n in names for i, c in enumerate(cleans)]


def test_training_moves_accuracy_well_above_chance(fitted):
    examples = held_out(NAMES)
    before = estimator.accuracy(toy_estimator(), examples)
    after = estimator.accuracy(fitted, examples)
    mean = lambda acc: sum(acc.values()) / len(acc)
    assert mean(after) >= 0.7 and mean(after) >= mean(before) + 0.3, (before, after)  # chance: 1/3
    clean = data.toy_images(4, 64, 64, seed=98)
    assert sum(max(fitted.scores(c).values()) < fitted.threshold for c in clean) >= 3  # clean: nothing present


def test_prompt_weights_collapse_and_mix():
    assert estimator.prompt_weights({"noise": 0.9, "haze": 0.1, "lowlight": 0.2}) == {"noise": 1.0}
    assert estimator.prompt_weights({"noise": 0.1, "haze": 0.3, "lowlight": 0.2}) == {"haze": 1.0}  # none present
    mixed = estimator.prompt_weights({"noise": 0.05, "haze": 0.9, "lowlight": 0.6})
    assert mixed == pytest.approx({"haze": 0.6, "lowlight": 0.4})
    assert estimator.prompt_weights({"noise": 0.55, "haze": 0.99, "lowlight": 0.02, "blur": 0.51, "rain": 0.52,
                                     "snow": 0.53}).keys() == {"noise", "haze", "blur", "rain", "snow"}
    assert estimator.describe_weights(mixed) == "haze 0.60, lowlight 0.40"
    top = {"noise": 0.05, "haze": 0.9, "lowlight": 0.6}
    assert estimator.prompt_weights(top, combine="top") == {"haze": 1.0}  # present or not: the most likely alone


def test_bank_keeps_its_combine_rule_and_refuses_an_unknown_one(tmp_path, fitted, monkeypatch):
    """`estimator.py bank --combine top` writes a bank that decides one prompt where the estimator alone mixes;
    the detection (accuracy's view) is the same either way; an unknown rule never loads."""
    _, files = make_prompts(tmp_path)
    est_file = tmp_path / "est.safetensors"
    estimator.save_estimator(est_file, fitted)
    estimator.main(["bank", "--estimator", str(est_file), "--prompts", *map(str, files), "--combine", "top",
                    "-o", str(tmp_path / "bank.safetensors")])
    bank = estimator.load_bank(tmp_path / "bank.safetensors")
    assert bank.estimator.combine == "top" and fitted.combine == "mix"
    scores = {"noise": 0.1, "haze": 0.8, "lowlight": 0.7}
    for est in (bank.estimator, fitted):  # two present: the rules differ
        monkeypatch.setattr(est, "scores", lambda _: scores)
    image = data.toy_images(1, 32, 32, seed=1)[0]
    assert bank.estimator.decide(image) == {"haze": 1.0} and set(fitted.decide(image)) == {"haze", "lowlight"}
    assert bank.estimator.detected(image) == fitted.detected(image) == {"haze", "lowlight"}
    odd = rewrite(tmp_path / "bank.safetensors", tmp_path / "odd.safetensors",
                  lambda h: {**h, "__metadata__": {**h["__metadata__"], "estimator": h["__metadata__"]["estimator"]
                                                   .replace('"top"', '"vote"')}})
    with pytest.raises(ValueError, match="combine"):
        estimator.load_bank(odd)


def test_bank_round_trip(tmp_path, fitted):
    _, files = make_prompts(tmp_path, names=["lowlight", "noise", "haze"])  # another order than the estimator's
    estimator.save_bank(tmp_path / "bank.safetensors", files, fitted)
    bank = estimator.load_bank(tmp_path / "bank.safetensors")
    assert bank.names == NAMES and [m["degradation"] for _, m in bank.prompts] == NAMES
    for name, (prompt, meta) in zip(NAMES, bank.prompts):
        original, original_meta = prompts.load_prompt(tmp_path / f"{name}.safetensors")
        assert meta == original_meta
        for key, value in original.state_dict().items():
            assert torch.equal(prompt.state_dict()[key], value)
    for key, value in fitted.state_dict().items():
        assert torch.equal(bank.estimator.state_dict()[key], value)
    assert bank.estimator.threshold == fitted.threshold and bank.estimator.config == fitted.config
    # the same weights score alike; not bit for bit, since the kernels a CPU picks depend on memory alignment
    # (a loaded tensor and a trained one differed by 1e-8 on one CI machine)
    image = data.toy_images(1, 48, 40, seed=5)[0]
    assert bank.estimator.scores(image) == pytest.approx(fitted.scores(image), rel=1e-5, abs=1e-9)


def test_bank_with_a_pair_prompt_uses_it_when_it_sees_that_pair(tmp_path, monkeypatch):
    """A bank may add prompts trained on two degradations at once ("haze+lowlight"): it decides that prompt when
    the estimator detects exactly that pair, its rule otherwise; `--eval` counts it as both parts; a combination
    of degradations the estimator does not score, or a name out of physical order, is no bank's prompt."""
    _, files = make_prompts(tmp_path, names=[*NAMES, "haze+lowlight"])
    est = toy_estimator()
    est.combine = "top"
    estimator.save_bank(tmp_path / "bank.safetensors", files, est)
    bank = estimator.load_bank(tmp_path / "bank.safetensors")
    assert bank.names == [*NAMES, "haze+lowlight"] and bank.prompts[3][1]["degradation"] == "haze+lowlight"
    image = data.toy_images(1, 32, 32, seed=1)[0]
    for scores, decided in [({"noise": 0.1, "haze": 0.8, "lowlight": 0.7}, {"haze+lowlight": 1.0}),
                            ({"noise": 0.8, "haze": 0.7, "lowlight": 0.1}, {"noise": 1.0}),  # no such pair: top
                            ({"noise": 0.1, "haze": 0.8, "lowlight": 0.1}, {"haze": 1.0})]:
        monkeypatch.setattr(bank.estimator, "scores", lambda _, scores=scores: scores)
        assert bank.decide(image) == decided
    rows = [{"degradation": "haze+lowlight", "auto": {"haze+lowlight": 1.0}},
            {"degradation": "haze+lowlight", "auto": {"haze": 1.0}}]
    assert estimator.decision_accuracy(rows, bank.names) == {"haze+lowlight": (0.5, 2)}
    for i, odd in enumerate(("haze+rain", "lowlight+haze")):
        (tmp_path / str(i)).mkdir()
        _, odd_files = make_prompts(tmp_path / str(i), names=[*NAMES, odd])
        with pytest.raises(ValueError, match="the prompts are for"):
            estimator.save_bank(tmp_path / f"odd{i}.safetensors", odd_files, est)


def rewrite(path, target, change):
    """Copy a safetensors file with its header JSON passed through `change` (keeping the data bytes)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = change(json.loads(raw[8:8 + size]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])
    return target


def test_bank_refuses_foreign_misshaped_and_tampered_files(tmp_path):
    bb, files = make_prompts(tmp_path)
    est = toy_estimator()
    good = tmp_path / "bank.safetensors"
    estimator.save_bank(good, files, est)
    with pytest.raises(ValueError, match="not a prompt bank of this project"):
        estimator.load_bank(files[0])  # a prompt file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a prompt bank of this project"):
        estimator.load_bank(foreign)
    # tampered: a tensor's bytes changed, or the metadata's order of the prompts swapped
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bytes.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="do not match its SHA-256"):
        estimator.load_bank(tmp_path / "bytes.safetensors")

    def swap(header):
        names = json.loads(header["__metadata__"]["prompts"])
        header["__metadata__"]["prompts"] = json.dumps(names[::-1])
        return header

    with pytest.raises(ValueError, match="do not match its SHA-256"):
        estimator.load_bank(rewrite(good, tmp_path / "swapped.safetensors", swap))
    # wrongly shaped, with a valid digest: one prompt too few stacked; an estimator of another width
    tensors = weights.read_state_dict(good)
    meta = {k: json.loads(v) if k in ("prompts", "prompt_metadata", "estimator") else v
            for k, v in weights.read_metadata(good).items() if k != "sha256"}
    short = {k: v[:2] if k.startswith("prompt.") else v for k, v in tensors.items()}
    estimator._write(tmp_path / "short.safetensors", short, meta)
    with pytest.raises(ValueError, match="stacked prompts must have 3 along the first axis"):
        estimator.load_bank(tmp_path / "short.safetensors")
    estimator._write(tmp_path / "width.safetensors", tensors, {**meta, "estimator": {**meta["estimator"], "width": 4}})
    with pytest.raises(ValueError, match="the estimator does not fit its config"):
        estimator.load_bank(tmp_path / "width.safetensors")
    # and sample.py says so in one line, before restoring anything
    image = tmp_path / "x.png"
    media.write_image(image, data.toy_images(1, 32, 32)[0])
    result = sample_py("--preset", "tiny", "--image", image, "--prompt", "auto", "--bank",
                       tmp_path / "bytes.safetensors", "-o", tmp_path / "out.png", check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("sample.py: error: ") and "do not match its SHA-256" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()
    # a bank of wan prompts on a flux backbone
    _, wan_files = make_prompts(tmp_path / "wan", kind="wan")
    estimator.save_bank(tmp_path / "wan.safetensors", wan_files, est)
    with pytest.raises(ValueError, match="trained for wan"):
        restore.load_bank(tmp_path / "wan.safetensors", bb)


def test_weighted_velocity_is_the_hand_computed_mix(tmp_path):
    bb, files = make_prompts(tmp_path)
    loaded = [p for p, _ in restore.load_prompts(files, bb)]
    x = torch.randn_like(bb.encode(torch.zeros(1, 3, 32, 32)))
    t = torch.tensor([0.3])
    singles = [restore.velocity_for(bb, [p])(x, t) for p in loaded]
    assert not torch.allclose(singles[0], singles[1])
    mixed = restore.velocity_for(bb, loaded, mix=[0.2, 0.5, 0.3])(x, t)
    torch.testing.assert_close(mixed, 0.2 * singles[0] + 0.5 * singles[1] + 0.3 * singles[2])
    uniform = restore.velocity_for(bb, loaded)(x, t)
    torch.testing.assert_close(uniform, sum(singles) / 3)
    with pytest.raises(ValueError, match="one non-negative weight per prompt summing to 1"):
        restore.velocity_for(bb, loaded, mix=[0.5, 0.5])


def test_prompt_auto_end_to_end_on_the_tiny_preset(tmp_path, fitted):
    bb, files = make_prompts(tmp_path)
    estimator.save_bank(tmp_path / "bank.safetensors", files, fitted)
    clean = data.toy_images(1, 48, 48, seed=4)[0]
    hazy = estimator.degrade(clean, ["haze"], torch.Generator().manual_seed(0))
    media.write_image(tmp_path / "hazy.png", hazy)
    common = ["--preset", "tiny", "--prompt", "auto", "--bank", str(tmp_path / "bank.safetensors"), "--steps", "2"]
    err = sample_py("--image", tmp_path / "hazy.png", *common, "-o", tmp_path / "out.png").stderr
    hazy = media.read_image(tmp_path / "hazy.png")  # as written (8 bits)
    decided = fitted.decide(hazy)
    assert f"hazy.png: auto: {estimator.describe_weights(decided)}" in err and "--prompt auto over the bank" in err
    bank = restore.load_bank(tmp_path / "bank.safetensors", bb)
    velocity, again = restore.blind_velocity(bb, bank, hazy)
    assert again == decided
    expected = restore.restore_image(bb, velocity, hazy, restore.RestoreOptions(steps=2))
    assert torch.allclose(media.read_image(tmp_path / "out.png"), expected, atol=1 / 255 + 1e-6)
    # --eval: the decision per item and the estimator's accuracy per degradation
    for i, name in enumerate(NAMES):
        degraded = estimator.degrade(clean, [name], torch.Generator().manual_seed(i))
        media.write_image(tmp_path / "pairs" / "degraded" / f"{name}.png", degraded)
        media.write_image(tmp_path / "pairs" / "clean" / f"{name}.png", clean)
    manifest = [{"image_path": str(tmp_path / "pairs" / "degraded" / f"{n}.png"),
                 "target_path": str(tmp_path / "pairs" / "clean" / f"{n}.png"), "degradation": n, "dataset": "toy"}
                for n in NAMES]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = sample_py("--eval", tmp_path / "m.json", *common, "-o", tmp_path / "results").stdout
    rows = json.loads((tmp_path / "results" / "results.json").read_text())["items"]
    assert all(set(row["auto"]) <= set(NAMES) for row in rows)
    hits = estimator.decision_accuracy(rows, NAMES)
    assert set(hits) == set(NAMES)
    assert "estimator accuracy" in out and all(f"{n} {hits[n][0]:.2f} (1)" in out for n in NAMES)


def test_prompt_auto_on_a_video(tmp_path):
    _, files = make_prompts(tmp_path, kind="wan")
    estimator.save_bank(tmp_path / "bank.safetensors", files, toy_estimator())
    media.write_video(tmp_path / "clip.mp4", data.toy_videos(1, 9, 32, 32, seed=2)[0], fps=12)
    err = sample_py("--preset", "tiny", "--video", tmp_path / "clip.mp4", "--prompt", "auto", "--bank",
                    tmp_path / "bank.safetensors", "--steps", "1", "-o", tmp_path / "out.mp4").stderr
    assert "clip.mp4: auto: " in err
    assert media.read_video(tmp_path / "out.mp4").frames.shape[1] == 9


def test_prompt_auto_needs_a_bank_and_no_other_prompt(tmp_path):
    media.write_image(tmp_path / "x.png", data.toy_images(1, 32, 32)[0])
    result = sample_py("--preset", "tiny", "--image", tmp_path / "x.png", "--prompt", "auto", check=False)
    assert result.returncode == 1 and "sample.py: error: --prompt auto with tiny-flux needs --bank FILE" in result.stderr
    result = sample_py("--preset", "tiny", "--image", tmp_path / "x.png", "--prompt", "auto", "--prompt", "haze",
                       check=False)
    assert result.returncode == 2 and "give no other --prompt" in result.stderr
    assert not (ROOT / "x_restored.png").exists()


def test_video_frames_as_clean_examples(tmp_path, capsys):
    """`estimator.py fit --videos`: every --every-th frame of each clip is a clean image (a video backbone's
    estimator learns what its footage looks like clean)."""
    clip = torch.stack(data.toy_images(9, 24, 32, seed=3), dim=1)  # [3, 9, 24, 32]
    media.write_video(tmp_path / "clips" / "a.mp4", clip, 16)
    decoded = media.read_video(tmp_path / "clips" / "a.mp4").frames
    frames = estimator.read_frames(tmp_path / "clips", every=4)
    assert len(frames) == 3 and all(torch.equal(f, decoded[:, i]) for f, i in zip(frames, (0, 4, 8)))
    assert len(estimator.read_frames(tmp_path / "clips", every=1, limit=5)) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        estimator.read_frames(tmp_path / "empty", every=1)
