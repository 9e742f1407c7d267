"""metrics.py: PSNR/SSIM against scikit-image on natural images, the Y/quantisation conventions, resize_to
against PIL, LPIPS math against the `lpips` package (when installed) and a plain re-computation, summaries."""

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from metrics import (LPIPS, LPIPSUnavailable, load_lpips, markdown_table, psnr, quantise, resize_to, rgb_to_y,
                     ssim, summarise)
from oracle import max_abs, randomize_
from weights import CheckpointError, save_safetensors

TOL = 1e-3  # the task's tolerance against skimage; the measured differences are printed (about 1e-15)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny; on a shared 2-core machine intra-op threads only add contention (10x+)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ fixtures


def _natural(name: str, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """A crop of a skimage sample photo as float32 [3, H, W] in [0, 1]."""
    pixels = getattr(skdata, name)()[top:top + height, left:left + width]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


CROPS = {  # non-square crops with texture and flat areas
    "astronaut": ("astronaut", 60, 140, 150, 190),
    "chelsea": ("chelsea", 40, 90, 170, 130),
    "coffee": ("coffee", 100, 200, 120, 210),
}


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Gaussian noise, NOT clamped: values outside [0, 1] exercise the metrics' clamping."""
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def _blurred(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(x[None], (2, 2, 2, 2), mode="replicate"), k2, groups=3)[0]


DISTORTIONS = {"noise": lambda x: _noisy(x, 0.08), "blur": _blurred}


def _uint8(x: torch.Tensor) -> np.ndarray:
    """The test's own 8-bit conversion: [3, H, W] float -> [H, W, 3] uint8 (clamp, *255 in float32, round)."""
    return np.round(np.clip(x.numpy().astype(np.float32), 0, 1) * np.float32(255)).astype(np.uint8).transpose(1, 2, 0)


def _y_numpy(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] float64 BT.601 luma in [16, 235], written out per channel."""
    rgb = rgb.astype(np.float64) / 255
    return 16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def _skimage_scores(pred: torch.Tensor, target: torch.Tensor, channel: str) -> tuple[float, float]:
    """(PSNR, SSIM) of one image pair [3, H, W] by scikit-image, on the test's own 8-bit / Y conversion."""
    p, t = _uint8(pred), _uint8(target)
    if channel == "y":
        p, t = _y_numpy(p), _y_numpy(t)
        axis = None
    else:
        p, t = p.astype(np.float64), t.astype(np.float64)
        axis = -1
    value_psnr = peak_signal_noise_ratio(t, p, data_range=255)
    value_ssim = structural_similarity(t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255, channel_axis=axis)
    return float(value_psnr), float(value_ssim)


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


@pytest.mark.parametrize("channel", ["rgb", "y"])
@pytest.mark.parametrize("distortion", sorted(DISTORTIONS))
@pytest.mark.parametrize("image", sorted(CROPS))
def test_psnr_ssim_match_skimage(image, distortion, channel):
    target = _natural(*CROPS[image])
    pred = DISTORTIONS[distortion](target)
    ref_psnr, ref_ssim = _skimage_scores(pred, target, channel)
    got_psnr, got_ssim = psnr(pred, target, channel=channel), ssim(pred, target, channel=channel)
    print(f"{image}/{distortion}/{channel}: psnr {got_psnr:.4f} (|d| {abs(got_psnr - ref_psnr):.2e}), "
          f"ssim {got_ssim:.5f} (|d| {abs(got_ssim - ref_ssim):.2e})")
    assert abs(got_psnr - ref_psnr) <= TOL
    assert abs(got_ssim - ref_ssim) <= TOL
    assert 0.2 < got_ssim < 1 and 15 < got_psnr < 50  # a real distortion, not a degenerate case


def test_crop_border_matches_skimage_on_cropped_arrays():
    target = _natural(*CROPS["coffee"])
    pred = _noisy(target, 0.05, seed=3)
    c = 7
    ref_psnr, ref_ssim = _skimage_scores(pred[:, c:-c, c:-c], target[:, c:-c, c:-c], "y")
    assert abs(psnr(pred, target, channel="y", crop_border=c) - ref_psnr) <= TOL
    assert abs(ssim(pred, target, channel="y", crop_border=c) - ref_ssim) <= TOL
    assert abs(psnr(pred, target, channel="y") - ref_psnr) > 1e-3  # the crop changed something


def test_batch_and_video_are_means_of_per_image_scores():
    clean = [_natural(*CROPS["astronaut"]), _natural("astronaut", 220, 150, 150, 190),
             _natural("astronaut", 300, 300, 150, 190)]
    degraded = [_noisy(clean[0], 0.03, 1), _blurred(clean[1]), _noisy(clean[2], 0.1, 2)]
    for channel in ("rgb", "y"):
        refs = [_skimage_scores(p, t, channel) for p, t in zip(degraded, clean)]
        ref_psnr, ref_ssim = np.mean([r[0] for r in refs]), np.mean([r[1] for r in refs])
        batch_p, batch_t = torch.stack(degraded), torch.stack(clean)  # [B, 3, H, W]
        video_p, video_t = batch_p.transpose(0, 1), batch_t.transpose(0, 1)  # [3, F, H, W]
        assert abs(psnr(batch_p, batch_t, channel=channel, video=False) - ref_psnr) <= TOL
        assert abs(ssim(batch_p, batch_t, channel=channel, video=False) - ref_ssim) <= TOL
        assert abs(psnr(video_p, video_t, channel=channel, video=True) - ref_psnr) <= TOL
        assert abs(ssim(video_p, video_t, channel=channel, video=True) - ref_ssim) <= TOL
    # [3, 3, H, W] is three images or three frames: a 4-D input must say which.
    with pytest.raises(ValueError, match="video=False .* video=True"):
        psnr(video_p, video_t)
    with pytest.raises(ValueError, match=r"a video \[3, F, H, W\]"):
        ssim(video_p[:2], video_t[:2], video=True)


def test_bad_inputs_are_loud():
    x = torch.rand(3, 20, 24)
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :19])
    with pytest.raises(ValueError, match="channel"):
        psnr(x, x, channel="ycbcr")
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(x, x, crop_border=5)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        ssim(torch.rand(4, 20, 24), torch.rand(4, 20, 24))
    with pytest.raises(ValueError, match="empty"):
        psnr(torch.rand(0, 3, 20, 24), torch.rand(0, 3, 20, 24), video=False)
    with pytest.raises(ValueError, match="float"):
        psnr((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        psnr(x, torch.where(x > 0.5, x, torch.nan))


# ------------------------------------------------------------------------------------------------ conventions


def test_y_channel_is_the_bt601_formula_per_pixel():
    levels = quantise(torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0)))
    y = rgb_to_y(levels)
    assert y.shape == (1, 6, 7)
    for i, j in [(0, 0), (2, 5), (5, 6), (3, 1)]:
        r, g, b = (levels[c, i, j].item() / 255 for c in range(3))
        assert y[0, i, j].item() == pytest.approx(16 + 65.481 * r + 128.553 * g + 24.966 * b, abs=1e-9)
    assert rgb_to_y(torch.zeros(3, 1, 1)).item() == pytest.approx(16)
    assert rgb_to_y(torch.full((3, 1, 1), 255.0)).item() == pytest.approx(235)


def test_quantisation_clamps_and_rounds_to_8_bits():
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 100.2 / 255, 1.0, 1.7])
    assert quantise(x).tolist() == [0, 0, 0, 1, 100, 255, 255]
    assert quantise(x).dtype == torch.float64
    target = _natural(*CROPS["chelsea"])
    # Out-of-range values measure exactly like their clamped versions.
    wild = target.clone()
    wild[:, :20] = -0.3
    wild[:, 20:40] = 1.4
    tame = wild.clamp(0, 1)
    assert psnr(wild, target) == psnr(tame, target) and ssim(wild, target) == ssim(tame, target)
    # Errors below half an 8-bit level vanish: quantisation is a real step, not a display detail.
    tiny = target + 0.3 / 255 * (torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) - 0.5)
    assert psnr(tiny, target) == math.inf
    assert psnr(target + 0.7 / 255, target) < 60


def test_identical_symmetric_and_monotone():
    target = _natural(*CROPS["coffee"])
    for channel in ("rgb", "y"):
        assert psnr(target, target, channel=channel) == math.inf
        assert ssim(target, target, channel=channel) == pytest.approx(1.0, abs=1e-12)
    pred = _noisy(target, 0.05)
    assert ssim(pred, target) == pytest.approx(ssim(target, pred), abs=1e-12)
    assert psnr(pred, target) == pytest.approx(psnr(target, pred), abs=1e-12)
    by_level = [psnr(_noisy(target, s, seed=4), target) for s in (0.01, 0.04, 0.12)]
    assert by_level[0] > by_level[1] > by_level[2], by_level
    by_level_ssim = [ssim(_noisy(target, s, seed=4), target) for s in (0.01, 0.04, 0.12)]
    assert by_level_ssim[0] > by_level_ssim[1] > by_level_ssim[2], by_level_ssim


# ------------------------------------------------------------------------------------------------ resize


def _pil_bicubic(image: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bicubic resize of each channel as a 32-bit float image (no 8-bit rounding in between)."""
    planes = [Image.fromarray(c.numpy().astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
              for c in image]
    return torch.from_numpy(np.stack([np.asarray(p) for p in planes])).clamp(0, 1)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_resize_to_matches_pil_bicubic(name):
    image = torch.from_numpy(getattr(skdata, name)().copy()).permute(2, 0, 1).float() / 255  # 512², 300x451, 400x600
    resized = resize_to(image)
    assert resized.shape == (3, 512, 512) and resized.dtype == torch.float32
    assert 0 <= resized.min() and resized.max() <= 1
    diff = max_abs(resized, _pil_bicubic(image, 512))
    print(f"resize_to vs PIL bicubic ({name} {list(image.shape[1:])}): max-abs {diff:.2e}")
    assert diff < 1e-4


def test_resize_to_video_frames_and_dtype():
    video = torch.rand(3, 2, 40, 70, generator=torch.Generator().manual_seed(0))
    out = resize_to(video, 32)
    assert out.shape == (3, 2, 32, 32)
    assert max_abs(out[:, 1], resize_to(video[:, 1], 32)) == 0
    assert resize_to(video.bfloat16(), 32).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="size"):
        resize_to(video, 0)


# ------------------------------------------------------------------------------------------------ LPIPS


def _filled_lpips(seed: int) -> LPIPS:
    model = LPIPS().to_empty(device="cpu").eval()
    randomize_(model, seed)
    for i in range(5):  # the learned heads are non-negative; keep that property
        getattr(model, f"lin{i}").model[1].weight.data.abs_()
    return model


def _lpips_by_hand(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (AlexNet) written out from the paper and the lpips package's constants, functional only."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1).double()
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1).double()

    def taps(img):
        h = (2 * img - 1 - shift) / scale
        outs = []
        h = F.relu(F.conv2d(h, state["features.0.weight"], state["features.0.bias"], stride=4, padding=2))
        outs.append(h)
        h = F.relu(F.conv2d(F.max_pool2d(h, 3, 2), state["features.3.weight"], state["features.3.bias"], padding=2))
        outs.append(h)
        h = F.max_pool2d(h, 3, 2)
        for k in (6, 8, 10):
            h = F.relu(F.conv2d(h, state[f"features.{k}.weight"], state[f"features.{k}.bias"], padding=1))
            outs.append(h)
        return outs

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = state[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
        total += ((nx - ny) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_refuses_without_weights():
    for paths in (None, []):
        with pytest.raises(LPIPSUnavailable, match="--lpips-weights") as err:
            load_lpips(paths)
        assert "random weights" in str(err.value) and "alex.pth" in str(err.value)
    with pytest.raises(LPIPSUnavailable, match="no weights loaded"):
        LPIPS()(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))


def test_lpips_math_matches_a_plain_recomputation():
    model = _filled_lpips(0).double()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).clamp(0, 1)
    got, ref = model(x, y), _lpips_by_hand(state, x, y)
    print(f"LPIPS vs plain re-computation: max-abs {max_abs(got, ref):.2e} (values {got.tolist()})")
    assert got.shape == (2,) and max_abs(got, ref) <= 1e-10
    assert model(x, x).abs().max() == 0 and (got > 0).all()


def test_lpips_alexnet_taps_have_torchvision_sizes():
    model = LPIPS()  # meta device: shapes only
    expected = {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
                "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
                "features.10.weight": (256, 256, 3, 3)}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: shapes[k] for k in expected} == expected
    assert sorted(shapes) == sorted([f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
                                    + [f"lin{i}.model.1.weight" for i in range(5)])
    h, sizes = torch.empty(1, 3, 224, 224, device="meta"), []
    for index, layer in enumerate(model.features):
        h = layer(h)
        if index in (1, 4, 7, 9, 11):
            sizes.append(tuple(h.shape[1:]))
    assert sizes == [(64, 55, 55), (192, 27, 27), (384, 13, 13), (256, 13, 13), (256, 13, 13)]


def _torchvision_alexnet_features() -> nn.Sequential:
    """AlexNet `features` as torchvision lays it out (13 modules), written in the test for the stub below."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def _lpips_package_dir() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    return Path(spec.submodule_search_locations[0]) if spec else None


# The `lpips` package is an optional oracle (not in requirements-test.txt): `pip install --no-deps lpips`
# (its torchvision dependency is not needed here and must not be installed).
needs_lpips_package = pytest.mark.skipif(_lpips_package_dir() is None, reason="the lpips package is not installed")


@needs_lpips_package
def test_lpips_matches_the_lpips_package(monkeypatch):
    # lpips imports torchvision only to fetch AlexNet's `features`; a stub hands it a randomly built one.
    stub = types.ModuleType("torchvision")
    stub.models = types.SimpleNamespace(alexnet=lambda pretrained=False: types.SimpleNamespace(
        features=_torchvision_alexnet_features()))
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    import lpips

    torch.manual_seed(0)
    reference = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False).eval()
    randomize_(reference, 5)
    with torch.no_grad():
        reference.scaling_layer.shift.copy_(torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        reference.scaling_layer.scale.copy_(torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
    state = {}
    for key, value in reference.state_dict().items():  # net.slice{k}.{i}.* -> features.{i}.*
        if key.startswith("net.slice"):
            state["features." + key.split(".", 2)[2]] = value
        elif key.startswith("lin") and not key.startswith("lins."):  # lins.* repeats lin0..4
            state[key] = value
    ours = LPIPS().to_empty(device="cpu").eval()
    ours.load_state_dict(state, strict=True)
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    y = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, ref = ours(x, y), reference(x, y, normalize=True).flatten()
    print(f"LPIPS vs lpips package (float32): max-abs {max_abs(got, ref):.2e}")
    assert max_abs(got, ref) <= 1e-5


@needs_lpips_package
def test_load_lpips_reads_the_published_formats(tmp_path):
    # torchvision's alexnet .pth layout (with its classifier) + the lpips package's own v0.1 alex.pth.
    backbone = {f"features.{k}": v for k, v in _torchvision_alexnet_features().state_dict().items()}
    backbone.update({"classifier.1.weight": torch.zeros(40, 92), "classifier.1.bias": torch.zeros(40)})  # shrunk
    torch.save(backbone, tmp_path / "alexnet-owt.pth")
    heads = _lpips_package_dir() / "weights" / "v0.1" / "alex.pth"
    model = load_lpips([tmp_path / "alexnet-owt.pth", heads])
    published = torch.load(heads, map_location="cpu", weights_only=True)
    assert max_abs(model.lin2.model[1].weight, published["lin2.model.1.weight"]) == 0
    assert max_abs(model.features[3].weight, backbone["features.3.weight"]) == 0
    x = quantise(torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))).float() / 255  # on 8-bit levels
    assert model.score(x, x) == 0 and model.score(x, _noisy(x, 0.1)) > 0
    # score() quantises like psnr: sub-level differences vanish.
    assert model.score(x[None], (x + 0.1 / 255)[None], video=False) == model.score(x, x + 0.1 / 255) == 0
    # One merged safetensors file works the same; a missing head is named.
    merged = {k: v for k, v in backbone.items() if not k.startswith("classifier")} | published
    save_safetensors(merged, tmp_path / "lpips_alex.safetensors")
    again = load_lpips(tmp_path / "lpips_alex.safetensors")
    assert again.score(x, _noisy(x, 0.1)) == model.score(x, _noisy(x, 0.1))
    with pytest.raises(CheckpointError, match="lin4.model.1.weight"):
        load_lpips([tmp_path / "alexnet-owt.pth"])
    with pytest.raises(CheckpointError, match="earlier"):
        load_lpips([tmp_path / "lpips_alex.safetensors", heads])


# ------------------------------------------------------------------------------------------------ tables


def test_summarise_and_markdown_table():
    rows = [
        {"dataset": "rain", "image_path": "a.png", "psnr": 30.0, "ssim": 0.90},
        {"dataset": "haze", "image_path": "b.png", "psnr": 20.0, "ssim": 0.70, "lpips": 0.25},
        {"dataset": "rain", "image_path": "c.png", "ssim": 0.80, "psnr": 34.0},
    ]
    summary = summarise(rows)
    assert list(summary) == ["rain", "haze"]
    assert summary["rain"] == {"count": 2, "psnr": 32.0, "ssim": pytest.approx(0.85)}
    assert summary["haze"] == {"count": 1, "psnr": 20.0, "ssim": 0.70, "lpips": 0.25}
    table = markdown_table(summary)
    assert table.splitlines() == [
        "| dataset | count | psnr | ssim | lpips |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| rain | 2 | 32.00 | 0.8500 | - |",
        "| haze | 1 | 20.00 | 0.7000 | 0.2500 |",
    ]
    with pytest.raises(ValueError, match="different metrics"):
        summarise(rows + [{"dataset": "rain", "psnr": 1.0}])
    with pytest.raises(ValueError, match="dataset"):
        summarise([{"psnr": 1.0}])


def test_lpips_score_is_the_frame_mean_of_the_definition_on_8_bit_levels():
    """`score` quantises like psnr (clamp, round to 8 bits) and averages per-frame distances of a video."""
    model = _filled_lpips(3).double()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    target = torch.rand(3, 2, 40, 48, generator=g, dtype=torch.float64)
    pred = target + 0.15 * torch.randn(target.shape, generator=g, dtype=torch.float64)  # leaves [0, 1] a little
    frames = [_lpips_by_hand(state, quantise(pred[:, f][None]) / 255, quantise(target[:, f][None]) / 255)
              for f in range(2)]
    expected = sum(d.item() for d in frames) / 2
    assert abs(model.score(pred, target, video=True) - expected) <= 1e-10
    assert abs(frames[0].item() - frames[1].item()) > 1e-4  # a mean of two different numbers


# ------------------------------------------------------------------------------------------------ block texture


def test_block_texture_sees_a_token_grid_and_not_a_smooth_photo():
    """A photo plus piecewise-constant 8 x 8 blocks scores well above 0; the photo itself, and the photo shifted
    off the grid, score 0 (against itself) and near 0; blocks on a 4-pixel grid show on grid=4, less on 8."""
    import metrics

    photo = _natural("astronaut", 0, 0, 128, 160)
    generator = torch.Generator().manual_seed(0)
    blocks = F.interpolate(torch.rand(1, 3, 16, 20, generator=generator) - 0.5, scale_factor=8, mode="nearest")[0]
    blocky = (photo + 0.15 * blocks).clamp(0, 1)
    assert metrics.block_texture(photo, photo) == 0
    assert metrics.block_texture(blocky, photo) > 0.3
    assert abs(metrics.grid_step_ratio(photo, 8) - 1) < 0.1  # a grid means nothing to a photo
    shifted = _natural("astronaut", 3, 5, 128, 160)
    assert abs(metrics.block_texture(shifted, photo)) < 0.05
    smooth = F.avg_pool2d(photo[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    assert abs(metrics.grid_step_ratio(smooth, 8) - 1) < 0.1
    fine = F.interpolate(torch.rand(1, 3, 32, 40, generator=generator) - 0.5, scale_factor=4, mode="nearest")[0]
    fine_blocky = (photo + 0.15 * fine).clamp(0, 1)
    assert metrics.block_texture(fine_blocky, photo, grid=4) > 0.3
    video = torch.stack([blocky, photo], dim=1)  # [3, 2, H, W]: the mean over frames
    clean = torch.stack([photo, photo], dim=1)
    assert metrics.block_texture(video, clean) == pytest.approx(metrics.block_texture(blocky, photo) / 2)
    with pytest.raises(ValueError, match="two 8-pixel cells"):
        metrics.grid_step_ratio(photo[:, :12, :12], 8)
