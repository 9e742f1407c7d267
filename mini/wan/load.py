"""Load the video miniature (mini/wan/) as a `backbone.Backbone` of kind "wan", strictly, through weights.py.

    bb = load_miniature("mini/wan")        # DiT + VAE + the empty prompt's UMT5 context; UMT5 kept (token site)

`miniature.json` ("backbone": "wan") holds the configs of the three networks it ships: `wan` (model/wan.py
WanConfig), `wan_vae` (model/wan_vae.py WanVAEConfig, with the measured per-channel latent statistics) and `umt5`
(model/t5.py T5Config, Wan's UMT5 layout), plus `text_len` (the UMT5 context length) and `vocabulary` (the caption
words of pre-training, for `text.caption_ids`-style captions). The empty prompt's context is UMT5 on
[</s>, <pad> ...] masked to its first token and zeroed after it, exactly what pre-training conditioned on
(`mini.wan.pretrain_wan.encode_caption([])`).
"""

import json
import os
from pathlib import Path

import torch

import backbone
import text
import weights
from model import wan as wan_model
from model.t5 import T5Config, UMT5Encoder
from model.wan_vae import WanVAE, WanVAEConfig

FOLDER = Path(__file__).resolve().parent
CONFIG_NAME = "mini-wan"


def _tuples(spec: dict) -> dict:
    """JSON lists back to the tuples the frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def empty_context(umt5: UMT5Encoder, length: int) -> torch.Tensor:
    """[1, length, d_model]: UMT5 on the empty prompt [</s>, <pad> ...], masked to </s>, zeroed after it."""
    ids = text.empty_t5_ids(length).to(umt5.token_embedding.weight.device)
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1
    with torch.no_grad():
        return umt5(ids, attention_mask=mask) * mask[..., None]


def load_miniature(folder: str | os.PathLike = FOLDER, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> backbone.Backbone:
    """The video miniature in `folder` (see the module docstring); the VAE and UMT5 stay float32."""
    folder = Path(folder)
    spec = json.loads((folder / backbone.MINIATURE_FILE).read_text())
    if spec.get("backbone") != "wan":
        raise ValueError(f"{folder}: miniature.json says backbone {spec.get('backbone')!r}, not 'wan'")
    umt5 = weights.build(UMT5Encoder, T5Config(**spec["umt5"]), folder / "umt5.safetensors", device=device)
    txt = empty_context(umt5, spec["text_len"])
    dit = weights.build(wan_model.WanModel, wan_model.WanConfig(**_tuples(spec["wan"])), folder / "wan.safetensors",
                        dtype=dtype, device=device)
    vae = weights.build(WanVAE, WanVAEConfig(**_tuples(spec["wan_vae"])), folder / "wan_vae.safetensors",
                        dtype=torch.float32, device=device)
    site = text.TokenSite(umt5, spec["text_len"], masked=True)  # tiny: always kept
    return backbone.Backbone("wan", CONFIG_NAME, dit, vae, txt.to(dtype), token_site=site)
