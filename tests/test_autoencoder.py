"""FLUX.1 autoencoder: oracle equality with diffusers' AutoencoderKL, the official key set, tiling, errors."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

import weights
from model.autoencoder import CONFIGS, AutoEncoder, AutoEncoderParams
from model.tiling import run_tiled, tile_starts
from oracle import max_abs, randomize_

SMALL = AutoEncoderParams(
    resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2, 4], num_res_blocks=2, z_channels=4,
    scale_factor=0.37, shift_factor=0.11,
)  # fmt: skip
# One res block per level keeps the tiling tests fast; still 8x downsampling like FLUX.
TILING = AutoEncoderParams(
    resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=4,
    scale_factor=0.37, shift_factor=0.11,
)  # fmt: skip


def diffusers_config(p: AutoEncoderParams) -> dict:
    levels = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        latent_channels=p.z_channels,
        block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        act_fn="silu",
        norm_num_groups=32,
        sample_size=p.resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor,
    )


def smooth_image(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image in [-1, 1]: coarse uniform noise, bicubically upsampled 8x."""
    coarse = torch.rand(b, 3, h // 8, w // 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiling_ae():
    return randomize_(AutoEncoder(TILING), seed=3).eval()


# ------------------------------------------------------------------------------------------- oracle


@torch.no_grad()
def test_matches_diffusers_autoencoder_kl():
    ours = randomize_(AutoEncoder(SMALL), seed=0).eval()
    config = diffusers_config(SMALL)
    reference = AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(ours.state_dict(), config), strict=True)

    image = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square, batch 2
    latent = ours.encode(image)
    expected = SMALL.scale_factor * (reference.encode(image).latent_dist.mean - SMALL.shift_factor)
    assert latent.shape == (2, 4, 5, 7)
    encode_err = max_abs(latent, expected)

    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    decoded = ours.decode(z)
    expected = reference.decode(z / SMALL.scale_factor + SMALL.shift_factor).sample
    assert decoded.shape == (2, 3, 40, 56)
    decode_err = max_abs(decoded, expected)

    print(f"\nAE oracle max-abs (float32): encode {encode_err:.2e}, decode {decode_err:.2e}")
    assert encode_err <= 1e-5 and decode_err <= 1e-5


@torch.no_grad()
def test_sampling_draws_around_the_mean():
    ae = randomize_(AutoEncoder(TILING), seed=4).eval()
    image = smooth_image(1, 32, 48, seed=5)
    mean = ae.encode(image)
    a = ae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
    b = ae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, mean)
    # sample = scale * (mean_z + std * noise - shift), with the noise the generator gives in mean's shape
    logvar = ae.encoder(image).chunk(2, dim=1)[1]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = mean + TILING.scale_factor * torch.exp(0.5 * logvar) * noise
    assert max_abs(a, expected) <= 1e-5


# ------------------------------------------------------------------------------------------- official keys


def test_official_key_set_matches_diffusers_full_size():
    with torch.device("meta"):
        ours = AutoEncoder(CONFIGS["flux"])
        reference = AutoencoderKL(**diffusers_config(CONFIGS["flux"]))
    state = ours.state_dict()
    assert not list(ours.buffers())
    assert len(state) == 244 and sum(t.numel() for t in state.values()) == 83_819_683
    # No "first_stage_model." / "vae." prefix: the converter then takes every key as it is.
    converted = convert_ldm_vae_checkpoint(state, diffusers_config(CONFIGS["flux"]))
    assert len(converted) == len(state)  # every official key was mapped, and to a distinct name
    got = {k: tuple(v.shape) for k, v in converted.items()}
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert got == want
    # A few spot checks of the official layout.
    assert state["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in state and "decoder.up.0.upsample.conv.weight" not in state
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert state["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert state["decoder.conv_in.weight"].shape == (512, 16, 3, 3)


@torch.no_grad()
def test_builds_on_meta_and_loads_by_assignment_in_bfloat16():
    source = randomize_(AutoEncoder(TILING), seed=6).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    ae = weights.build(AutoEncoder, TILING, state, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ae.parameters())
    image = smooth_image(2, 16, 32, seed=8)
    latent = ae.encode(image)
    decoded = ae.decode(latent)
    assert latent.dtype == decoded.dtype == torch.bfloat16
    enc_rel = relative(latent, source.encode(image))
    dec_rel = relative(decoded, source.decode(latent.float()))
    print(f"\nAE bfloat16 vs float32 relative L2: encode {enc_rel:.3f}, decode {dec_rel:.3f}")
    assert enc_rel < 0.05 and dec_rel < 0.05


# ------------------------------------------------------------------------------------------- tiling


def test_tile_starts_cover_with_overlap():
    assert tile_starts(10, 16, 4) == [0]
    for length, tile, overlap in [(17, 16, 4), (40, 12, 4), (64, 64, 8), (100, 32, 8), (33, 16, 8)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("scales", [(8, 1), (1, 8)])
def test_run_tiled_blends_exactly_for_a_pointwise_function(scales):
    """With a function that treats every output pixel independently, tiling must change nothing: this checks
    the crop offsets, the window placement and that the blend weights are normalised (corners included)."""
    in_scale, out_scale = scales
    x = torch.randn(2, 3, 19 * in_scale, 30 * in_scale, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(1))

    def fn(t: torch.Tensor) -> torch.Tensor:  # pooled or repeated, then a per-pixel nonlinear channel mix
        t = F.avg_pool2d(t, in_scale) if in_scale > 1 else F.interpolate(t, scale_factor=out_scale)
        return torch.tanh(F.conv2d(t, mix))

    tiled = run_tiled(fn, x, tile=8, overlap=3, in_scale=in_scale, out_scale=out_scale)
    assert tiled.shape == fn(x).shape
    assert max_abs(tiled, fn(x)) <= 1e-6


def test_run_tiled_has_no_seams_when_tiles_disagree():
    """Give every tile its own constant offset (like per-tile GroupNorm statistics would): the blended output
    must cross-fade, so no step between neighbouring pixels exceeds the offset spread over the ramp length."""
    offsets = iter(torch.linspace(-1, 1, 12)[torch.randperm(12, generator=torch.Generator().manual_seed(0))])
    x = torch.zeros(1, 1, 28 * 8, 36 * 8)  # 12 + 2 * 8 by 12 + 3 * 8 units
    overlap = 4

    def fn(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 8) + next(offsets)

    tiled = run_tiled(fn, x, tile=12, overlap=overlap, in_scale=8, out_scale=1)  # 3 x 4 tiles
    steps = torch.cat([tiled.diff(dim=2).abs().flatten(), tiled.diff(dim=3).abs().flatten()])
    spread = tiled.max() - tiled.min()
    assert spread > 1.0  # the tiles really disagree
    assert steps.max() <= 2.0 / overlap + 1e-6  # offsets span 2; a hard cut would step by up to 2


@torch.no_grad()
def test_tiling_is_exact_when_one_tile_covers_the_image(tiling_ae):
    image = smooth_image(2, 64, 96, seed=9)
    latent = tiling_ae.encode(image)
    assert torch.equal(tiling_ae.encode(image, tile=96, overlap=16), latent)
    assert torch.equal(tiling_ae.decode(latent, tile=128, overlap=32), tiling_ae.decode(latent))


@torch.no_grad()
def test_tiled_autoencoder_is_close_to_untiled_without_seams(tiling_ae):
    """Tiles see only their own GroupNorm statistics, attention context and zero padding, so tiled results
    only approximate the untiled ones; random weights are far more sensitive to that than trained ones.
    Measured on this random net: relative L2 0.22 (encode) / 0.27 (decode). Seams are measured as the
    largest change of a neighbour-to-neighbour step (tiled vs untiled), relative to the largest untiled
    step: 0.24 / 0.45 with the linear cross-fade, 0.33 / 0.99 when overlaps are plainly averaged (hard edges)."""
    image = smooth_image(1, 128, 192, seed=10)
    latent = tiling_ae.encode(image)
    decoded = tiling_ae.decode(latent)
    tiled_latent = tiling_ae.encode(image, tile=96, overlap=32)  # 2 x 3 tiles of 12 x 12 latent pixels
    tiled_decoded = tiling_ae.decode(latent, tile=96, overlap=32)

    def seam(tiled: torch.Tensor, whole: torch.Tensor) -> float:
        return max((tiled.diff(dim=d) - whole.diff(dim=d)).abs().max() / whole.diff(dim=d).abs().max() for d in (2, 3))

    enc_rel, dec_rel = relative(tiled_latent, latent), relative(tiled_decoded, decoded)
    enc_seam, dec_seam = seam(tiled_latent, latent), seam(tiled_decoded, decoded)
    print(f"\nAE tiled vs untiled: relative L2 encode {enc_rel:.3f}, decode {dec_rel:.3f}; "
          f"seam encode {enc_seam:.3f}, decode {dec_seam:.3f}")  # fmt: skip
    assert enc_rel < 0.3 and dec_rel < 0.4
    assert enc_seam < 0.3 and dec_seam < 0.6


# ------------------------------------------------------------------------------------------- errors


def test_errors_say_what_was_expected_and_given(tiling_ae):
    with pytest.raises(ValueError, match=r"multiples of 8.*got shape \[1, 3, 60, 64\].*multiples of 16"):
        tiling_ae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*got shape \[1, 4, 64, 64\]"):
        tiling_ae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"got shape \[3, 64, 64\]"):
        tiling_ae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"latent must be \[B, 4, h, w\]; got shape \[1, 16, 8, 8\]"):
        tiling_ae.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"latent must be .*got shape \[4, 8, 8\]"):
        tiling_ae.decode(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"tile and overlap.*got tile=100, overlap=16"):
        tiling_ae.decode(torch.zeros(1, 4, 8, 8), tile=100, overlap=16)
    with pytest.raises(ValueError, match=r"overlap <= tile / 2.*got tile=64, overlap=40"):
        tiling_ae.encode(torch.zeros(1, 3, 64, 64), tile=64, overlap=40)
