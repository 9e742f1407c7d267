"""T5 / UMT5 / CLIP text encoders against transformers' T5EncoderModel, UMT5EncoderModel and CLIPTextModel.

Oracle tests use tiny random configs (float32, max-abs <= 1e-5, printed); key-set tests build the published
full-size configs on the meta device.
"""

import re

import pytest
import torch
from oracle import max_abs, randomize_
from transformers import CLIPTextConfig as ReferenceCLIPConfig
from transformers import CLIPTextModel, T5EncoderModel, UMT5Config, UMT5EncoderModel
from transformers import T5Config as ReferenceT5Config

from model.clip import CONFIGS as CLIP_CONFIGS
from model.clip import CLIPTextConfig, CLIPTextEncoder, drop_position_ids
from model.t5 import CONFIGS as T5_CONFIGS
from model.t5 import T5Config, T5Encoder, UMT5Encoder, fold_tied_embedding, relative_position_buckets
from weights import CheckpointError, build

# L = 20 tokens with max_distance 12 and 8 buckets: exact, logarithmic and clipped buckets all occur.
TINY_T5 = T5Config(
    vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=3, num_buckets=8, max_distance=12
)
TINY_UMT5 = T5Config(**{**TINY_T5.__dict__, "bias_in_every_layer": True})
TINY_CLIP = CLIPTextConfig(vocab_size=100, width=32, num_layers=3, num_heads=4, mlp_dim=64, max_positions=16)
TOLERANCE = 1e-5


def reference_t5_config(config: T5Config, umt5: bool, **extra):
    kind = UMT5Config if umt5 else ReferenceT5Config
    return kind(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_heads=config.num_heads, relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=config.eps, dropout_rate=0.0, **extra,
    )  # fmt: skip


def reference_clip_config(config: CLIPTextConfig, eos_token_id: int):
    return ReferenceCLIPConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_positions, hidden_act="quick_gelu", layer_norm_eps=config.eps,
        bos_token_id=config.vocab_size - 2, eos_token_id=eos_token_id, pad_token_id=1,
    )  # fmt: skip


# Wan's UMT5 key names (wan/modules/t5.py) -> transformers' UMT5EncoderModel names.
WAN_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # through the GELU
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_to_transformers(key: str) -> str:
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    assert match and match.group(2) in WAN_BLOCK_KEYS, f"not a Wan UMT5 key: {key}"
    return f"encoder.block.{match.group(1)}.{WAN_BLOCK_KEYS[match.group(2)]}"


def with_tied_alias(state: dict) -> dict:
    """transformers' T5/UMT5 encoders list the tied embedding under both names."""
    return {**state, "encoder.embed_tokens.weight": state["shared.weight"]}


def t5_inputs(vocab_size: int, padded: bool):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (2, 20), generator=generator)
    mask = torch.ones(2, 20, dtype=torch.long)
    if padded:  # second text: 13 tokens then padding (id 0)
        ids[1, 13:] = 0
        mask[1, 13:] = 0
    return ids, mask


def shape_set(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("umt5_layout", [False, True], ids=["t5", "umt5-transformers-layout"])
def test_t5_encoder_matches_transformers(umt5_layout, padded, masked):
    config = TINY_UMT5 if umt5_layout else TINY_T5
    ours = randomize_(T5Encoder(config), seed=0).eval()
    reference = (UMT5EncoderModel if umt5_layout else T5EncoderModel)(reference_t5_config(config, umt5_layout)).eval()
    reference.load_state_dict(with_tied_alias(ours.state_dict()), strict=True)
    ids, mask = t5_inputs(config.vocab_size, padded)
    mask = mask if masked else None
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        from_embeds = ours(attention_mask=mask, inputs_embeds=ours.shared(ids))
    error = max_abs(got, expected)
    print(f"T5Encoder({'umt5' if umt5_layout else 't5'}, padded={padded}, mask={masked}) max-abs {error:.2e}")
    assert error <= TOLERANCE
    assert torch.equal(from_embeds, got)
    if padded and masked:  # the mask changes what the padded text's tokens see
        assert not torch.allclose(got[1], ours(ids)[1])


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_umt5_wan_layout_matches_transformers(masked):
    ours = randomize_(UMT5Encoder(TINY_UMT5), seed=0).eval()
    reference = UMT5EncoderModel(reference_t5_config(TINY_UMT5, umt5=True)).eval()
    state = {wan_to_transformers(k): v for k, v in ours.state_dict().items()}
    reference.load_state_dict(with_tied_alias(state), strict=True)
    ids, mask = t5_inputs(TINY_UMT5.vocab_size, padded=True)
    mask = mask if masked else None
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        from_embeds = ours(attention_mask=mask, inputs_embeds=ours.token_embedding(ids))
    error = max_abs(got, expected)
    print(f"UMT5Encoder(Wan layout, mask={masked}) max-abs {error:.2e}")
    assert error <= TOLERANCE
    assert torch.equal(from_embeds, got)


def clip_inputs(length: int):
    """Two texts: <start> tokens <end> then <end> padding, as FLUX's CLIP tokenizer pads."""
    generator = torch.Generator().manual_seed(2)
    start, end = TINY_CLIP.vocab_size - 2, TINY_CLIP.vocab_size - 1
    ids = torch.full((2, length), end)
    for row, n in enumerate([length - 2, 5]):
        ids[row, 0] = start
        ids[row, 1 : 1 + n] = torch.randint(3, start, (n,), generator=generator)
    return ids


@pytest.mark.parametrize("length", [16, 11])
def test_clip_matches_transformers(length):
    ours = randomize_(CLIPTextEncoder(TINY_CLIP), seed=0).eval()
    ids = clip_inputs(length)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        hidden_embeds, pooled_embeds = ours(ids, inputs_embeds=ours.text_model.embeddings.token_embedding(ids))
    # transformers 5 names CLIPTextModel's parameters without the `text_model.` prefix of the published files.
    state = {k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    # eos_token_id 2 is the published (legacy) value: pooled at argmax(ids); the real end id: its first position.
    for eos_token_id in (2, TINY_CLIP.vocab_size - 1):
        reference = CLIPTextModel(reference_clip_config(TINY_CLIP, eos_token_id)).eval()
        reference.load_state_dict(state, strict=True)
        with torch.no_grad():
            expected = reference(input_ids=ids)
        errors = max_abs(hidden, expected.last_hidden_state), max_abs(pooled, expected.pooler_output)
        name = f"CLIPTextEncoder(L={length}, eos_token_id={eos_token_id})"
        print(f"{name} max-abs {errors[0]:.2e}, pooled {errors[1]:.2e}")
        assert max(errors) <= TOLERANCE
    assert torch.equal(hidden_embeds, hidden) and torch.equal(pooled_embeds, pooled)


def test_relative_position_buckets_by_hand():
    # 8 buckets, max distance 12: 4 per direction, exact for |d| < 2, then log steps; keys after the query +4.
    buckets = relative_position_buckets(20, num_buckets=8, max_distance=12)
    distances = [0, 1, 2, 3, 5, 11, 19]
    assert [buckets[19, 19 - d].item() for d in distances] == [0, 1, 2, 2, 3, 3, 3]  # keys before the query
    assert [buckets[0, d].item() for d in distances] == [0, 5, 6, 6, 7, 7, 7]  # keys after it


# ---------------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_as_close_to_float32_as_transformers():
    """bfloat16 runs (float32 norms and softmax) are as far from float32 as transformers' own bfloat16 runs."""
    ids, mask = t5_inputs(TINY_T5.vocab_size, padded=True)
    for make, config in [(T5Encoder, TINY_T5), (UMT5Encoder, TINY_UMT5)]:
        model = randomize_(make(config), seed=0).eval()
        umt5 = make is UMT5Encoder
        reference = (UMT5EncoderModel if umt5 else T5EncoderModel)(reference_t5_config(config, umt5)).eval()
        state = {wan_to_transformers(k) if umt5 else k: v for k, v in model.state_dict().items()}
        reference.load_state_dict(with_tied_alias(state))
        with torch.no_grad():
            full = model(ids, mask)
            model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)
            half = model(ids, mask)
            reference_half = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            embeds = model(attention_mask=mask, inputs_embeds=torch.randn(2, 20, config.d_model))  # float32 in
        assert half.dtype == torch.bfloat16 and embeds.dtype == torch.bfloat16
        scale = full.abs().max().item()
        ours, theirs = max_abs(half.float(), full) / scale, max_abs(reference_half.float(), full) / scale
        print(f"{make.__name__} bfloat16 vs float32, relative max-abs: ours {ours:.2e}, transformers {theirs:.2e}")
        assert ours < 1.5 * theirs
    clip_model = randomize_(CLIPTextEncoder(TINY_CLIP), seed=0).eval()
    ids = clip_inputs(16)
    with torch.no_grad():
        _, full = clip_model(ids)
        _, half = clip_model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    relative = max_abs(half.float(), full) / full.abs().max().item()
    print(f"CLIPTextEncoder bfloat16 vs float32 pooled, relative max-abs {relative:.2e}")
    assert relative < 5e-2


def test_float16_and_bad_inputs_raise():
    model = T5Encoder(TINY_T5)
    ids, mask = t5_inputs(TINY_T5.vocab_size, padded=True)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=torch.zeros(2, 20, TINY_T5.d_model))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, mask[:, :10])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 20, 7))
    with pytest.raises(ValueError, match="float16"):
        model.half()(ids)
    with pytest.raises(ValueError, match="L <= 16"):
        CLIPTextEncoder(TINY_CLIP)(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="bias table in every block"):
        UMT5Encoder(TINY_T5)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_fold_tied_embedding_accepts_each_published_form():
    state = randomize_(T5Encoder(TINY_T5), seed=3).state_dict()
    embedding = state["shared.weight"]
    only_alias = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    for form in (state, only_alias, with_tied_alias(state)):
        model = build(T5Encoder, TINY_T5, fold_tied_embedding(form))  # strict
        assert torch.equal(model.shared.weight, embedding)
    with pytest.raises(CheckpointError, match="differ"):
        fold_tied_embedding({**state, "encoder.embed_tokens.weight": embedding + 1})


def test_drop_position_ids():
    state = randomize_(CLIPTextEncoder(TINY_CLIP), seed=3).state_dict()
    position_ids = torch.arange(TINY_CLIP.max_positions)[None]
    assert drop_position_ids(state) is state
    legacy = {**state, "text_model.embeddings.position_ids": position_ids}
    model = build(CLIPTextEncoder, TINY_CLIP, drop_position_ids(legacy))
    assert torch.equal(model.text_model.final_layer_norm.weight, state["text_model.final_layer_norm.weight"])
    with pytest.raises(CheckpointError, match="position_ids"):
        drop_position_ids({**state, "text_model.embeddings.position_ids": position_ids.flip(-1)})
    with pytest.raises(CheckpointError, match="unexpected"):  # without dropping, strict loading names the key
        build(CLIPTextEncoder, TINY_CLIP, legacy)


# ---------------------------------------------------------------------------------------------- official key sets


def test_t5_v1_1_xxl_keys_match_flux_text_encoder_2():
    config = T5_CONFIGS["t5-v1_1-xxl"]
    with torch.device("meta"):
        ours = shape_set(T5Encoder(config).state_dict())
        reference = shape_set(T5EncoderModel(reference_t5_config(config, umt5=False)).state_dict())
    # transformers lists the tied alias too; it is not saved (FLUX's index has `shared.weight` only).
    del reference["encoder.embed_tokens.weight"]
    assert ours == reference
    # FLUX.1's text_encoder_2/model.safetensors.index.json: 219 tensors, total_size 9,524,621,312 bytes (bfloat16)
    assert len(ours) == 219
    assert sum(torch.Size(shape).numel() for shape in ours.values()) * 2 == 9_524_621_312


def test_umt5_xxl_keys_match_transformers_through_wan_names():
    config = T5_CONFIGS["umt5-xxl"]
    with torch.device("meta"):
        wan = shape_set(UMT5Encoder(config).state_dict())
        transformers_layout = shape_set(T5Encoder(config).state_dict())
        reference = shape_set(UMT5EncoderModel(reference_t5_config(config, umt5=True)).state_dict())
    del reference["encoder.embed_tokens.weight"]
    assert {wan_to_transformers(k): v for k, v in wan.items()} == reference
    assert len(wan) == len(reference) == 2 + 24 * 10
    assert transformers_layout == reference


def test_clip_l_keys_match_transformers():
    config = CLIP_CONFIGS["clip-l"]
    with torch.device("meta"):
        ours = shape_set(CLIPTextEncoder(config).state_dict())
        reference = shape_set(CLIPTextModel(reference_clip_config(config, eos_token_id=2)).state_dict())
    assert ours == {"text_model." + k: v for k, v in reference.items()}
    assert len(ours) == 196 and "text_model.embeddings.position_ids" not in ours
