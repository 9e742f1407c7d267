"""Load the video miniature (mini/wan/) as a `backbone.Backbone` of kind "wan", strictly, through weights.py.

    bb = load_miniature("mini/wan")        # DiT + VAE + the empty prompt's UMT5 context; UMT5 kept (token site)

The loader is `backbone.load_miniature`, which reads either miniature by the kind its miniature.json records
("backbone": "wan" here) and names it "mini-wan" in backbone.BACKBONES. `miniature.json` holds the configs of the
three networks it ships: `wan` (model/wan.py WanConfig), `wan_vae` (model/wan_vae.py WanVAEConfig, with the
measured per-channel latent statistics) and `umt5` (model/t5.py T5Config, Wan's UMT5 layout), plus `text_len`
(the UMT5 context length) and `vocabulary` (the caption words of pre-training, for `text.caption_ids`-style
captions). The empty prompt's context is UMT5 on [</s>, <pad> ...] masked to its first token and zeroed after it,
exactly what pre-training conditioned on (`mini.wan.pretrain_wan.encode_caption([])`).
"""

import os
from pathlib import Path

import torch

import backbone

FOLDER = backbone.BACKBONES["mini-wan"].folder
CONFIG_NAME = backbone.BACKBONES["mini-wan"].config


def load_miniature(folder: str | os.PathLike = FOLDER, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> backbone.Backbone:
    """The video miniature in `folder` (see the module docstring); the VAE and UMT5 stay float32."""
    if backbone.miniature_kind(folder) != "wan":
        raise ValueError(f"{folder}: miniature.json says backbone {backbone.miniature_kind(folder)!r}, not 'wan'")
    return backbone.load_miniature(Path(folder), dtype, device)
