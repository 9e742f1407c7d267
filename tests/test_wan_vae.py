"""The Wan2.1 VAE against diffusers' AutoencoderKLWan, its official key set, its causal chunking, and its errors.

The small test VAE keeps the official block structure (4 levels, dim_mult (1, 2, 4, 4), 2 residual blocks) because
diffusers' `convert_wan_vae_to_diffusers` hard-codes the decoder's block indices; only the base width shrinks.
"""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from oracle import max_abs, randomize_

from model.wan_vae import CONFIGS, WanVAE, WanVAEConfig
from weights import build

SMALL = WanVAEConfig(dim=8)  # widths 8, 16, 32, 32; z_dim 16 with the published statistics


@pytest.fixture(scope="module")
def small_vae() -> WanVAE:
    return randomize_(WanVAE(SMALL), seed=0).eval()


@pytest.fixture(scope="module")
def reference(small_vae: WanVAE) -> AutoencoderKLWan:
    ref = AutoencoderKLWan(base_dim=SMALL.dim, z_dim=SMALL.z_dim).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(small_vae.state_dict()), strict=True)
    return ref


def random_video(frames: int, height: int = 16, width: int = 24, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


def random_latent(frames: int, height: int = 2, width: int = 3, batch: int = 2, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SMALL.z_dim, frames, height, width, generator=generator)


def statistics(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


# ---------------------------------------------------------------------------------------------- oracle


@torch.no_grad()
def test_encode_matches_diffusers(small_vae, reference):
    video = random_video(9)  # [2, 3, 9, 16, 24]
    ours = small_vae.encode(video)
    mean, std = statistics(SMALL)
    expected = (reference.encode(video).latent_dist.mean - mean) / std  # diffusers returns the raw posterior mean
    assert ours.shape == (2, 16, 3, 2, 3) and ours.dtype == torch.float32
    err = max_abs(ours, expected)
    print(f"encode vs diffusers: max-abs {err:.2e} (latent max |x| {expected.abs().max():.2f})")
    assert err <= 1e-5


@torch.no_grad()
def test_decode_matches_diffusers(small_vae, reference):
    latent = random_latent(3)  # -> [2, 3, 9, 16, 24]
    ours = small_vae.decode(latent)
    mean, std = statistics(SMALL)
    expected = reference.decode(latent * std + mean).sample
    assert ours.shape == (2, 3, 9, 16, 24) and ours.dtype == torch.float32
    # Random weights must not saturate the clamp, or the comparison would say little.
    assert (ours.abs() < 1).float().mean() > 0.5
    err = max_abs(ours, expected)
    print(f"decode vs diffusers: max-abs {err:.2e}")
    assert err <= 1e-5


def test_official_key_set():
    with torch.device("meta"):
        ours = WanVAE(CONFIGS["wan2.1"])
        ref = AutoencoderKLWan()
    converted = {k: tuple(v.shape) for k, v in convert_wan_vae_to_diffusers(ours.state_dict()).items()}
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(converted) == len(ours.state_dict()) == 194  # the converter renamed every key, none collided
    assert converted == expected
    assert not list(ours.buffers())


# ---------------------------------------------------------------------------------------------- causality


@torch.no_grad()
def test_chunked_equals_whole_clip(small_vae):
    """`encode` feeds 1 + 4 + 4 frames and `decode` one latent frame at a time; one piece must give the same."""
    video = random_video(9)
    whole, _ = small_vae.conv1(small_vae.encoder(video, {})).chunk(2, dim=1)
    assert max_abs(small_vae.encode(video), small_vae.normalize(whole)) <= 1e-5

    latent = random_latent(3)
    whole = small_vae.decoder(small_vae.conv2(small_vae.denormalize(latent)), {}).clamp(-1, 1)
    assert max_abs(small_vae.decode(latent), whole) <= 1e-5


@torch.no_grad()
def test_prefix_is_independent_of_later_frames(small_vae):
    video = random_video(9)
    assert max_abs(small_vae.encode(video[:, :, :5]), small_vae.encode(video)[:, :, :2]) <= 1e-5
    assert max_abs(small_vae.encode(video[:, :, :1]), small_vae.encode(video)[:, :, :1]) <= 1e-5

    latent = random_latent(3)
    assert max_abs(small_vae.decode(latent[:, :, :2]), small_vae.decode(latent)[:, :, :5]) <= 1e-5


# ---------------------------------------------------------------------------------------------- loading, dtypes


@torch.no_grad()
def test_loads_a_pth_on_meta_and_runs_in_bfloat16(small_vae, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(small_vae.state_dict(), path)
    video = random_video(5, batch=1)
    latent = small_vae.encode(video)

    fp32 = build(WanVAE, SMALL, path)
    assert max_abs(fp32.encode(video), latent) == 0

    bf16 = build(WanVAE, SMALL, path, dtype=torch.bfloat16)
    latent_bf16 = bf16.encode(video)
    decoded_bf16 = bf16.decode(latent)
    assert latent_bf16.dtype == decoded_bf16.dtype == torch.float32
    assert decoded_bf16.shape == (1, 3, 5, 16, 24)
    assert max_abs(latent_bf16, latent) < 0.05 * latent.abs().max().item()
    assert max_abs(decoded_bf16, small_vae.decode(latent)) < 0.1


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 10, 16, 24), r"4k\+1 frames .* got 10; the nearest valid counts are 9 or 13"),
        ((2, 3, 4, 16, 24), r"got 4; the nearest valid counts are 1 or 5"),
        ((2, 3, 0, 16, 24), r"got 0; the nearest valid counts are 1"),
        ((2, 3, 9, 20, 24), r"divisible by 8, got 20x24 .* multiples of 16"),
        ((2, 3, 9, 16, 12), r"divisible by 8, got 16x12"),
        ((2, 4, 9, 16, 24), r"3 \(RGB\) channels .* got 4"),
        ((3, 9, 16, 24), r"video \[B, 3, F, H, W\], got a tensor of shape \(3, 9, 16, 24\) \(4 dims\)"),
    ],
)
def test_encode_errors(small_vae, shape, message):
    with pytest.raises(ValueError, match=message):
        small_vae.encode(torch.zeros(shape))


def test_encode_rejects_integer_video(small_vae):
    with pytest.raises(ValueError, match="floating video in \\[-1, 1\\], got dtype torch.uint8"):
        small_vae.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 4, 3, 2, 3), r"16 latent channels .* got 4"),
        ((16, 3, 2, 3), r"latent \[B, 16, T, h, w\], got a tensor of shape \(16, 3, 2, 3\) \(4 dims\)"),
        ((2, 16, 0, 2, 3), r"at least one latent frame"),
    ],
)
def test_decode_errors(small_vae, shape, message):
    with pytest.raises(ValueError, match=message):
        small_vae.decode(torch.zeros(shape))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attn_scales": (1.0,)}, "attention outside the middle blocks is not implemented"),
        ({"temperal_downsample": (True, True)}, r"one entry per downsample \(3\)"),
        ({"z_dim": 4}, "need z_dim=4 entries each, got 16 and 16"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        WanVAE(dataclasses.replace(SMALL, **change))


def test_spatial_tiles_one_covering_tile_is_exact_and_several_stay_close(small_vae):
    """Tiled encode/decode (each tile through the whole clip with its own causal cache): one tile covering the
    frame is the whole-frame result exactly; two tiles stay close (per-tile attention and convolution borders;
    random weights, measured 0.014 / 0.12 RMS against a mirrored result's 0.094 / 0.34)."""
    import data

    video = data.toy_videos(1, 5, 64, 96, seed=4)[0][None] * 2 - 1  # smooth moving pictures, as a camera gives
    with torch.no_grad():
        whole = small_vae.encode(video)
        assert torch.equal(small_vae.encode(video, tile=96, overlap=16), whole)
        tiled = small_vae.encode(video, tile=64, overlap=24)  # two tiles of 8 x 8 latent pixels, 3 shared
        assert tiled.shape == whole.shape
        error = (tiled - whole).square().mean().sqrt()
        assert error < 0.5 * (whole.flip(-1) - whole).square().mean().sqrt()
        frames = small_vae.decode(whole)
        assert torch.equal(small_vae.decode(whole, tile=96, overlap=16), frames)
        tiled_frames = small_vae.decode(whole, tile=64, overlap=24)
        assert tiled_frames.shape == frames.shape
        assert (tiled_frames - frames).square().mean().sqrt() < 0.5 * (frames.flip(-1) - frames).square().mean().sqrt()
