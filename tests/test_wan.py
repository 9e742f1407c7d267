"""Wan2.1 DiT (model/wan.py) against diffusers' WanTransformer3DModel, the official key sets, deep prompts, loading."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.embeddings import get_timestep_embedding
from oracle import max_abs, randomize_

from model.wan import CONFIGS, WanConfig, WanModel, check_latent_shape, timestep_embedding
from weights import build, save_safetensors

# head_dim 16 is not a multiple of 6: the RoPE split is uneven (frames 8, rows 4, cols 4 channels).
SMALL = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)


def diffusers_config(config: WanConfig) -> dict:
    return dict(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
        rope_max_seq_len=1024,
    )


def small_model(seed: int = 0) -> WanModel:
    return randomize_(WanModel(SMALL), seed).eval()


def inputs(seed: int = 1):
    """Batch 2, 3 latent frames of 4x6 (non-square), 7 text tokens (shorter than text_len)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.tensor([0.3, 0.91])
    context = torch.randn(2, 7, SMALL.text_dim, generator=g)
    return x, t, context


class Float64Sinusoid(torch.nn.Module):
    """Wan's timestep features in float64 (cosines first), for the oracle in place of diffusers' float32 ones."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        angles = torch.outer(timesteps.double(), torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def reference_for(model: WanModel) -> WanTransformer3DModel:
    ref = WanTransformer3DModel(**diffusers_config(model.config)).eval()
    state = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    ref.load_state_dict(state, strict=True)
    return ref


@torch.no_grad()
def test_matches_diffusers():
    model = small_model()
    ref = reference_for(model)
    x, t, context = inputs()
    ours = model(x, t, context)
    assert ours.shape == x.shape

    # As published, diffusers computes the timestep sinusoid in float32, Wan in float64 (so do we); at t*1000
    # ~ 900 the rounding of the angles alone moves the output by ~2e-5.
    plain = ref(x, t * 1000, context, return_dict=False)[0]
    err_plain = max_abs(ours, plain)
    print(f"wan vs diffusers (diffusers' float32 sinusoid): max-abs {err_plain:.3g}")
    assert err_plain <= 1e-4

    # With the same float64 sinusoid everything else must agree to float32 precision.
    ref.condition_embedder.timesteps_proj = Float64Sinusoid(SMALL.freq_dim)
    exact = ref(x, t * 1000, context, return_dict=False)[0]
    err = max_abs(ours, exact)
    print(f"wan vs diffusers (float64 sinusoid): max-abs {err:.3g}")
    assert err <= 1e-5


def test_timestep_sinusoid_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    ours = timestep_embedding(t, 256)
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert max_abs(ours, theirs) <= 2e-4  # float32 rounding of angles up to 1000 rad
    assert max_abs(ours[:2], theirs[:2]) <= 1e-6


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_official_key_set(name):
    config = CONFIGS[name]
    with torch.device("meta"):
        ours = WanModel(config)
        ref = WanTransformer3DModel(**diffusers_config(config))
    converted = convert_wan_transformer_to_diffusers(dict(ours.state_dict()))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert ours.blocks[0].modulation.shape == (1, 6, config.dim)
    assert ours.head.modulation.shape == (1, 2, config.dim)
    assert len(ours.state_dict()) == 12 + 27 * config.num_layers + 3  # 825 keys for 1.3B, 1095 for 14B


def deep_prompts(model: WanModel, alphas, batch: int = 1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    prompt = (0.5 * torch.randn(batch, 7, model.config.dim, generator=g)).requires_grad_()
    alpha_list = [torch.tensor(float(a), requires_grad=True) for a in alphas]
    return prompt, alpha_list, [(prompt, a) for a in alpha_list]


def block_outputs(model: WanModel, *args, **kwargs):
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, out: captured.append(out.detach())) for block in model.blocks]
    try:
        out = model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured


@torch.no_grad()
def test_zero_alpha_is_bit_identical():
    model = small_model()
    x, t, context = inputs()
    plain = model(x, t, context)
    _, _, prompts = deep_prompts(model, [0.0, 0.0])
    assert torch.equal(model(x, t, context, cross_prompts=prompts), plain)
    assert torch.equal(model(x, t, context, cross_prompts=[None, None]), plain)


@torch.no_grad()
def test_nonzero_alpha_changes_its_block():
    model = small_model()
    x, t, context = inputs()
    _, plain_blocks = block_outputs(model, x, t, context)
    for i in range(SMALL.num_layers):
        alphas = [0.0] * SMALL.num_layers
        alphas[i] = 0.7
        _, _, prompts = deep_prompts(model, alphas, batch=2)
        _, blocks = block_outputs(model, x, t, context, cross_prompts=prompts)
        for j in range(SMALL.num_layers):
            assert torch.equal(blocks[j], plain_blocks[j]) == (j < i), (i, j)


def test_gradients_reach_only_prompts():
    model = small_model().requires_grad_(False)
    x, t, context = inputs()
    # alpha starts at 0 in training: it must still get a gradient, P gets one once alpha is non-zero.
    prompt, alphas, prompts = deep_prompts(model, [0.0, 0.4])
    model(x, t, context, cross_prompts=prompts).square().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(a.grad is not None and a.grad != 0 for a in alphas)
    assert all(p.grad is None for p in model.parameters())


def test_bfloat16_close_to_float32():
    model = small_model()
    x, t, context = inputs()
    with torch.no_grad():
        full = model(x, t, context)
        half = model.to(torch.bfloat16)(x, t, context)
    assert half.dtype == torch.bfloat16
    rel = max_abs(half, full) / full.abs().max().item()
    print(f"bfloat16 vs float32: max-abs {max_abs(half, full):.3g} (relative to max {rel:.3g})")
    assert rel < 0.05


def test_checkpointing_same_outputs_and_gradients():
    x, t, context = inputs()
    results = []
    for checkpointing in (False, True):
        model = small_model()
        model.checkpointing = checkpointing
        prompt, alphas, prompts = deep_prompts(model, [0.3, -0.2])
        out = model(x, t, context, cross_prompts=prompts)
        out.square().mean().backward()
        grads = [prompt.grad, *(a.grad for a in alphas), *(p.grad for p in model.parameters())]
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_shape_errors():
    model = small_model()
    x, t, context = inputs()
    with pytest.raises(ValueError, match=r"4x5.*multiples of 16x16"):
        check_latent_shape((1, 16, 3, 4, 5), SMALL)
    with pytest.raises(ValueError, match="latent video"):
        model(x[:, :8], t, context)
    with pytest.raises(ValueError, match="flow time"):
        model(x, t[:1], context)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :16])
    _, _, prompts = deep_prompts(model, [0.0, 0.0])
    with pytest.raises(ValueError, match="one entry per block"):
        model(x, t, context, cross_prompts=prompts[:1])
    with pytest.raises(ValueError, match=r"cross_prompts\[0\].*\[1, 7, 64\]"):
        model(x, t, context[:, :5], cross_prompts=prompts)


@torch.no_grad()
def test_build_from_safetensors(tmp_path):
    model = small_model()
    x, t, context = inputs()
    expected = model(x, t, context)
    state = model.state_dict()

    single = tmp_path / "diffusion_pytorch_model.safetensors"
    save_safetensors(state, single)
    assert torch.equal(build(WanModel, SMALL, single)(x, t, context), expected)

    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        save_safetensors({k: state[k] for k in shard_keys}, tmp_path / name)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    loaded = build(WanModel, SMALL, index)
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded(x, t, context), expected)
