"""A frozen, pre-trained backbone made ready for the method: DiT + VAE + the cached empty-prompt conditioning.

    bb = load("flux-dev", "FLUX.1-dev/")  |  load("wan", "Wan2.1-T2V-1.3B/")  |  load("mini-flux")  |  load("tiny-wan")
    latent = bb.encode(pixels)                        # [B, 3, H, W] (FLUX) or [B, 3, F, H, W] (Wan), in [-1, 1]
    v = bb.velocity(x_t, t, prompt)                   # what bridge.py calls; prompt from prompts.py or None
    pixels = bb.decode(latent)

The two backbones differ only here: FLUX works on packed 2x2 patch tokens with a pooled CLIP vector and a
guidance input; Wan works on the latent video directly with a UMT5 context. Everything the method does
(bridge.py, prompts.py, training.py, restore.py) sees a latent tensor and a velocity function.

Every backbone has a name in one table, `BACKBONES`: the official FLUX.1 and Wan2.1 releases (read from a
snapshot folder), the shipped miniatures (mini/, mini/wan/: a folder whose `miniature.json` records its kind)
and the tiny random presets. `resolve` turns what a command line says (a name or a kind, a folder, a preset)
into one of them; train.py and sample.py choose the same way.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import defaults
import prompts
import text
import weights
from model import flux as flux_model
from model import wan as wan_model
from model import clip as clip_model
from model import t5 as t5_model
from model import wan_vae
from model.autoencoder import CONFIGS as AE_CONFIGS
from model.autoencoder import AutoEncoder, AutoEncoderParams
from model.t5 import T5Config, UMT5Encoder
from model.wan_vae import WanVAE, WanVAEConfig

MINI = Path(__file__).resolve().parent / "mini"  # the shipped miniatures
MINIATURE_FILE = "miniature.json"  # what makes a folder a miniature: its networks' configs and its backbone kind


@dataclass(frozen=True)
class Spec:
    """One named backbone: which architecture, where its weights come from, and the sizes the method uses with it."""

    name: str  # the table's key, e.g. "flux-dev", "mini-flux", "tiny-wan"
    kind: str  # "flux" (images) or "wan" (video): the DiT, VAE and conditioning code
    source: str  # "snapshot" (an official release folder), "miniature" (a folder with miniature.json), "tiny"
    config: str  # the DiT config's name, as prompt files record it
    folder: Path | None = None  # a shipped miniature's folder
    prompt_len: int | None = None  # default deep-prompt tokens K (None: as many as the text conditioning has)
    train_size: tuple[int, int] = (128, 128)  # default training crop (H, W)
    train_frames: int | None = None  # default training clip length (video)
    tile: int = defaults.SMALL_TILE  # images larger than tile x tile pixels are restored in overlapping tiles
    t0: float = defaults.T0  # default bridge start time (training and sampling)
    frame_noise: str = "independent"  # video: default starting noise across latent frames (restore.FRAME_NOISE)
    grid_shift: bool = False  # the sampler moves the DiT's token grid one latent pixel per step (restore.grid_shifted)


_FLUX = dict(kind="flux", source="snapshot", prompt_len=defaults.PROMPT_LEN["flux"],
             train_size=defaults.TRAIN_SIZE["flux"], tile=defaults.TILE)
_WAN = dict(kind="wan", source="snapshot", prompt_len=defaults.PROMPT_LEN["wan"],
            train_size=defaults.TRAIN_SIZE["wan"], train_frames=defaults.TRAIN_FRAMES,
            tile=max(defaults.TRAIN_SIZE["wan"]))  # its native 480 x 832 frames in one tile
_TINY = dict(source="tiny", prompt_len=defaults.TINY_TEXT_LEN, train_size=(32, 32))
BACKBONES = {spec.name: spec for spec in (
    Spec("flux-dev", config="flux-dev", **_FLUX),
    Spec("flux-schnell", config="flux-schnell", **_FLUX),
    Spec("wan-1.3b", config="wan2.1-t2v-1.3b", **_WAN),
    Spec("wan-14b", config="wan2.1-t2v-14b", **_WAN),
    # The image miniature restores in tiles of its training crop: its prompts are learned on 128 px crops (256
    # image tokens), and in FLUX's joint attention 16 prompt tokens weigh less among more image tokens (pilot on
    # training photos, haze at 256 px: +0.5 dB untiled, +5.3 dB in 128 px tiles; mini/README.md).
    # Its sampler moves the token grid per step (restore.grid_shifted): on validation crops of the training photos
    # the block texture fell 0.18 -> 0.11 and SSIM rose 0.528 -> 0.537 (mean of six degradations), PSNR -0.03 to
    # +0.17 dB (mini/README.md, mini/texture.py). Not measured on FLUX.1 itself: off there.
    Spec("mini-flux", "flux", "miniature", "miniature", folder=MINI, tile=128, grid_shift=True),
    # The video miniature's bridge starts at T0 0.2: its small DiT leaves less grain and flicker from a shallower
    # start (held-out clip, clean round trip: 27.9 dB at 0.2, 27.1 at 0.4; rain prompt +1.5 dB vs +1.1; mini/wan/README.md),
    # and its starting noise is one frame shared by all latent frames (validation clips of the training footage:
    # flicker / the clean clip's, haze 1.09 -> 0.72, low light 0.69 -> 0.45, rain 2.35 -> 2.22; PSNR -0.02 to -0.07 dB).
    Spec("mini-wan", "wan", "miniature", "mini-wan", folder=MINI / "wan", train_size=(64, 64), train_frames=9, t0=0.2,
         frame_noise="shared"),
    Spec("tiny-flux", "flux", config="tiny-flux", **_TINY),
    Spec("tiny-wan", "wan", config="tiny-wan", train_frames=9, **_TINY),
)}
KINDS = ("flux", "wan")


@dataclass
class Backbone:
    kind: str  # "flux" or "wan"
    config: str  # the DiT config's name, e.g. "flux-dev"; recorded in prompt files
    dit: nn.Module  # Flux or WanModel, frozen
    vae: nn.Module  # AutoEncoder or WanVAE, frozen, float32 by default
    txt: Tensor  # [1, L, text_width] the text encoder's output for the empty prompt "" (T5 or UMT5)
    pooled: Tensor | None = None  # [1, 768] FLUX only: pooled CLIP vector of ""
    guidance: float = defaults.FLUX_GUIDANCE  # FLUX.1-dev's guidance input
    token_site: text.TokenSite | None = None  # the text encoders, kept only for the text-token baseline
    name: str | None = None  # its entry in BACKBONES (None: built by hand, e.g. in a test)
    folder: Path | None = None  # where it was loaded from (a snapshot or a miniature folder)

    def __post_init__(self):
        frozen = [self.dit, self.vae]
        if self.token_site is not None:
            frozen += [m for m in (self.token_site.t5, self.token_site.clip) if m is not None]
        for module in frozen:
            module.requires_grad_(False).eval()

    # ------------------------------------------------------------------ facts prompts need

    @property
    def num_blocks(self) -> int:
        return self.dit.num_blocks if self.kind == "flux" else self.dit.config.num_layers

    @property
    def width(self) -> int:
        """The DiT's hidden width D (the deep prompt's width)."""
        return self.dit.params.hidden_size if self.kind == "flux" else self.dit.config.dim

    @property
    def spec(self) -> Spec | None:
        return BACKBONES.get(self.name)

    @property
    def text_width(self) -> int:
        return self.txt.shape[-1]

    @property
    def pooled_width(self) -> int:
        return 0 if self.pooled is None else self.pooled.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def new_prompt(self, site: str, length: int) -> nn.Module:
        """A freshly initialised prompt (prompts.py) of `length` tokens that fits this backbone."""
        return prompts.new_prompt(site, length, self.num_blocks, self.width, self.text_width, self.pooled_width,
                                  self.token_site)

    def attach(self, prompt: nn.Module) -> nn.Module:
        """Connect a loaded prompt to this backbone: a text-token prompt runs through its text encoders."""
        if isinstance(prompt, prompts.TokenPrompt):
            if self.token_site is None:
                raise ValueError("this is a text-token prompt: the backbone must be loaded with its text encoders "
                                 "(keep_text_encoders=True)")
            prompt.site = self.token_site
        return prompt

    def to(self, device: torch.device | str) -> "Backbone":
        self.dit.to(device)
        self.vae.to(device)
        if self.token_site is not None:
            self.token_site.t5.to(device)
            if self.token_site.clip is not None:
                self.token_site.clip.to(device)
        self.txt = self.txt.to(device)
        self.pooled = None if self.pooled is None else self.pooled.to(device)
        return self

    # ------------------------------------------------------------------ pixels <-> latents

    @torch.no_grad()
    def encode(self, pixels: Tensor, tile: int | None = None, sample_seed: int | None = None) -> Tensor:
        """[B, 3, H, W] (FLUX) or [B, 3, F, H, W] (Wan) in [-1, 1] -> float32 latent [B, 16, ...].

        `tile` (pixels): encode overlapping spatial tiles of at most tile x tile pixels (bounded memory; a video
        tile is encoded through the whole clip with its own causal context).
        `sample_seed`: a posterior draw (mean + std * noise, noise from a generator of that seed on the device)
        instead of the posterior mean (the authors' latent_dist.sample())."""
        self.check_pixels(pixels)
        pixels = pixels.to(self.device, next(self.vae.parameters()).dtype)
        draw = {} if sample_seed is None else {
            "sample": True, "generator": torch.Generator(self.device).manual_seed(sample_seed)}
        if tile is not None:
            return self.vae.encode(pixels, tile=tile, overlap=defaults.tile_overlap(tile), **draw).float()
        return self.vae.encode(pixels, **draw).float()

    @torch.no_grad()
    def decode(self, latent: Tensor, tile: int | None = None) -> Tensor:
        """Inverse of `encode`: float32 pixels in [-1, 1]. `tile` as in `encode`."""
        latent = latent.to(self.device, next(self.vae.parameters()).dtype)
        if tile is not None:
            return self.vae.decode(latent, tile=tile, overlap=defaults.tile_overlap(tile)).float().clamp(-1, 1)
        return self.vae.decode(latent).float().clamp(-1, 1)

    def latent_shape(self, size: tuple[int, int], frames: int | None = None) -> tuple[int, ...]:
        """The latent shape (without batch) of images of `size` (H, W), or of clips of `frames` frames (Wan)."""
        if self.kind == "flux":
            down = self.vae.downscale
            return (self.vae.params.z_channels, size[0] // down, size[1] // down)
        down, time = self.vae.spatial_factor, self.vae.temporal_factor
        return (self.vae.config.z_dim, (frames - 1) // time + 1, size[0] // down, size[1] // down)

    def check_pixels(self, pixels: Tensor) -> None:
        """One clear error for an input the DiT cannot take (sizes must be multiples of 16; Wan: frames as the VAE
        compresses time, 4k+1 for Wan2.1's)."""
        ndim = 4 if self.kind == "flux" else 5
        layout = "[B, 3, H, W]" if self.kind == "flux" else "[B, 3, F, H, W]"
        if pixels.ndim != ndim or pixels.shape[1] != 3:
            raise ValueError(f"{self.kind} expects RGB pixels {layout}, got shape {list(pixels.shape)}")
        height, width = pixels.shape[-2:]
        multiple = defaults.SIZE_MULTIPLE
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for {self.kind}, got {height}x{width}")
        if self.kind == "wan" and (pixels.shape[2] - 1) % self.vae.temporal_factor:
            stride = self.vae.temporal_factor
            raise ValueError(f"Wan needs {stride}k+1 frames (1, {1 + stride}, {1 + 2 * stride}, ...), "
                             f"got {pixels.shape[2]}")

    # ------------------------------------------------------------------ the velocity

    def velocity(self, x: Tensor, t: Tensor, prompt: nn.Module | None = None, txt: Tensor | None = None,
                 pooled: Tensor | None = None) -> Tensor:
        """Velocity of the latent x [B, 16, H, W] (FLUX) or [B, 16, F, H, W] (Wan) at flow time t [B], float32.

        The DiT runs in its own dtype; x and the result are float32 (the bridge's arithmetic stays float32).
        `prompt` (a prompts.DeepPrompt / TextPrompt, or None for the plain pre-trained model) turns the base
        conditioning into the DiT's conditioning arguments. The base conditioning is the cached empty prompt's
        (`self.txt`, `self.pooled`) unless `txt` [1, L, text_width] (and for FLUX `pooled` [1, 768]) are given:
        another text's, per call, without changing the backbone (the text-prompting baseline).
        """
        batch = x.shape[0]
        txt = (self.txt if txt is None else txt).expand(batch, -1, -1)
        if self.kind == "flux":
            pooled = (self.pooled if pooled is None else pooled).expand(batch, -1)
            cond = prompt.flux_inputs(txt, pooled) if prompt is not None else {"txt": txt, "y": pooled}
            height, width = x.shape[-2:]
            guidance = torch.full((batch,), self.guidance, device=x.device) if self.dit.params.guidance_embed else None
            v = self.dit(
                img=flux_model.pack(x.to(self.dtype)),
                img_ids=flux_model.image_ids(batch, height, width, x.device),
                txt_ids=flux_model.text_ids(batch, txt.shape[1], x.device),
                timesteps=t.float(),
                guidance=guidance,
                **cond,
            )
            return flux_model.unpack(v, height, width).float()
        cond = prompt.wan_inputs(txt) if prompt is not None else {"context": txt}
        return self.dit(x.to(self.dtype), t.float(), **cond).float()


# ---------------------------------------------------------------------------------------------- choosing by name


def resolve(choice: str, folder: str | os.PathLike | None = None,
            preset: str | None = None) -> tuple[Spec, Path | None]:
    """(spec, folder) of the backbone a command line asks for.

    `choice` is a name of BACKBONES or a kind ("flux", "wan"). With a kind: `preset` "tiny" is the tiny preset;
    a `folder` holding miniature.json is a miniature of the kind it records; any other folder is an official
    snapshot, told apart by its files (FLUX.1-dev / -schnell by the transformer file, Wan2.1 1.3B / 14B by the
    checkpoint header); no folder is the shipped miniature of that kind. With a name, a folder must hold that
    backbone (a miniature's folder defaults to the shipped one). Raises ValueError naming what is wrong.
    """
    folder = None if folder is None else Path(folder)
    if choice in BACKBONES:
        spec = BACKBONES[choice]
        if preset is not None and spec.source != "tiny":
            raise ValueError(f"--preset {preset} is a backbone of its own; it does not go with {choice}")
        if spec.source == "tiny":
            if folder is not None:
                raise ValueError(f"{choice} is a random preset built in code; it reads no folder ({folder})")
            return spec, None
        found, folder = resolve(spec.kind, folder if folder is not None else spec.folder)
        if found.name != spec.name:
            raise ValueError(f"{folder} holds {found.name}, not {spec.name}")
        return spec, folder
    if choice not in KINDS:
        raise ValueError(f"unknown backbone {choice!r}; choose a kind {KINDS} or a name {sorted(BACKBONES)}")
    if preset is not None:
        if preset != "tiny":
            raise ValueError(f"unknown preset {preset!r}; the only preset is 'tiny'")
        return BACKBONES[f"tiny-{choice}"], None
    if folder is None:
        shipped = BACKBONES[f"mini-{choice}"]
        if not (shipped.folder / MINIATURE_FILE).is_file():
            raise ValueError(f"no {choice} snapshot folder given and the shipped {shipped.name} miniature is not in "
                             f"{shipped.folder}")
        return shipped, shipped.folder
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if (folder / MINIATURE_FILE).is_file():
        kind = miniature_kind(folder)
        if kind != choice:
            model = "a FLUX-architecture image model" if kind == "flux" else "a Wan-architecture video model"
            raise ValueError(f"{folder} holds a miniature of {model}: use the {kind} backbone")
        return BACKBONES[f"mini-{kind}"], folder
    config = flux_config(folder) if choice == "flux" else wan_config(folder)
    return next(spec for spec in BACKBONES.values() if spec.source == "snapshot" and spec.config == config), folder


def load(
    choice: str, folder: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device="cpu",
    text_cache=None, keep_text_encoders: bool = False, preset: str | None = None,
) -> Backbone:
    """The backbone `resolve(choice, folder, preset)` names, loaded: e.g. load("flux", "FLUX.1-dev/", torch.bfloat16,
    "cuda"), load("mini-flux"), load("tiny-wan"). `text_cache` and `keep_text_encoders` are for official snapshots
    (the miniatures always keep their tiny text encoders; the tiny presets are float32 on the CPU, then moved)."""
    spec, folder = resolve(choice, folder, preset)
    if spec.source == "tiny":
        return tiny(spec.kind).to(device)
    if spec.source == "miniature":
        return load_miniature(folder, dtype, device)
    load_official = load_flux if spec.kind == "flux" else load_wan
    return load_official(folder, dtype, device, text_cache, keep_text_encoders)


# ---------------------------------------------------------------------------------------------- official snapshots


def flux_config(snapshot: Path) -> str:
    """"flux-dev" or "flux-schnell": which transformer file the snapshot holds."""
    path = weights.find_file(snapshot, flux_model.CHECKPOINT_NAMES.values())
    return next(name for name, file in flux_model.CHECKPOINT_NAMES.items() if file == path.name)


def _wan_dit_file(snapshot: Path) -> Path:
    return weights.find_file(snapshot, ["diffusion_pytorch_model.safetensors.index.json",
                                        "diffusion_pytorch_model.safetensors"])


def wan_config(snapshot: Path) -> str:
    """The published Wan2.1 size in the snapshot ("wan2.1-t2v-1.3b" or "-14b"), from its checkpoint's header."""
    path = _wan_dit_file(snapshot)
    width = weights.tensor_shape(path, "patch_embedding.weight")[0]
    sizes = {c.dim: name for name, c in wan_model.CONFIGS.items()}
    if width not in sizes:
        raise weights.CheckpointError(f"{path}: a Wan DiT of width {width}; the published sizes are {sizes}")
    return sizes[width]


def load_flux(
    snapshot: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    text_cache: str | os.PathLike | None = None,
    keep_text_encoders: bool = False,
) -> Backbone:
    """FLUX.1-dev or -schnell from an official snapshot folder (which one: by the transformer file present).

    The text encoders run first, once, for the empty prompt (their output is cached on disk in `text_cache`), and
    are freed before the 12B transformer is loaded, unless `keep_text_encoders` (the text-token baseline). The
    autoencoder stays float32 (as in the paper).
    """
    snapshot = Path(snapshot)
    config = flux_config(snapshot)
    text_len = defaults.FLUX_TEXT_LEN[config]
    txt, pooled = text.flux_text([""], snapshot, text_len, device=device, dtype=dtype, cache_dir=text_cache)
    path = snapshot / flux_model.CHECKPOINT_NAMES[config]
    dit = weights.build(flux_model.Flux, flux_model.CONFIGS[config], path, dtype=dtype, device=device)
    vae = weights.build(AutoEncoder, AE_CONFIGS["flux"], weights.find_file(snapshot, ["ae.safetensors"]),
                        dtype=torch.float32, device=device)
    site = None
    if keep_text_encoders:
        site = text.TokenSite(text.load_t5(snapshot / "text_encoder_2", dtype, device), text_len, masked=False,
                              clip_encoder=text.load_clip(snapshot / "text_encoder", dtype, device))
    name = next(spec.name for spec in BACKBONES.values() if spec.source == "snapshot" and spec.config == config)
    return Backbone("flux", config, dit, vae, txt, pooled, token_site=site, name=name, folder=snapshot)


def load_wan(
    snapshot: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    text_cache: str | os.PathLike | None = None,
    keep_text_encoders: bool = False,
    context_len: int = defaults.WAN_CONTEXT_LEN,
) -> Backbone:
    """Wan2.1-T2V from an official snapshot folder. `context_len`: the empty prompt's UMT5 states are zero-padded
    to this many tokens; 226 is what the paper's authors used (and what their released prompts expect), the
    official Wan pipeline pads to 512. Which published size (1.3B or 14B) is read from the checkpoint's header.
    The UMT5 encoder runs once and is freed (unless `keep_text_encoders`, for the text-token baseline); the VAE
    stays float32."""
    snapshot = Path(snapshot)
    txt = text.wan_text([""], snapshot, context_len, device=device, dtype=dtype, cache_dir=text_cache)
    config = wan_config(snapshot)
    dit = weights.build(wan_model.WanModel, wan_model.CONFIGS[config], _wan_dit_file(snapshot), dtype=dtype,
                        device=device)
    vae = weights.build(WanVAE, wan_vae.CONFIGS["wan2.1"], weights.find_file(snapshot, wan_vae.CHECKPOINT_NAMES.values()),
                        dtype=torch.float32, device=device)
    site = None
    if keep_text_encoders:
        site = text.TokenSite(text.load_umt5(snapshot / text.WAN_T5_FILE, dtype, device), context_len, masked=True)
    name = next(spec.name for spec in BACKBONES.values() if spec.source == "snapshot" and spec.config == config)
    return Backbone("wan", config, dit, vae, txt, token_site=site, name=name, folder=snapshot)


# ---------------------------------------------------------------------------------------------- miniatures


def miniature_kind(folder: str | os.PathLike) -> str:
    """The backbone kind a miniature's miniature.json records ("backbone": "flux" or "wan")."""
    path = Path(folder) / MINIATURE_FILE
    try:
        kind = json.loads(path.read_text()).get("backbone")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable miniature description ({err})") from None
    if kind not in KINDS:
        raise ValueError(f"{path} records backbone {kind!r}; a miniature records \"backbone\": \"flux\" or \"wan\"")
    return kind


def load_miniature(folder: str | os.PathLike = MINI, dtype: torch.dtype = torch.float32, device="cpu") -> Backbone:
    """A miniature of this project (mini/, mini/wan/): the same code as FLUX.1 or Wan2.1 at small configs, in the
    official key format, with tiny frozen text encoders whose output for the empty prompt is the conditioning
    the DiT was pre-trained with (always kept: the text-token baseline and captions need them). `miniature.json`
    records the kind ("backbone") and the networks' configs:

        flux: `flux`, `autoencoder`, `t5`, `clip` (files flux, ae, t5, clip .safetensors) and `text_len`
        wan:  `wan`, `wan_vae`, `umt5` (files wan, wan_vae, umt5 .safetensors) and `text_len`
    """
    folder = Path(folder)
    spec = json.loads((folder / MINIATURE_FILE).read_text())
    kind = miniature_kind(folder)
    if kind == "flux":
        t5 = weights.build(t5_model.T5Encoder, t5_model.T5Config(**spec["t5"]), folder / "t5.safetensors", device=device)
        clip = weights.build(clip_model.CLIPTextEncoder, clip_model.CLIPTextConfig(**spec["clip"]),
                             folder / "clip.safetensors", device=device)
        with torch.no_grad():
            txt = t5(text.empty_t5_ids(spec["text_len"]).to(device))
            _, pooled = clip(text.empty_clip_ids(clip.config).to(device))
        dit = weights.build(flux_model.Flux, flux_model.FluxParams(**spec["flux"]), folder / "flux.safetensors",
                            dtype=dtype, device=device)
        vae = weights.build(AutoEncoder, AutoEncoderParams(**spec["autoencoder"]), folder / "ae.safetensors",
                            dtype=torch.float32, device=device)
        site = text.TokenSite(t5, spec["text_len"], masked=False, clip_encoder=clip)
        return Backbone("flux", BACKBONES["mini-flux"].config, dit, vae, txt.to(dtype), pooled.to(dtype),
                        token_site=site, name="mini-flux", folder=folder)
    umt5 = weights.build(UMT5Encoder, T5Config(**spec["umt5"]), folder / "umt5.safetensors", device=device)
    txt = _masked_empty_context(umt5, spec["text_len"])
    dit = weights.build(wan_model.WanModel, wan_model.WanConfig(**_tuples(spec["wan"])), folder / "wan.safetensors",
                        dtype=dtype, device=device)
    vae = weights.build(WanVAE, WanVAEConfig(**_tuples(spec["wan_vae"])), folder / "wan_vae.safetensors",
                        dtype=torch.float32, device=device)
    site = text.TokenSite(umt5, spec["text_len"], masked=True)
    return Backbone("wan", BACKBONES["mini-wan"].config, dit, vae, txt.to(dtype), token_site=site, name="mini-wan",
                    folder=folder)


def _tuples(config: dict) -> dict:
    """JSON lists back to the tuples the frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _masked_empty_context(umt5: UMT5Encoder, length: int) -> Tensor:
    """[1, length, d_model]: UMT5 on the empty prompt [</s>, <pad> ...], masked to </s> and zeroed after it (the
    video miniature's pre-training conditioning, as Wan's pipeline pads the empty prompt)."""
    ids = text.empty_t5_ids(length).to(umt5.token_embedding.weight.device)
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1
    with torch.no_grad():
        return umt5(ids, attention_mask=mask) * mask[..., None]


# ---------------------------------------------------------------------------------------------- tiny presets

# Tiny random configs of both backbones (same code paths, real VAE structure: 8x down in space, 4x in time) so
# that the whole method runs on a CPU in seconds. Used by `--preset tiny` in train.py / sample.py and the tests
# (BACKBONES "tiny-flux", "tiny-wan").
TINY_FLUX = flux_model.FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=4,
    depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True, guidance_embed=True,
)
TINY_AE = AutoEncoderParams(
    resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16,
    scale_factor=0.3611, shift_factor=0.1159,
)
TINY_WAN = wan_model.WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=64)
TINY_WAN_VAE = WanVAEConfig(dim=8)
TINY_T5 = t5_model.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2, num_buckets=8)
TINY_UMT5 = t5_model.T5Config(**{**TINY_T5.__dict__, "bias_in_every_layer": True})
TINY_CLIP = clip_model.CLIPTextConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, mlp_dim=64, max_positions=16)
TINY_TEXT_LEN = defaults.TINY_TEXT_LEN


def tiny(kind: str) -> Backbone:
    """The tiny random backbone of `kind` ("flux" or "wan"): always the same weights (seed 0), float32, CPU.

    It has tiny random text encoders too (kept, for the text-token baseline); its empty-prompt conditioning is
    their output for the empty prompt, as for the real models."""
    if kind not in ("flux", "wan"):
        raise ValueError(f"unknown backbone {kind!r}; choose 'flux' or 'wan'")
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # module initialisers draw from the global generator
    try:
        if kind == "flux":
            t5, clip = t5_model.T5Encoder(TINY_T5).eval(), clip_model.CLIPTextEncoder(TINY_CLIP).eval()
            site = text.TokenSite(t5, TINY_TEXT_LEN, masked=False, clip_encoder=clip)
            dit, vae = flux_model.Flux(TINY_FLUX), AutoEncoder(TINY_AE)
        else:
            site = text.TokenSite(t5_model.UMT5Encoder(TINY_UMT5).eval(), TINY_TEXT_LEN, masked=True)
            dit, vae = wan_model.WanModel(TINY_WAN), WanVAE(TINY_WAN_VAE)
    finally:
        torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        txt, pooled = site(torch.zeros(1, 0, site.t5_width), torch.zeros(1, 0, site.clip_width))
    return Backbone(kind, f"tiny-{kind}", dit, vae, txt, pooled, token_site=site, name=f"tiny-{kind}")
