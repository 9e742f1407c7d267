"""The authors' protocol (protocol.py), part by part against hand-computed values or identities, and
`sample.py --protocol paper` end to end on the tiny preset with a manifest written the authors' way."""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import backbone
import bridge
import data
import media
import metrics
import prompts
import protocol
import restore

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv, cwd=None) -> None:
    """sample.py as a user runs it (nothing imports the command lines)."""
    subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, argv)], cwd=cwd, check=True)

GRID = bridge.time_grid(0.4, 1e-4, 20).float()  # the released sampler's times


# ---------------------------------------------------------------------------------------------- timesteps


def test_flux_times_are_the_euler_grid_in_float16():
    fed = (protocol.scheduler_time("flux", GRID) * 1000).tolist()
    # by hand: 0.4 -> k = 400 -> float16(0.4) = 0.39990234375; 0.4 - 0.3999/19 = 0.378952... -> k = 379 ->
    # float16(0.379) = 0.37890625; 1e-4 -> k = 1 (the grid's smallest) -> float16(0.001) = 0.0010004044
    assert fed[0] == pytest.approx(399.90234375, abs=1e-9)
    assert fed[1] == pytest.approx(378.90625, abs=1e-9)
    assert fed[-1] == pytest.approx(1.0004043579, abs=1e-6)
    assert all(torch.tensor(f / 1000).half().float().item() == pytest.approx(f / 1000, abs=0) for f in fed)


def test_wan_times_are_the_unipc_grid_truncated():
    fed = (protocol.scheduler_time("wan", GRID) * 1000).tolist()
    # sigmas 0.999 k / 1000: 0.4 -> k = 400 -> 399.6 -> 399; 0.378952 -> k = 379 -> 378.62 -> 378;
    # 0.021147 -> k = 21 -> 20.98 -> 20; 1e-4 -> k = 1... no: 0.000999 -> 0.999 -> 0
    assert fed[:2] == [399.0, 378.0] and fed[-2:] == [20.0, 0.0]
    assert all(f == int(f) for f in fed) and fed == sorted(fed, reverse=True)
    assert protocol.wan_sigmas()[0].item() == pytest.approx(0.999) and protocol.wan_sigmas()[-1].item() == pytest.approx(0.000999)


def test_rounding_reaches_the_velocity_only():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    y, eps = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    plain = bridge.sample(velocity, y, eps)
    rounded = bridge.sample(protocol.rounded_velocity(velocity, "wan"), y, eps)
    assert torch.equal(torch.cat(seen[20:]), protocol.scheduler_time("wan", GRID))
    assert torch.equal(torch.cat(seen[:20]), GRID)
    assert torch.equal(plain, rounded)  # zero velocity: the bridge's own algebra saw the continuous t both times


def test_autocast_runs_the_velocity_in_float16():
    seen = {}

    def velocity(x, t):
        seen["dtype"] = (x @ x.transpose(-1, -2)).dtype  # a matmul under autocast
        return x

    out = protocol.autocast_velocity(velocity, torch.float16)(torch.ones(1, 4, 4), torch.zeros(1))
    assert seen["dtype"] == torch.float16 and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- sizes


def test_input_resize_is_pil_bicubic_and_an_identity_at_its_size():
    image = torch.rand(3, 24, 40).mul(255).round().div(255)
    assert torch.equal(protocol.resize_like_pil(image, (24, 40)), image)
    constant = torch.full((3, 30, 50), 0.2).mul(255).round().div(255)
    resized = protocol.resize_like_pil(constant, (64, 32))  # aspect not kept
    assert resized.shape == (3, 64, 32) and torch.equal(resized, torch.full_like(resized, constant[0, 0, 0].item()))
    video = torch.stack([image, 1 - image], dim=1)
    assert protocol.resize_like_pil(video, (16, 16)).shape == (3, 2, 16, 16)


def test_metric_resize_has_no_antialias_and_is_clamped():
    image = torch.rand(3, 512, 512)
    assert torch.equal(protocol.eval_resize(image), image)  # same size: identity
    big = torch.rand(3, 1024, 1024)
    theirs = protocol.eval_resize(big)
    by_hand = torch.nn.functional.interpolate(big[None], size=(512, 512), mode="bicubic",
                                              align_corners=False).clamp(0, 1)[0]
    assert torch.equal(theirs, by_hand)
    assert (theirs - metrics.resize_to(big, 512)).abs().max() > 0.05  # ours antialiases: not the same numbers
    assert theirs.min() >= 0 and theirs.max() <= 1


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_psnr_and_ssim_equal_scikit_image(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 37, 45, generator=g, dtype=torch.float64)
    pred = (target + 0.1 * torch.randn(3, 37, 45, generator=g, dtype=torch.float64)).clamp(0, 1)
    a, b = target.permute(1, 2, 0).numpy(), pred.permute(1, 2, 0).numpy()
    assert metrics.paper_ssim(pred, target) == pytest.approx(
        structural_similarity(a, b, data_range=1.0, channel_axis=-1), abs=1e-6)
    assert metrics.paper_psnr(pred, target) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)
    assert metrics.paper_ssim(target, target) == pytest.approx(1.0) and metrics.paper_psnr(target, target) == math.inf


def test_dists_is_its_written_out_definition_and_refuses_random_weights():
    with pytest.raises(metrics.LPIPSUnavailable):
        metrics.load_dists(None)
    with pytest.raises(metrics.LPIPSUnavailable):
        metrics.DISTS()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    model = metrics.DISTS().to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) if name in ("alpha", "beta")
                    else 0.05 * torch.randn(p.shape, generator=g))
    x, y = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    fx, fy = model.taps(x), model.taps(y)
    assert [f.shape[1] for f in fx] == list(metrics.DISTS_CHANNELS) and fx[0] is x
    alpha, beta = model.alpha.flatten().tolist(), model.beta.flatten().tolist()
    total, index, similarity = sum(alpha) + sum(beta), 0, 0.0
    for a, b in zip(fx, fy):
        for c in range(a.shape[1]):
            u, v = a[0, c].double().flatten(), b[0, c].double().flatten()
            mu, mv = u.mean().item(), v.mean().item()
            var_u, var_v = ((u - mu) ** 2).mean().item(), ((v - mv) ** 2).mean().item()
            cov = (u * v).mean().item() - mu * mv
            s1 = (2 * mu * mv + 1e-6) / (mu**2 + mv**2 + 1e-6)
            s2 = (2 * cov + 1e-6) / (var_u + var_v + 1e-6)
            similarity += (alpha[index] * s1 + beta[index] * s2) / total
            index += 1
    assert model(x, y).item() == pytest.approx(1 - similarity, abs=1e-5)
    assert model(x, x).item() == pytest.approx(0, abs=1e-5)
    pooled = metrics.L2Pool()(torch.full((1, 2, 8, 8), 3.0))
    assert pooled.shape == (1, 2, 4, 4) and torch.allclose(pooled[..., 1:, 1:], torch.tensor(3.0))


def test_no_reference_metrics_only_through_the_optional_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # not installed
    with pytest.raises(ValueError, match="pyiqa"):
        metrics.no_reference(["musiq"])
    fake = types.SimpleNamespace(create_metric=lambda name, device: (lambda x: x.mean() * (2 if name == "b" else 1)))
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    scores = metrics.no_reference(["a", "b"])
    video = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.6)], dim=1)
    assert scores["a"](video) == pytest.approx(0.4) and scores["b"](video[:, 0]) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------- restoring


def test_vae_sample_is_mean_plus_std_times_the_seeded_noise():
    bb = backbone.tiny("flux")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    vae = bb.vae
    mean, logvar = vae.encoder(pixels).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(123))
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    expected = vae.params.scale_factor * (z - vae.params.shift_factor)
    drawn = bb.encode(pixels, sample_seed=123)
    assert torch.allclose(drawn, expected, atol=1e-6)
    assert not torch.allclose(drawn, bb.encode(pixels), atol=1e-4)
    wan = backbone.tiny("wan")
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(wan.encode(clip, sample_seed=123), wan.encode(clip, sample_seed=123))
    assert not torch.allclose(wan.encode(clip, sample_seed=123), wan.encode(clip), atol=1e-4)


def test_first_frames_one_pass_fixed_noise_and_size():
    bb = backbone.tiny("wan")
    video = data.toy_videos(1, 14, 32, 48, seed=0)[0]
    calls = []
    velocity = lambda x, t: calls.append(x.shape) or bb.velocity(x, t)  # noqa: E731
    paper = restore.RestoreOptions(steps=2, first_frames=33, size=(16, 32), fixed_noise=True, seed=42)
    out = restore.restore_video(bb, velocity, video, paper)
    assert out.shape == (3, 13, 16, 32)  # the first 13 = 4k+1 <= 14 frames, one pass, at the protocol's size
    assert len(calls) == 2
    clip = protocol.resize_like_pil(video[:, :5], (16, 32))
    fixed = restore.RestoreOptions(steps=2, fixed_noise=True, seed=42)
    assert torch.equal(restore.restore_chunk(bb, bb.velocity, clip, fixed, 0),
                       restore.restore_chunk(bb, bb.velocity, clip, fixed, 3))
    ours = restore.RestoreOptions(steps=2, seed=42)
    assert not torch.equal(restore.restore_chunk(bb, bb.velocity, clip, ours, 0),
                           restore.restore_chunk(bb, bb.velocity, clip, ours, 3))
    with pytest.raises(ValueError, match="timesteps"):
        restore.RestoreOptions(timesteps="rounded")
    with pytest.raises(ValueError, match="multiples"):
        restore.RestoreOptions(size=(100, 64))


def test_shared_frame_noise_is_one_frame_for_every_latent_frame_and_chunk(monkeypatch):
    bb = backbone.tiny("wan")
    clip = data.toy_videos(1, 9, 32, 32, seed=0)[0]
    starts = []
    real_sample = bridge.sample
    monkeypatch.setattr(bridge, "sample", lambda v, y, eps, *a, **k: starts.append(eps) or real_sample(v, y, eps, *a, **k))
    for frame_noise in ("shared", "independent"):
        options = restore.RestoreOptions(steps=1, seed=7, frame_noise=frame_noise)
        restore.restore_chunk(bb, bb.velocity, clip, options, 0)
        restore.restore_chunk(bb, bb.velocity, clip, options, 3)
    shared, shared_later, independent, independent_later = starts
    assert shared.shape[2] == 3  # 9 frames: three latent frames
    assert torch.equal(shared, shared[:, :, :1].expand_as(shared)) and torch.equal(shared, shared_later)
    assert not torch.equal(independent[:, :, 1], independent[:, :, 0])
    assert not torch.equal(independent, independent_later)
    assert shared.std().item() == pytest.approx(1, abs=0.2)  # still unit noise
    with pytest.raises(ValueError, match="frame_noise"):
        restore.RestoreOptions(frame_noise="correlated")
    assert backbone.BACKBONES["mini-wan"].frame_noise == "shared"
    assert backbone.BACKBONES["wan-1.3b"].frame_noise == "independent"


def test_their_manifests_read_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    media.write_image(tmp_path / "data" / "in.png", torch.rand(3, 20, 24))
    media.write_image(tmp_path / "data" / "gt.png", torch.rand(3, 32, 32))
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "test.json"
    manifest.write_text(json.dumps([{"image_path": "data/in.png", "target_path": "data/gt.png", "dataset": "x"}]))
    with pytest.raises(ValueError, match="degradation"):
        restore.evaluation_items(manifest)
    items = restore.evaluation_items(manifest, tmp_path, lenient=True)
    assert items[0].degraded == tmp_path / "data" / "in.png" and items[0].degradation == "unknown"
    bb = backbone.tiny("flux")
    with pytest.raises(ValueError, match="differ in size"):
        restore.evaluate_item(bb, bb.velocity, items[0], restore.RestoreOptions(steps=1))
    restored, row = restore.evaluate_item(bb, bb.velocity, items[0], restore.RestoreOptions(steps=1),
                                          resize_mismatch=True)
    assert restored.shape == (3, 32, 32) and "paper_psnr" not in row


# ---------------------------------------------------------------------------------------------- end to end


def test_protocol_paper_end_to_end_on_the_tiny_preset(tmp_path, monkeypatch):
    """An authors'-style manifest (cwd-relative paths, no degradation, input and target of different sizes)
    evaluated with one flag: restored at 1024 x 1024, measured both ways at 512, their figures recomputed."""
    monkeypatch.chdir(tmp_path)
    clean = data.toy_images(1, 48, 64, seed=3)[0]
    media.write_image(tmp_path / "gt.png", clean)
    media.write_image(tmp_path / "in.png", data.DEGRADATIONS["haze"](clean, torch.Generator().manual_seed(0))[:, :40])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "test.json").write_text(json.dumps(
        [{"image_path": "in.png", "target_path": "gt.png", "dataset": "toy"}]))
    cli("--eval", "m/test.json", "--preset", "tiny", "--protocol", "paper", "--steps", "1", "-o", "out",
        "--save-images", cwd=tmp_path)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    row, settings = result["items"][0], result["settings"]
    assert settings["protocol"] == "paper" and settings["timesteps"] == "scheduler" and settings["seed"] == 42
    assert settings["dtype"] == "float16" and settings["vae_sample"] and settings["resize_512"]
    restored = media.read_image(tmp_path / "out" / "images" / "in.png")
    assert restored.shape == (3, 1024, 1024)
    target = media.read_image(tmp_path / "gt.png")
    degraded = protocol.resize_like_pil(media.read_image(tmp_path / "in.png"), (48, 64))
    theirs = protocol.eval_resize(degraded), protocol.eval_resize(target)
    assert row["input_paper_psnr"] == pytest.approx(metrics.paper_psnr(*theirs), abs=1e-9)
    assert row["input_paper_ssim"] == pytest.approx(metrics.paper_ssim(*theirs), abs=1e-9)
    assert row["input_psnr"] == pytest.approx(metrics.psnr(metrics.resize_to(degraded, 512),
                                                           metrics.resize_to(target, 512)), abs=1e-9)
    assert {"paper_psnr", "paper_ssim", "psnr", "ssim"} <= row.keys()


@pytest.mark.slow
def test_image_protocol_paper_is_the_parts_together(tmp_path):
    """--protocol paper equals its parts given one by one (the table is what the switch reads)."""
    image = tmp_path / "x.png"
    media.write_image(image, data.toy_images(1, 40, 56, seed=1)[0])
    cli("--image", image, "--preset", "tiny", "--protocol", "paper", "--steps", "1", "-o", tmp_path / "a.png")
    cli("--image", image, "--preset", "tiny", "--size-policy", "paper", "--timesteps", "scheduler", "--dtype",
        "float16", "--vae-sample", "--fixed-noise", "--seed", "42", "--first-frames", "33", "--steps", "1",
        "-o", tmp_path / "b.png")
    a, b = media.read_image(tmp_path / "a.png"), media.read_image(tmp_path / "b.png")
    assert a.shape == (3, 1024, 1024) and torch.equal(a, b)
    cli("--image", image, "--preset", "tiny", "--steps", "1", "-o", tmp_path / "c.png")
    assert media.read_image(tmp_path / "c.png").shape == (3, 40, 56)


@pytest.mark.slow
def test_protocol_paper_on_the_miniature(tmp_path):
    """The shipped image miniature under --protocol paper: a 40 x 56 input comes back 1024 x 1024, float16 on a CPU."""
    image = tmp_path / "x.png"
    media.write_image(image, data.toy_images(1, 40, 56, seed=1)[0])
    cli("--image", image, "--protocol", "paper", "--no-prompt", "--steps", "1", "-o", tmp_path / "out.png")
    out = media.read_image(tmp_path / "out.png")
    assert out.shape == (3, 1024, 1024) and 0.02 < out.std() and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- FLUX prompts


def test_authors_flux_prompt_file_imports(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(1, 512, 3072, generator=g)
    alphas = [torch.randn((), generator=g) for _ in range(57)]
    torch.save({"backend": "flux", "deep_prompt_bank": {"prompts": bank}, "alphas": alphas}, tmp_path / "flux_haze.pt")
    prompts.main(["import", str(tmp_path / "flux_haze.pt")])
    prompt, meta = prompts.load_prompt(tmp_path / "flux_haze.safetensors", backbone="flux")
    assert torch.equal(prompt.prompts, bank) and torch.equal(prompt.alphas, torch.stack(alphas))
    assert meta["config"] == "flux-dev" and meta["degradation"] == "haze" and meta["length"] == 512
    with pytest.raises(SystemExit, match="exists"):
        prompts.main(["import", str(tmp_path / "flux_haze.pt")])
    torch.save({"backend": "flux", "deep_prompt_bank": {"prompts": bank}, "alphas": alphas[:30]}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="57 alphas"):
        prompts.main(["import", str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors")])
    assert not (tmp_path / "bad.safetensors").exists()
    assert np.isfinite(meta["t0"])
