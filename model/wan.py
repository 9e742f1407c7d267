"""Wan2.1 text-to-video diffusion transformer (DiT), written to load the official checkpoints as they are.

    model = build(WanModel, CONFIGS["wan2.1-t2v-1.3b"], "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
    velocity = model(latent, t, context)                  # [B, 16, F, H, W], t in [0, 1], context [B, L, 4096]

The network, top to bottom:
  1. `patch_embedding` cuts the latent video [B, 16, F, H, W] into 1x2x2 patches -> tokens [B, L, dim],
     L = F * H/2 * W/2, in (frame, row, col) order.
  2. The flow time t (times 1000) becomes a 256-d sinusoid -> `time_embedding` -> e [B, dim];
     `time_projection` turns e into six modulation vectors per block [B, 6, dim]. This path runs in float32.
  3. `text_embedding` maps the UMT5 tokens [B, L_text, 4096] to the model width: the context [B, L_text, dim].
  4. Each of the `num_layers` blocks: modulated self-attention with 3-D RoPE, cross-attention to the context
     (no modulation), modulated GELU MLP. Shift/scale/gate come from the block's own `modulation` table plus
     the time projection, in float32.
  5. `head`: modulated final norm + linear, then the patches are folded back to [B, 16, F, H, W].

Parameter names are the official Wan2.1 keys (`blocks.3.self_attn.q.weight`, `head.modulation`, ...), so an
official state dict loads without renaming. Attention is global over all tokens (the official `window_size` is
(-1, -1) for every released model) and written with `scaled_dot_product_attention`.

Deep prompts (the paper's extension point): `forward(..., cross_prompts=...)` gives block i a pair (P, alpha)
and its cross-attention becomes `attn(x, ctx) + alpha * attn(x, ctx + P)`, with the same frozen attention
weights. With alpha = 0 the result is exactly that of the pretrained model.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.rope import apply_rope


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 DiT (field names as in the official `WanModel`)."""

    dim: int  # model width
    ffn_dim: int  # hidden width of the MLP
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, cols) of latent per token
    in_dim: int = 16  # latent channels in
    out_dim: int = 16  # latent channels out
    freq_dim: int = 256  # width of the sinusoidal time features
    text_dim: int = 4096  # width of the UMT5 tokens
    text_len: int = 512  # the official pipeline zero-pads the text tokens to this length (forward does not)
    qk_norm: bool = True  # RMSNorm on queries and keys
    cross_attn_norm: bool = True  # affine LayerNorm (`norm3`) before the cross-attention
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


CONFIGS = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}

VAE_STRIDE = 8  # the Wan VAE downsamples height and width by 8; used only to word errors in pixels

# One entry per block: None, or (P [1 or B, L_text, dim], alpha 0-d tensor).
CrossPrompts = Sequence[tuple[torch.Tensor, torch.Tensor] | None]


def check_latent_shape(shape: Sequence[int], config: WanConfig) -> None:
    """Raise a ValueError unless `shape` is a latent video [B, in_dim, F, H, W] that the patch size divides."""
    shape = tuple(shape)
    if len(shape) != 5 or shape[1] != config.in_dim:
        raise ValueError(f"expected a latent video [B, {config.in_dim}, F, H, W], got shape {list(shape)}")
    frames, height, width = shape[2:]
    pt, ph, pw = config.patch_size
    if frames % pt:
        raise ValueError(f"latent frame count {frames} is not a multiple of the temporal patch size {pt}")
    if height % ph or width % pw:
        raise ValueError(
            f"latent size {height}x{width} (HxW) is not a multiple of the patch size {ph}x{pw}: the video's pixel "
            f"height and width must be multiples of {VAE_STRIDE * ph}x{VAE_STRIDE * pw} "
            f"(the VAE downsamples by {VAE_STRIDE})"
        )


# ---------------------------------------------------------------------------------------------- positions and time


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the timesteps t [B] (in [0, 1000]) -> [B, dim] float32, cosines first.

    Frequency k is 10000^(-k / (dim/2)); computed in float64 as the official code does, then rounded.
    """
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0):
    """cos and sin of the 3-D rotary angles for a (frames, rows, cols) token grid: two float32 [L, head_dim/2].

    The head dimension is split into three parts, one per axis: rows and cols get 2*(head_dim//6) channels each,
    frames get the rest (head_dim - 4*(head_dim//6)). Each part is an ordinary 1-D RoPE over its axis with its
    own frequencies theta^(-2k/part). Angles are computed in float64 (as the official code does).
    """
    side = 2 * (head_dim // 6)
    parts = (head_dim - 2 * side, side, side)
    angles = []
    for axis, (size, part) in enumerate(zip(grid, parts)):
        freqs = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64, device=device) / part)
        axis_angles = torch.arange(size, dtype=torch.float64, device=device)[:, None] * freqs  # [size, part/2]
        view = [1, 1, 1, part // 2]
        view[axis] = size
        angles.append(axis_angles.view(view).expand(*grid, part // 2))
    angles = torch.cat(angles, dim=-1).flatten(0, 2)  # [L, head_dim/2], tokens in (frame, row, col) order
    return angles.cos().float(), angles.sin().float()


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 whatever the dtype of the layer's weights."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


# ---------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension (computed in float32), then a learned per-channel scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class Attention(nn.Module):
    """Multi-head attention of x [B, L, dim] over a source [B, S, dim] (the same x for self-attention).

    Queries and keys are RMS-normalised over the full width (all heads together) before being split into heads.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        q = self.queries(x)
        k, v = self.keys_values(source)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o(self.attend(q, k, v))

    def prompted(self, x: torch.Tensor, context: torch.Tensor, prompt: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The deep prompt's cross-attention attn(x, ctx) + alpha * attn(x, ctx + P), with the queries and the
        output projection computed once: `o` is affine, so o(a) + alpha o(a') = W (a + alpha a') + (1 + alpha) b."""
        q = self.queries(x)
        mixed = self.attend(q, *self.keys_values(context)) + alpha * self.attend(q, *self.keys_values(context + prompt))
        return F.linear(mixed, self.o.weight, (1 + alpha) * self.o.bias)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] -> normalised queries [B, heads, L, head_dim]."""
        return rearrange(self.norm_q(self.q(x)), "b l (n d) -> b n l d", n=self.num_heads)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, S, dim] -> normalised keys and values, each [B, heads, S, head_dim]."""
        k = rearrange(self.norm_k(self.k(source)), "b s (n d) -> b n s d", n=self.num_heads)
        return k, rearrange(self.v(source), "b s (n d) -> b n s d", n=self.num_heads)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention, heads merged: [B, heads, L, head_dim] -> [B, L, dim] (before the output projection)."""
        return rearrange(F.scaled_dot_product_attention(q, k, v), "b n l d -> b l (n d)")


class WanBlock(nn.Module):
    """Self-attention (modulated, RoPE) -> cross-attention to the text (plain residual) -> MLP (modulated).

    The official names are `norm1` before self-attention, `norm3` before cross-attention and `norm2` before the
    MLP. `modulation` [1, 6, dim] is added to the time projection to give, in this order: shift, scale, gate of
    the self-attention and shift, scale, gate of the MLP.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNormFP32(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, config.num_heads, config.qk_norm, config.eps)
        self.norm3 = LayerNormFP32(dim, eps=config.eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, config.num_heads, config.qk_norm, config.eps)
        self.norm2 = LayerNormFP32(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cross_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim], time_mod [B, 6, dim] float32, context [B, L_text, dim] -> [B, L, dim].

        `cross_prompt` = (P [1 or B, L_text, dim], alpha 0-d) adds alpha * attn(x, context + P) to the
        cross-attention output.
        """
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + time_mod).chunk(6, dim=1)

        h = (self.norm1(x).float() * (1 + scale_sa) + shift_sa).type_as(x)
        x = (x.float() + self.self_attn(h, h, rope).float() * gate_sa).type_as(x)

        h = self.norm3(x)
        if cross_prompt is None:
            x = x + self.cross_attn(h, context)
        else:
            prompt, alpha = cross_prompt
            x = x + self.cross_attn.prompted(h, context, prompt.to(context.dtype), alpha)

        h = (self.norm2(x).float() * (1 + scale_ff) + shift_ff).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_ff).type_as(x)


class Head(nn.Module):
    """Final modulated norm and the projection of every token to its patch of output latent values."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = LayerNormFP32(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], time_emb [B, dim] float32 -> [B, L, out_dim * prod(patch_size)]."""
        shift, scale = (self.modulation.float() + time_emb[:, None]).chunk(2, dim=1)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


# ---------------------------------------------------------------------------------------------- the model


class WanModel(nn.Module):
    """The Wan2.1 text-to-video DiT. Predicts the flow velocity of a latent video given the time and the text.

    Set `model.checkpointing = True` to recompute each block's activations in the backward pass (used only
    while gradients are being recorded) instead of storing them.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of an even size")
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.checkpointing = False

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow time t [B] in [0, 1] -> (time_emb [B, dim], time_mod [B, 6, dim]), both float32.

        The `time_embedding` / `time_projection` layers are applied by hand (the Sequential containers exist to
        carry the official key names) so that this path stays in float32 in a bfloat16 model, as in Wan.
        """
        features = timestep_embedding(t * 1000, self.config.freq_dim)
        time_emb = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], features)))
        time_mod = linear_fp32(self.time_projection[1], F.silu(time_emb))
        return time_emb, time_mod.unflatten(1, (6, self.config.dim))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cross_prompts: CrossPrompts | None = None
    ) -> torch.Tensor:
        """Velocity of the latent video.

        Args:
            x: latent video [B, in_dim, F, H, W]; H and W even (see `check_latent_shape`).
            t: flow time [B] in [0, 1] (t=0 clean, t=1 noise). It is multiplied by 1000 here, the scale the
                checkpoints were trained with; diffusers' `WanTransformer3DModel` takes that [0, 1000] value.
            context: UMT5 text tokens [B, L_text, text_dim], used exactly as given. The caller does any zero
                padding: the official pipeline pads to `config.text_len` = 512 tokens, the paper's authors padded
                to 226. The padding tokens take part in the attention (there is no mask), so the choice matters.
            cross_prompts: None, or one entry per block: None or (P, alpha) with P [1 or B, L_text, dim] (at the
                model width, i.e. after `text_embedding`) and alpha a 0-d tensor; block i's cross-attention then
                becomes attn(x, ctx) + alpha * attn(x, ctx + P), ctx being the embedded context.

        Inputs are cast to the dtype of the model's weights; the velocity [B, out_dim, F, H, W] comes back in it.
        """
        config = self.config
        check_latent_shape(x.shape, config)
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"expected t of shape [{batch}] (one flow time per sample), got {list(t.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.text_dim:
            raise ValueError(f"expected context [{batch}, L, {config.text_dim}], got {list(context.shape)}")
        if cross_prompts is None:
            cross_prompts = [None] * config.num_layers
        self._check_cross_prompts(cross_prompts, batch, context.shape[1])

        dtype = self.patch_embedding.weight.dtype
        grid = tuple(size // patch for size, patch in zip(x.shape[2:], config.patch_size))
        # [B, L, dim] in (frame, row, col) order; made contiguous once here, else every op of every block works on
        # (and LayerNorm / Linear copy) a transposed layout
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        time_emb, time_mod = self.embed_time(t)
        context = self.text_embedding(context.to(dtype))
        rope = rope_cos_sin(grid, config.head_dim, x.device)

        for block, cross_prompt in zip(self.blocks, cross_prompts):
            if self.checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, time_mod, context, rope, cross_prompt, use_reentrant=False)
            else:
                tokens = block(tokens, time_mod, context, rope, cross_prompt)

        patches = self.head(tokens, time_emb)  # [B, L, pt*ph*pw*out_dim]
        pt, ph, pw = config.patch_size
        return rearrange(
            patches,
            "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
            f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw,
        )

    def _check_cross_prompts(self, cross_prompts: CrossPrompts, batch: int, text_len: int) -> None:
        blocks = self.config.num_layers
        if len(cross_prompts) != blocks:
            raise ValueError(f"cross_prompts needs one entry per block ({blocks}), got {len(cross_prompts)}")
        for i, entry in enumerate(cross_prompts):
            if entry is None:
                continue
            prompt, alpha = entry
            if prompt.ndim != 3 or prompt.shape[0] not in (1, batch) or prompt.shape[1:] != (text_len, self.config.dim):
                raise ValueError(
                    f"cross_prompts[{i}]: expected P of shape [1 or {batch}, {text_len}, {self.config.dim}] "
                    f"(the context length and the model width), got {list(prompt.shape)}"
                )
            if not isinstance(alpha, torch.Tensor) or alpha.ndim != 0:
                raise ValueError(f"cross_prompts[{i}]: alpha must be a 0-d tensor, got {alpha!r}")
