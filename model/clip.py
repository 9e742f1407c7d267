"""CLIP text encoder (CLIP-L, FLUX's `text_encoder/`), with the key names of the published transformers file.

A causal pre-norm transformer over at most 77 tokens:

    x = token_embedding(ids) + position_embedding[:L]
    x = x + SelfAttention(LayerNorm(x))      (causal, 1/sqrt(head_dim) scaling, Linear biases)
    x = x + fc2(quick_gelu(fc1(LayerNorm(x))))      quick_gelu(u) = u * sigmoid(1.702 u)
    hidden = final_layer_norm(x)
    pooled = hidden at the end-of-text token

FLUX uses only `pooled` (its 768-d "vec" input). The end-of-text token is found as the argmax of the ids: it has the
highest id of CLIP's vocabulary (49407), and padding with it (FLUX pads with `<|endoftext|>`) keeps the first
occurrence. This is the rule transformers applies for the published config (`eos_token_id: 2`, a legacy value).

Key names: `text_model.embeddings...`, `text_model.encoder.layers.{i}...`, `text_model.final_layer_norm` as in
FLUX's `text_encoder/model.safetensors` (transformers 5 itself drops the `text_model.` prefix in its own state dicts).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model import CheckpointError


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    eps: float = 1e-5


CONFIGS = {"clip-l": CLIPTextConfig()}

POSITION_IDS_KEY = "text_model.embeddings.position_ids"


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention: [B, L, C] -> [B, L, C]."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads) for f in projections)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding lookup [B, L] -> [B, L, width] (what `inputs_embeds` replaces)."""
        return self.text_model.embeddings.token_embedding(input_ids)

    def forward(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] (L <= 77) -> (hidden [B, L, width] after the final norm, pooled [B, width]).

        `inputs_embeds` [B, L, width], when given, replaces the token embedding lookup; `input_ids` is still needed
        to find the end-of-text token for `pooled`.
        """
        width, max_positions = self.config.width, self.config.max_positions
        if input_ids.ndim != 2 or input_ids.shape[1] > max_positions:
            raise ValueError(f"input_ids: expected [B, L] with L <= {max_positions}, got {list(input_ids.shape)}")
        embeddings = self.text_model.embeddings
        if inputs_embeds is None:
            x = embeddings.token_embedding(input_ids)
        elif tuple(inputs_embeds.shape) != (*input_ids.shape, width):
            raise ValueError(f"inputs_embeds: expected {[*input_ids.shape, width]}, got {list(inputs_embeds.shape)}")
        else:
            x = inputs_embeds.to(embeddings.token_embedding.weight.dtype)
        x = x + embeddings.position_embedding.weight[: input_ids.shape[1]]
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        hidden = self.text_model.final_layer_norm(x)
        end_of_text = input_ids.argmax(dim=-1)  # first occurrence of the highest id
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), end_of_text]
        return hidden, pooled


def drop_position_ids(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint without `text_model.embeddings.position_ids`, after checking that it holds 0, 1, ..., 76.

    transformers before 4.31 saved CLIP's position ids buffer ([1, 77] int64) in checkpoints; older CLIP-L exports
    carry it. We compute positions in `forward` (no buffers), so exactly this key is accepted and ignored; every
    other key must match the model. FLUX.1's `text_encoder/` was written by a later transformers (non-persistent
    buffer), so it is expected to lack the key; both forms load.
    """
    position_ids = state.get(POSITION_IDS_KEY)
    if position_ids is None:
        return state
    if not torch.equal(position_ids.flatten().long(), torch.arange(position_ids.numel())):
        raise CheckpointError(f"{POSITION_IDS_KEY} is not 0, 1, 2, ...: this is not a plain CLIP text encoder")
    return {k: v for k, v in state.items() if k != POSITION_IDS_KEY}
