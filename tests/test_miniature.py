"""The shipped miniature (mini/): its files load strictly, its configs match its tensors, and it has learned
something that random weights could not show (reconstruction, denoising)."""

import json
from pathlib import Path

import pytest
import torch

import backbone
import bridge
import weights
from mini import images
from mini.pretrain_ae import psnr
from model import flux as flux_model
from model.autoencoder import AutoEncoder, AutoEncoderParams
from model.clip import CLIPTextConfig, CLIPTextEncoder
from model.t5 import T5Config, T5Encoder

MINI = Path(__file__).resolve().parent.parent / "mini"
SPEC = json.loads((MINI / "miniature.json").read_text())
NETWORKS = {  # json entry -> (file, model class, config class)
    "flux": ("flux.safetensors", flux_model.Flux, flux_model.FluxParams),
    "autoencoder": ("ae.safetensors", AutoEncoder, AutoEncoderParams),
    "t5": ("t5.safetensors", T5Encoder, T5Config),
    "clip": ("clip.safetensors", CLIPTextEncoder, CLIPTextConfig),
}
AE_MIN_PSNR = 23.5  # dB on the held-out chelsea crop; 24.36 measured when the miniature was made (README)


@pytest.fixture(scope="module")
def bb() -> backbone.Backbone:
    return backbone.load_miniature(MINI)


@pytest.mark.parametrize("entry", NETWORKS)
def test_config_matches_tensors(entry):
    file, model_class, config_class = NETWORKS[entry]
    with torch.device("meta"):
        model = model_class(config_class(**SPEC[entry]))
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    shipped = {key: tuple(t.shape) for key, t in weights.read_state_dict(MINI / file).items()}
    assert shipped == expected
    assert all(t.dtype == torch.float32 for t in weights.read_state_dict(MINI / file).values())


def test_weights_fit_the_budget():
    total = sum((MINI / file).stat().st_size for file, _, _ in NETWORKS.values())
    print(f"miniature weights: {total / 2**20:.2f} MiB")
    assert total <= 20 * 10**6


def test_loads_as_a_flux_backbone(bb):
    assert bb.kind == "flux" and not bb.dit.params.guidance_embed
    assert bb.txt.shape == (1, SPEC["text_len"], SPEC["t5"]["d_model"])
    assert bb.pooled.shape == (1, SPEC["clip"]["width"])
    assert torch.isfinite(bb.txt).all() and torch.isfinite(bb.pooled).all()


def test_autoencoder_reconstructs_heldout(bb):
    clean = images.heldout_crops()["chelsea"][None]
    recon = (bb.decode(bb.encode(clean * 2 - 1)) + 1) / 2
    score = psnr(recon, clean)
    print(f"held-out chelsea reconstruction: {score:.2f} dB")
    assert score > AE_MIN_PSNR


@torch.no_grad()
def test_velocity_denoises_heldout_latent(bb):
    """x0_hat = x_t - t v beats both the noised input and the best structure-blind (per-element linear) estimate."""
    x0 = bb.encode(images.heldout_crops()["kodim23"][None] * 2 - 1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4])
    x_t = (1 - t) * x0 + t * eps
    x0_hat = bridge.predict_x0(x_t, t, bb.velocity(x_t, t))
    power = x0.square().mean()
    linear = 0.6 * power / (0.36 * power + 0.16) * x_t
    errors = {name: (e - x0).square().mean().item() for name, e in (("model", x0_hat), ("x_t", x_t), ("linear", linear))}
    print(f"latent MSE at t=0.4: {errors}")
    assert errors["model"] < errors["linear"] < errors["x_t"]
