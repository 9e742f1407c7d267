"""FLUX.1, the rectified-flow transformer of Black Forest Labs, written to load the official checkpoints as they are.

Every attribute name below is a key of `flux1-dev.safetensors` / `flux1-schnell.safetensors`, so the official
state dict loads with `load_state_dict` and no renaming. The network ("MMDiT"):

    img [B, N, 64]  --img_in-->  [B, N, D]          packed 2x2 patches of the 16-channel latent
    txt [B, L, 4096] --txt_in--> [B, L, D]          T5-XXL token states
    vec = time_in(t) + guidance_in(g) + vector_in(y)        [B, D]   y: pooled CLIP-L vector [B, 768]
    depth double-stream blocks:  own weights for txt and img, one joint attention over [txt; img]
    depth_single_blocks single-stream blocks: one set of weights over the concatenated sequence [txt; img]
    final_layer: adaptive norm + linear on the img part  ->  velocity [B, N, 64]

Every block is modulated by `vec` (shift, scale, gate from a linear layer on silu(vec)). Positions enter only
through rotary embeddings (RoPE) of 3-axis ids: (0, 0, 0) for text, (0, row, col) for image tokens.

Flow convention: t = 0 is clean data, t = 1 is noise, x_t = (1 - t) x0 + t eps, and the network predicts the
velocity v = eps - x0. `forward` takes t in [0, 1]; it is multiplied by 1000 before the sinusoidal embedding.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.rope import apply_rope


@dataclass
class FluxParams:
    in_channels: int  # 64 = 16 latent channels x a 2x2 patch
    out_channels: int
    vec_in_dim: int  # pooled CLIP width
    context_in_dim: int  # T5 width
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: list[int]  # RoPE channels per id axis (index, row, col); sums to hidden_size // num_heads
    theta: int
    qkv_bias: bool
    guidance_embed: bool  # FLUX.1-dev is guidance-distilled: the guidance scale is an input


CONFIGS = {
    "flux-dev": FluxParams(
        in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
        num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
        guidance_embed=True,
    ),
    "flux-schnell": FluxParams(
        in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
        num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
        guidance_embed=False,
    ),
}

# Official checkpoint file names, in the order a snapshot folder is searched.
CHECKPOINT_NAMES = {"flux-dev": "flux1-dev.safetensors", "flux-schnell": "flux1-schnell.safetensors"}


# ---------------------------------------------------------------------------------------------- positions


def rope(ids: Tensor, axes_dim: Sequence[int], theta: int) -> tuple[Tensor, Tensor]:
    """Rotary angles for 3-axis token ids.

    ids [B, S, 3] -> (cos, sin), each [B, 1, S, head_dim / 2]: axis a of the ids rotates `axes_dim[a] / 2`
    channel pairs with frequencies theta^(-2i / axes_dim[a]). Angles are formed in float64 (positions times
    frequencies loses precision in float32 for large images), the result is float32.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., axis, None].double() * freqs)  # [B, S, dim / 2]
    angles = torch.cat(angles, dim=-1).unsqueeze(1).float()
    return angles.cos(), angles.sin()


def attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Joint attention with RoPE on q and k. q, k, v [B, H, S, head_dim] -> [B, S, H * head_dim]."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "B H S D -> B S (H D)")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] (cosines first, then sines) of t [B] scaled by `time_factor`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = time_factor * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------- layers


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts the timestep / guidance embedding and the pooled CLIP vector to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, computed in float32, with a learned per-channel `scale`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return x32.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Separate RMS norms for queries and keys (per head), which keeps attention logits bounded."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The per-stream attention weights of a double block: fused qkv projection, QK norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, D] -> q, k, v [B, H, S, head_dim], with q and k normalised."""
        q, k, v = rearrange(self.qkv(x), "B S (K H D) -> K B H S D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """silu(vec) -> Linear -> shift, scale, gate (one triple, or two for a double block's attention and MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        """vec [B, D] -> list of 3 or 6 tensors [B, 1, D]: (shift, scale, gate) for each sub-layer."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def modulate(x: Tensor, norm: nn.Module, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * norm(x) + shift


def mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden_dim, hidden_size)
    )


# ---------------------------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    """Text and image streams with their own weights, attending jointly over the sequence [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, cos: Tensor, sin: Tensor, txt_attn_term: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """img [B, N, D], txt [B, L, D], vec [B, D]; txt_attn_term [1 or B, L, D] is added to the normalised,
        modulated text tokens as they enter the attention (see `Flux.forward`). Returns the new (img, txt)."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, self.img_norm1, img_shift1, img_scale1))
        txt_in = modulate(txt, self.txt_norm1, txt_shift1, txt_scale1)
        if txt_attn_term is not None:
            txt_in = txt_in + txt_attn_term
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_in)

        out = attention(
            torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2),
            cos, sin,
        )
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp(modulate(img, self.img_norm2, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, self.txt_norm2, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the joint sequence; attention and MLP run in parallel from one fused projection.

    linear1: x -> [q | k | v | mlp hidden]; linear2: [attention out | gelu(mlp hidden)] -> x.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(
        self, x: Tensor, vec: Tensor, cos: Tensor, sin: Tensor, txt_attn_term: Tensor | None = None
    ) -> Tensor:
        """x [B, L + N, D] (text first), vec [B, D]; txt_attn_term [1 or B, L, D] is added to the first L
        (text) tokens of the attention's input only, not to the MLP's. Returns [B, L + N, D]."""
        shift, scale, gate = self.modulation(vec)
        x_mod = modulate(x, self.pre_norm, shift, scale)
        attn_in = x_mod
        if txt_attn_term is not None:
            txt_len = txt_attn_term.shape[1]
            attn_in = torch.cat((x_mod[:, :txt_len] + txt_attn_term, x_mod[:, txt_len:]), dim=1)
        # linear1 as its two halves (row blocks of the one official weight): q, k, v from the attention's input,
        # the MLP hidden layer from the plain modulated tokens
        qkv_rows = 3 * self.hidden_size
        qkv = F.linear(attn_in, self.linear1.weight[:qkv_rows], self.linear1.bias[:qkv_rows])
        hidden = F.linear(x_mod, self.linear1.weight[qkv_rows:], self.linear1.bias[qkv_rows:])
        q, k, v = rearrange(qkv, "B S (K H D) -> K B H S D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, cos, sin), self.mlp_act(hidden)), dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    """Adaptive layer norm (shift, scale from vec) and the projection back to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(x, self.norm_final, shift[:, None], scale[:, None]))


# ---------------------------------------------------------------------------------------------- the model


class Flux(nn.Module):
    """The FLUX.1 transformer. See the module docstring for the data flow."""

    def __init__(self, params: FluxParams):
        super().__init__()
        head_dim, rest = divmod(params.hidden_size, params.num_heads)
        if rest or sum(params.axes_dim) != head_dim:
            raise ValueError(
                f"hidden_size {params.hidden_size} / num_heads {params.num_heads} must give a head size equal to "
                f"sum(axes_dim) = {sum(params.axes_dim)}"
            )
        self.params = params
        self.checkpointing = False  # recompute each block's activations in backward (see `forward`)

        D = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(params.vec_in_dim, D)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, D)
        self.txt_in = nn.Linear(params.context_in_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(D, params.out_channels)

    @property
    def num_blocks(self) -> int:
        """Double plus single blocks: the length of `txt_attn_terms`."""
        return self.params.depth + self.params.depth_single_blocks

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attn_terms: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """Velocity of the packed latent tokens.

        img [B, N, in_channels]   packed latent tokens (see `pack`)
        img_ids [B, N, 3]         (0, row, col) of each token (see `image_ids`)
        txt [B, L, context_in_dim], txt_ids [B, L, 3] (zeros, see `text_ids`)
        timesteps [B]             flow time in [0, 1]; keep it float32 even for a bfloat16 model (bfloat16 would
                                  round 1000 * t by up to 2 units before the sinusoidal embedding)
        y [B, vec_in_dim]         pooled CLIP vector
        guidance [B]              guidance scale; required exactly when params.guidance_embed (FLUX.1-dev)
        txt_attn_terms            the extension point for learned deep prompts: None, or one entry per block
                                  (the `depth` double blocks first, then the single blocks), each None or a tensor
                                  [1 or B, L, D] added to the block's normalised, modulated text tokens where they
                                  enter its attention. This is where the paper's authors inject their prompt bank
                                  (alpha_i * P); a zero term leaves the output bit-identical.
        Returns [B, N, out_channels].
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C] token tensors, got {list(img.shape)} and {list(txt.shape)}")
        if self.params.guidance_embed != (guidance is not None):
            need = "needs a guidance scale (FLUX.1-dev is guidance-distilled)" if self.params.guidance_embed else (
                "has no guidance embedding (FLUX.1-schnell): pass guidance=None")
            raise ValueError(f"this model {need}")
        if txt_attn_terms is not None and len(txt_attn_terms) != self.num_blocks:
            raise ValueError(f"txt_attn_terms needs one entry per block ({self.num_blocks}), got {len(txt_attn_terms)}")
        terms = list(txt_attn_terms) if txt_attn_terms is not None else [None] * self.num_blocks
        double_terms, single_terms = terms[: self.params.depth], terms[self.params.depth :]

        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        cos, sin = rope(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)

        for block, term in zip(self.double_blocks, double_terms):
            img, txt = self._run(block, img, txt, vec, cos, sin, term)
        x = torch.cat((txt, img), dim=1)
        for block, term in zip(self.single_blocks, single_terms):
            x = self._run(block, x, vec, cos, sin, term)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def _run(self, block: nn.Module, *args):
        """Call a block, recomputing its activations in backward when `self.checkpointing` is on."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ---------------------------------------------------------------------------------------------- packing


def pack(latent: Tensor) -> Tensor:
    """[B, C, H, W] latent -> [B, (H/2)(W/2), 4C] tokens, each the channels of one 2x2 patch (c, row, col)."""
    if latent.ndim != 4 or latent.shape[-2] % 2 or latent.shape[-1] % 2:
        raise ValueError(
            f"expected a latent [B, C, H, W] with even H and W, got {list(latent.shape)} "
            "(the image's height and width must be multiples of 16 for FLUX)"
        )
    return rearrange(latent, "B C (H ph) (W pw) -> B (H W) (C ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack`: [B, (H/2)(W/2), 4C] -> [B, C, H, W] for a latent of `height` x `width`."""
    return rearrange(tokens, "B (H W) (C ph pw) -> B C (H ph) (W pw)", H=height // 2, W=width // 2, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Ids [B, (H/2)(W/2), 3] = (0, row, col) of the packed tokens of a `height` x `width` latent."""
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(torch.zeros(1, device=device), rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Ids [B, L, 3] of text tokens: all zero, so text carries no rotary position."""
    return torch.zeros(batch, length, 3, device=device)
