import hashlib
from pathlib import Path

import pytest
import torch

import backbone
import prompts

AUTHORS = Path(__file__).resolve().parents[2] / "shared" / "ypt"
SHA256 = {
    "wan_haze.pt": "b16a8223ffa4bb030430122bc86f105f2e3e4f9cc6557fda76d00bd7c05b2389",
    "wan_rain.pt": "0b95181e2dad02b7e91d61119ee56699171ef2bca10eba755feb244fb7027d3a",
}


@pytest.fixture(scope="module", params=["flux", "wan"])
def bb(request):
    return backbone.tiny(request.param)


def latent_batch(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 16, 4, 6) if bb.kind == "flux" else (2, 16, 3, 4, 6)
    return torch.randn(shape, generator=g), torch.tensor([0.3, 0.05])


@pytest.mark.parametrize("site", ["deep", "text"])
def test_untrained_prompt_is_exactly_the_pretrained_model(bb, site):
    x, t = latent_batch(bb)
    prompt = bb.new_prompt(site, 8)
    with torch.no_grad():
        assert torch.equal(bb.velocity(x, t, prompt), bb.velocity(x, t))


def test_deep_prompt_changes_output_and_trains_only_prompt_tensors(bb):
    x, t = latent_batch(bb)
    prompt = bb.new_prompt("deep", 8)
    with torch.no_grad():
        prompt.alphas.fill_(0.5)
    out = bb.velocity(x, t, prompt)
    assert not torch.allclose(out, bb.velocity(x, t), atol=1e-4)
    out.square().mean().backward()
    assert prompt.prompts.grad.abs().sum() > 0 and (prompt.alphas.grad != 0).all()
    assert all(p.grad is None and not p.requires_grad for p in bb.dit.parameters())


def test_deep_prompt_is_padded_or_cut_to_the_text_length(bb):
    x, t = latent_batch(bb)
    long = bb.new_prompt("deep", bb.txt.shape[1] + 5)
    short = prompts.DeepPrompt(bb.num_blocks, bb.txt.shape[1], bb.width)
    with torch.no_grad():
        long.alphas.fill_(0.3)
        short.alphas.fill_(0.3)
        short.prompts.copy_(long.prompts[:, : bb.txt.shape[1]])
        assert torch.equal(bb.velocity(x, t, long), bb.velocity(x, t, short))


def test_text_prompt_shifts_the_conditioning(bb):
    x, t = latent_batch(bb)
    prompt = prompts.TextPrompt(4, bb.text_width, bb.pooled_width)
    with torch.no_grad():
        prompt.tokens.normal_()
    shifted = backbone.Backbone(bb.kind, bb.config, bb.dit, bb.vae, bb.txt.clone(), bb.pooled)
    shifted.txt[:, :4] += prompt.tokens[0]
    with torch.no_grad():
        assert torch.allclose(bb.velocity(x, t, prompt), shifted.velocity(x, t), atol=1e-6)


def test_token_prompt_learns_through_the_frozen_text_encoders(tmp_path, bb):
    x, t = latent_batch(bb)
    prompt = bb.new_prompt("token", 3)
    assert prompt.t5.shape == (1, 3, bb.token_site.t5_width)
    assert (prompt.clip is not None) == (bb.kind == "flux")
    out = bb.velocity(x, t, prompt)
    out.square().mean().backward()
    assert prompt.t5.grad.abs().sum() > 0
    if prompt.clip is not None:
        assert prompt.clip.grad.abs().sum() > 0
    encoders = [m for m in (bb.token_site.t5, bb.token_site.clip) if m is not None]
    assert all(p.grad is None and not p.requires_grad for m in encoders for p in m.parameters())
    # the empty prompt's conditioning is the text encoders on zero learned tokens: the same code path
    states, pooled = bb.token_site(torch.zeros(1, 0, bb.token_site.t5_width), torch.zeros(1, 0, bb.token_site.clip_width))
    assert torch.equal(states, bb.txt) and (pooled is None or torch.equal(pooled, bb.pooled))

    meta = {"backbone": bb.kind, "config": bb.config, "site": "token"}
    prompts.save_prompt(prompt, tmp_path / "token.safetensors", meta)
    loaded, _ = prompts.load_prompt(tmp_path / "token.safetensors")
    with pytest.raises(ValueError, match="needs the text encoders in memory"):
        bb.velocity(x, t, loaded)
    bare = backbone.Backbone(bb.kind, bb.config, bb.dit, bb.vae, bb.txt, bb.pooled)
    with pytest.raises(ValueError, match="loaded with its text encoders"):
        bare.attach(loaded)
    with torch.no_grad():
        assert torch.equal(bb.velocity(x, t, bb.attach(loaded)), bb.velocity(x, t, prompt))


def test_save_load_round_trip_and_wrong_backbone(tmp_path, bb):
    prompt = bb.new_prompt("deep", 8)
    meta = {"backbone": bb.kind, "config": bb.config, "site": "deep", "length": 8, "t0": 0.4, "train_args": {"lr": 1e-3}}
    prompts.save_prompt(prompt, tmp_path / "p.safetensors", meta)
    loaded, loaded_meta = prompts.load_prompt(tmp_path / "p.safetensors", backbone=bb.kind)
    assert all(torch.equal(a, b) for a, b in zip(prompt.state_dict().values(), loaded.state_dict().values()))
    assert loaded_meta["t0"] == 0.4 and loaded_meta["train_args"] == {"lr": 1e-3} and loaded_meta["length"] == 8
    other = "wan" if bb.kind == "flux" else "flux"
    with pytest.raises(ValueError, match=f"trained for {bb.kind} .* not {other}"):
        prompts.load_prompt(tmp_path / "p.safetensors", backbone=other)
    with pytest.raises(ValueError, match="lacks"):
        prompts.save_prompt(prompt, tmp_path / "q.safetensors", {"backbone": bb.kind})


@pytest.mark.skipif(not AUTHORS.is_dir(), reason="../shared/ypt (the authors' released prompts) is absent")
@pytest.mark.parametrize("name", sorted(SHA256))
def test_import_of_authors_wan_prompt_is_bit_exact(tmp_path, name):
    path = AUTHORS / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name]
    original = torch.load(path, map_location="cpu", weights_only=True)
    prompt, meta = prompts.import_authors_wan(path)
    prompts.save_prompt(prompt, tmp_path / "imported.safetensors", meta)
    loaded, loaded_meta = prompts.load_prompt(tmp_path / "imported.safetensors", backbone="wan")
    assert loaded.prompts.shape == (1, 226, 1536) and loaded.alphas.shape == (30,)
    assert torch.equal(loaded.prompts, original["deep_prompt_bank"]["prompts"])
    assert all(torch.equal(loaded.alphas[i], a.reshape(())) for i, a in enumerate(original["alphas"]))
    assert loaded.prompts.dtype == original["deep_prompt_bank"]["prompts"].dtype
    assert loaded_meta["config"] == "wan2.1-t2v-1.3b" and loaded_meta["context_len"] == 226
    assert loaded.alphas.abs().sum() > 0  # a trained prompt: its gates are open


def test_import_refuses_other_files(tmp_path):
    torch.save({"something": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an authors' deep-prompt file"):
        prompts.import_authors_wan(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a prompt file of this project .* prompts.py import"):
        (tmp_path / "y.pt").write_bytes(b"")
        prompts.load_prompt(tmp_path / "y.pt")


@pytest.mark.parametrize("damage,message", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("int", "torch.int64"), ("bool", "torch.bool"),
    ("t0", "not a bridge time"), ("width", "takes"),
])
def test_a_damaged_prompt_is_refused_at_load(tmp_path, bb, damage, message):
    """Each is one ValueError before any restoration (it used to be a black video, or a traceback)."""
    import restore
    import weights

    prompt = bb.new_prompt("deep", 4)
    state = {k: v.clone() for k, v in prompt.state_dict().items()}
    meta = {"format": prompts.FORMAT, "backbone": bb.kind, "config": bb.config, "site": "deep", "t0": 0.4}
    if damage in ("nan", "inf"):
        state["prompts"][0, 1, 2] = float(damage)
    elif damage in ("int", "bool"):
        state["alphas"] = state["alphas"].to(torch.int64 if damage == "int" else torch.bool)
    elif damage == "t0":
        meta["t0"] = "soon"
    else:
        state["prompts"] = torch.zeros(1, 4, state["prompts"].shape[2] + 8)
    path = tmp_path / "damaged.safetensors"
    weights.save_safetensors(state, path, meta)
    with pytest.raises(ValueError, match=message):
        restore.load_prompts([path], bb)
