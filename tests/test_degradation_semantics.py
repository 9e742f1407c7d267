"""Each synthetic degradation does what its name and docstring say, measured on inputs where the answer is known
(constant images, impulses, pairs of images degraded with the same draw) — not only "the PSNR drops", which a
degradation doing the opposite of its name (haze with the transmission inverted, rain darkening) also passes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import data

SEEDS = range(6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant(value: float, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.full((3, height, width), value)


def impulse(size: int = 61) -> torch.Tensor:
    image = torch.zeros(3, size, size)
    image[:, size // 2, size // 2] = 1.0
    return image


def spread(response: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(total mass, variance along the principal axis, [minor, major] eigenvalues) of a 2-D response [H, W]."""
    rows, cols = torch.meshgrid(torch.arange(response.shape[0]), torch.arange(response.shape[1]), indexing="ij")
    mass = response.sum()
    w = response / mass
    mr, mc = (w * rows).sum(), (w * cols).sum()
    cov = torch.tensor([[(w * (rows - mr) ** 2).sum(), (w * (rows - mr) * (cols - mc)).sum()],
                        [(w * (rows - mr) * (cols - mc)).sum(), (w * (cols - mc) ** 2).sum()]])
    return mass.item(), (mr.item(), mc.item()), torch.linalg.eigvalsh(cov.double())


def laplacian_energy(image: torch.Tensor) -> float:
    lap = 4 * image[:, 1:-1, 1:-1] - image[:, :-2, 1:-1] - image[:, 2:, 1:-1] - image[:, 1:-1, :-2] - image[:, 1:-1, 2:]
    return lap.square().mean().item()


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_is_white_zero_mean_with_sigma_in_15_to_50_levels(seed):
    gray = constant(0.5, 128, 128)
    residual = data.DEGRADATIONS["noise"](gray, gen(seed)) - gray
    sigma = 1.4826 * residual.abs().median().item()  # robust to the few values clamped at 0 and 1
    assert 15 / 255 * 0.97 <= sigma <= 50 / 255 * 1.03, sigma * 255
    assert abs(residual.mean().item()) < 0.003
    neighbours = (residual[:, :, 1:] * residual[:, :, :-1]).mean() / residual.square().mean()
    assert abs(neighbours) < 0.03  # white: neighbouring pixels uncorrelated
    channels = (residual[0] * residual[1]).mean() / residual.square().mean()
    assert abs(channels) < 0.03  # independent per channel


def test_noise_levels_cover_the_stated_range():
    gray = constant(0.5, 96, 96)
    sigmas = [1.4826 * (data.DEGRADATIONS["noise"](gray, gen(s)) - gray).abs().median().item() * 255
              for s in range(16)]
    assert min(sigmas) < 25 and max(sigmas) > 40


# ---------------------------------------------------------------------------------------------- blur


@pytest.mark.parametrize("seed", SEEDS)
def test_gaussian_blur_impulse_response_is_a_centred_gaussian_of_sigma_1_to_3(seed):
    out = data.DEGRADATIONS["blur"](impulse(), gen(seed))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    mass, centre, variances = spread(out[0])
    assert mass == pytest.approx(1.0, abs=1e-5)  # a normalised kernel: brightness kept
    assert centre == pytest.approx((30, 30), abs=1e-4)  # not shifted
    minor, major = variances.tolist()
    assert major == pytest.approx(minor, rel=1e-3)  # isotropic
    assert 0.9 <= minor <= 9.0, minor  # sigma^2, sigma in [1, 3] (the 3-sigma cut trims ~3%)


@pytest.mark.parametrize("name", ["blur", "motion-blur"])
def test_blurs_remove_high_frequency_energy_and_keep_the_mean(name):
    image = data.toy_images(1, 64, 64, seed=3)[0]
    for seed in SEEDS:
        out = data.DEGRADATIONS[name](image, gen(seed))
        assert laplacian_energy(out) < 0.5 * laplacian_energy(image)
        assert abs(out.mean().item() - image.mean().item()) < 0.01


@pytest.mark.parametrize("seed", SEEDS)
def test_motion_blur_impulse_response_is_a_thin_line_of_7_to_25_pixels(seed):
    out = data.DEGRADATIONS["motion-blur"](impulse(), gen(seed))
    mass, centre, variances = spread(out[0])
    assert mass == pytest.approx(1.0, abs=1e-5)
    assert centre == pytest.approx((30, 30), abs=0.05)
    minor, major = variances.tolist()
    length = (12 * major) ** 0.5  # a uniform segment of length L has variance L^2 / 12
    assert 6.5 <= length <= 26, length
    assert minor < 0.35  # a line, not a disc


# ---------------------------------------------------------------------------------------------- haze


def haze_maps(seed: int, size: int = 64):
    """Transmission t [3, H, W] and airlight A [3] recovered from two constant images hazed with one draw:
    I = J t + A (1 - t)  =>  t = (I1 - I2) / (J1 - J2),  A = (I1 - J1 t) / (1 - t)."""
    j1, j2 = constant(0.1, size, size), constant(0.7, size, size)
    i1, i2 = data.DEGRADATIONS["haze"](j1, gen(seed)), data.DEGRADATIONS["haze"](j2, gen(seed))
    t = (i1 - i2) / (j1 - j2)
    far = t < 0.9
    airlight = ((i1 - j1 * t) / (1 - t))
    return t, airlight, far, i1


@pytest.mark.parametrize("seed", SEEDS)
def test_haze_transmission_falls_with_depth_and_pulls_toward_the_airlight(seed):
    t, airlight, far, dark_hazed = haze_maps(seed)
    assert torch.allclose(t[0], t[1], atol=1e-5) and torch.allclose(t[0], t[2], atol=1e-5)  # one map per pixel
    assert t.max().item() == pytest.approx(1.0, abs=1e-4)  # the nearest point (d = 0) is clear
    assert torch.exp(torch.tensor(-2.5)).item() - 1e-4 <= t.min().item() <= torch.exp(torch.tensor(-1.0)).item() + 1e-4
    # depth grows toward the top row (far = 1 at the top): in every column the top is hazier than the bottom
    assert (t[0, 0] < t[0, -1]).all()
    assert t[0, :16].mean() < t[0, -16:].mean() - 0.2
    for c in range(3):  # one airlight per channel, gray 0.75..0.95 with a tint of +-0.03
        values = airlight[c][far[c]]
        assert values.numel() > 100
        assert values.max() - values.min() < 1e-3
        assert 0.72 - 1e-4 <= values.mean().item() <= 0.98 + 1e-4
    # a dark scene gets brighter everywhere, most where it is farthest
    assert (dark_hazed >= 0.1 - 1e-6).all()
    assert dark_hazed[:, :8].mean() > dark_hazed[:, -8:].mean() + 0.15


# ---------------------------------------------------------------------------------------------- low light


@pytest.mark.parametrize("seed", SEEDS)
def test_lowlight_darkens_with_a_gamma_curve_and_signal_dependent_noise(seed):
    bright, mid = (data.DEGRADATIONS["lowlight"](constant(v, 96, 96), gen(seed)) for v in (1.0, 0.5))
    scale, mid_level = bright.mean().item(), mid.mean().item()
    assert 0.15 - 0.005 <= scale <= 0.4 + 0.005  # s * 1 ** gamma
    ratio = mid_level / scale  # 0.5 ** gamma, gamma in [1.5, 2.5], with a little lift where noise clamps at 0
    assert 0.5**2.5 * 0.95 <= ratio <= 0.5**1.5 * 1.1, ratio
    # shot + read noise: brighter pixels are noisier; read noise alone keeps it above 0.005
    assert bright.std().item() > mid.std().item() > 0.004
    natural = data.toy_images(1, 64, 64, seed=4)[0]
    dark = data.DEGRADATIONS["lowlight"](natural, gen(seed))
    assert dark.mean() < 0.45 * natural.mean()
    assert torch.corrcoef(torch.stack([dark.flatten(), natural.flatten()]))[0, 1] > 0.8  # the scene is kept


# ---------------------------------------------------------------------------------------------- rain, snow


@pytest.mark.parametrize("seed", SEEDS)
def test_rain_adds_sparse_bright_near_vertical_streaks(seed):
    gray = constant(0.4, 96, 96)
    rainy = data.DEGRADATIONS["rain"](gray, gen(seed))
    assert (rainy >= gray - 1e-6).all()  # screen blend: only brighter
    streaks = data.DEGRADATIONS["rain"](torch.zeros(3, 96, 96), gen(seed))[0]
    covered = (streaks > 0.05).float().mean().item()
    assert 0.01 < covered < 0.5
    assert streaks.max() > 0.3
    across = (streaks[:, 1:] - streaks[:, :-1]).square().mean()  # a vertical line varies across its width,
    along = (streaks[1:] - streaks[:-1]).square().mean()  # hardly along it
    assert across > 2.5 * along, (across / along).item()  # streaks within 25 degrees of vertical


@pytest.mark.parametrize("seed", SEEDS)
def test_snow_adds_a_whitish_veil_and_bright_flakes(seed):
    mid = data.toy_images(1, 96, 96, seed=5)[0] * 0.85
    snowy = data.DEGRADATIONS["snow"](mid, gen(seed))
    assert (snowy >= mid - 1e-6).all()  # towards white 0.9 and flakes of white: never darker below 0.9
    black = data.DEGRADATIONS["snow"](torch.zeros(3, 96, 96), gen(seed))
    floor = black.min().item()
    assert 0.9 * 0.05 - 1e-4 <= floor <= 0.9 * 0.2 + 1e-4  # the veil v * 0.9, v in [0.05, 0.2]
    assert torch.equal(black[0], black[1]) and torch.equal(black[0], black[2])  # white flakes, gray veil
    flakes = (black[0] > 0.5).float().mean().item()
    assert 0.001 < flakes < 0.2 and black.max() > 0.8


# ---------------------------------------------------------------------------------------------- jpeg


def test_jpeg_is_pillows_codec_at_a_quality_from_10_to_40():
    image = data.toy_images(1, 48, 64, seed=6)[0]
    levels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def codec(quality: int) -> torch.Tensor:
        buffer = io.BytesIO()
        Image.fromarray(levels, "RGB").save(buffer, format="JPEG", quality=quality)
        return torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1).float() / 255

    encoded = {q: codec(q) for q in range(1, 101)}
    for seed in SEEDS:
        out = data.DEGRADATIONS["jpeg"](image, gen(seed))
        matches = [q for q, decoded in encoded.items() if torch.equal(out, decoded)]
        assert matches and all(10 <= q <= 40 for q in matches), matches
