"""The prompt paths against an independent reference: diffusers' FLUX / Wan transformers (holding our random
weights, through diffusers' own converters) with the prompt put in from the method's written equations (prompts.py),
by hooking each block's attention input the authors' way; ours is `Backbone.velocity` with a real prompt object.

  FLUX deep  block i (double blocks first) adds alpha_i * P to the normalised, modulated text tokens entering its
             attention: a double block's text-stream qkv input, a single block's first L rows of the attention
             input only (not the MLP half, not the residual stream). P zero-padded or cut to the text length L.
  Wan deep   block i's cross-attention is attn(x, ctx) + alpha_i * attn(x, ctx + P) (the whole attention with its
             output projection, bias included, evaluated twice).
  text site  offsets added to the T5/UMT5 output tokens (and the pooled CLIP vector) before the DiT.
  token site K learned vectors at the encoders' input embedding, spliced in before `</s>`: with the vectors set
             to the embeddings of real words it must equal encoding those words as text.
FLUX.1-dev's guidance input is 1.0 (the authors' value). Gates are random, non-zero and distinct per block, so
a prompt applied in the wrong block order fails; every comparison is checked per block and on the velocity, and
the test also shows that the nearest wrong formula misses the reference by far more than the tolerance.
"""

import pytest
import torch
from oracle import max_abs, randomize_

import backbone
import prompts
from bench.reference import flux_model_from, wan_model_from
from model import flux as flux_model
from model.wan import WanConfig, WanModel

TOL = 1e-5

FLUX_PARAMS = flux_model.FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=40, hidden_size=64, mlp_ratio=4.0,
    num_heads=4, depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True,
    guidance_embed=True,
)
WAN_CONFIG = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=48)
TEXT_LEN = 7


def padded(p: torch.Tensor, length: int) -> torch.Tensor:
    """p [1, K, C] zero-padded or cut to `length` tokens, written out (not prompts.fit_length)."""
    out = torch.zeros(1, length, p.shape[2], dtype=p.dtype)
    n = min(length, p.shape[1])
    out[:, :n] = p[:, :n]
    return out


def random_gates(count: int, seed: int) -> torch.Tensor:
    """Distinct non-zero gates of both signs, |alpha| in [0.4, 1.6]."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
    magnitude = 0.4 + 1.2 * torch.randperm(count, generator=g).float() / max(1, count - 1)
    return sign * magnitude


def deep_prompt(num_blocks: int, length: int, width: int, seed: int) -> prompts.DeepPrompt:
    prompt = prompts.DeepPrompt(num_blocks, length, width)
    with torch.no_grad():
        prompt.prompts.copy_(0.7 * torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed)))
        prompt.alphas.copy_(random_gates(num_blocks, seed + 1))
    return prompt.requires_grad_(False)


def capture(blocks, kind: str):
    """Forward hooks that record each block's output, in call order. Returns (records, handles)."""
    records = []

    def hook(module, args, out):
        if kind == "ours-double":  # (img, txt)
            records.append(torch.cat((out[1], out[0]), dim=1))
        elif kind == "ref-flux":  # (encoder_hidden_states = txt, hidden_states = img)
            records.append(torch.cat(out, dim=1))
        else:  # one tensor: ours single [txt; img], Wan tokens
            records.append(out)

    return records, [block.register_forward_hook(hook) for block in blocks]


def remove(handles):
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------------------------- FLUX


@pytest.fixture(scope="module")
def flux():
    """(our Backbone around a random FLUX, diffusers' FLUX with the same weights)."""
    tiny = backbone.tiny("flux")
    dit = randomize_(flux_model.Flux(FLUX_PARAMS), seed=21).eval()
    g = torch.Generator().manual_seed(22)
    txt = torch.randn(1, TEXT_LEN, FLUX_PARAMS.context_in_dim, generator=g)
    pooled = torch.randn(1, FLUX_PARAMS.vec_in_dim, generator=g)
    bb = backbone.Backbone("flux", "test-flux", dit, tiny.vae, txt, pooled)  # the default guidance
    return bb, flux_model_from(dit)


def flux_inputs(seed: int = 23):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 6, 8, generator=g), torch.tensor([0.31, 0.07])


def flux_reference(ref, x, t, txt, pooled, terms=None):
    """diffusers' FLUX velocity of x [B, 16, H, W] at t [B] with guidance 1.0; `terms[i]` [1, L, D] (or None) is
    added to block i's text tokens where they enter its attention (the authors' hook). Returns (v, block outs)."""
    batch, (height, width) = x.shape[0], x.shape[-2:]
    depth = len(ref.transformer_blocks)
    handles = []
    for i, block in enumerate(ref.transformer_blocks):
        def double(module, args, kwargs, i=i):
            if terms is None or terms[i] is None:
                return None
            return args, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] + terms[i]}
        handles.append(block.attn.register_forward_pre_hook(double, with_kwargs=True))
    for j, block in enumerate(ref.single_transformer_blocks):
        def single(module, args, kwargs, i=depth + j):
            if terms is None or terms[i] is None:
                return None
            x = kwargs["hidden_states"]  # [B, L + N, D], the text rows first
            length = terms[i].shape[1]
            return args, {**kwargs, "hidden_states": torch.cat((x[:, :length] + terms[i], x[:, length:]), dim=1)}
        handles.append(block.attn.register_forward_pre_hook(single, with_kwargs=True))
    records, hooks = capture(list(ref.transformer_blocks) + list(ref.single_transformer_blocks), "ref-flux")
    try:
        with torch.no_grad():
            out = ref(
                hidden_states=flux_model.pack(x), encoder_hidden_states=txt.expand(batch, -1, -1),
                pooled_projections=pooled.expand(batch, -1), timestep=t, guidance=torch.full((batch,), 1.0),
                img_ids=flux_model.image_ids(1, height, width)[0], txt_ids=torch.zeros(txt.shape[1], 3),
                return_dict=False,
            )[0]
    finally:
        remove(handles + hooks)
    return flux_model.unpack(out, height, width), records


def flux_ours(bb, x, t, prompt):
    dit = bb.dit
    doubles, h1 = capture(dit.double_blocks, "ours-double")
    singles, h2 = capture(dit.single_blocks, "ours-single")
    try:
        with torch.no_grad():
            v = bb.velocity(x, t, prompt)
    finally:
        remove(h1 + h2)
    return v, doubles + singles


def deep_terms(prompt, length: int, alphas=None):
    p = padded(prompt.prompts, length)
    return [a * p for a in (prompt.alphas if alphas is None else alphas)]


def test_flux_guidance_input_is_one(flux):
    bb, _ = flux
    assert bb.guidance == 1.0


@pytest.mark.parametrize("length", [4, TEXT_LEN + 3], ids=["K<L-padded", "K>L-cut"])
def test_flux_deep_prompt_matches_the_hooked_reference(flux, length):
    bb, ref = flux
    x, t = flux_inputs()
    prompt = deep_prompt(bb.num_blocks, length, bb.width, seed=24)
    ours, our_blocks = flux_ours(bb, x, t, prompt)
    expected, ref_blocks = flux_reference(ref, x, t, bb.txt, bb.pooled, deep_terms(prompt, TEXT_LEN))
    assert len(our_blocks) == len(ref_blocks) == bb.num_blocks
    for i, (a, b) in enumerate(zip(our_blocks, ref_blocks)):
        assert max_abs(a, b) <= TOL, f"block {i} ({'double' if i < FLUX_PARAMS.depth else 'single'}) differs"
    assert max_abs(ours, expected) <= TOL

    plain, _ = flux_reference(ref, x, t, bb.txt, bb.pooled)
    reversed_, _ = flux_reference(ref, x, t, bb.txt, bb.pooled, deep_terms(prompt, TEXT_LEN, prompt.alphas.flip(0)))
    print(f"FLUX deep K={length}: ours vs reference {max_abs(ours, expected):.1e}; the prompt moves the velocity by "
          f"{max_abs(ours, plain):.2f}, reversed gates by {max_abs(ours, reversed_):.2f}")
    assert max_abs(ours, plain) > 1e-2 and max_abs(ours, reversed_) > 1e-2  # the test can tell them apart


def test_flux_deep_prompt_each_block_alone(flux):
    """One gate open at a time: block i's term reaches block i only, at its attention input."""
    bb, ref = flux
    x, t = flux_inputs(seed=25)
    prompt = deep_prompt(bb.num_blocks, TEXT_LEN, bb.width, seed=26)
    gates = prompt.alphas.clone()
    for i in range(bb.num_blocks):
        with torch.no_grad():
            prompt.alphas.zero_()
            prompt.alphas[i] = gates[i]
        ours, _ = flux_ours(bb, x, t, prompt)
        expected, _ = flux_reference(ref, x, t, bb.txt, bb.pooled, deep_terms(prompt, TEXT_LEN))
        assert max_abs(ours, expected) <= TOL, f"the prompt of block {i} alone differs from the reference"


def test_flux_text_site_matches_the_reference(flux):
    bb, ref = flux
    x, t = flux_inputs(seed=27)
    prompt = prompts.TextPrompt(5, bb.text_width, bb.pooled_width)
    g = torch.Generator().manual_seed(28)
    with torch.no_grad():
        prompt.tokens.normal_(generator=g)
        prompt.pooled.normal_(generator=g)
    ours, our_blocks = flux_ours(bb, x, t, prompt)
    expected, ref_blocks = flux_reference(ref, x, t, bb.txt + padded(prompt.tokens.detach(), TEXT_LEN),
                                          bb.pooled + prompt.pooled.detach())
    for i, (a, b) in enumerate(zip(our_blocks, ref_blocks)):
        assert max_abs(a, b) <= TOL, f"block {i} differs"
    assert max_abs(ours, expected) <= TOL
    tokens_only, _ = flux_reference(ref, x, t, bb.txt + padded(prompt.tokens.detach(), TEXT_LEN), bb.pooled)
    assert max_abs(ours, tokens_only) > 1e-2  # the pooled offset matters too


# ---------------------------------------------------------------------------------------------- Wan


class Float64Sinusoid(torch.nn.Module):
    """Wan's timestep features in float64, cosines first (diffusers' own are float32: ~1e-5 off at t*1000 ~ 300)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        angles = torch.outer(timesteps.double(), 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half))
        return torch.cat([angles.cos(), angles.sin()], dim=1).float()


@pytest.fixture(scope="module")
def wan():
    tiny = backbone.tiny("wan")
    dit = randomize_(WanModel(WAN_CONFIG), seed=31).eval()
    txt = torch.randn(1, TEXT_LEN, WAN_CONFIG.text_dim, generator=torch.Generator().manual_seed(32))
    bb = backbone.Backbone("wan", "test-wan", dit, tiny.vae, txt)
    ref = wan_model_from(dit)
    ref.condition_embedder.timesteps_proj = Float64Sinusoid(WAN_CONFIG.freq_dim)
    return bb, ref


def wan_inputs(seed: int = 33):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 2, 4, 6, generator=g), torch.tensor([0.33, 0.05])


def wan_reference(ref, x, t, context, prompt_terms=None):
    """diffusers' Wan velocity; `prompt_terms[i]` = (P [1, L, dim], alpha) makes block i's cross-attention
    attn2(x, ctx) + alpha * attn2(x, ctx + P). Returns (v, block outputs)."""
    originals = []
    for i, block in enumerate(ref.blocks):
        plain = block.attn2.forward
        originals.append(plain)
        if prompt_terms is None or prompt_terms[i] is None:
            continue
        p, alpha = prompt_terms[i]

        def prompted(hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                     plain=plain, p=p, alpha=alpha):
            return (plain(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
                    + alpha * plain(hidden_states, encoder_hidden_states + p, attention_mask, rotary_emb))

        block.attn2.forward = prompted
    records, hooks = capture(ref.blocks, "ref-wan")
    try:
        with torch.no_grad():
            out = ref(x, t * 1000, context.expand(x.shape[0], -1, -1), return_dict=False)[0]
    finally:
        remove(hooks)
        for block, plain in zip(ref.blocks, originals):
            block.attn2.forward = plain
    return out, records


def wan_ours(bb, x, t, prompt):
    records, hooks = capture(bb.dit.blocks, "ours-wan")
    try:
        with torch.no_grad():
            v = bb.velocity(x, t, prompt)
    finally:
        remove(hooks)
    return v, records


@pytest.mark.parametrize("length", [4, TEXT_LEN + 3], ids=["K<L-padded", "K>L-cut"])
def test_wan_deep_prompt_matches_the_hooked_reference(wan, length):
    bb, ref = wan
    x, t = wan_inputs()
    prompt = deep_prompt(bb.num_blocks, length, bb.width, seed=34)
    p = padded(prompt.prompts, TEXT_LEN)
    ours, our_blocks = wan_ours(bb, x, t, prompt)
    expected, ref_blocks = wan_reference(ref, x, t, bb.txt, [(p, a) for a in prompt.alphas])
    assert len(our_blocks) == len(ref_blocks) == bb.num_blocks
    for i, (a, b) in enumerate(zip(our_blocks, ref_blocks)):
        assert max_abs(a, b) <= TOL, f"block {i} differs"
    assert max_abs(ours, expected) <= TOL

    plain, _ = wan_reference(ref, x, t, bb.txt)
    reversed_, _ = wan_reference(ref, x, t, bb.txt, [(p, a) for a in prompt.alphas.flip(0)])
    prompt_alone, _ = wan_reference(ref, x, t, bb.txt * 0, [(p, a) for a in prompt.alphas])  # attn(x, P)-like
    print(f"Wan deep K={length}: ours vs reference {max_abs(ours, expected):.1e}; the prompt moves the velocity by "
          f"{max_abs(ours, plain):.2f}, reversed gates by {max_abs(ours, reversed_):.2f}")
    assert min(max_abs(ours, plain), max_abs(ours, reversed_), max_abs(ours, prompt_alone)) > 1e-2


def test_wan_deep_prompt_each_block_alone(wan):
    bb, ref = wan
    x, t = wan_inputs(seed=35)
    prompt = deep_prompt(bb.num_blocks, TEXT_LEN, bb.width, seed=36)
    gates = prompt.alphas.clone()
    for i in range(bb.num_blocks):
        with torch.no_grad():
            prompt.alphas.zero_()
            prompt.alphas[i] = gates[i]
        ours, _ = wan_ours(bb, x, t, prompt)
        terms = [None] * bb.num_blocks
        terms[i] = (prompt.prompts, gates[i])
        expected, _ = wan_reference(ref, x, t, bb.txt, terms)
        assert max_abs(ours, expected) <= TOL, f"the prompt of block {i} alone differs from the reference"


def test_wan_text_site_matches_the_reference(wan):
    bb, ref = wan
    x, t = wan_inputs(seed=37)
    prompt = prompts.TextPrompt(5, bb.text_width)
    with torch.no_grad():
        prompt.tokens.normal_(generator=torch.Generator().manual_seed(38))
    ours, _ = wan_ours(bb, x, t, prompt)
    expected, _ = wan_reference(ref, x, t, bb.txt + padded(prompt.tokens.detach(), TEXT_LEN))
    assert max_abs(ours, expected) <= TOL and max_abs(ours, wan_reference(ref, x, t, bb.txt)[0]) > 1e-2


# ---------------------------------------------------------------------------------------------- text tokens


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_token_site_with_word_embeddings_equals_encoding_the_words(kind):
    """The learned vectors go where prompt words go: [v_1 .. v_K, </s>, <pad> ...] for T5/UMT5 (Wan: attention
    mask over the K + 1 tokens, states zeroed past them) and [<start>, v_1 .. v_Kc, <end> ...] for CLIP. Set to
    the embeddings of word ids, the site must give exactly the encoders' output for those ids."""
    site = backbone.tiny(kind).token_site
    length, words = site.length, [5, 17, 9]
    k = len(words)
    t5_ids = torch.zeros(1, length, dtype=torch.long)  # <pad> = 0
    t5_ids[0, :k] = torch.tensor(words)
    t5_ids[0, k] = 1  # </s>
    clip_vectors = None
    with torch.no_grad():
        if site.masked:
            mask = torch.zeros(1, length, dtype=torch.long)
            mask[0, : k + 1] = 1
            expected = site.t5(t5_ids, mask) * mask[..., None]
        else:
            expected = site.t5(t5_ids)
        if site.clip is not None:
            vocab, positions = site.clip.config.vocab_size, site.clip.config.max_positions
            clip_ids = torch.full((1, positions), vocab - 1, dtype=torch.long)  # <end> pads
            clip_ids[0, 0] = vocab - 2  # <start>
            clip_ids[0, 1 : 1 + k] = torch.tensor(words)
            _, expected_pooled = site.clip(clip_ids)
            clip_vectors = site.clip.embed(clip_ids[:, 1 : 1 + k])
        states, pooled = site(site.t5.embed(t5_ids[:, :k]), clip_vectors)
    assert max_abs(states, expected) <= TOL
    if site.clip is not None:
        assert max_abs(pooled, expected_pooled) <= TOL
    empty, _ = site(torch.zeros(1, 0, site.t5_width), torch.zeros(1, 0, site.clip_width))
    assert max_abs(states, empty) > 1e-2  # the words change the conditioning: the comparison can fail
