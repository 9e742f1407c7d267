"""Fake official snapshots for tests: the published folder layouts and key formats of FLUX.1-dev and
Wan2.1-T2V, holding tiny random networks and tiny tokenizers made in the test (no downloads).

`official_configs(monkeypatch)` points the published architectures (flux-dev, the FLUX AE, T5, CLIP, UMT5,
wan2.1-t2v-1.3b, the Wan VAE) at the tiny ones, so that backbone.load_flux / load_wan, train.py and sample.py
run their real code paths on these folders.
"""

import json
from pathlib import Path

import torch
from oracle import randomize_
from safetensors.torch import save_file
from text_fixtures import make_clip_bpe, make_spiece, make_umt5_tokenizer_json

import backbone
import text
from model import flux, wan, wan_vae
from model.autoencoder import CONFIGS as AE_CONFIGS
from model.autoencoder import AutoEncoder
from model.clip import CLIPTextConfig, CLIPTextEncoder
from model.t5 import T5Config, T5Encoder, UMT5Encoder

T5 = T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_buckets=8)
UMT5 = T5Config(**{**T5.__dict__, "vocab_size": 120, "bias_in_every_layer": True})
CLIP_WIDTH = 32
FLUX = flux.FluxParams(**{**backbone.TINY_FLUX.__dict__, "context_in_dim": T5.d_model, "vec_in_dim": CLIP_WIDTH})
WAN = wan.WanConfig(**{**backbone.TINY_WAN.__dict__, "text_dim": UMT5.d_model})


def clip_config(snapshot: Path) -> CLIPTextConfig:
    vocab = json.loads((snapshot / "tokenizer" / "vocab.json").read_text())
    return CLIPTextConfig(vocab_size=len(vocab), width=CLIP_WIDTH, num_layers=2, num_heads=4, mlp_dim=64)


def official_configs(monkeypatch, flux_snapshot: Path | None = None) -> None:
    """Make the published configs the tiny ones of these fake snapshots (undone by monkeypatch)."""
    monkeypatch.setitem(flux.CONFIGS, "flux-dev", FLUX)
    monkeypatch.setitem(AE_CONFIGS, "flux", backbone.TINY_AE)
    monkeypatch.setitem(wan.CONFIGS, "wan2.1-t2v-1.3b", WAN)
    monkeypatch.setitem(wan_vae.CONFIGS, "wan2.1", backbone.TINY_WAN_VAE)
    monkeypatch.setattr(text, "FLUX_T5", T5)
    monkeypatch.setattr(text, "WAN_UMT5", UMT5)
    if flux_snapshot is not None:
        monkeypatch.setattr(text, "FLUX_CLIP", clip_config(flux_snapshot))


def make_flux_snapshot(root: Path) -> Path:
    """text_encoder/, text_encoder_2/ (sharded, bfloat16), tokenizer/, tokenizer_2/, flux1-dev.safetensors,
    ae.safetensors, as in black-forest-labs/FLUX.1-dev."""
    make_clip_bpe(root / "tokenizer")
    make_spiece(root / "tokenizer_2")
    (root / "text_encoder").mkdir(parents=True)
    clip_state = randomize_(CLIPTextEncoder(clip_config(root)), seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in clip_state.items()}, root / "text_encoder" / "model.safetensors")
    t5_state = randomize_(T5Encoder(T5), seed=2).state_dict()
    keys = sorted(t5_state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    (root / "text_encoder_2").mkdir()
    for name, shard_keys in shards.items():
        save_file({k: t5_state[k].to(torch.bfloat16) for k in shard_keys}, root / "text_encoder_2" / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(randomize_(flux.Flux(FLUX), seed=3).state_dict(), root / "flux1-dev.safetensors")
    save_file(AutoEncoder(backbone.TINY_AE).state_dict(), root / "ae.safetensors")
    return root


def make_wan_snapshot(root: Path) -> Path:
    """models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/tokenizer.json, diffusion_pytorch_model.safetensors and
    Wan2.1_VAE.pth, as in Wan-AI/Wan2.1-T2V-1.3B."""
    make_umt5_tokenizer_json(root / text.WAN_TOKENIZER_FILE)
    state = randomize_(UMT5Encoder(UMT5), seed=4).state_dict()
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, root / text.WAN_T5_FILE)
    save_file(randomize_(wan.WanModel(WAN), seed=5).state_dict(), root / "diffusion_pytorch_model.safetensors")
    torch.save(wan_vae.WanVAE(backbone.TINY_WAN_VAE).state_dict(), root / "Wan2.1_VAE.pth")
    return root
