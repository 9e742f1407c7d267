"""REFERENCE HARNESS: diffusers' FLUX / Wan transformers with the paper's deep prompt added the authors' way.

This is the yardstick our models are benchmarked against, not project code. It builds diffusers'
`FluxTransformer2DModel` / `WanTransformer3DModel` from a config, loads OUR weights converted with diffusers' own
converters (so both sides compute with identical numbers), and applies the same deep prompt (P, alpha_i) the way
the paper's authors do on a diffusers model: by hooking each block's attention.

  FLUX double block i : alpha_i * P is added to the normalised, modulated text tokens (`encoder_hidden_states`)
                        entering the block's attention.
  FLUX single block j : alpha_j * P is added to the first L (text) tokens of the attention's input only (the
                        block's MLP branch reads the same normalised tokens without it).
  Wan block i         : the cross-attention becomes attn2(x, ctx) + alpha_i * attn2(x, ctx + P).

`velocity(x, t)` then mirrors `backbone.Backbone.velocity` (same packing, ids, guidance, dtypes), so the same
`bridge.loss` runs on either side.
"""

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
)
from torch import Tensor, nn

from model import flux as flux_model
from model.wan import WanConfig
from prompts import fit_length

# ---------------------------------------------------------------------------------------------- FLUX


def flux_state_to_diffusers(state: dict, params: flux_model.FluxParams) -> dict:
    """Our official-format FLUX state dict -> diffusers keys, through diffusers' converter.

    The converter splits a single block's fused `linear1` with FLUX-dev's width (3072) written in; for another
    width we hand it zero stand-ins of the full-size shape and split `linear1` ourselves into q, k, v and the MLP
    input (sizes D, D, D, mlp_ratio * D: facts of the layout).
    """
    state = dict(state)
    D, mlp_dim = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    full = 3 * 3072 + 4 * 3072
    linear1 = {}
    for i in range(params.depth_single_blocks):
        for kind in ("weight", "bias"):
            key = f"single_blocks.{i}.linear1.{kind}"
            linear1[key] = state[key]
            state[key] = torch.zeros(full, *state[key].shape[1:], dtype=state[key].dtype, device="meta")
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    for i in range(params.depth_single_blocks):
        for kind in ("weight", "bias"):
            parts = linear1[f"single_blocks.{i}.linear1.{kind}"].split([D, D, D, mlp_dim])
            prefix = f"single_transformer_blocks.{i}."
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                converted[f"{prefix}{name}.{kind}"] = part
    return converted


def flux_model_from(ours: flux_model.Flux) -> FluxTransformer2DModel:
    """diffusers' FLUX transformer holding a copy of exactly our model's weights (same device and dtype), frozen."""
    params = ours.params
    weight = next(ours.parameters())
    with torch.device(weight.device):
        ref = FluxTransformer2DModel(
            patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
            num_single_layers=params.depth_single_blocks, attention_head_dim=params.hidden_size // params.num_heads,
            num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
            pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
            axes_dims_rope=tuple(params.axes_dim),
        )
    ref.to(weight.dtype).load_state_dict(flux_state_to_diffusers(ours.state_dict(), params), strict=True)
    return ref.requires_grad_(False).eval()


def hook_flux_deep_prompt(ref: FluxTransformer2DModel, prompt: nn.Module, txt_len: int) -> list:
    """Add alpha_i * P at each block's attention input (the authors' way). Returns the hook handles."""
    handles = []
    depth = len(ref.transformer_blocks)

    def term(index: int, like: Tensor) -> Tensor:
        return (prompt.alphas[index] * fit_length(prompt.prompts, txt_len)).to(like.dtype)

    for i, block in enumerate(ref.transformer_blocks):
        def double(module, args, kwargs, i=i):
            text = kwargs["encoder_hidden_states"]
            return args, {**kwargs, "encoder_hidden_states": text + term(i, text)}

        handles.append(block.attn.register_forward_pre_hook(double, with_kwargs=True))
    for j, block in enumerate(ref.single_transformer_blocks):
        def single(module, args, kwargs, i=depth + j):
            x = kwargs["hidden_states"]  # [B, L + N, D], text first
            x = torch.cat((x[:, :txt_len] + term(i, x), x[:, txt_len:]), dim=1)
            return args, {**kwargs, "hidden_states": x}

        handles.append(block.attn.register_forward_pre_hook(single, with_kwargs=True))
    return handles


def flux_velocity(ref: FluxTransformer2DModel, txt: Tensor, pooled: Tensor, guidance: float = 1.0):
    """velocity(x [B, 16, H, W] float32, t [B]) -> float32, as `Backbone.velocity` computes it for FLUX."""
    dtype = next(ref.parameters()).dtype

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        batch, (height, width) = x.shape[0], x.shape[-2:]
        out = ref(
            hidden_states=flux_model.pack(x.to(dtype)),
            encoder_hidden_states=txt.expand(batch, -1, -1),
            pooled_projections=pooled.expand(batch, -1),
            timestep=t.float(),
            img_ids=flux_model.image_ids(1, height, width, x.device)[0],
            txt_ids=flux_model.text_ids(1, txt.shape[1], x.device)[0],
            guidance=torch.full((batch,), guidance, device=x.device) if ref.config.guidance_embeds else None,
            return_dict=False,
        )[0]
        return flux_model.unpack(out, height, width).float()

    return velocity


# ---------------------------------------------------------------------------------------------- Wan


def wan_model_from(ours: nn.Module) -> WanTransformer3DModel:
    """diffusers' Wan transformer holding a copy of exactly our model's weights (same device and dtype), frozen."""
    config: WanConfig = ours.config
    weight = next(ours.parameters())
    with torch.device(weight.device):
        ref = WanTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
            in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
            cross_attn_norm=config.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=config.eps,
        )
    ref.to(weight.dtype).load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    return ref.requires_grad_(False).eval()


def hook_wan_deep_prompt(ref: WanTransformer3DModel, prompt: nn.Module) -> None:
    """Each block's cross-attention becomes attn2(x, ctx) + alpha_i * attn2(x, ctx + P) (the authors' way)."""
    for i, block in enumerate(ref.blocks):
        plain = block.attn2.forward

        def prompted(hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, plain=plain, i=i):
            p = fit_length(prompt.prompts, encoder_hidden_states.shape[1]).to(encoder_hidden_states.dtype)
            return plain(hidden_states, encoder_hidden_states, attention_mask, rotary_emb) + prompt.alphas[i] * plain(
                hidden_states, encoder_hidden_states + p, attention_mask, rotary_emb)

        block.attn2.forward = prompted


def wan_velocity(ref: WanTransformer3DModel, context: Tensor):
    """velocity(x [B, 16, F, H, W] float32, t [B] in [0, 1]) -> float32 (diffusers takes t * 1000)."""
    dtype = next(ref.parameters()).dtype

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        out = ref(x.to(dtype), t.float() * 1000, context.expand(batch, -1, -1), return_dict=False)[0]
        return out.float()

    return velocity


# ---------------------------------------------------------------------------------------------- both


def reference_velocity(bb, prompt: nn.Module | None):
    """(diffusers model, velocity function) equivalent to `bb.velocity(x, t, prompt)` of our Backbone `bb`."""
    if bb.kind == "flux":
        ref = flux_model_from(bb.dit)
        if prompt is not None:
            hook_flux_deep_prompt(ref, prompt, bb.txt.shape[1])
        return ref, flux_velocity(ref, bb.txt, bb.pooled, bb.guidance)
    ref = wan_model_from(bb.dit)
    if prompt is not None:
        hook_wan_deep_prompt(ref, prompt)
    return ref, wan_velocity(ref, bb.txt)
