"""Miniature, stage 2: tiny frozen text encoders and a small FLUX transformer pre-trained by rectified flow on
captioned photographs of every look.

    python -m mini.pretrain_flux --photos ../shared/data/photos --out mini       # after mini.pretrain_ae

FLUX.1's pre-training data held photos of every look (dark, foggy, rainy, snowy, soft, grainy, crisp) with captions
that say so; that is what gives its text pathway leverage over the look of an image, which a learned prompt can
then use. This stage builds a miniature of that:
1. Text encoders. A tiny T5 encoder and a tiny CLIP text encoder with seeded random weights (`model/t5.py`,
   `model/clip.py`), never trained, like FLUX's frozen encoders. A caption is a sequence of words of a seven-word
   vocabulary (`VOCABULARY`, recorded in miniature.json): one per look.
2. Captioned pool. Random 128 px crops of the photos (squares of 1x, 2x or 4x that side resized down, flips) and a
   smaller pool of 256 px crops. Each crop independently gets a look: clean ("clean", share CLEAN_SHARE), one of the
   six degradations of `data.DEGRADATIONS` with its own random strength ("noisy", "blurry", "hazy", "rainy",
   "dark", "snowy"), or two of them ("hazy dark", share PAIR_SHARE). The caption names the look. The crops are
   encoded once by the stage-1 autoencoder (posterior means, normalised). No crop is ever seen beside a clean
   version of itself: pre-training is text-to-image generation, never a (degraded, clean) pair.
3. Pre-training. `model/flux.py` at a small config learns the ordinary rectified-flow objective: x_t = (1 - t) x0 +
   t eps, t ~ U[0, 1], target v = eps - x0, mean squared error, conditioned on the crop's caption, or on the empty
   prompt for a share EMPTY_SHARE of samples (the unconditional model the restoration bridge starts from). Three
   steps in four use the 128 px pool (batch 8), the fourth the 256 px pool (batch 2). AdamW, warm-up and cosine
   decay; the shipped weights are an EMA of the trained ones; modulation and output layers start at zero (adaLN-zero).

Resumable: `<out>/checkpoints/flux.pt` every --save-every steps (the pools are cached beside it). Writes
`t5.safetensors`, `clip.safetensors`, `flux.safetensors` (official key names), their configs, "text_len" and
"vocabulary" in `miniature.json`, and the "flux" entry of `figures.json`.
"""

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

import data
import text
import weights
from mini import images
from mini.pretrain_ae import Checkpoint, continue_from, learning_rate, update_json
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
# look -> (caption word, the degradation of data.DEGRADATIONS that makes it); word ids from 2 (0 pad, 1 </s>)
LOOKS = {"clean": None, "noisy": "noise", "blurry": "blur", "hazy": "haze", "rainy": "rain", "dark": "lowlight",
         "snowy": "snow"}
VOCABULARY = {word: 2 + i for i, word in enumerate(LOOKS)}
CLEAN_SHARE, PAIR_SHARE = 0.4, 0.15  # the rest: one degradation, each equally likely
EMPTY_SHARE = 0.1  # samples trained on the empty prompt
POOLS = ((128, 6144, 8), (256, 768, 2))  # (crop side, pool size, batch)
SCALES = (1.0, 2.0, 4.0)


def make_text_encoders(folder: Path, seed: int) -> tuple[T5Encoder, CLIPTextEncoder]:
    """Create and save the seeded random text encoders, record their configs, reload them strictly."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(T5Encoder(T5).state_dict(), folder / "t5.safetensors")
    weights.save_safetensors(CLIPTextEncoder(CLIP).state_dict(), folder / "clip.safetensors")
    update_json(folder / "miniature.json", t5=asdict(T5), clip=asdict(CLIP), text_len=TEXT_LEN, vocabulary=VOCABULARY)
    t5 = weights.build(T5Encoder, T5, folder / "t5.safetensors")
    clip = weights.build(CLIPTextEncoder, CLIP, folder / "clip.safetensors")
    return t5, clip


@torch.no_grad()
def encode_caption(words: list[str], t5: T5Encoder, clip: CLIPTextEncoder) -> tuple[Tensor, Tensor]:
    """The conditioning of a caption (a list of VOCABULARY words; [] is the empty prompt): T5 on
    [w_1 .. w_n, </s>, <pad> ...] -> txt [1, TEXT_LEN, 64]; CLIP on [<start>, w_1 .. w_n, <end> ...] -> pooled [1, 32].
    The same ids `text.caption_ids` gives sample.py's --text for the miniature."""
    t5_ids, clip_ids = text.caption_ids(words, VOCABULARY, TEXT_LEN, clip.config)
    return t5(t5_ids), clip(clip_ids)[1]


def draw_look(generator: torch.Generator) -> list[str]:
    """A random caption: ["clean"] (CLEAN_SHARE), two distinct degraded looks (PAIR_SHARE) or one."""
    u = torch.rand(1, generator=generator).item()
    degraded = [w for w in LOOKS if w != "clean"]
    if u < CLEAN_SHARE:
        return ["clean"]
    order = torch.randperm(len(degraded), generator=generator).tolist()
    return [degraded[i] for i in order[: 2 if u > 1 - PAIR_SHARE else 1]]


def apply_look(crop: Tensor, words: list[str], generator: torch.Generator) -> Tensor:
    """crop [3, H, W] in [0, 1] with the caption's degradations applied in caption order, clamped to [0, 1]."""
    for word in words:
        if LOOKS[word] is not None:
            crop = data.DEGRADATIONS[LOOKS[word]](crop, generator).clamp(0, 1)
    return crop


@torch.no_grad()
def captioned_pool(ae: AutoEncoder, photos: list[Tensor], side: int, count: int, t5: T5Encoder,
                   clip: CLIPTextEncoder, generator: torch.Generator) -> dict[str, Tensor]:
    """{"latents": [count, 16, side/4, side/4], "txt": [count, TEXT_LEN, 64], "pooled": [count, 32],
    "look": [count, len(LOOKS)] (which looks each crop has, for the figures)}."""
    captions = {}
    latents, txt, pooled, looks = [], [], [], []
    for start in range(0, count, 32):
        crops = images.random_crops(photos, min(32, count - start), side, generator, SCALES)
        words = [draw_look(generator) for _ in crops]
        crops = torch.stack([apply_look(c, w, generator) for c, w in zip(crops, words)])
        latents.append(ae.encode(crops * 2 - 1))
        for w in words:
            key = " ".join(w)
            if key not in captions:
                captions[key] = encode_caption(w, t5, clip)
            txt.append(captions[key][0])
            pooled.append(captions[key][1])
            looks.append(torch.tensor([[word in w for word in LOOKS]]))
    return {"latents": torch.cat(latents), "txt": torch.cat(txt), "pooled": torch.cat(pooled),
            "look": torch.cat(looks)}


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
    """The transformer's velocity for latents x [B, 16, h, w] at times t [B] under conditioning txt [B or 1, L, 64],
    pooled [B or 1, 32] (the same arguments `backbone.Backbone.velocity` passes)."""
    batch, _, height, width = x.shape
    v = model(
        img=flux_model.pack(x), img_ids=flux_model.image_ids(batch, height, width),
        txt=txt.expand(batch, -1, -1), txt_ids=flux_model.text_ids(batch, txt.shape[1]),
        timesteps=t, y=pooled.expand(batch, -1),
    )
    return flux_model.unpack(v, height, width)


def training_batch(pools: list[dict[str, Tensor]], step: int, empty: tuple[Tensor, Tensor],
                   generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x0 [B, 16, h, w], txt [B, L, 64], pooled [B, 32]): random entries of pool 0 (three steps in four) or pool 1,
    each caption replaced by the empty prompt's with probability EMPTY_SHARE."""
    pool, (_, _, batch) = (pools[1], POOLS[1]) if step % 4 == 3 else (pools[0], POOLS[0])
    index = torch.randint(len(pool["latents"]), (batch,), generator=generator)
    drop = torch.rand(batch, generator=generator) < EMPTY_SHARE
    txt = torch.where(drop[:, None, None], empty[0], pool["txt"][index])
    pooled = torch.where(drop[:, None], empty[1], pool["pooled"][index])
    return pool["latents"][index], txt, pooled


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


def train(model: flux_model.Flux, pools: list[dict[str, Tensor]], empty: tuple[Tensor, Tensor], steps: int,
          lr: float, ema_decay: float, generator: torch.Generator, checkpoint: Checkpoint, save_every: int,
          stop_at: int | None = None, log_every: int = 50) -> tuple[nn.Module, list[float]]:
    """Train `model` in place (continuing from `checkpoint` if it exists) on the schedule of `steps` steps, stopping
    after step `stop_at` (a partial run of the same schedule, resumable later); returns (the EMA model, every loss)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first, losses, state = checkpoint.load(model, optimizer, generator)
    if state:
        ema.load_state_dict(state["ema"])
    start = time.time()
    for step in range(first, min(steps, stop_at or steps)):
        loss = flow_loss(model, *training_batch(pools, step, empty, generator), generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))  # short memory while it warms up
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, done = time.time() - start, step + 1 - first
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"flux step {step + 1}/{steps}  loss {recent:.4f}  {elapsed / 60:.1f} min, "
                  f"eta {elapsed / done * (steps - step - 1) / 60:.1f} min", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            checkpoint.save(model, optimizer, generator, step + 1, losses, ema=ema.state_dict())
    return ema, losses


@torch.no_grad()
def probe_loss(model: nn.Module, pools: list[dict[str, Tensor]], empty: tuple[Tensor, Tensor], seed: int,
               batches: int = 8) -> float:
    """The flow loss on fixed draws (same entries, captions, times and noise for every model compared)."""
    generator = torch.Generator().manual_seed(seed)
    losses = [flow_loss(model, *training_batch(pools, i, empty, generator), generator) for i in range(batches)]
    return round(torch.stack(losses).mean().item(), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of training photographs (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("mini"), help="the miniature's folder, with the stage-1 "
                   "autoencoder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (default: %(default)s)")
    p.add_argument("--init", type=Path, help="continue from these weights (e.g. a finished run's flux.safetensors): "
                   "a further stage with a fresh optimizer, EMA and --steps schedule of its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--stop-at", type=int, help="write the weights after this step of the --steps schedule (the "
                   "checkpoint stays, so the run can go on later)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.save_every < 1 or (args.stop_at is not None and not 0 < args.stop_at <= args.steps):
        p.error("--steps and --save-every must be positive, --stop-at in 1..--steps")

    start = time.time()
    t5, clip = make_text_encoders(args.out, args.seed)
    empty = encode_caption([], t5, clip)
    spec = json.loads((args.out / "miniature.json").read_text())
    ae = weights.build(AutoEncoder, AutoEncoderParams(**spec["autoencoder"]), args.out / "ae.safetensors")
    pool_file = args.out / "checkpoints" / "flux_pools.pt"
    if pool_file.is_file():
        pools = torch.load(pool_file, weights_only=True)
    else:
        photos = images.load_photos(args.photos)
        generator = torch.Generator().manual_seed(args.seed + 1)
        pools = [captioned_pool(ae, photos, side, count, t5, clip, generator) for side, count, _ in POOLS]
        pool_file.parent.mkdir(parents=True, exist_ok=True)
        with weights.atomic_file(pool_file) as tmp:
            torch.save(pools, tmp)
    print(f"pools {[list(p['latents'].shape) for p in pools]}: latent std {pools[0]['latents'].std():.3f}; "
          f"{(time.time() - start) / 60:.1f} min", flush=True)

    model = new_flux(args.seed)
    if args.init:
        continue_from(model, args.init)
    generator = torch.Generator().manual_seed(args.seed)
    settings = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "ema", "seed")}
    settings["init"] = str(args.init) if args.init else None
    checkpoint = Checkpoint(args.out / "checkpoints" / "flux.pt", settings | {"config": asdict(FLUX)})
    ema, losses = train(model, pools, empty, args.steps, args.lr, args.ema, generator, checkpoint, args.save_every,
                        args.stop_at)
    weights.save_safetensors(ema.state_dict(), args.out / "flux.safetensors")
    update_json(args.out / "miniature.json", backbone="flux", flux=asdict(FLUX))

    window = max(1, len(losses) // 20)
    curve = [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 4) for i in range(0, len(losses), window)]
    minutes = (time.time() - start) / 60
    figures = args.out / "figures.json"
    earlier = json.loads(figures.read_text()).get("flux") if args.init and figures.is_file() else None
    update_json(figures, flux={
        **settings, "stopped_at": len(losses), "params": sum(t.numel() for t in ema.parameters()), "wall_minutes_last_run": round(minutes, 1),
        "pools": [list(p["latents"].shape) for p in pools],
        "look_shares": {w: round(pools[0]["look"][:, i].float().mean().item(), 3) for i, w in enumerate(LOOKS)},
        "loss_curve_window": window, "loss_curve": curve,
        "probe_loss_ema": probe_loss(ema, pools, empty, seed=1234),
        "probe_loss_raw": probe_loss(model, pools, empty, seed=1234),
        "continued_from": earlier,  # the figures of the stage --init came from
    })
    print(f"loss {curve[0]} -> {curve[-1]}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
