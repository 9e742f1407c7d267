"""What a training step feeds the method, through the real training code (training.train on the tiny preset): pairs
oriented clean -> target and degraded -> input, pixels mapped to [-1, 1]; x_t on the bridge of the configured
--t0 (or the naive path); a resumed run refusing a changed set-up; the latent cache refusing another data set-up;
and, on the shipped miniature (a pre-trained model, where restoration can show), a prompt trained a few steps on
one pair moving the restored latent toward the clean target."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backbone
import bridge
import data
import media
import training
import weights

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "mini"


def run(tmp_path, kind="flux", degradation="noise", name="run", resume=False, latent_cache=None, identity=None,
        **options):
    """A training run of the tiny backbone of `kind` on its toy pairs, as `train.py --preset tiny` makes it."""
    spec = backbone.BACKBONES[f"tiny-{kind}"]
    dataset = data.toy_dataset(kind == "wan", degradation, spec.train_size, spec.train_frames)
    options = training.TrainOptions(**{"prompt_len": spec.prompt_len, "log_every": 1000, **options})
    return training.train(backbone.tiny(kind), dataset, options, tmp_path / name, resume=resume,
                          latent_cache=latent_cache, cache_identity=identity)


@pytest.fixture
def recorded(monkeypatch):
    """Records every pixel batch the VAE encodes (with the latents it returned), every bridge.loss call's
    arguments and every (x, t) the DiT is asked about."""
    log = {"encode": [], "loss": [], "velocity": []}
    encode, loss, velocity = backbone.Backbone.encode, bridge.loss, backbone.Backbone.velocity

    def recording_encode(self, pixels, *args, **kwargs):
        latents = encode(self, pixels, *args, **kwargs)
        log["encode"].append((pixels.detach().clone(), latents.detach().clone()))
        return latents

    def recording_loss(velocity_fn, x0, y, eps, t, t0, path="bridge"):
        log["loss"].append({"x0": x0.detach().clone(), "y": y.detach().clone(), "eps": eps.detach().clone(),
                            "t": t.detach().clone(), "t0": t0, "path": path})
        return loss(velocity_fn, x0, y, eps, t, t0, path)

    def recording_velocity(self, x, t, prompt=None):
        log["velocity"].append((x.detach().clone(), t.detach().clone()))
        return velocity(self, x, t, prompt)

    monkeypatch.setattr(backbone.Backbone, "encode", recording_encode)
    monkeypatch.setattr(bridge, "loss", recording_loss)
    monkeypatch.setattr(backbone.Backbone, "velocity", recording_velocity)
    return log


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_training_pairs_are_clean_target_and_degraded_input_in_minus_one_to_one(tmp_path, recorded, kind):
    """Low light darkens every pixel, so of the two images encoded for an item the degraded one is the darker;
    the loss must get the latents of the brighter (clean) image as X0 and of the darker one as Y."""
    run(tmp_path, kind, "lowlight", batch=2, steps=1)
    (call,) = recorded["loss"]
    encoded = [(p, z) for pixels, latents in recorded["encode"] for p, z in zip(pixels, latents)]  # per image
    assert all(pixels.min() >= -1 and pixels.max() <= 1 for pixels, _ in encoded)

    def pixels_of(latent):
        (match,) = [p for p, z in encoded if torch.equal(z, latent)]
        return match

    for i in range(2):
        clean, degraded = pixels_of(call["x0"][i]), pixels_of(call["y"][i])
        assert clean.min() < -0.5 and clean.max() > 0.5  # [0, 1] mapped to [-1, 1], not left in [0, 1]
        assert clean.mean() > degraded.mean() + 0.3, f"item {i}: X0 is not the clean (brighter) image of the pair"
        assert ((degraded + 1) / 2).mean() < 0.45 * ((clean + 1) / 2).mean()  # Y is its low-light version


@pytest.mark.parametrize("path", ["bridge", "naive"])
def test_training_x_t_is_the_configured_path_at_the_configured_t0(tmp_path, recorded, path):
    """--t0 0.25 (not the default 0.4, not 1): every x_t the DiT sees in training is
    (1 - t)((1 - t/T0) X0 + (t/T0) Y) + t eps at the drawn t in [t_min, T0] (naive: (1 - t) Y + t eps)."""
    run(tmp_path, t0=0.25, path=path, batch=3, steps=2)
    assert len(recorded["loss"]) == len(recorded["velocity"]) == 2
    for call, (x_t, t_seen) in zip(recorded["loss"], recorded["velocity"]):
        x0, y, eps, t = call["x0"], call["y"], call["eps"], call["t"]
        assert torch.equal(t_seen, t) and 1e-4 <= t.min() and t.max() <= 0.25
        tt = t.reshape(-1, 1, 1, 1)
        if path == "bridge":
            expected = (1 - tt) * ((1 - tt / 0.25) * x0 + (tt / 0.25) * y) + tt * eps
        else:
            expected = (1 - tt) * y + tt * eps
        assert (x_t - expected).abs().max() <= 1e-5
        assert (x0 - y).abs().max() > 0.01  # the paths differ: the check can fail


@pytest.mark.parametrize("change", [{"t0": 0.3}, {"batch": 4}, {"seed": 1}, {"prompt_len": 4}, {"path": "naive"},
                                    {"t_min": 0.01}, {"site": "text"}], ids=lambda c: next(iter(c)))
def test_resume_refuses_a_changed_set_up(tmp_path, change):
    run(tmp_path, batch=2, steps=1)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"different run set-up.*{key}"):
        run(tmp_path, resume=True, **{"batch": 2, "steps": 2, **change})


def test_latent_cache_refuses_latents_of_another_identity(tmp_path):
    cache = tmp_path / "latents"
    run(tmp_path, batch=2, steps=1, latent_cache=cache, identity={"degradation": "noise"})
    stamp = (cache / "identity.json").read_text()
    run(tmp_path, batch=2, steps=1, latent_cache=cache, identity={"degradation": "noise"}, name="same")  # reused
    with pytest.raises(ValueError, match="latents of another data set-up"):
        run(tmp_path, batch=2, steps=1, latent_cache=cache, identity={"degradation": "blur"}, name="other")
    assert (cache / "identity.json").read_text() == stamp  # nothing overwritten


def test_train_py_latent_cache_refuses_another_data_set_up(tmp_path):
    """The command line stamps its data set-up (degradation, size, seed, ...) into the cache folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "train.py", "--preset", "tiny", "--backbone", "flux", "--batch", "2", "--steps", "1",
              "--latent-cache", str(tmp_path / "latents")]
    subprocess.run([*common, "--out", str(tmp_path / "a")], cwd=ROOT, env=env, check=True, capture_output=True)
    other = subprocess.run([*common, "--degradation", "blur", "--out", str(tmp_path / "b")], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert other.returncode != 0 and "latents of another data set-up" in other.stderr


@pytest.mark.skipif(not (MINI / backbone.MINIATURE_FILE).is_file(), reason="the shipped miniature is absent")
def test_a_prompt_trained_on_a_pair_moves_the_restoration_toward_the_clean_target(tmp_path):
    """One haze pair (a 32x32 crop of a held-out photo, cached, so every step sees the same pair), a deep prompt
    trained for 30 steps on the frozen miniature; the restored latent must get closer to the clean latent, and
    its change must point from Y toward X0. Measured on the miniature of 1 Dec: MSE x 0.70, 0.33 of the way from
    Y to X0; trained on swapped pairs: x 1.51, -0.29."""
    clean = media.read_image(MINI / "heldout" / "coffee.png")[:, :32, :32]  # the whole crop: no random offset
    cache = tmp_path / "latents"
    bb = backbone.load_miniature(MINI)
    options = training.TrainOptions(prompt_len=16, steps=30, batch=2, lr=0.2, log_every=1000)
    trained = training.train(bb, data.Synthetic([clean], "haze", (32, 32)), options, tmp_path / "run",
                             latent_cache=cache)
    x0 = bb.encode(clean[None] * 2 - 1)  # the clean target, encoded here
    cached = list(weights.read_state_dict(cache / "0.safetensors").values())
    y = max(cached, key=lambda latent: (latent - x0[0]).abs().max().item())[None]  # the pair's other half
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = bridge.sample(bb.velocity, y, eps, 0.4, 1e-4, 10)
        learned = bridge.sample(lambda x, t: bb.velocity(x, t, trained.prompt), y, eps, 0.4, 1e-4, 10)
    before, after = (plain - x0).square().mean().item(), (learned - x0).square().mean().item()
    direction = x0 - y
    toward = ((learned - plain) * direction).sum().item() / direction.square().sum().item()
    print(f"restored latent vs clean: MSE {before:.4f} -> {after:.4f}; moved {toward:.2f} of the way from Y to X0")
    assert after < 0.85 * before
    assert toward > 0.1
