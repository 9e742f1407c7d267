"""text.flux_text / text.wan_text on tiny fake snapshots: what they compute, and the disk cache (hits load no encoder;
a changed text, length, dtype or model file misses)."""

import json
import os

import pytest
import torch
from oracle import randomize_
from safetensors.torch import save_file
from text_fixtures import make_clip_bpe, make_spiece, make_umt5_tokenizer_json

import text
from model.clip import CLIPTextConfig, CLIPTextEncoder
from model.t5 import T5Config, T5Encoder, UMT5Encoder
from weights import CheckpointError

TINY_T5 = T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_buckets=8)
TINY_UMT5 = T5Config(**{**TINY_T5.__dict__, "vocab_size": 120, "bias_in_every_layer": True})
TEXTS = ["", "a photo of a cat", "hazy rainy snowy blurry dark images"]


@pytest.fixture(scope="module")
def flux_snapshot(tmp_path_factory):
    """text_encoder/ (with the legacy position_ids key), text_encoder_2/ (2 bf16 shards, `shared.weight` only),
    tokenizer/ and tokenizer_2/."""
    root = tmp_path_factory.mktemp("flux")
    vocab, _ = make_clip_bpe(root / "tokenizer")
    make_spiece(root / "tokenizer_2")
    vocab_size = len(json.loads(vocab.read_text()))
    clip_config = CLIPTextConfig(vocab_size=vocab_size, width=32, num_layers=2, num_heads=4, mlp_dim=64)
    clip_state = randomize_(CLIPTextEncoder(clip_config), seed=1).state_dict()
    clip_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (root / "text_encoder").mkdir()
    save_file({k: v.contiguous() for k, v in clip_state.items()}, root / "text_encoder/model.safetensors")
    t5_state = randomize_(T5Encoder(TINY_T5), seed=2).state_dict()
    keys = sorted(t5_state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    (root / "text_encoder_2").mkdir()
    for name, shard_keys in shards.items():
        save_file({k: t5_state[k].to(torch.bfloat16) for k in shard_keys}, root / "text_encoder_2" / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (root / "text_encoder_2/model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root, clip_config


@pytest.fixture(scope="module")
def wan_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    make_umt5_tokenizer_json(root / text.WAN_TOKENIZER_FILE)
    state = randomize_(UMT5Encoder(TINY_UMT5), seed=3).state_dict()
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, root / text.WAN_T5_FILE)
    return root


@pytest.fixture
def loads(monkeypatch, flux_snapshot):
    """Tiny architectures in place of the published ones, and a count of the encoders loaded."""
    monkeypatch.setattr(text, "FLUX_T5", TINY_T5)
    monkeypatch.setattr(text, "FLUX_CLIP", flux_snapshot[1])
    monkeypatch.setattr(text, "WAN_UMT5", TINY_UMT5)
    counts = {"t5": 0, "clip": 0, "umt5": 0}
    for name in counts:
        original = getattr(text, f"load_{name}")

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(text, f"load_{name}", counted)
    return counts


def test_flux_text_computes_what_flux_does(flux_snapshot, loads):
    root, _ = flux_snapshot
    txt, pooled = text.flux_text(TEXTS, root, length=24)
    assert txt.shape == (3, 24, TINY_T5.d_model) and pooled.shape == (3, 32) and txt.dtype == torch.float32
    # by hand: T5 on the padded ids WITHOUT a mask; CLIP's pooled state at the end token
    t5_ids, _ = text.T5Tokenizer(root / "tokenizer_2/spiece.model")(TEXTS, 24)
    clip_ids, _ = text.CLIPTokenizer(root / "tokenizer/vocab.json", root / "tokenizer/merges.txt")(TEXTS)
    with torch.no_grad():
        expected_txt = text.load_t5(root / "text_encoder_2")(t5_ids)
        expected_pooled = text.load_clip(root / "text_encoder")(clip_ids)[1]
    assert torch.equal(txt, expected_txt) and torch.equal(pooled, expected_pooled)
    assert not torch.allclose(txt[0, -1], txt[0, 0])  # padding positions carry (unmasked) states


def test_flux_text_cache(flux_snapshot, loads, tmp_path):
    root, _ = flux_snapshot
    cache = tmp_path / "cache"
    first = text.flux_text(TEXTS, root, length=24, cache_dir=cache)
    assert loads == {"t5": 1, "clip": 1, "umt5": 0}
    assert len(list(cache.glob("flux-*.safetensors"))) == 3
    reference = text.flux_text(TEXTS, root, length=24)  # no cache
    assert all(torch.equal(a, b) for a, b in zip(first, reference))
    loads.update(t5=0, clip=0)

    # every text cached (any order, repeated): identical tensors, no encoder loaded
    again = text.flux_text(TEXTS[::-1] + [TEXTS[0]], root, length=24, cache_dir=cache)
    assert loads == {"t5": 0, "clip": 0, "umt5": 0}
    for got, want in zip(again, first):
        assert torch.equal(got, torch.cat([want.flip(0), want[:1]]))

    # a new text: one load of each encoder for the missing text only
    text.flux_text([TEXTS[1], "snow"], root, length=24, cache_dir=cache)
    assert loads == {"t5": 1, "clip": 1, "umt5": 0}
    assert len(list(cache.glob("flux-*.safetensors"))) == 4

    # a changed length or dtype misses
    text.flux_text([TEXTS[1]], root, length=16, cache_dir=cache)
    assert loads["t5"] == 2
    half = text.flux_text([TEXTS[1]], root, length=24, dtype=torch.bfloat16, cache_dir=cache)
    assert loads["t5"] == 3 and half[0].dtype == torch.bfloat16

    # a rewritten model file (here: a new modification time of one T5 shard) misses
    shard = root / "text_encoder_2/model-00002-of-00002.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    text.flux_text([TEXTS[1]], root, length=24, cache_dir=cache)
    assert loads["t5"] == 4


def test_wan_text_masks_zeroes_and_caches(wan_snapshot, loads, tmp_path):
    cache = tmp_path / "cache"
    states = text.wan_text(TEXTS, wan_snapshot, length=16, cache_dir=cache)
    assert states.shape == (3, 16, TINY_UMT5.d_model) and loads["umt5"] == 1
    ids, mask = text.UMT5Tokenizer(wan_snapshot / text.WAN_TOKENIZER_FILE)(TEXTS, 16)
    with torch.no_grad():
        expected = text.load_umt5(wan_snapshot / text.WAN_T5_FILE)(ids, mask)
    for i, n in enumerate(mask.sum(dim=1).tolist()):
        assert torch.equal(states[i, :n], expected[i, :n])  # computed with the attention mask
        assert not states[i, n:].any() and states[i, :n].abs().sum(dim=-1).min() > 0  # zero exactly past the text
    loads["umt5"] = 0

    again = text.wan_text(TEXTS, wan_snapshot, length=16, cache_dir=cache)
    assert loads["umt5"] == 0 and torch.equal(again, states)
    text.wan_text(["a new prompt"], wan_snapshot, length=16, cache_dir=cache)
    assert loads["umt5"] == 1
    weights_file = wan_snapshot / text.WAN_T5_FILE
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    text.wan_text(TEXTS[:1], wan_snapshot, length=16, cache_dir=cache)
    assert loads["umt5"] == 2


def test_bad_requests_raise(wan_snapshot, tmp_path):
    with pytest.raises(ValueError, match="list of strings"):
        text.wan_text("a single string", wan_snapshot)
    with pytest.raises(ValueError, match="length"):
        text.wan_text([""], wan_snapshot, length=0)
    with pytest.raises(CheckpointError, match="missing"):
        text.wan_text([""], tmp_path)
