"""Learned prompts: the only parameters the method trains; the pre-trained backbone stays frozen.

A prompt turns the backbone's base conditioning — the text encoders' output for the empty prompt "" — into the
keyword arguments of the DiT's forward. Two sites:

  DeepPrompt  (the authors' released form) one shared bank P [1, K, D] at the DiT's width plus one gate alpha_i
              per block, initialised to 0 so that the untrained model is exactly the pre-trained one.
                FLUX: block i adds alpha_i * P to the text tokens entering its attention (`Flux.txt_attn_terms`).
                Wan:  block i's cross-attention becomes attn(x, ctx) + alpha_i * attn(x, ctx + P).
  TextPrompt  (the abstract's form) a learned offset [1, K, 4096] on the T5/UMT5 output tokens, and for FLUX a
              learned offset [1, 768] on the pooled CLIP vector; initialised to 0 for the same reason.
  TokenPrompt (a baseline) K learned vectors at the text encoders' INPUT embedding, trained through the frozen
              encoders, which must then stay in memory.

Prompt files are safetensors with metadata (backbone, config, site, K, the bridge's T0, training arguments).
The paper authors' released `wan_*.pt` files import into this format bit-exactly (`import_authors_wan`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import defaults
import weights

FORMAT = "ypt-prompt/1"
SITES = ("deep", "text", "token")


def fit_length(p: Tensor, length: int) -> Tensor:
    """Zero-pad or cut p [1, K, C] along the token axis to `length` tokens."""
    k = p.shape[1]
    return p[:, :length] if k >= length else F.pad(p, (0, 0, 0, length - k))


class DeepPrompt(nn.Module):
    """Shared prompt bank P [1, K, D] (init N(0, 0.02^2)) and per-block gates alpha [num_blocks] (init 0)."""

    def __init__(self, num_blocks: int, length: int, width: int, init_std: float = 0.02):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(1, length, width) * init_std)
        self.alphas = nn.Parameter(torch.zeros(num_blocks))

    def flux_inputs(self, txt: Tensor, pooled: Tensor) -> dict:
        """Forward arguments of `Flux`: the base txt [B, L, 4096] and pooled [B, 768] plus one term per block."""
        p = fit_length(self.prompts, txt.shape[1])
        terms = [(alpha * p).to(txt.dtype) for alpha in self.alphas]
        return {"txt": txt, "y": pooled, "txt_attn_terms": terms}

    def wan_inputs(self, context: Tensor) -> dict:
        """Forward arguments of `WanModel`: the base context [B, L, 4096] plus (P, alpha_i) for every block."""
        p = fit_length(self.prompts, context.shape[1])
        return {"context": context, "cross_prompts": [(p, alpha) for alpha in self.alphas]}


class TextPrompt(nn.Module):
    """Learned offsets on the text encoders' output: tokens [1, K, width] (and pooled [1, pooled_width] for FLUX)."""

    def __init__(self, length: int, width: int = 4096, pooled_width: int = 0):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, length, width))
        self.pooled = nn.Parameter(torch.zeros(1, pooled_width)) if pooled_width else None

    def flux_inputs(self, txt: Tensor, pooled: Tensor) -> dict:
        return {
            "txt": txt + fit_length(self.tokens, txt.shape[1]).to(txt.dtype),
            "y": pooled + self.pooled.to(pooled.dtype),
        }

    def wan_inputs(self, context: Tensor) -> dict:
        return {"context": context + fit_length(self.tokens, context.shape[1]).to(context.dtype)}


class TokenPrompt(nn.Module):
    """The text-token baseline: K learned vectors at the text encoders' INPUT embedding (T5/UMT5 [1, K, C], and for
    FLUX CLIP [1, Kc, 768]) in place of prompt words; the frozen encoders turn them into the conditioning at every
    step (`text.TokenSite`, attached by `Backbone.attach`; the encoders are not part of the prompt's state)."""

    def __init__(self, length: int, t5_width: int, clip_length: int = 0, clip_width: int = 0):
        super().__init__()
        self.t5 = nn.Parameter(torch.zeros(1, length, t5_width))
        self.clip = nn.Parameter(torch.zeros(1, clip_length, clip_width)) if clip_width else None
        self.site = None

    def _encode(self) -> tuple[Tensor, Tensor | None]:
        if self.site is None:
            raise ValueError("a text-token prompt needs the text encoders in memory: attach it with Backbone.attach")
        return self.site(self.t5, self.clip)

    def flux_inputs(self, txt: Tensor, pooled: Tensor) -> dict:
        states, new_pooled = self._encode()
        return {"txt": states.to(txt.dtype).expand(txt.shape[0], -1, -1),
                "y": new_pooled.to(pooled.dtype).expand(pooled.shape[0], -1)}

    def wan_inputs(self, context: Tensor) -> dict:
        states, _ = self._encode()
        return {"context": states.to(context.dtype).expand(context.shape[0], -1, -1)}


def new_prompt(
    site: str, length: int, num_blocks: int, width: int, text_width: int, pooled_width: int, token_site=None
) -> nn.Module:
    """A freshly initialised prompt of K = `length` tokens for a DiT of `num_blocks` blocks of `width` whose text
    conditioning is [*, L, text_width] (and a pooled vector of `pooled_width`, 0 for none). The "token" site
    needs the encoders (`token_site`, a text.TokenSite) and starts from embeddings of random vocabulary tokens.
    See Backbone.new_prompt."""
    if site == "deep":
        return DeepPrompt(num_blocks, length, width)
    if site == "text":
        return TextPrompt(length, text_width, pooled_width)
    if site == "token":
        if token_site is None:
            raise ValueError("the text-token site needs the text encoders in memory (load the backbone with them)")
        clip_length = min(length, token_site.clip.config.max_positions - 2) if token_site.clip is not None else 0
        prompt = TokenPrompt(length, token_site.t5_width, clip_length, token_site.clip_width)
        with torch.no_grad():
            prompt.t5.copy_(token_site.initial_vectors(length, "t5"))
            if prompt.clip is not None:
                prompt.clip.copy_(token_site.initial_vectors(clip_length, "clip"))
        prompt.site = token_site
        return prompt
    raise ValueError(f"unknown prompt site {site!r}; choose one of {SITES}")


# ---------------------------------------------------------------------------------------------- files


def save_prompt(prompt: nn.Module, path: str | os.PathLike, meta: dict) -> None:
    """Write the prompt's tensors and `meta` (must name backbone, config, site) to a safetensors file atomically."""
    missing = {"backbone", "config", "site"} - meta.keys()
    if missing:
        raise ValueError(f"prompt metadata lacks {sorted(missing)}")
    weights.save_safetensors(prompt.state_dict(), path, metadata={"format": FORMAT, **meta})


def read_meta(path: str | os.PathLike) -> dict:
    """A prompt file's metadata (JSON-encoded values decoded), without its tensors; refuses other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a prompt file of this project (.safetensors); the authors' released .pt "
                         "files convert with `python prompts.py import FILE.pt OUT.safetensors`")
    raw = weights.read_metadata(path)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a prompt file of this project (no '{FORMAT}' format tag)")
    return {k: _decode(v) for k, v in raw.items()}


def load_prompt(path: str | os.PathLike, backbone: str | None = None) -> tuple[nn.Module, dict]:
    """Read a prompt file -> (prompt module, metadata). With `backbone` given, a file made for another backbone
    is refused with a clear error."""
    path = Path(path)
    meta = read_meta(path)
    if backbone is not None and meta["backbone"] != backbone:
        raise ValueError(f"{path}: this prompt was trained for {meta['backbone']} ({meta['config']}), not {backbone}")
    if "t0" in meta and not (isinstance(meta["t0"], (int, float)) and not isinstance(meta["t0"], bool)
                             and 0 < meta["t0"] <= 1):
        raise ValueError(f"{path}: its metadata's t0 is {meta['t0']!r}, not a bridge time in (0, 1]")
    state = weights.read_state_dict(path)
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} is {tensor.dtype}; a prompt's tensors are floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values; this prompt is broken")
    try:
        prompt = _prompt_for(meta, state, path)
    except (KeyError, IndexError) as err:  # a file with the tag but not the tensors (or metadata) of its site
        raise ValueError(f"{path}: not a complete prompt file (missing {err})") from None
    weights.load_into(prompt, state)
    return prompt, meta


def _prompt_for(meta: dict, state: dict, path: Path) -> nn.Module:
    """The (untrained) prompt module a file's metadata and tensor shapes describe."""
    if meta["site"] == "deep":
        prompt = DeepPrompt(state["alphas"].shape[0], state["prompts"].shape[1], state["prompts"].shape[2])
    elif meta["site"] == "text":
        pooled = state.get("pooled")
        prompt = TextPrompt(state["tokens"].shape[1], state["tokens"].shape[2], 0 if pooled is None else pooled.shape[1])
    elif meta["site"] == "token":
        clip_shape = state["clip"].shape[1:] if "clip" in state else (0, 0)
        prompt = TokenPrompt(state["t5"].shape[1], state["t5"].shape[2], *clip_shape)
    else:
        raise ValueError(f"{path}: unknown prompt site {meta['site']!r}")
    return prompt


def _decode(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# The authors' released prompt files, per backend: (our config, K, alphas = the DiT's blocks, text length).
AUTHORS_FORMATS = {
    "wan": ("wan2.1-t2v-1.3b", defaults.PROMPT_LEN["wan"], 30, defaults.WAN_CONTEXT_LEN),
    "flux": ("flux-dev", defaults.PROMPT_LEN["flux"], 19 + 38, defaults.FLUX_TEXT_LEN["flux-dev"]),
}


def import_authors(path: str | os.PathLike) -> tuple[DeepPrompt, dict]:
    """The paper authors' released prompt (`wan_*.pt` / `flux_*.pt`: {"backend": "wan" | "flux",
    "deep_prompt_bank": {"prompts": [1, K, D]}, "alphas": [one scalar tensor per block]}; Wan K = 226, D = 1536,
    30 alphas; FLUX K = 512, D = 3072, 57 alphas = 19 double + 38 single blocks) as a DeepPrompt, values
    bit-exact, read with weights_only=True.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        prompts = payload["deep_prompt_bank"]["prompts"]
        alphas = torch.stack([a.reshape(()) for a in payload["alphas"]])
    except Exception as err:
        raise ValueError(f"{path}: not an authors' deep-prompt file ({type(err).__name__}: {err})") from None
    backend = payload.get("backend")
    if backend not in AUTHORS_FORMATS:
        raise ValueError(f"{path}: backend {backend!r}, expected one of {sorted(AUTHORS_FORMATS)}")
    config, length, blocks, context_len = AUTHORS_FORMATS[backend]
    if prompts.ndim != 3 or prompts.shape[:2] != (1, length) or alphas.shape[0] != blocks:
        raise ValueError(f"{path}: a {backend} prompt of shape {list(prompts.shape)} with {alphas.shape[0]} alphas; "
                         f"the authors' {backend} files are [1, {length}, D] with {blocks} alphas")
    prompt = DeepPrompt(alphas.shape[0], prompts.shape[1], prompts.shape[2])
    weights.load_into(prompt, {"prompts": prompts, "alphas": alphas})
    meta = {
        "backbone": backend, "config": config, "site": "deep", "length": prompts.shape[1],
        "context_len": context_len, "t0": defaults.T0, "t_min": defaults.T_MIN,
        "degradation": Path(path).stem.removeprefix(f"{backend}_"),
        "source": f"imported from the authors' release {Path(path).name}",
    }
    return prompt, meta


def import_authors_wan(path: str | os.PathLike) -> tuple[DeepPrompt, dict]:
    """`import_authors` of a Wan file (`wan_*.pt`); any other backend is refused."""
    prompt, meta = import_authors(path)
    if meta["backbone"] != "wan":
        raise ValueError(f"{path}: backend {meta['backbone']!r}, expected 'wan'")
    return prompt, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prompt files: convert the authors' release, show metadata.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("import", help="convert an authors' wan_*.pt / flux_*.pt into this project's "
                                  "format")
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path, nargs="?", help="default: SOURCE with .safetensors (never "
                         "overwritten)")
    show = commands.add_parser("show", help="print a prompt file's metadata and tensor shapes")
    show.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "import":
        target = args.target or args.source.with_suffix(".safetensors")
        try:
            if args.target is None and target.exists():
                raise ValueError(f"{target} exists; name another output file")
            prompt, meta = import_authors(args.source)
        except ValueError as err:
            sys.exit(f"prompts.py: error: {err}")
        args.target = target
        save_prompt(prompt, args.target, meta)
        print(f"wrote {args.target}: {meta['site']} prompt for {meta['config']}, K={meta['length']}")
    else:
        try:
            prompt, meta = load_prompt(args.path)
        except (ValueError, weights.CheckpointError) as err:
            sys.exit(f"prompts.py: error: {err}")
        for key, value in meta.items():
            print(f"{key}: {value}")
        for name, tensor in prompt.state_dict().items():
            print(f"{name}: {list(tensor.shape)} {tensor.dtype}")


if __name__ == "__main__":
    main()
