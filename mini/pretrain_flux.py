"""Miniature, stage 2: tiny frozen text encoders and a small FLUX transformer pre-trained by rectified flow.

    python -m mini.pretrain_flux --out mini          # after mini.pretrain_ae

1. Text encoders. A tiny T5 encoder and a tiny CLIP text encoder with seeded random weights (`model/t5.py`,
   `model/clip.py`). They are never trained: like FLUX's, their output for the empty prompt is the fixed
   conditioning of the transformer, computed here with the same calls as `backbone.load_miniature`.
2. Latent pool. The stage-1 autoencoder encodes (posterior means, normalised) a fixed set of random 256 px crops
   of the TRAIN images, with left-right flips, once.
3. Pre-training. `model/flux.py` at a small config learns the ordinary rectified-flow objective on windows of
   those latents: x_t = (1 - t) x0 + t eps, t ~ U[0, 1], target v = eps - x0, mean squared error. Three steps in
   four use 16 x 16 latent windows (128 px, 64 tokens, batch 16); every fourth the whole 32 x 32 latent
   (256 px, 256 tokens, batch 4), so that larger images are in-distribution too. AdamW with a warm-up and a
   cosine decay; the shipped weights are an exponential moving average (EMA) of the trained ones. Modulation and
   output layers start at zero (adaLN-zero, as in DiT), so every block starts as the identity.

Writes `t5.safetensors`, `clip.safetensors`, `flux.safetensors` (official key names), their configs and
"text_len" in `miniature.json`, and the "flux" entry of `figures.json` (loss curve, wall time).
"""

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

import text
import weights
from mini import images
from mini.pretrain_ae import learning_rate, update_json
from model import flux as flux_model
from model.autoencoder import AutoEncoder, AutoEncoderParams
from model.clip import CLIPTextConfig, CLIPTextEncoder
from model.t5 import T5Config, T5Encoder

T5 = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)
CLIP = CLIPTextConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, mlp_dim=64, max_positions=16)
TEXT_LEN = 16  # T5 tokens of the conditioning (and so the most prompt tokens later stages can use)
FLUX = flux_model.FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=CLIP.width, context_in_dim=T5.d_model, hidden_size=128,
    mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=6, axes_dim=[4, 14, 14], theta=10_000, qkv_bias=True,
    guidance_embed=False,
)
POOL_CROP = 256  # the latent pool holds crops of POOL_CROP px -> latents [16, 32, 32]
# Captions (--captions, an experiment; the shipped transformer has none): each crop is described by three words,
# its brightness, contrast and colourfulness, each one of CAPTION_BINS levels (quantiles over the pool), the way
# real captions say "dark", "hazy", "vivid".
CAPTION_BINS = 5
CAPTION_DROP = 0.1  # share of samples trained on the empty prompt: the unconditional model restoration starts from
WINDOWS = ((16, 16), (16, 16), (16, 16), (32, 4))  # (latent side, batch) of steps 0, 1, 2, 3 mod 4


def make_text_encoders(folder: Path, seed: int) -> tuple[T5Encoder, CLIPTextEncoder, Tensor, Tensor]:
    """Create, save and reload the seeded random text encoders; return them and the empty-prompt conditioning
    (txt [1, TEXT_LEN, 64], pooled [1, 32]) exactly as `backbone.load_miniature` computes it."""
    torch.manual_seed(seed)
    weights.save_safetensors(T5Encoder(T5).state_dict(), folder / "t5.safetensors")
    weights.save_safetensors(CLIPTextEncoder(CLIP).state_dict(), folder / "clip.safetensors")
    update_json(folder / "miniature.json", t5=asdict(T5), clip=asdict(CLIP), text_len=TEXT_LEN)
    t5 = weights.build(T5Encoder, T5, folder / "t5.safetensors")
    clip = weights.build(CLIPTextEncoder, CLIP, folder / "clip.safetensors")
    with torch.no_grad():
        txt = t5(text.empty_t5_ids(TEXT_LEN))
        _, pooled = clip(text.empty_clip_ids(clip.config))
    return t5, clip, txt, pooled


@torch.no_grad()
def latent_pool(ae: AutoEncoder, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """[count, 16, 32, 32] normalised latents (posterior means) of random POOL_CROP px TRAIN crops, and their
    statistics [count, 3] (`crop_statistics`)."""
    train_images = [images.load(name) for name in images.TRAIN]
    crops = images.random_crops(train_images, count, POOL_CROP, generator)
    return torch.cat([ae.encode(chunk * 2 - 1) for chunk in crops.split(16)]), crop_statistics(crops)


def crop_statistics(crops: Tensor) -> Tensor:
    """[N, 3]: mean luminance (brightness), its standard deviation (contrast) and the mean of max - min over the
    RGB channels (colourfulness) of crops [N, 3, H, W] in [0, 1]."""
    luminance = (crops * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    colour = (crops.amax(1) - crops.amin(1)).mean((1, 2))
    return torch.stack([luminance.mean((1, 2)), luminance.std((1, 2)), colour], dim=1)


@torch.no_grad()
def captions(statistics: Tensor, t5: T5Encoder, clip: CLIPTextEncoder) -> tuple[Tensor, Tensor]:
    """The conditioning of each pool crop's caption: txt [N, TEXT_LEN, 64], pooled [N, 32]. Statistic k in level
    b (of CAPTION_BINS, by quantiles over the pool) is word 2 + k * CAPTION_BINS + b of both tiny vocabularies;
    a caption is its three words, then </s> and padding (T5), or between start and end tokens (CLIP)."""
    quantiles = torch.linspace(0, 1, CAPTION_BINS + 1)[1:-1]
    edges = torch.quantile(statistics, quantiles, dim=0).T.contiguous()  # [3, CAPTION_BINS - 1]
    levels = torch.stack([torch.bucketize(statistics[:, k].contiguous(), edges[k]) for k in range(3)], dim=1)
    words = 2 + torch.arange(3) * CAPTION_BINS + levels  # [N, 3]
    t5_ids = text.empty_t5_ids(TEXT_LEN).repeat(len(words), 1)
    t5_ids = torch.cat([words, t5_ids[:, : TEXT_LEN - 3]], dim=1)  # words, </s>, <pad> ...
    clip_ids = text.empty_clip_ids(clip.config).repeat(len(words), 1)
    clip_ids = torch.cat([clip_ids[:, :1], words, clip_ids[:, 1:-3]], dim=1)  # start, words, end ...
    txt = torch.cat([t5(ids) for ids in t5_ids.split(64)])
    pooled = torch.cat([clip(ids)[1] for ids in clip_ids.split(64)])
    return txt, pooled


def new_flux(seed: int) -> flux_model.Flux:
    """The transformer at its initialisation: PyTorch's default init, with adaLN-zero modulation and output."""
    torch.manual_seed(seed)
    model = flux_model.Flux(FLUX)
    zeroed = [block.img_mod.lin for block in model.double_blocks] + [block.txt_mod.lin for block in model.double_blocks]
    zeroed += [block.modulation.lin for block in model.single_blocks]
    zeroed += [model.final_layer.adaLN_modulation[1], model.final_layer.linear]
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def velocity(model: flux_model.Flux, x: Tensor, t: Tensor, txt: Tensor, pooled: Tensor) -> Tensor:
    """The transformer's velocity for latents x [B, 16, h, w] at times t [B] under the empty-prompt conditioning
    (the same arguments `backbone.Backbone.velocity` passes)."""
    batch, _, height, width = x.shape
    v = model(
        img=flux_model.pack(x), img_ids=flux_model.image_ids(batch, height, width),
        txt=txt.expand(batch, -1, -1), txt_ids=flux_model.text_ids(batch, txt.shape[1]),
        timesteps=t, y=pooled.expand(batch, -1),
    )
    return flux_model.unpack(v, height, width)


def training_batch(pool: Tensor, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of latent windows [B, 16, side, side] from random pool entries at random offsets, and the entries'
    indices [B] (for their captions)."""
    side, batch = WINDOWS[step % len(WINDOWS)]
    index = torch.randint(len(pool), (batch,), generator=generator)
    offsets = torch.randint(pool.shape[-1] - side + 1, (batch, 2), generator=generator)
    windows = [pool[i, :, r : r + side, c : c + side] for i, (r, c) in zip(index.tolist(), offsets.tolist())]
    return torch.stack(windows), index


def conditioning(index: Tensor, pool_txt: Tensor | None, pool_pooled: Tensor | None, txt: Tensor, pooled: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The captions' conditioning of pool entries `index` [B], each replaced by the empty prompt's (txt, pooled)
    with probability CAPTION_DROP: ([B, TEXT_LEN, 64], [B, 32]). Without captions (None) the empty prompt's,
    drawing nothing from `generator`."""
    if pool_txt is None:
        return txt, pooled
    empty = torch.rand(len(index), generator=generator) < CAPTION_DROP
    return (torch.where(empty[:, None, None], txt, pool_txt[index]),
            torch.where(empty[:, None], pooled, pool_pooled[index]))


def flow_loss(model: flux_model.Flux, x0: Tensor, txt: Tensor, pooled: Tensor, generator: torch.Generator) -> Tensor:
    """Rectified-flow loss mean((v(x_t, t) - (eps - x0))^2), t ~ U[0, 1], x_t = (1 - t) x0 + t eps."""
    t = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    return (velocity(model, x_t, t, txt, pooled) - (eps - x0)).square().mean()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(model: flux_model.Flux, pool: Tensor, pool_txt: Tensor | None, pool_pooled: Tensor | None, txt: Tensor,
          pooled: Tensor,
          steps: int, lr: float, ema_decay: float, generator: torch.Generator,
          log_every: int = 50) -> tuple[nn.Module, list[float]]:
    """Train `model` in place on the pool's latents under the empty prompt (txt, pooled), or under their captions
    (pool_txt, pool_pooled, not None) with a CAPTION_DROP share of empty prompts; returns (the EMA model, the loss
    of every step)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, start = [], time.time()
    for step in range(steps):
        x0, index = training_batch(pool, step, generator)
        loss = flow_loss(model, x0, *conditioning(index, pool_txt, pool_pooled, txt, pooled, generator), generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))  # short memory while it warms up
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"flux step {step + 1}/{steps}  loss {recent:.4f}  {elapsed / 60:.1f} min, "
                  f"eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min", flush=True)
    return ema, losses


@torch.no_grad()
def probe_loss(model: nn.Module, pool: Tensor, txt: Tensor, pooled: Tensor, seed: int, batches: int = 8) -> float:
    """The flow loss on fixed draws (same windows, times and noise for every model compared)."""
    generator = torch.Generator().manual_seed(seed)
    losses = [flow_loss(model, training_batch(pool, i, generator)[0], txt, pooled, generator) for i in range(batches)]
    return round(torch.stack(losses).mean().item(), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mini"), help="the miniature's folder, with the stage-1 "
                   "autoencoder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay (default: %(default)s)")
    p.add_argument("--pool", type=int, default=1024, help="latent pool size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", action="store_true", help="an experiment (mini/README.md): condition on three "
                   "words describing each crop's brightness, contrast and colourfulness, 10%% empty prompts")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    t5, clip, txt, pooled = make_text_encoders(args.out, args.seed)
    spec = json.loads((args.out / "miniature.json").read_text())
    ae = weights.build(AutoEncoder, AutoEncoderParams(**spec["autoencoder"]), args.out / "ae.safetensors")
    generator = torch.Generator().manual_seed(args.seed)
    pool, statistics = latent_pool(ae, args.pool, generator)
    pool_txt, pool_pooled = captions(statistics, t5, clip) if args.captions else (None, None)
    print(f"latent pool {list(pool.shape)}: mean {pool.mean():.3f}, std {pool.std():.3f}; "
          f"{(time.time() - start) / 60:.1f} min", flush=True)

    model = new_flux(args.seed)
    ema, losses = train(model, pool, pool_txt, pool_pooled, txt, pooled, args.steps, args.lr, args.ema, generator)
    weights.save_safetensors(ema.state_dict(), args.out / "flux.safetensors")
    update_json(args.out / "miniature.json", flux=asdict(FLUX))

    window = max(1, args.steps // 20)
    curve = [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 4) for i in range(0, len(losses), window)]
    minutes = (time.time() - start) / 60
    update_json(args.out / "figures.json", flux={
        "steps": args.steps, "lr": args.lr, "ema": args.ema, "pool": args.pool, "seed": args.seed,
        "params": sum(t.numel() for t in ema.parameters()), "wall_minutes": round(minutes, 1),
        "cpu_minutes": round(time.process_time() / 60, 1),
        "loss_curve_window": window, "loss_curve": curve,
        "probe_loss_ema": probe_loss(ema, pool, txt, pooled, seed=1234),
        "probe_loss_raw": probe_loss(model, pool, txt, pooled, seed=1234),
        "pool_mean": round(pool.mean().item(), 4), "pool_std": round(pool.std().item(), 4),
    })
    print(f"loss {curve[0]} -> {curve[-1]}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
