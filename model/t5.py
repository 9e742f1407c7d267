"""T5 text encoders: T5-v1.1-XXL (FLUX's `text_encoder_2/`) and UMT5-XXL (Wan's text encoder).

Both are the encoder half of T5 v1.1. Every block is pre-norm:

    x = x + SelfAttention(RMSNorm(x), bias)        bias = relative position bias (+ padding mask)
    x = x + GatedGELU(RMSNorm(x))                  wo(gelu_tanh(wi_0 x) * wi_1 x)

followed by one final RMSNorm. T5's peculiarities, kept exactly: the token embedding is NOT scaled, attention has
NO 1/sqrt(head_dim) factor (it is folded into the trained weights), no Linear has a bias, and positions enter only
through a learned bias added to the attention logits, looked up by a bucketed key-minus-query distance.

The two checkpoints differ only in their key names and in where the bias table lives:

- `T5Encoder` uses transformers' names (FLUX ships `text_encoder_2/` in transformers format). T5 v1.1 learns ONE
  table, stored in block 0 (`encoder.block.0.layer.0.SelfAttention.relative_attention_bias`), and every block
  reuses the bias computed from it. With `bias_in_every_layer=True` the same class has transformers' UMT5 layout.
- `UMT5Encoder` uses the names of Wan's own `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding`,
  `blocks.{i}.{norm1, attn, norm2, ffn, pos_embedding}`, `norm`). UMT5 learns a separate table in every block.

The shared math (RMSNorm, relative position buckets, biased attention, gated GELU) is written once below.
float16 is refused: T5 v1.1 activations overflow it (transformers clamps them; we support float32 and bfloat16).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model import CheckpointError


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int = 4096
    d_kv: int = 64  # width of one attention head
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative position buckets (half for keys before the query, half after)
    max_distance: int = 128  # distances beyond this share the last bucket
    eps: float = 1e-6
    bias_in_every_layer: bool = False  # False: T5 v1.1 (one table, block 0); True: UMT5 (one table per block)


CONFIGS = {
    "t5-v1_1-xxl": T5Config(vocab_size=32128),
    "umt5-xxl": T5Config(vocab_size=256384, bias_in_every_layer=True),
}


# ---------------------------------------------------------------------------------------------- shared math


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square (computed in float32), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = x.float().pow(2).mean(dim=-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps)).to(self.weight.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bucket index [L, L] of every (query i, key j) pair, from the distance j - i (bidirectional, as in encoders).

    Keys before the query use buckets [0, num_buckets/2), keys after it the upper half. The first half of each half
    holds the exact distances 0, 1, 2, ...; its other buckets cover larger distances in logarithmic steps up to
    `max_distance`, beyond which everything falls into its last bucket.
    """
    position = torch.arange(length, device=device)
    distance = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    bucket = (distance > 0).long() * half
    distance = distance.abs()
    exact = half // 2
    far = distance.clamp(min=exact).float()  # clamp only keeps log() finite; near distances use `distance` below
    log_bucket = exact + (torch.log(far / exact) / math.log(max_distance / exact) * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


def relative_position_bias(table: nn.Embedding, length: int, max_distance: int) -> torch.Tensor:
    """The learned bias [1, H, L, L] added to the attention logits; `table` is [num_buckets, H]."""
    buckets = relative_position_buckets(length, table.num_embeddings, max_distance, table.weight.device)
    return rearrange(table(buckets), "q k h -> 1 h q k")


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] mask (1 = token, 0 = padding) -> additive bias [B, 1, 1, L]: 0 for tokens, most negative for padding."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return rearrange(bias, "b k -> b 1 1 k")


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias and NO 1/sqrt(head_dim) scaling (T5). No Linear biases."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.o = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], bias [B or 1, H, L, L] -> [B, L, dim]."""
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


def gated_gelu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """T5 v1.1's feed-forward: down(gelu(gate x) * up x), GELU in its tanh approximation ("gelu_new")."""
    return down(F.gelu(gate(x), approximate="tanh") * up(x))


def _embed(table: nn.Embedding, input_ids, inputs_embeds, attention_mask, d_model: int) -> torch.Tensor:
    """Token embeddings [B, L, d_model] (looked up, or given as `inputs_embeds`), after checking every input."""
    if table.weight.dtype == torch.float16:
        raise ValueError("float16 is not supported by the T5 encoders (activations overflow): use bfloat16 or float32")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids [B, L] and inputs_embeds [B, L, d_model]")
    if input_ids is not None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected [B, L], got {list(input_ids.shape)}")
        x = table(input_ids)
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != d_model:
            raise ValueError(f"inputs_embeds: expected [B, L, {d_model}], got {list(inputs_embeds.shape)}")
        x = inputs_embeds.to(table.weight.dtype)  # e.g. float32 learned embeddings into a bfloat16 model
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention_mask: expected {list(x.shape[:2])}, got {list(attention_mask.shape)}")
    return x


# ---------------------------------------------------------------------------------------------- transformers layout


class T5SelfAttention(Attention):
    """`layer.0.SelfAttention`: q, k, v, o, plus the bias table where this layout stores one."""

    def __init__(self, config: T5Config, has_bias_table: bool):
        super().__init__(config.d_model, config.num_heads, config.d_kv)
        self.relative_attention_bias = nn.Embedding(config.num_buckets, config.num_heads) if has_bias_table else None


class T5AttentionLayer(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = T5SelfAttention(config, has_bias_table)
        self.layer_norm = RMSNorm(config.d_model, config.eps)


class T5DenseGatedGelu(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # gate (through GELU)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # linear branch
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(config)  # the name is historical: v1.1 uses gated GELU
        self.layer_norm = RMSNorm(config.d_model, config.eps)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5AttentionLayer(config, has_bias_table), T5FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attention, feed_forward = self.layer
        x = x + attention.SelfAttention(attention.layer_norm(x), bias)
        ffn = feed_forward.DenseReluDense
        return x + gated_gelu(feed_forward.layer_norm(x), ffn.wi_0, ffn.wi_1, ffn.wo)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [T5Block(config, has_bias_table=config.bias_in_every_layer or i == 0) for i in range(config.num_layers)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.eps)


class T5Encoder(nn.Module):
    """T5 encoder with transformers' key names (`shared`, `encoder.block.{i}.layer...`, `encoder.final_layer_norm`).

    transformers ties `encoder.embed_tokens` to `shared`; this model holds the table once, as `shared`. Pass
    checkpoints through `fold_tied_embedding` first (FLUX's `text_encoder_2` holds `shared.weight` only).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding lookup [B, L] -> [B, L, d_model] (what `inputs_embeds` replaces)."""
        return self.shared(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] or inputs_embeds [B, L, d_model], attention_mask [B, L] (1 = token) or None.

        Returns the final-norm states [B, L, d_model].
        """
        x = _embed(self.shared, input_ids, inputs_embeds, attention_mask, self.config.d_model)
        mask = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        bias = None
        for block in self.encoder.block:
            table = block.layer[0].SelfAttention.relative_attention_bias
            if table is not None:  # T5 v1.1: block 0 only, then reused; UMT5 layout: every block
                bias = relative_position_bias(table, x.shape[1], self.config.max_distance)
                bias = bias if mask is None else bias + mask
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def fold_tied_embedding(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers T5 encoder checkpoint with its token embedding as `shared.weight` only (what `T5Encoder` holds).

    transformers ties `encoder.embed_tokens.weight` to `shared.weight`; a file may hold either name or both (then
    they must be equal). FLUX.1's published `text_encoder_2/model.safetensors.index.json` lists 219 tensors,
    `shared.weight` but not `encoder.embed_tokens.weight` (its total_size, 9,524,621,312 bytes, is one bfloat16 copy).
    """
    state = dict(state)
    alias = state.pop("encoder.embed_tokens.weight", None)
    if alias is not None:
        if "shared.weight" not in state:
            state["shared.weight"] = alias
        elif not torch.equal(state["shared.weight"], alias):
            raise CheckpointError("shared.weight and encoder.embed_tokens.weight differ: not a tied T5 encoder")
    return state


# ---------------------------------------------------------------------------------------------- Wan layout


class PositionBiasTable(nn.Module):
    """`blocks.{i}.pos_embedding`: the block's own [num_buckets, H] table (Wan's `embedding` attribute)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.embedding = nn.Embedding(config.num_buckets, config.num_heads)


class UMT5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        # A Sequential only so that the key is `gate.0.weight` as in Wan's file (Wan keeps its weightless GELU
        # module at index 1; the GELU is applied in `gated_gelu`).
        self.gate = nn.Sequential(nn.Linear(config.d_model, config.d_ff, bias=False))
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # linear branch
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=False)


class UMT5Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.eps)
        self.attn = Attention(config.d_model, config.num_heads, config.d_kv)
        self.norm2 = RMSNorm(config.d_model, config.eps)
        self.ffn = UMT5FeedForward(config)
        self.pos_embedding = PositionBiasTable(config)
        self.max_distance = config.max_distance

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bias = relative_position_bias(self.pos_embedding.embedding, x.shape[1], self.max_distance)
        bias = bias if mask is None else bias + mask
        x = x + self.attn(self.norm1(x), bias)
        return x + gated_gelu(self.norm2(x), self.ffn.gate[0], self.ffn.fc1, self.ffn.fc2)


class UMT5Encoder(nn.Module):
    """UMT5 encoder with the key names of Wan's `models_t5_umt5-xxl-enc-bf16.pth`; a bias table in every block."""

    def __init__(self, config: T5Config):
        super().__init__()
        if not config.bias_in_every_layer:
            raise ValueError("UMT5Encoder (Wan's layout) has a bias table in every block: set bias_in_every_layer")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([UMT5Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, config.eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding lookup [B, L] -> [B, L, d_model] (what `inputs_embeds` replaces)."""
        return self.token_embedding(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] or inputs_embeds [B, L, d_model], attention_mask [B, L] (1 = token) or None.

        Returns the final-norm states [B, L, d_model].
        """
        x = _embed(self.token_embedding, input_ids, inputs_embeds, attention_mask, self.config.d_model)
        mask = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
