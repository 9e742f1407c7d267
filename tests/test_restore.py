"""restore.py on the tiny preset: prompts, tiles and chunks behave as identities where they should, blends have no
seams, requests are validated, per-request conditioning leaves the backbone as it was."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from snapshots import make_flux_snapshot, official_configs

import backbone
import bridge
import data
import defaults
import estimator
import prompts
import restore
from model import tiling


def options(**overrides) -> restore.RestoreOptions:
    return restore.RestoreOptions(**{"steps": 3, "chunk_frames": 9, "chunk_overlap": 4, **overrides})


def odd_image() -> torch.Tensor:
    """[3, 40, 56] (not a multiple of 16), on 8-bit levels as an image file holds them."""
    return data.toy_images(1, 40, 56, seed=1)[0].mul(255).round().div(255)


def test_zero_gate_prompt_is_the_plain_pretrained_bridge():
    bb = backbone.tiny("flux")
    image = odd_image()
    prompt = bb.new_prompt("deep", 8)  # gates at 0: untrained
    plain = restore.restore_image(bb, bb.velocity, image, options(tile=256))
    gated = restore.restore_image(bb, lambda x, t: bb.velocity(x, t, prompt), image, options(tile=256))
    assert torch.equal(plain, gated)
    with torch.no_grad():
        prompt.alphas.fill_(20.0)  # P ~ N(0, 0.02^2): the gate must open wide to move a random tiny model
    opened = restore.restore_image(bb, lambda x, t: bb.velocity(x, t, prompt), image, options(tile=256))
    assert (opened - plain).abs().max() > 1e-3


def test_tiles_covering_the_image_change_nothing():
    bb = backbone.tiny("flux")
    latent = torch.randn(1, 16, 16, 24)
    t = torch.full((1,), 0.3)
    with torch.no_grad():  # run_tiled itself (not the size shortcut) with one covering tile is exactly the velocity
        assert torch.equal(tiling.run_tiled(lambda crop: bb.velocity(crop, t), latent, 24, 4, 1, 1),
                           bb.velocity(latent, t))
    pointwise = restore.tiled_velocity(lambda x, t: torch.tanh(x) * t, 8, 2)(latent, t)  # 2 x 4 tiles, blended
    assert (pointwise - torch.tanh(latent) * 0.3).abs().max() <= 1e-6
    image = data.toy_images(1, 64, 128, seed=5)[0]
    whole = restore.restore_image(bb, bb.velocity, image, options(steps=2, tile=256))
    tiled = restore.restore_image(bb, bb.velocity, image, options(steps=2, tile=64))  # 2 tiles, 16-px fades
    assert tiled.shape == whole.shape
    # each tile sees less context: close, not equal; far closer than a flipped or a flat picture would be
    # (measured 0.057 against 0.18 and 0.15). Exact tiling checks: tests/test_sampling_geometry.py
    error = (tiled - whole).abs().mean()
    assert error < 0.5 * min((whole.flip(-1) - whole).abs().mean(), (whole - whole.mean()).abs().mean())


def test_tiles_that_disagree_leave_no_seam():
    """Each tile's velocity is a different constant (its crop's mean); one row of 5 tiles overlapping by exactly 6.
    Across a cross-fade the result may change by at most (the two neighbours' difference) / 6 per pixel; a hard
    seam, or an average pasted over the overlap, jumps by the whole difference or half of it."""
    latent = torch.randn(1, 16, 16, 56) + torch.linspace(0, 8, 56)
    velocity = restore.tiled_velocity(lambda x, t: torch.zeros_like(x) + x.mean(), tile=16, overlap=6)
    out = velocity(latent, torch.zeros(1))
    starts = tiling.tile_starts(56, 16, 6)
    assert starts == [0, 10, 20, 30, 40]
    means = torch.tensor([latent[..., c : c + 16].mean() for c in starts])
    neighbours = (means[1:] - means[:-1]).abs()
    step = (out[..., 1:] - out[..., :-1]).abs().max()
    assert step <= neighbours.max() / 6 + 1e-5
    assert neighbours.min() > 3 * step  # the tiles really disagree
    assert torch.equal(out[..., :10], torch.full_like(out[..., :10], means[0].item()))  # one tile alone: its own


def test_chunk_plan():
    assert restore.chunk_plan(33, 33, 8) == (33, [0])
    assert restore.chunk_plan(10, 33, 8) == (9, [0, 1])
    assert restore.chunk_plan(1, 33, 8) == (1, [0])
    length, starts = restore.chunk_plan(100, 33, 8)
    assert length == 33 and starts[0] == 0 and starts[-1] + length == 100
    assert all(b - a <= length - 8 for a, b in zip(starts, starts[1:]))


def test_video_chunks_covering_the_clip_change_nothing():
    """One covering chunk is the plain restoration of the clip (encode, walk the bridge, decode); in a chunked clip
    the frames only the first chunk covers are exactly that chunk's restoration. Exact chunk placement and
    blending: tests/test_sampling_geometry.py."""
    bb = backbone.tiny("wan")
    video = data.toy_videos(1, 9, 16, 16, seed=6)[0]
    covering = restore.restore_video(bb, bb.velocity, video, options(chunk_frames=33))
    y = bb.encode(video[None] * 2 - 1)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(defaults.mix_seed(0, 0)))
    x0 = bridge.sample(bb.velocity, y, eps, 0.4, 1e-4, 3)
    assert torch.equal(covering, ((bb.decode(x0)[0] + 1) / 2).clamp(0, 1))
    long = data.toy_videos(1, 17, 16, 16, seed=6)[0]
    chunked = restore.restore_video(bb, bb.velocity, long, options(chunk_frames=9, chunk_overlap=4))
    assert restore.chunk_plan(17, 9, 4) == (9, [0, 4, 8])
    assert chunked.shape == long.shape
    first = restore.restore_video(bb, bb.velocity, long[:, :9], options(chunk_frames=9))
    assert torch.equal(chunked[:, :4], first[:, :4])
    assert not torch.equal(chunked[:, 4:9], first[:, 4:9])  # there the second chunk is blended in


def test_chunks_that_disagree_blend_without_jumps():
    length, starts = restore.chunk_plan(40, 9, 4)
    chunks = {i: torch.full((3, length, 2, 2), float(i % 2)) for i in range(len(starts))}  # alternate 0 and 1
    video = tiling.blend_chunks(chunks, starts, length, 4)
    assert video.shape == (3, 40, 2, 2)
    assert (video[:, 1:] - video[:, :-1]).abs().max() <= 1 / 4 + 1e-6  # a hard cut would jump by 1
    assert torch.equal(video[:, :2], chunks[0][:, :2])  # frames only one chunk covers are that chunk's


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "steps >= 1"), ({"t0": 0.4, "t_min": 0.5}, "t_min <= T0"), ({"t0": 1.5}, "T0 <= 1"),
    ({"tile": 100}, "multiple of 32"), ({"tile": 32}, "at least 64"), ({"chunk_frames": 8}, "4k\\+1"),
    ({"chunk_frames": 9, "chunk_overlap": 9}, "overlap"),
])
def test_options_refuse_what_the_sampler_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        restore.RestoreOptions(**settings)


def test_tile_defaults_to_the_backbone_table():
    assert restore.tile_for(backbone.tiny("flux"), restore.RestoreOptions()) == backbone.BACKBONES["tiny-flux"].tile
    assert restore.tile_for(backbone.tiny("flux"), restore.RestoreOptions(tile=512)) == 512
    # the image miniature restores in tiles of its training crop (its prompts' image-token count)
    assert backbone.BACKBONES["flux-dev"].tile == 1024 and backbone.BACKBONES["mini-flux"].tile == 128
    assert backbone.BACKBONES["mini-flux"].tile == backbone.BACKBONES["mini-flux"].train_size[0]


def test_default_prompt_follows_the_miniature_record(tmp_path):
    spec = backbone.BACKBONES["mini-flux"]
    folder = tmp_path / "mini"
    (folder / "prompts").mkdir(parents=True)
    config = json.loads((spec.folder / backbone.MINIATURE_FILE).read_text())
    config.pop("default_prompt", None)
    for name in ("haze", defaults.ALL_IN_ONE, "bank"):
        (folder / "prompts" / f"{name}.safetensors").write_bytes(b"x")
    (folder / backbone.MINIATURE_FILE).write_text(json.dumps(config))
    assert restore.default_prompt(spec, folder) == [folder / "prompts" / f"{defaults.ALL_IN_ONE}.safetensors"]
    (folder / backbone.MINIATURE_FILE).write_text(json.dumps({**config, "default_prompt": "auto"}))
    assert restore.default_prompt(spec, folder) == folder / "prompts" / "bank.safetensors"
    (folder / "prompts" / "bank.safetensors").unlink()  # recorded, but no bank shipped: the all-in-one rule
    assert restore.default_prompt(spec, folder) == [folder / "prompts" / f"{defaults.ALL_IN_ONE}.safetensors"]
    assert restore.default_prompt(backbone.BACKBONES["tiny-flux"], None) == []


def test_prompt_files_by_shipped_name_default_and_none():
    spec = backbone.BACKBONES["mini-flux"]
    all_in_one = spec.folder / "prompts" / f"{defaults.ALL_IN_ONE}.safetensors"
    assert all_in_one.is_file() and restore.prompt_files([], spec, spec.folder) == [all_in_one]  # the default
    assert restore.prompt_files(["haze"], spec, spec.folder) == [spec.folder / "prompts" / "haze.safetensors"]
    assert restore.prompt_files([], spec, spec.folder, none=True) == []
    assert restore.prompt_files([], backbone.BACKBONES["tiny-flux"], None) == []  # not a miniature: no prompt
    with pytest.raises(ValueError, match="no shipped miniature prompt named 'fog'"):
        restore.prompt_files(["fog"], spec, spec.folder)


def test_prompts_are_checked_against_the_backbone(tmp_path):
    bb = backbone.tiny("flux")
    prompt = bb.new_prompt("deep", 8)
    meta = {"backbone": "flux", "config": "other-flux", "site": "deep"}
    prompts.save_prompt(prompt, tmp_path / "p.safetensors", meta)
    with pytest.raises(ValueError, match="trained for other-flux, the backbone is tiny-flux"):
        restore.load_prompts([tmp_path / "p.safetensors"], bb)


def test_t0_warning_names_the_prompt_and_both_times():
    metas = [{"t0": 0.4}, {"t0": 0.3}, {}]
    files = [Path("a.safetensors"), Path("runs/b/a.safetensors"), Path("c.safetensors")]
    assert restore.t0_warnings(files, metas, 0.4) == ["a.safetensors was trained at T0 0.3; sampling at T0 0.4"]
    assert restore.t0_warnings(files, metas, 0.3) == ["a.safetensors was trained at T0 0.4; sampling at T0 0.3"]
    assert restore.t0_warnings(files[:1], metas[:1], 0.4) == []


def test_prompts_are_sampled_at_the_t0_they_were_trained_at():
    assert restore.trained_t0([{"t0": 0.1}]) == 0.1
    assert restore.trained_t0([{"t0": 0.1}, {"t0": 0.5}]) == 0.3  # several: the mean
    assert restore.trained_t0([{"t0": 0.1}, {"t0": 0.5}], [0.75, 0.25]) == 0.2  # weighted as they are mixed
    assert restore.trained_t0([{}, {}]) is None and restore.trained_t0([]) is None  # the backbone's, then
    bb = backbone.tiny("flux")
    bank = estimator.Bank(["haze", "noise"], [(bb.new_prompt("deep", 4), {"t0": 0.5}),
                                              (bb.new_prompt("deep", 4), {"t0": 0.1})], estimator=None)
    options = restore.RestoreOptions(t0=0.4, prompt_t0=True)
    assert restore.decided_options(bank, {"noise": 1.0}, options).t0 == 0.1
    assert restore.decided_options(bank, {"haze": 0.5, "noise": 0.5}, options).t0 == 0.3
    fixed = restore.RestoreOptions(t0=0.4)  # --t0 given: every input at it
    assert restore.decided_options(bank, {"noise": 1.0}, fixed) is fixed


@torch.no_grad()
def test_text_conditioning_is_per_request(tmp_path, monkeypatch):
    """The text-prompting baseline changes the velocity it is built into, not the backbone: the empty-prompt
    velocity stays exactly what it was (a page serving several requests shares one backbone)."""
    snapshot = make_flux_snapshot(tmp_path / "FLUX.1-dev")
    official_configs(monkeypatch, snapshot)
    bb = backbone.load("flux", snapshot, torch.float32, "cpu", text_cache=tmp_path / "cache")
    x, t = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0)), torch.full((1,), 0.3)
    empty = bb.velocity(x, t)
    txt, pooled = bb.txt.clone(), bb.pooled.clone()
    texted = restore.velocity_for(bb, (), restore.text_conditioning(bb, "a sharp clean photo", tmp_path / "cache"))
    assert not torch.equal(texted(x, t), empty)
    assert torch.equal(bb.txt, txt) and torch.equal(bb.pooled, pooled)
    assert torch.equal(restore.velocity_for(bb)(x, t), empty)
    with pytest.raises(ValueError, match="needs an official snapshot"):
        restore.text_conditioning(backbone.tiny("flux"), "a photo")


@torch.no_grad()
def test_several_prompts_average_their_velocities():
    bb = backbone.tiny("wan")
    first, second = bb.new_prompt("deep", 8), bb.new_prompt("deep", 8)
    for prompt, gate in ((first, 5.0), (second, -3.0)):
        prompt.alphas.fill_(gate)
    x, t = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0)), torch.full((1,), 0.3)
    mixed = restore.velocity_for(bb, [first, second])(x, t)
    expected = (bb.velocity(x, t, first) + bb.velocity(x, t, second)) / 2
    assert torch.allclose(mixed, expected, atol=1e-6) and not torch.allclose(mixed, bb.velocity(x, t, first))


def test_video_chunks_in_spatial_tiles():
    """A chunk whose frames exceed the tile is encoded, restored and decoded in tiles: with the tile covering the
    frame nothing changes (bit for bit); with 2 x 2 tiles the result is close to the whole-frame one (the velocity
    and the VAE see less context per tile; the shipped video miniature on a real clip: 42 dB apart at 256 px in
    128 px tiles, see mini/wan/README.md), far closer than a flipped clip."""
    bb = backbone.tiny("wan")
    clip = data.toy_videos(1, 5, 64, 96, seed=6)[0]
    whole = restore.restore_chunk(bb, bb.velocity, clip, options(steps=2, tile=128), 0)
    covering = restore.restore_chunk(bb, bb.velocity, clip, options(steps=2, tile=96), 0)
    assert torch.equal(covering, whole)
    tiled = restore.restore_chunk(bb, bb.velocity, clip, options(steps=2, tile=64), 0)
    assert tiled.shape == whole.shape == clip.shape
    error = (tiled - whole).abs().mean()
    assert error < 0.5 * (whole.flip(-1) - whole).abs().mean()
    assert backbone.BACKBONES["wan-1.3b"].tile >= max(defaults.TRAIN_SIZE["wan"])  # 480 x 832: one tile


def test_grid_shift_moves_the_token_grid_per_step_and_nothing_else():
    """Pointwise velocities are unchanged by it (a shift, then the crop back); a velocity constant on each 2 x 2
    token steps at the token borders of call i's grid: (0, 0), then (1, 1), (0, 1), (1, 0), then (0, 0) again.
    Images [B, C, h, w] and videos [B, C, F, h, w] alike; the backbone table decides when the options do not."""
    def per_token(x, t):  # each 2 x 2 token's mean: what a per-token output layer that ignores the rest would give
        flat = x.reshape(x.shape[0], -1, *x.shape[-2:])
        mean = F.interpolate(F.avg_pool2d(flat, 2), scale_factor=2, mode="nearest")
        return mean.reshape(x.shape)

    for shape in ((1, 16, 8, 12), (1, 16, 3, 8, 12)):
        x = torch.randn(shape)
        t = torch.full((1,), 0.3)
        pointwise = restore.grid_shifted(lambda z, t: torch.tanh(z) * t)
        for _ in range(5):
            assert torch.equal(pointwise(x, t), torch.tanh(x) * t)
        shifted = restore.grid_shifted(per_token)
        for dy, dx in restore.GRID_SHIFTS + restore.GRID_SHIFTS[:1]:
            v = shifted(x, t)
            assert v.shape == x.shape
            rows = (v[..., 1:, :] - v[..., :-1, :]).abs().amax(dim=(0, 1, -1) if v.ndim == 4 else (0, 1, 2, -1))
            cols = (v[..., 1:] - v[..., :-1]).abs().amax(dim=tuple(range(v.ndim - 1)))
            inside_rows = [i for i in range(len(rows)) if (i + 1 - dy) % 2 and 0 < i + 1 - dy < x.shape[-2] - 1]
            inside_cols = [i for i in range(len(cols)) if (i + 1 - dx) % 2 and 0 < i + 1 - dx < x.shape[-1] - 1]
            assert rows[inside_rows].max() < 1e-6 and cols[inside_cols].max() < 1e-6  # flat inside its tokens
    bb = backbone.tiny("flux")
    image = data.toy_images(1, 32, 48, seed=3)[0]
    plain = restore.restore_image(bb, bb.velocity, image, options(steps=3))
    assert torch.equal(plain, restore.restore_image(bb, bb.velocity, image, options(steps=3, grid_shift=False)))
    assert not torch.equal(plain, restore.restore_image(bb, bb.velocity, image, options(steps=3, grid_shift=True)))
    assert backbone.BACKBONES["mini-flux"].grid_shift and not backbone.BACKBONES["flux-dev"].grid_shift
    assert not any(backbone.BACKBONES[name].grid_shift for name in ("wan-1.3b", "mini-wan", "tiny-flux", "tiny-wan"))
