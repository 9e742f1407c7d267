"""Restoration with a frozen backbone and learned prompts: images, videos, evaluation items.

sample.py is a command line over these functions; a web page or a notebook calls them the same way. Everything
a request chooses (prompts, text, steps, T0, seed, tiles, chunks) is an argument: nothing here changes the
backbone, so one loaded backbone serves any number of different requests.

    bb = backbone.load("mini-flux")
    files = prompt_files(["haze"], bb.spec, bb.folder)       # paths, or the names of a miniature's shipped prompts
    loaded = load_prompts(files, bb)                         # [(prompt, metadata)], checked against the backbone
    velocity = velocity_for(bb, [prompt for prompt, _ in loaded])   # several prompts: velocities averaged
    image = restore_image(bb, velocity, image, RestoreOptions(steps=20), progress=print)
    video = restore_video(bb, velocity, video, RestoreOptions(chunk_frames=33))
    restored, row = evaluate_item(bb, velocity, item, RestoreOptions())

A restoration encodes the degraded input, walks the bridge from T0 to t_min with the prompted model (bridge.py)
and decodes. Sizes are kept exactly: images are reflect-padded to a multiple of 16 and cropped back, never
resized; images larger than the tile are restored in overlapping tiles blended without seams (VAE and
transformer); videos of any length are restored in overlapping 4k+1-frame chunks blended across the overlap.
Progress is reported through `progress(done, total)` after every model evaluation (it may raise to cancel);
errors are exceptions (ValueError for a bad input or request).
"""

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import backbone as backbones
import bridge
import data
import defaults
import estimator
import media
import metrics
import prompts
import protocol
import runtime
import streaming
import text
import weights
from model import tiling

ProgressFn = Callable[[int, int], None]  # (model evaluations done, total) of one restoration


FRAME_NOISE = ("independent", "shared")  # a video's starting noise: drawn anew per latent frame, or one for all


@dataclass(frozen=True)
class RestoreOptions:
    """The sampler's and the sizes' settings of one restoration (validated on construction)."""

    steps: int = defaults.STEPS  # model evaluations on the bridge
    t0: float = defaults.T0  # bridge start time
    t_min: float = defaults.T_MIN  # the sampler's last time
    seed: int = defaults.SEED  # seed of the starting noise (video chunk i: defaults.mix_seed(seed, i))
    tile: int | None = None  # pixels: larger images are restored in tiles (None: the backbone's, Spec.tile)
    grid_shift: bool | None = None  # move the DiT's token grid one latent pixel per step (None: Spec.grid_shift)
    chunk_frames: int = defaults.CHUNK_FRAMES  # video chunk length, 4k+1
    chunk_overlap: int = defaults.CHUNK_OVERLAP  # frames shared by neighbouring chunks
    # The authors' protocol, part by part (protocol.py; the defaults are ours):
    size: tuple[int, int] | None = None  # (H, W): inputs resized to it (PIL bicubic), the output stays that size
    first_frames: int | None = None  # videos: only the first min(n, first_frames) frames (4k+1), one pass
    timesteps: str = "continuous"  # "scheduler": the DiT sees t rounded to its scheduler's grid
    autocast: str | None = None  # e.g. "float16": the DiT runs under torch.autocast of that dtype
    vae_sample_seed: int | None = None  # encode with latent_dist.sample() from a generator of this seed
    fixed_noise: bool = False  # every call (every video chunk) starts from the noise of `seed` itself
    frame_noise: str = "independent"  # video: "shared": one noise frame of `seed`, the same at every latent frame
    prompt_t0: bool = False  # --prompt auto: each input at the T0 its chosen prompts were trained at, not `t0`

    def __post_init__(self):
        if self.frame_noise not in FRAME_NOISE:
            raise ValueError(f"frame_noise must be one of {FRAME_NOISE}, got {self.frame_noise!r}")
        if self.timesteps not in ("continuous", "scheduler"):
            raise ValueError(f"timesteps must be 'continuous' or 'scheduler', got {self.timesteps!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < defaults.SIZE_MULTIPLE
                                      or any(s % defaults.SIZE_MULTIPLE for s in self.size)):
            raise ValueError(f"the restoration size must be two multiples of {defaults.SIZE_MULTIPLE}, got {self.size}")
        if self.first_frames is not None and self.first_frames < 1:
            raise ValueError(f"first_frames must be at least 1, got {self.first_frames}")
        if self.steps < 1 or not 0 < self.t_min <= self.t0 <= 1:
            raise ValueError(f"need steps >= 1 and 0 < t_min <= T0 <= 1, got steps={self.steps}, "
                             f"t_min={self.t_min}, T0={self.t0}")
        if self.tile is not None and (self.tile % 32 or self.tile < 64):
            raise ValueError(f"the tile must be a multiple of 32, at least 64 pixels, got {self.tile}")
        if not defaults.is_clip_length(self.chunk_frames) or not 0 <= self.chunk_overlap < self.chunk_frames:
            raise ValueError(f"video chunks must have 4k+1 frames and overlap by [0, chunk frames) frames, got "
                             f"{self.chunk_frames} frames overlapping by {self.chunk_overlap}")


def dit_velocity(bb: backbones.Backbone, velocity: bridge.VelocityFn, options: RestoreOptions) -> bridge.VelocityFn:
    """`velocity` as the options feed the DiT: t rounded to the scheduler's grid, under autocast (protocol.py)."""
    if options.timesteps == "scheduler":
        velocity = protocol.rounded_velocity(velocity, bb.kind)
    if options.autocast is not None:
        velocity = protocol.autocast_velocity(velocity, getattr(torch, options.autocast))
    return velocity


def encode(bb: backbones.Backbone, pixels: Tensor, options: RestoreOptions, tile: int | None = None) -> Tensor:
    """The degraded latent: the posterior mean, or a draw seeded `options.vae_sample_seed`."""
    if options.vae_sample_seed is None:
        return bb.encode(pixels, tile=tile)
    return bb.encode(pixels, tile=tile, sample_seed=options.vae_sample_seed)


def tile_for(bb: backbones.Backbone, options: RestoreOptions) -> int:
    """The tile size in pixels: the request's, else the backbone's (Spec.tile), else FLUX.1's."""
    if options.tile is not None:
        return options.tile
    return bb.spec.tile if bb.spec is not None else defaults.TILE


def grid_shift_for(bb: backbones.Backbone, options: RestoreOptions) -> bool:
    """Whether the sampler moves the token grid per step: the request's choice, else the backbone's (Spec.grid_shift)."""
    if options.grid_shift is not None:
        return options.grid_shift
    return bb.spec is not None and bb.spec.grid_shift


GRID_SHIFTS = ((0, 0), (1, 1), (0, 1), (1, 0))  # latent-pixel offsets of the 2 x 2 token grid, one per step in turn


def grid_shifted(velocity: bridge.VelocityFn) -> bridge.VelocityFn:
    """`velocity` with the DiT's token grid moved from one call to the next: call i sees the latent [..., h, w]
    reflect-padded by GRID_SHIFTS[i % 4] latent pixels in front (and to an even size behind) and its velocity is
    cropped back. A DiT predicts each 2 x 2 token on its own, so its errors step at token borders (the image
    miniature's restored latents step 19-29% more across them than inside, the clean latent does not); moving the
    borders from step to step spreads those steps instead of stacking them. The bridge and the model are untouched:
    a sampler setting, one model call per step as before. Make one per restoration (it counts its calls)."""
    calls = 0

    def shifted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        dy, dx = GRID_SHIFTS[calls % len(GRID_SHIFTS)]
        calls += 1
        if not (dy or dx):
            return velocity(x, t)
        height, width = x.shape[-2:]
        planes = x.reshape(x.shape[0], -1, height, width)  # a video's frames as planes: reflect pads [B, C, H, W]
        padded = F.pad(planes, (dx, 2 - dx if dx else 0, dy, 2 - dy if dy else 0), mode="reflect")
        padded = padded.reshape(*x.shape[:-2], *padded.shape[-2:])
        return velocity(padded, t)[..., dy : dy + height, dx : dx + width]

    return shifted


def sampler_velocity(bb: backbones.Backbone, velocity: bridge.VelocityFn, options: RestoreOptions,
                     latent_tile: int | None) -> bridge.VelocityFn:
    """The velocity the sampler calls for one restoration: as the options feed the DiT (dit_velocity), in tiles of
    `latent_tile` latent pixels when given, with the token grid shifted per step when the options (or the
    backbone's default) say so."""
    velocity = dit_velocity(bb, velocity, options)
    if latent_tile is not None:
        velocity = tiled_velocity(velocity, latent_tile, defaults.tile_overlap(latent_tile))
    return grid_shifted(velocity) if grid_shift_for(bb, options) else velocity


def describe_plan(bb: backbones.Backbone, height: int, width: int, options: RestoreOptions,
                  frames: int | None = None) -> str:
    """One line saying what a restoration of a height x width input (a video: of `frames` frames) will do: the
    spatial tiles, the chunks, the steps and the T0."""
    tile = tile_for(bb, options)
    padded = (height + -height % defaults.SIZE_MULTIPLE, width + -width % defaults.SIZE_MULTIPLE)
    factor = bb.vae.downscale if bb.kind == "flux" else bb.vae.spatial_factor
    if max(padded) > tile:
        unit, overlap = tile // factor, defaults.tile_overlap(tile // factor)
        rows, cols = (len(tiling.tile_starts(side // factor, unit, overlap)) for side in padded)
        where = f"in {rows} x {cols} tiles of {tile} px"
    else:
        where = "in one piece"
    text = f"{width}x{height} px {where}"
    if frames is not None:
        length, starts = chunk_plan(frames, options.chunk_frames, options.chunk_overlap)
        text += f", {frames} frames in {len(starts)} chunk{'s' if len(starts) > 1 else ''} of {length}"
    shift = ", token grid shifted per step" if grid_shift_for(bb, options) else ""
    return text + f", {options.steps} steps from T0 {options.t0:g}" + shift


# ---------------------------------------------------------------------------------------------- prompts


def prompt_files(requested: Sequence[str], spec: backbones.Spec, folder: Path | None, none: bool = False) -> list[Path]:
    """The prompt files a request names, before any model is loaded.

    A path is itself. With a miniature (`spec.source` "miniature", loaded from `folder`) a bare name ("haze")
    is one of its shipped prompts, folder/prompts/NAME.safetensors. Nothing requested: a miniature's default, its
    all-in-one prompt (`defaults.ALL_IN_ONE`, trained on the mixture of every degradation, so it needs no name), or,
    without one, all its shipped prompts (velocities averaged); no prompt for the other backbones (the plain pre-trained model). `none`: no prompt at all."""
    if none:
        return []
    shipped = sorted(p for p in (folder / "prompts").glob("*.safetensors") if p.name != estimator.BANK_NAME) \
        if spec.source == "miniature" else []
    paths = []
    for file in requested:
        path = Path(file)
        if spec.source == "miniature" and not path.suffix and not path.exists():
            path = folder / "prompts" / f"{path.name}.safetensors"
            if not path.is_file():
                raise ValueError(f"no shipped miniature prompt named {file!r}; shipped: {[p.stem for p in shipped]}")
        paths.append(path)
    if requested:
        return paths
    all_in_one = [p for p in shipped if p.stem == defaults.ALL_IN_ONE]
    return all_in_one or shipped


def default_prompt(spec: backbones.Spec, folder: Path | None) -> list[Path] | Path:
    """What a restoration uses when no prompt is named: a miniature's choice, recorded in its miniature.json as
    "default_prompt" from its comparison table ("auto": its prompt bank, folder/prompts/bank.safetensors, returned
    as that one Path, for --prompt auto; absent: `prompt_files`' rule, the all-in-one prompt); other backbones:
    [] (the plain pre-trained model)."""
    if spec.source == "miniature":
        choice = json.loads((folder / backbones.MINIATURE_FILE).read_text()).get("default_prompt")
        if choice == "auto" and (folder / "prompts" / estimator.BANK_NAME).is_file():
            return folder / "prompts" / estimator.BANK_NAME
    return prompt_files([], spec, folder)


def needs_text_encoders(files: Sequence[Path]) -> bool:
    """Whether any of the prompt files is a text-token prompt (the backbone must then keep its text encoders)."""
    return any(weights.read_metadata(f).get("site") == "token" for f in files if f.suffix == ".safetensors")


def load_prompts(files: Sequence[Path], bb: backbones.Backbone) -> list[tuple[nn.Module, dict]]:
    """[(prompt, metadata)] of the files, each checked against the backbone (kind and config), attached to it
    (a text-token prompt runs through its text encoders) and on its device."""
    loaded = []
    for path in files:
        prompt, meta = prompts.load_prompt(path, backbone=bb.kind)
        if meta["config"] != bb.config:
            raise ValueError(f"{path}: this prompt was trained for {meta['config']}, the backbone is {bb.config}")
        check_prompt_shapes(path, prompt, meta["site"], bb)
        loaded.append((bb.attach(prompt.eval()).to(bb.device), meta))
    return loaded


def check_prompt_shapes(path: Path, prompt: nn.Module, site: str, bb: backbones.Backbone) -> None:
    """Every tensor of a loaded prompt has the shape a fresh prompt of its length has on this backbone (the
    length, axis 1, is the prompt's own); ValueError otherwise (a file whose metadata names the wrong config)."""
    state = prompt.state_dict()
    length = next(t.shape[1] for t in state.values() if t.ndim > 1)
    expected = {k: tuple(t.shape) for k, t in bb.new_prompt(site, length).state_dict().items()}
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{path}: tensor {key!r} is {list(tensor.shape)}; {bb.name} takes {list(expected[key])}")


def t0_warnings(files: Sequence[Path], metas: Sequence[dict], t0: float) -> list[str]:
    """One line per prompt trained at another bridge T0 than the one sampled at (`t0`)."""
    return [f"{Path(f).name} was trained at T0 {meta['t0']}; sampling at T0 {t0}"
            for f, meta in zip(files, metas) if "t0" in meta and meta["t0"] != t0]


def trained_t0(metas: Sequence[dict], mix: Sequence[float] | None = None) -> float | None:
    """The bridge T0 the prompts were trained at (their metadata's "t0"): one prompt's own, several prompts' mean
    weighted by `mix` (equal weights without one); None when none records it (sample at the backbone's T0)."""
    pairs = [(meta["t0"], w) for meta, w in zip(metas, mix or [1.0] * len(metas)) if "t0" in meta]
    if not pairs or sum(w for _, w in pairs) <= 0:
        return None
    return round(sum(t0 * w for t0, w in pairs) / sum(w for _, w in pairs), 6)


def check_text_prompting(spec: backbones.Spec | None) -> None:
    """Text prompting needs an official snapshot's text encoders and tokenizers, or the image miniature (whose
    captions are words of its own small vocabulary): a ValueError otherwise."""
    if spec is None or not (spec.source == "snapshot" or (spec.source == "miniature" and spec.kind == "flux")):
        raise ValueError("--text needs an official snapshot with its text encoders and tokenizers (--flux or --wan), "
                         "or the image miniature")


def text_conditioning(bb: backbones.Backbone, words: str, cache: Path | None = None) -> tuple[Tensor, Tensor | None]:
    """The base conditioning of `words` instead of the empty prompt's (the text-prompting baseline): (txt
    [1, L, text_width], pooled [1, 768] for FLUX or None), encoded by the snapshot's text encoders (cached on
    disk in `cache`). The backbone itself is not changed."""
    check_text_prompting(bb.spec)
    length = bb.txt.shape[1]
    if bb.spec.source == "miniature":
        vocabulary = json.loads((Path(bb.folder) / backbones.MINIATURE_FILE).read_text()).get("vocabulary")
        if not vocabulary:
            raise ValueError(f"{bb.folder}: this miniature records no caption vocabulary, so it has no text prompting")
        site = bb.token_site
        t5_ids, clip_ids = text.caption_ids(words.split(), vocabulary, length, site.clip.config)
        with torch.no_grad():
            return site.t5(t5_ids.to(bb.device)).to(bb.dtype), site.clip(clip_ids.to(bb.device))[1].to(bb.dtype)
    if bb.kind == "flux":
        return text.flux_text([words], bb.folder, length, bb.device, bb.dtype, cache)
    return text.wan_text([words], bb.folder, length, bb.device, bb.dtype, cache), None


def velocity_for(bb: backbones.Backbone, prompt_modules: Sequence[nn.Module] = (),
                 conditioning: tuple[Tensor, Tensor | None] | None = None,
                 mix: Sequence[float] | None = None) -> bridge.VelocityFn:
    """The velocity the sampler walks with: the plain pre-trained model (no prompt), one prompt's, or the average
    of several prompts' velocities at every step (the paper's recipe for mixed degradations); `mix` (one weight per
    prompt, summing to 1, e.g. from `--prompt auto`'s estimator) make it a weighted average. `conditioning`
    (from `text_conditioning`) replaces the empty prompt's for this velocity only."""
    txt, pooled = conditioning if conditioning is not None else (None, None)
    if mix is not None and (len(mix) != len(prompt_modules) or abs(sum(mix) - 1) > 1e-6 or min(mix, default=0) < 0):
        raise ValueError(f"need one non-negative weight per prompt summing to 1, got {list(mix)} for "
                         f"{len(prompt_modules)} prompts")
    if not prompt_modules:
        return lambda x, t: bb.velocity(x, t, None, txt, pooled)
    velocities = [lambda x, t, p=p: bb.velocity(x, t, p, txt, pooled) for p in prompt_modules]
    if len(velocities) == 1:
        return velocities[0]
    if mix is None:
        return bridge.average_velocity(velocities)

    def weighted(x: Tensor, t: Tensor) -> Tensor:
        return sum(w * velocity(x, t) for w, velocity in zip(mix, velocities))

    return weighted


def load_bank(path: Path, bb: backbones.Backbone) -> estimator.Bank:
    """A prompt bank (estimator.py) for `--prompt auto`, its prompts checked against the backbone (kind and
    config), attached and on its device; the estimator on the CPU (it looks at pixels only)."""
    bank = estimator.load_bank(path)
    for i, (prompt, meta) in enumerate(bank.prompts):
        if meta["backbone"] != bb.kind or meta["config"] != bb.config:
            raise ValueError(f"{path}: its prompts were trained for {meta['backbone']} ({meta['config']}), the "
                             f"backbone is {bb.kind} ({bb.config})")
        bank.prompts[i] = (bb.attach(prompt).to(bb.device), meta)
    return bank


def blind_velocity(bb: backbones.Backbone, bank: estimator.Bank,
                   degraded: Tensor) -> tuple[bridge.VelocityFn, dict[str, float]]:
    """`--prompt auto` for one input (image [3, H, W] or video [3, F, H, W] in [0, 1]): the estimator's
    decision {degradation: weight} and the velocity mixing only the chosen prompts with those weights (one
    prompt when one dominates: no extra model evaluations)."""
    decided = bank.decide(degraded)
    chosen = [bank.names.index(name) for name in decided]
    velocity = velocity_for(bb, [bank.prompts[i][0] for i in chosen], mix=list(decided.values()))
    return velocity, decided


def at_trained_t0(options: RestoreOptions, metas: Sequence[dict], mix: Sequence[float] | None = None) -> RestoreOptions:
    """`options` at the T0 these prompts were trained at (`trained_t0`); `options` themselves when none records one."""
    t0 = trained_t0(metas, mix)
    return options if t0 is None else dataclasses.replace(options, t0=t0)


def decided_options(bank: estimator.Bank, decided: dict[str, float], options: RestoreOptions) -> RestoreOptions:
    """The options of one `--prompt auto` decision: with `options.prompt_t0`, at the T0 its prompts were trained
    at (weighted by the decision); else `options` themselves."""
    if not options.prompt_t0:
        return options
    return at_trained_t0(options, [bank.prompts[bank.names.index(name)][1] for name in decided], list(decided.values()))


# ---------------------------------------------------------------------------------------------- images


def pad_to_16(pixels: Tensor) -> Tensor:
    """Reflect-pad the last two axes (H, W) up to multiples of 16; crop the result back with [..., :H, :W]."""
    height, width = pixels.shape[-2:]
    multiple = defaults.SIZE_MULTIPLE
    if min(height, width) < multiple:
        raise ValueError(f"the input is {height}x{width} pixels; the smallest size that can be restored is "
                         f"{multiple}x{multiple}")
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:]) if pixels.ndim > 3 else pixels[None]
    padded = F.pad(flat, (0, pad_w, 0, pad_h), mode="reflect")
    return padded.reshape(*pixels.shape[:-2], height + pad_h, width + pad_w)


def tiled_velocity(velocity: bridge.VelocityFn, tile: int, overlap: int) -> bridge.VelocityFn:
    """Velocity on latents [B, C, h, w] larger than `tile` latent pixels, from overlapping tiles cross-faded."""

    def tiled(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[-2] <= tile and x.shape[-1] <= tile:
            return velocity(x, t)
        return tiling.run_tiled(lambda crop: velocity(crop, t), x, tile, overlap, in_scale=1, out_scale=1)

    return tiled


@torch.no_grad()
def restore_image(bb: backbones.Backbone, velocity: bridge.VelocityFn, image: Tensor, options: RestoreOptions,
                  progress: ProgressFn | None = None) -> Tensor:
    """image [3, H, W] in [0, 1] -> restored [3, H, W] in [0, 1] (CPU). Larger than the tile: tiled throughout.
    With `options.size` the input is first resized to it and the result has that size."""
    if options.size is not None:
        image = protocol.resize_like_pil(image, options.size)
    height, width = image.shape[-2:]
    tile = tile_for(bb, options)
    pixels = pad_to_16(image)[None] * 2 - 1
    large = max(pixels.shape[-2:]) > tile
    y = encode(bb, pixels, options, tile=tile if large else None)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(options.seed)).to(y.device)
    velocity = sampler_velocity(bb, velocity, options, tile // bb.vae.downscale if large else None)
    x0 = bridge.sample(velocity, y, eps, options.t0, options.t_min, options.steps, on_step=progress)
    out = bb.decode(x0, tile=tile if large else None)
    return ((out[0] + 1) / 2).clamp(0, 1)[:, :height, :width].cpu()


# ---------------------------------------------------------------------------------------------- videos


def chunk_plan(frames: int, chunk: int, overlap: int) -> tuple[int, list[int]]:
    """(chunk length, chunk starts) covering `frames`: chunks of 4k+1 frames (at most `chunk`, at most the clip)
    whose neighbours share at least `overlap` frames (fewer when the clip is too short to allow it)."""
    length = min(chunk, defaults.clip_length_at_most(frames))
    return length, tiling.tile_starts(frames, length, min(overlap, length - 1))


@torch.no_grad()
def restore_chunk(bb: backbones.Backbone, velocity: bridge.VelocityFn, clip: Tensor, options: RestoreOptions,
                  index: int, on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """One chunk [3, L, H, W] in [0, 1] (L = 4k+1) -> restored [3, L, H, W] (CPU); frames larger than the tile
    are encoded, restored and decoded in overlapping spatial tiles (memory bounded by tile x chunk). From chunk `index`'s own
    starting noise (defaults.mix_seed), so a chunk restores the same in memory and in a stream. With
    options.frame_noise "shared" every latent frame starts from one noise frame: noise drawn anew per frame is
    randomness the input does not have, and shows as flicker (mini/wan/README.md)."""
    height, width = clip.shape[2:]
    pixels = pad_to_16(clip.contiguous())[None] * 2 - 1  # one memory layout, sliced or streamed
    tile = tile_for(bb, options)
    large = max(pixels.shape[-2:]) > tile  # frames larger than the tile: tiled throughout, as images
    y = encode(bb, pixels, options, tile=tile if large else None)
    if options.frame_noise == "shared":  # the same noise frame at every latent frame of every chunk
        frame = torch.randn(y[:, :, :1].shape, generator=torch.Generator().manual_seed(options.seed))
        eps = frame.to(y.device).expand_as(y)  # one frame crosses to the device, expanded there
    else:
        seed = options.seed if options.fixed_noise else defaults.mix_seed(options.seed, index)
        eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    velocity = sampler_velocity(bb, velocity, options, tile // bb.vae.spatial_factor if large else None)
    x0 = bridge.sample(velocity, y, eps, options.t0, options.t_min, options.steps, on_step=on_step)
    return ((bb.decode(x0, tile=tile if large else None)[0] + 1) / 2).clamp(0, 1)[:, :, :height, :width].cpu()


def restore_video(bb: backbones.Backbone, velocity: bridge.VelocityFn, video: Tensor, options: RestoreOptions,
                  progress: ProgressFn | None = None, rank: int = 0, world: int = 1) -> Tensor:
    """video [3, F, H, W] in [0, 1] -> restored [3, F, H, W] (CPU): overlapping 4k+1-frame chunks, cross-faded.

    With several processes (`rank` of `world`) the chunks are shared out over the ranks and every rank returns
    the blended whole; `progress` counts this rank's model evaluations. For a video file, `restore_video_file`
    does the same in a stream (memory bounded by the chunk). With `options.first_frames` only the first
    min(F, first_frames) frames, cut to 4k+1, are restored in one pass; with `options.size` every frame is first
    resized to it (the result has those frames and that size)."""
    if options.first_frames is not None:
        video = video[:, :defaults.clip_length_at_most(min(video.shape[1], options.first_frames))]
        options = dataclasses.replace(options, chunk_frames=video.shape[1], chunk_overlap=0)
    if options.size is not None:
        video = protocol.resize_like_pil(video, options.size)
    length, starts = chunk_plan(video.shape[1], options.chunk_frames, options.chunk_overlap)
    mine = list(range(rank, len(starts), world))
    total = len(mine) * options.steps
    restored = {}
    for done, index in enumerate(mine):
        on_step = None if progress is None else (
            lambda step, _, before=done * options.steps: progress(before + step, total))
        clip = video[:, starts[index] : starts[index] + length]
        restored[index] = restore_chunk(bb, velocity, clip, options, index, on_step)
    return tiling.blend_chunks(runtime.gather(restored, world), starts, length, options.chunk_overlap)


def restore_video_file(bb: backbones.Backbone, velocity: bridge.VelocityFn, source: Path, target: Path,
                       options: RestoreOptions, progress: ProgressFn | None = None,
                       side_by_side: bool = False) -> media.VideoInfo:
    """Restore the video file `source` into the .mp4 `target` in a stream (streaming.py): the same frames as
    `restore_video` on the whole clip, with memory bounded by one chunk; frame count, exact frame rate and audio
    kept. `side_by_side`: write input | output. Returns what `source` holds."""
    info = media.probe_video(source)
    length, starts = chunk_plan(info.frames, options.chunk_frames, options.chunk_overlap)
    total = len(starts) * options.steps

    def chunk(clip: Tensor, index: int) -> Tensor:
        on_step = None if progress is None else (
            lambda step, _, before=index * options.steps: progress(before + step, total))
        return restore_chunk(bb, velocity, clip, options, index, on_step)

    frames = streaming.iter_frames(source)
    inputs = []  # side by side: the input frames not yet written (at most about one chunk)
    if side_by_side:
        frames = (inputs.append(frame) or frame for frame in frames)
    with streaming.VideoWriter(target, info.fps, audio_from=source if info.has_audio else None) as writer:
        for frame in streaming.restore_stream(frames, info.frames, chunk, options.chunk_frames, options.chunk_overlap):
            writer.write(torch.cat([inputs.pop(0), frame], dim=-1) if side_by_side else frame)
    return info


# ---------------------------------------------------------------------------------------------- evaluation


def evaluation_items(path: Path, relative_to: Path | None = None, lenient: bool = False) -> list[data.ManifestItem]:
    """The (degraded, clean) items of a JSON manifest or of a folder with degraded/ and clean/ (those have
    degradation "unknown" and dataset "paired"). `relative_to`, `lenient`: as `data.Manifest` (the authors'
    manifests: their working directory, degradation optional)."""
    if path.suffix == ".json":
        return data.Manifest(path, None, relative_to=relative_to, lenient=lenient).items
    return [data.ManifestItem(degraded, clean, "unknown", "paired") for clean, degraded in
            data.PairedFolders(path, None).pairs]


def distinct_stems(paths: Sequence[Path], groups: Sequence[str] | None = None) -> list[str]:
    """Output names (without suffix) for `paths`, one each and all different: a path's stem where no other path
    shares it; else prefixed by its group (e.g. the dataset), then suffixed by its own suffix ("x.png", "x.jpg"
    -> "x_png", "x_jpg"), then by its position."""
    groups = list(groups) if groups is not None else [""] * len(paths)
    names = [Path(path).stem for path in paths]
    widen = (lambda i, name: f"{groups[i]}_{name}" if groups[i] else name,
             lambda i, name: f"{name}_{Path(paths[i]).suffix.lstrip('.')}" if Path(paths[i]).suffix else name,
             lambda i, name: f"{name}_{i}")
    for rule in widen:
        counts = Counter(names)
        names = [rule(i, name) if counts[name] > 1 else name for i, name in enumerate(names)]
    return names


def item_name(item: data.ManifestItem) -> str:
    """An item's name in the results: its degraded file's name (a video's: its frames' folder)."""
    return item.degraded[0].parent.name if isinstance(item.degraded, list) else item.degraded.name


def measure(pred: Tensor, target: Tensor, resize: int | None = None, lpips: metrics.LPIPS | None = None,
            paper: bool = False, dists: metrics.DISTS | None = None,
            no_reference: dict[str, Callable[[Tensor], float]] | None = None) -> dict:
    """PSNR and SSIM (RGB and Y; metrics.py states the conventions) of pred against target, both [3, H, W] or
    videos [3, F, H, W] (the mean over frames); resized to `resize` x `resize` first when given (the paper's
    512); LPIPS and DISTS if their weights were loaded. `paper`: also the authors' PSNR and SSIM (paper_psnr,
    paper_ssim: float RGB, scikit-image's SSIM, at protocol.EVAL_SIZE by bicubic without antialias);
    `no_reference` ({name: score(pred)}, metrics.no_reference) scores pred alone."""
    row = {}
    if paper:
        video = True if pred.ndim == 4 else None
        theirs = protocol.eval_resize(pred), protocol.eval_resize(target)
        row = {"paper_psnr": metrics.paper_psnr(*theirs, video=video),
               "paper_ssim": metrics.paper_ssim(*theirs, video=video)}
    if resize is not None:
        pred, target = metrics.resize_to(pred, resize), metrics.resize_to(target, resize)
    video = True if pred.ndim == 4 else None
    row = {**row, "psnr": metrics.psnr(pred, target, video=video), "ssim": metrics.ssim(pred, target, video=video),
           "psnr_y": metrics.psnr(pred, target, channel="y", video=video),
           "ssim_y": metrics.ssim(pred, target, channel="y", video=video)}
    if lpips is not None:
        device = next(lpips.parameters()).device
        row["lpips"] = lpips.score(pred.to(device), target.to(device), video=video)
    if dists is not None:
        device = dists.alpha.device
        row["dists"] = dists.score(pred.to(device), target.to(device), video=video)
    for name, score in (no_reference or {}).items():
        row[name] = score(pred)
    return row


def evaluate_item(bb: backbones.Backbone, velocity: bridge.VelocityFn | None, item: data.ManifestItem,
                  options: RestoreOptions, resize: int | None = None, lpips: metrics.LPIPS | None = None,
                  progress: ProgressFn | None = None, bank: estimator.Bank | None = None, *, paper: bool = False,
                  dists: metrics.DISTS | None = None, resize_mismatch: bool = False,
                  no_reference: dict | None = None) -> tuple[Tensor, dict]:
    """Read an item, restore its degraded input and measure it: (restored, row). The row names the item and
    holds `measure`'s figures of the restoration and, as input_*, of the degraded input itself. With a prompt
    `bank` (`--prompt auto`; `velocity` None) the velocity is `blind_velocity`'s and the row records its
    decision as "auto" {degradation: weight}. `paper`, `dists`: as `measure`. `resize_mismatch`: a degraded
    input of another size than its target is resized to the target's (PIL bicubic) instead of refused. A video
    restored on its first frames only (`options.first_frames`) is measured on those frames; a restoration of
    another size than the target (`options.size`) needs `resize`."""
    if isinstance(item.degraded, list):
        degraded = media.read_clip(item.degraded, 0, len(item.degraded))
        clean = media.read_clip(item.clean, 0, len(item.clean))
        restore = restore_video
    else:
        degraded, clean = media.read_image(item.degraded), media.read_image(item.clean)
        restore = restore_image
    name = item_name(item)
    if resize_mismatch and degraded.shape[:-2] == clean.shape[:-2] and degraded.shape != clean.shape:
        degraded = protocol.resize_like_pil(degraded, tuple(clean.shape[-2:]))
    if options.size is not None and resize is None:
        raise ValueError(f"{name}: restored at another size than its target: measuring needs a resize (e.g. "
                         f"{defaults.EVAL_RESIZE})")
    if degraded.shape != clean.shape:
        raise ValueError(f"{name}: input {list(degraded.shape)} and target {list(clean.shape)} differ in size")
    decided = None
    if bank is not None:
        velocity, decided = blind_velocity(bb, bank, degraded)
        options = decided_options(bank, decided, options)
    restored = restore(bb, velocity, degraded, options, progress)
    if restored.ndim == 4:  # the frames that were restored
        degraded, clean = degraded[:, :restored.shape[1]], clean[:, :restored.shape[1]]
    row = {"name": name, "dataset": item.dataset, "degradation": item.degradation,
           **({"auto": decided, "t0": options.t0} if decided is not None else {}),
           **measure(restored, clean, resize, lpips, paper, dists, no_reference),
           **{f"input_{k}": v for k, v in measure(degraded, clean, resize, lpips, paper, dists, no_reference).items()}}
    return restored, row


def evaluate(bb: backbones.Backbone, velocity: bridge.VelocityFn | None, items: Sequence[data.ManifestItem],
             options: RestoreOptions, resize: int | None = None, lpips: metrics.LPIPS | None = None,
             images: Path | None = None, progress: Callable[[str], ProgressFn | None] | None = None,
             rank: int = 0, world: int = 1, bank: estimator.Bank | None = None, *, paper: bool = False,
             dists: metrics.DISTS | None = None, resize_mismatch: bool = False,
             no_reference: dict | None = None) -> list[dict]:
    """`evaluate_item` of every item, in order: the rows (every rank returns all of them; the items are shared
    out over the ranks). `images`: also write each restored image there as NAME.png. `progress(label)` makes
    the progress callback of one item from its label ("name (3/10)"). `paper`, `dists`, `resize_mismatch`,
    `no_reference`: as `evaluate_item`."""
    rows = {}
    stems = distinct_stems([item.degraded[0].parent if isinstance(item.degraded, list) else item.degraded
                            for item in items], [item.dataset for item in items])
    for number, item in enumerate(items):
        if number % world != rank:
            continue
        label = f"{item_name(item)} ({number + 1}/{len(items)})"
        try:
            restored, rows[number] = evaluate_item(bb, velocity, item, options, resize, lpips,
                                                   progress(label) if progress is not None else None, bank,
                                                   paper=paper, dists=dists, resize_mismatch=resize_mismatch,
                                                   no_reference=no_reference)
        except ValueError as err:  # one unreadable or mismatched item: recorded, the others still measured
            reason = str(err) if str(item.degraded) in str(err) or str(item.clean) in str(err) else f"{label}: {err}"
            rows[number] = {"name": item_name(item), "dataset": item.dataset, "degradation": item.degradation,
                            "error": reason}
            continue
        if images is not None and not isinstance(item.degraded, list):
            rows[number]["image"] = f"{stems[number]}.png"
            media.write_image(images / rows[number]["image"], restored)
    rows = runtime.gather(rows, world)
    return [rows[i] for i in sorted(rows)]
