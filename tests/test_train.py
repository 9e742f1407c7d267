"""Training (training.py, and train.py its command line) on the tiny preset: frozen backbone, only prompts learn,
the loss falls, resume and multi-process runs reproduce a single uninterrupted run, compiled equals eager,
non-finite losses stop cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backbone
import bridge
import data
import prompts
import train
import training
import weights

ROOT = Path(__file__).resolve().parents[1]


def toy_pairs(kind: str):
    """The tiny preset's training data (train.py --preset tiny without --data)."""
    spec = backbone.BACKBONES[f"tiny-{kind}"]
    return data.toy_dataset(kind == "wan", "noise", spec.train_size, spec.train_frames)


def run(tmp_path, kind="flux", name="run", resume=False, latent_cache=None, **settings):
    """A training run on the tiny backbone of `kind` and its toy pairs, as `train.py --preset tiny` runs it."""
    options = training.TrainOptions(prompt_len=backbone.BACKBONES[f"tiny-{kind}"].prompt_len, log_every=1000,
                                    **settings)
    return training.train(backbone.tiny(kind), toy_pairs(kind), options, tmp_path / name, resume=resume,
                          latent_cache=latent_cache)


def fixed_batch_loss(bb, prompt, kind, seed=123):
    """The bridge loss of `prompt` on a fixed evaluation batch (all 8 toy sources, fixed t and noise)."""
    dataset = toy_pairs(kind)
    source = training.LatentSource(bb, dataset, None, {}, seed)
    indices = list(range(len(dataset)))
    x0, y = source(indices, [seed + i for i in indices])
    g = torch.Generator().manual_seed(seed)
    t = bridge.draw_times(len(indices), 1e-4, 0.4, g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return training.step_loss(bb, prompt, 0.4, "bridge")(x0, y, eps, t).item()


@pytest.mark.parametrize("kind,site,lr", [("flux", "deep", 5e-2), ("flux", "text", 2e-1), ("wan", "deep", 5e-2)])
def test_only_prompt_learns_and_loss_falls(tmp_path, kind, site, lr):
    result = run(tmp_path, kind, site=site, steps=40, batch=4, lr=lr, latent_cache=tmp_path / "latents")
    fresh = backbone.tiny(kind)
    for module in ("dit", "vae"):  # every backbone tensor bit-identical to the untouched pre-trained one
        trained_state, fresh_state = getattr(result.backbone, module).state_dict(), getattr(fresh, module).state_dict()
        assert trained_state.keys() == fresh_state.keys()
        assert all(torch.equal(trained_state[k], fresh_state[k]) for k in fresh_state)
    assert all(not p.requires_grad for p in result.backbone.dit.parameters())
    untrained = fixed_batch_loss(fresh, None, kind)
    learned = fixed_batch_loss(fresh, result.prompt, kind)
    print(f"{kind}/{site}: fixed-batch loss {untrained:.5f} -> {learned:.5f} after 40 steps")
    assert learned < 0.95 * untrained
    saved, meta = prompts.load_prompt(tmp_path / "run" / "prompt.safetensors", backbone=kind)
    assert meta["site"] == site and meta["step"] == 40 and meta["train_args"]["lr"] == lr
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), result.prompt.state_dict().values()))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 41))


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    common = dict(batch=2, save_every=3, lr=1e-2)
    whole = run(tmp_path, steps=6, name="whole", **common)
    run(tmp_path, steps=3, name="parts", **common)  # stops after step 3 (its last checkpoint)
    resumed = run(tmp_path, steps=6, resume=True, name="parts", **common)
    assert resumed.losses == whole.losses[3:]
    for a, b in zip(whole.prompt.state_dict().values(), resumed.prompt.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_set_up(tmp_path):
    run(tmp_path, batch=2, steps=2)
    with pytest.raises(ValueError, match="different run set-up.*site: deep -> text"):
        run(tmp_path, batch=2, steps=4, site="text", resume=True)


def test_latent_cache_encodes_each_pair_once(tmp_path, monkeypatch):
    calls = []
    encode = backbone.Backbone.encode
    monkeypatch.setattr(backbone.Backbone, "encode", lambda self, px: calls.append(len(px)) or encode(self, px))
    cache = tmp_path / "latents"
    first = run(tmp_path, batch=4, steps=6, latent_cache=cache, name="a")
    assert len(calls) == len(list(cache.glob("*.safetensors"))) <= 8  # 8 toy sources, each encoded once
    calls.clear()
    second = run(tmp_path, batch=4, steps=6, latent_cache=cache, name="b")
    assert calls == [] and second.losses == first.losses


def test_compiled_loss_equals_eager():
    bb = backbone.tiny("flux")
    prompt = bb.new_prompt("deep", 8)
    with torch.no_grad():
        prompt.alphas.fill_(0.2)
    g = torch.Generator().manual_seed(0)
    x0, y, eps = (torch.randn(2, 16, 4, 6, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.35])
    eager = training.step_loss(bb, prompt, 0.4, "bridge")
    # aot_eager traces the step through dynamo and AOTAutograd (the forward and backward graphs torch.compile
    # builds) without inductor's C++ code generation, which takes minutes on a small CPU; the slow test below
    # runs inductor through the compile option (`train.py --compile`).
    compiled = torch.compile(eager, backend="aot_eager")
    results = []
    for fn in (eager, compiled):
        prompt.zero_grad(set_to_none=True)
        value = fn(x0, y, eps, t)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in prompt.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_compile_option_matches_eager(tmp_path):
    eager = run(tmp_path, "wan", batch=2, steps=3, name="eager")
    compiled = run(tmp_path, "wan", batch=2, steps=3, compile=True, name="compiled")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    for a, b in zip(eager.prompt.state_dict().values(), compiled.prompt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_non_finite_loss_stops_without_touching_the_prompt(tmp_path, monkeypatch):
    run(tmp_path, batch=2, steps=2)
    before = weights.read_state_dict(tmp_path / "run" / "checkpoint.safetensors")
    velocity = backbone.Backbone.velocity
    monkeypatch.setattr(backbone.Backbone, "velocity", lambda self, x, t, p=None: velocity(self, x, t, p) * float("nan"))
    with pytest.raises(FloatingPointError, match="step 3: loss nan .* NOT updated"):
        run(tmp_path, batch=2, steps=4, resume=True)
    after = weights.read_state_dict(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_gloo_processes_equal_one_process(tmp_path):
    common = ["train.py", "--preset", "tiny", "--backbone", "wan", "--batch", "4", "--steps", "3", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, check=True)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
         "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, check=True,
    )
    one = weights.read_state_dict(tmp_path / "one" / "prompt.safetensors")
    two = weights.read_state_dict(tmp_path / "two" / "prompt.safetensors")
    # the same global batch and updates; only the order of floating-point sums differs (tolerance 1e-5)
    for key in one:
        assert (one[key] - two[key]).abs().max() <= 1e-5, key
    assert not torch.equal(one["alphas"], torch.zeros_like(one["alphas"]))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--backbone", "flux", "--out", str(tmp_path)])
    assert "exactly one of --weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--backbone", "flux", "--frames", "9", "--out", str(tmp_path)])
    assert "--frames is for video" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--backbone", "mini-flux", "--data", str(tmp_path), "--synthetic", "--degradation",
                          "haze+fog", "--out", str(tmp_path / "run")])
    assert "--degradation haze+fog: unknown degradation 'fog'" in capsys.readouterr().err


def test_cli_chooses_the_backbone_by_name_with_its_defaults(tmp_path):
    args = train.parse_args(["--backbone", "mini-flux", "--data", str(tmp_path), "--synthetic", "--degradation",
                             "haze", "lowlight", "--out", str(tmp_path / "run")])
    spec = backbone.BACKBONES["mini-flux"]
    assert args.backbone_name == "mini-flux" and args.weights == spec.folder and args.size == spec.train_size
    assert args.degradation == ["haze", "lowlight"]  # a mixture: one drawn per pair
    both = train.parse_args(["--backbone", "mini-flux", "--data", str(tmp_path), "--synthetic", "--degradation",
                             "haze+lowlight", "--out", str(tmp_path / "run")])
    assert both.degradation == "haze+lowlight"  # both on every pair
    same = train.parse_args(["--backbone", "flux", "--weights", str(spec.folder), "--data", str(tmp_path),
                             "--out", str(tmp_path / "run")])
    assert same.backbone_name == "mini-flux" and same.degradation == "unnamed"
    tiny = train.parse_args(["--backbone", "tiny-wan", "--out", str(tmp_path / "run")])
    assert tiny.backbone_name == "tiny-wan" and tiny.frames == 9 and tiny.weights is None


def test_resume_logs_each_step_once(tmp_path):
    """Steps logged after the last checkpoint (a run killed between two saves) are redone on --resume: the log
    then holds each step once, in order; a line cut by the kill is dropped too."""
    common = dict(batch=2, save_every=2, lr=1e-2)
    run(tmp_path, steps=2, name="parts", **common)
    log = tmp_path / "parts" / "log.jsonl"
    with log.open("a") as f:  # as if step 3 ran and the process was killed before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.5, "time": 1.0}) + "\n" + '{"step": 4, "lo')
    run(tmp_path, steps=4, resume=True, name="parts", **common)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "time": 1.0}) + "\n")
    train.check_out(out, resume=False, overwrite=False)  # nothing to keep: no checkpoint, no prompt
    assert not (out / "log.jsonl").exists()
    (out / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds a run"):
        train.check_out(out, resume=False, overwrite=False)


def test_safetensors_own_temporary_file_is_cleaned(tmp_path):
    import runtime

    left = tmp_path / ".tmpAb12Cd"  # what safetensors writes before its rename, left by a kill -9
    left.write_bytes(b"\0" * 100)
    mine = tmp_path / ".tmp_notes.txt"
    mine.write_text("a user's file")
    os.utime(left, (0, 0))
    os.utime(mine, (0, 0))
    assert runtime.clean_stale_temp(tmp_path) == [left]
    assert mine.exists()

