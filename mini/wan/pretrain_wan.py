"""Video miniature, stage 2: a tiny frozen UMT5 and a small Wan2.1 DiT pre-trained by rectified flow on captioned
clips of every look.

    python -m mini.wan.pretrain_wan --video ../shared/data/video --photos ../shared/data/photos --out mini/wan \
        --threads 1                                                       # after mini.wan.pretrain_vae

The video counterpart of `mini.pretrain_flux`, with the same looks and the same caption words:
1. Text encoder. A tiny UMT5 encoder (`model/t5.py`, Wan's key names) with seeded random weights, never trained,
   like Wan's frozen UMT5. A caption is a sequence of words of the image miniature's seven-word VOCABULARY
   (`mini.pretrain_flux.LOOKS`), recorded in miniature.json. As Wan runs real text, UMT5 sees
   [w_1 .. w_n, </s>, <pad> ...] with an attention mask over the first n + 1 tokens, and its output is zeroed
   after them; the empty prompt is [</s>, <pad> ...] (`encode_caption([])`).
2. Captioned pools. Clips from `mini.wan.clips` (half real footage, the held-out clip never among them; half
   camera motion over photos): POOLS gives (side, frames, count, batch). Each clip independently gets a look as
   in the image stage (clean with share CLEAN_SHARE, one of the six degradations of `data.DEGRADATIONS` at its
   own random strength, or two), applied to the whole clip, and the caption names it. The clips are encoded once
   by the stage-1 VAE (normalised posterior means, stored as bfloat16). The pools have a seed of their own
   (--pool-seed), so that a continuation stage (--init) can draw fresh clips while the text encoder stays. No
   clip is ever seen beside a clean version of itself: pre-training is text-to-video generation, never a
   (degraded, clean) pair.
3. Pre-training. `model/wan.py` at a small config (WAN) learns the rectified-flow objective: x_t = (1 - t) x0 +
   t eps, t ~ U[0, 1], target v = eps - x0, mean squared error, conditioned on the clip's caption, or on the empty
   prompt for a share EMPTY_SHARE of samples. Three steps in four use pool 0, the fourth pool 1 (bigger, longer
   clips: the sizes restoration meets). AdamW, warm-up and cosine decay; the shipped weights are an EMA; the time
   projection and the output layer start at zero.

Resumable: `<checkpoints>/wan.pt` every --save-every steps (the pools are cached beside it). Writes
`umt5.safetensors` and `wan.safetensors` (official key names), their configs, "text_len", "vocabulary" and
"backbone": "wan" in `miniature.json`, and the "wan" entry of `figures.json` (loss curve, probe loss, leverage:
how far each caption moves the velocity from the empty prompt's).
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
from mini.pretrain_ae import Checkpoint, continue_from, learning_rate, update_json
from mini.pretrain_flux import CLEAN_SHARE, EMPTY_SHARE, LOOKS, VOCABULARY, apply_look, draw_look, update_ema
from mini.wan import clips
from model import wan as wan_model
from model.t5 import T5Config, UMT5Encoder
from model.wan_vae import WanVAE, WanVAEConfig

UMT5 = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, bias_in_every_layer=True)
TEXT_LEN = 16  # UMT5 tokens of the conditioning (the context length of the DiT)
WAN = wan_model.WanConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6, text_dim=UMT5.d_model, text_len=TEXT_LEN)
POOLS = ((64, 9, 3072, 4), (96, 17, 384, 1))  # (clip side, frames, pool size, batch): 2304 and 2448 tokens a step


def make_text_encoder(folder: Path, seed: int) -> UMT5Encoder:
    """Create and save the seeded random UMT5, record its config and the vocabulary, reload it strictly."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(UMT5Encoder(UMT5).state_dict(), folder / "umt5.safetensors")
    update_json(folder / "miniature.json", umt5=asdict(UMT5), text_len=TEXT_LEN, vocabulary=VOCABULARY)
    return weights.build(UMT5Encoder, UMT5, folder / "umt5.safetensors")


@torch.no_grad()
def encode_caption(words: list[str], umt5: UMT5Encoder, length: int = TEXT_LEN) -> Tensor:
    """The context [1, length, 64] of a caption (VOCABULARY words; [] is the empty prompt): UMT5 on
    [w_1 .. w_n, </s>, <pad> ...] masked to its n + 1 tokens, zeroed after them (as Wan runs real text)."""
    if any(w not in VOCABULARY for w in words) or len(words) >= length:
        raise ValueError(f"caption {words} is not a short sequence of the words {list(VOCABULARY)}")
    ids = torch.cat([torch.tensor([[VOCABULARY[w] for w in words]], dtype=torch.long),
                     text.empty_t5_ids(length)[:, : length - len(words)]], dim=1)
    mask = (torch.arange(length) <= len(words)).long()[None]
    return umt5(ids, attention_mask=mask) * mask[..., None]


@torch.no_grad()
def captioned_pool(vae: WanVAE, footage: dict[str, Tensor], photos: list[Tensor], side: int, frames: int, count: int,
                   umt5: UMT5Encoder, generator: torch.Generator) -> dict[str, Tensor]:
    """{"latents": [count, 16, frames, side/4, side/4] bfloat16, "txt": [count, TEXT_LEN, 64],
    "look": [count, len(LOOKS)] (which looks each clip has, for the figures)}."""
    captions, latents, txt, looks = {}, [], [], []
    for start in range(0, count, 16):
        batch = clips.random_clips(footage, photos, min(16, count - start), frames, side, generator)
        words = [draw_look(generator) for _ in batch]
        batch = torch.stack([apply_look(c, w, generator) for c, w in zip(batch, words)])
        latents.append(vae.encode(batch * 2 - 1).to(torch.bfloat16))
        for w in words:
            key = " ".join(w)
            if key not in captions:
                captions[key] = encode_caption(w, umt5)
            txt.append(captions[key])
            looks.append(torch.tensor([[word in w for word in LOOKS]]))
    return {"latents": torch.cat(latents), "txt": torch.cat(txt), "look": torch.cat(looks)}


def new_wan(seed: int) -> wan_model.WanModel:
    """The DiT at its initialisation: PyTorch's default init, with the time projection and the output at zero."""
    torch.manual_seed(seed)
    model = wan_model.WanModel(WAN)
    for layer in (model.time_projection[1], model.head.head):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def training_batch(pools: list[dict[str, Tensor]], step: int, empty: Tensor,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x0 [B, 16, F, h, w] float32, txt [B, L, 64]): random entries of pool 0 (three steps in four) or pool 1, each
    caption replaced by the empty prompt's with probability EMPTY_SHARE."""
    pool, batch = (pools[1], POOLS[1][3]) if step % 4 == 3 else (pools[0], POOLS[0][3])
    index = torch.randint(len(pool["latents"]), (batch,), generator=generator)
    drop = torch.rand(batch, generator=generator) < EMPTY_SHARE
    return pool["latents"][index].float(), torch.where(drop[:, None, None], empty, pool["txt"][index])


def flow_loss(model: wan_model.WanModel, x0: Tensor, txt: Tensor, generator: torch.Generator) -> Tensor:
    """Rectified-flow loss mean((v(x_t, t) - (eps - x0))^2), t ~ U[0, 1], x_t = (1 - t) x0 + t eps."""
    t = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    tt = t.view(-1, 1, 1, 1, 1)
    return (model((1 - tt) * x0 + tt * eps, t, txt) - (eps - x0)).square().mean()


def train(model: wan_model.WanModel, pools: list[dict[str, Tensor]], empty: Tensor, steps: int, lr: float,
          ema_decay: float, generator: torch.Generator, checkpoint: Checkpoint, save_every: int,
          log_every: int = 25, stop_at: int | None = None) -> tuple[nn.Module, list[float]]:
    """Train `model` in place (continuing from `checkpoint` if it exists); returns (the EMA model, every loss).
    `stop_at`: end after that step (a partial run of the same `steps`-step schedule, resumable later)."""
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))  # short memory while it warms up
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, done = time.time() - start, step + 1 - first
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"wan step {step + 1}/{steps}  loss {recent:.4f}  {elapsed / 60:.1f} min, "
                  f"eta {elapsed / done * (steps - step - 1) / 60:.1f} min", flush=True)
        if ((step + 1) % save_every == 0 or step + 1 == stop_at) and step + 1 < steps:
            checkpoint.save(model, optimizer, generator, step + 1, losses, ema=ema.state_dict())
    return ema, losses


@torch.no_grad()
def probe_loss(model: nn.Module, pools: list[dict[str, Tensor]], empty: Tensor, seed: int, batches: int = 8) -> float:
    """The flow loss on fixed draws (same entries, captions, times and noise for every model compared)."""
    generator = torch.Generator().manual_seed(seed)
    losses = [flow_loss(model, *training_batch(pools, i, empty, generator), generator) for i in range(batches)]
    return round(torch.stack(losses).mean().item(), 4)


@torch.no_grad()
def leverage(model: nn.Module, pool: dict[str, Tensor], umt5: UMT5Encoder, seed: int, count: int = 8) -> dict[str, float]:
    """look word -> mean ||v(x_t, t, caption) - v(x_t, t, empty)|| / ||v(x_t, t, empty)|| on fixed pool entries
    at t ~ U[0.2, 0.8]: how much each one-word caption moves the velocity."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(pool["latents"]), (count,), generator=generator)
    x0 = pool["latents"][index].float()
    t = 0.2 + 0.6 * torch.rand(count, generator=generator)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * torch.randn(x0.shape, generator=generator)
    base = model(x_t, t, encode_caption([], umt5).expand(count, -1, -1))
    return {word: round(((model(x_t, t, encode_caption([word], umt5).expand(count, -1, -1)) - base).norm()
                         / base.norm()).item(), 4) for word in LOOKS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, required=True, help="folder of training videos (the held-out clip is skipped)")
    p.add_argument("--photos", type=Path, required=True, help="folder of photographs for the camera-motion clips")
    p.add_argument("--out", type=Path, default=Path("mini/wan"), help="the video miniature's folder, with the "
                   "stage-1 VAE (default: %(default)s)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: <out>/checkpoints)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (default: %(default)s)")
    p.add_argument("--stop-at", type=int, help="end after this step of the --steps schedule and write its EMA "
                   "(a partial run; the same command without --stop-at resumes it)")
    p.add_argument("--init", type=Path, help="continue from these weights (e.g. a finished run's wan.safetensors): "
                   "a further stage with a fresh optimizer, EMA and --steps schedule of its own")
    p.add_argument("--seed", type=int, default=0, help="seed of the text encoder, the DiT's init and training draws")
    p.add_argument("--pool-seed", type=int, help="seed of the captioned pools (default: --seed + 1); a continuation "
                   "stage may draw fresh clips of the same footage and photos with another")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.save_every < 1:
        p.error("--steps and --save-every must be positive")
    spec_file = args.out / "miniature.json"
    if not spec_file.is_file() or "wan_vae" not in json.loads(spec_file.read_text()):
        p.error(f"{spec_file} has no wan_vae entry: run mini.wan.pretrain_vae first")
    checkpoints = args.checkpoints or args.out / "checkpoints"

    start = time.time()
    umt5 = make_text_encoder(args.out, args.seed)
    empty = encode_caption([], umt5)
    config = json.loads(spec_file.read_text())["wan_vae"]
    vae = weights.build(WanVAE, WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}),
                        args.out / "wan_vae.safetensors")
    pool_seed = args.seed + 1 if args.pool_seed is None else args.pool_seed
    pool_file = checkpoints / "wan_pools.pt"
    if pool_file.is_file():
        pools = torch.load(pool_file, weights_only=True)
    else:
        footage, photos = clips.load_footage(args.video), images.load_photos(args.photos)
        generator = torch.Generator().manual_seed(pool_seed)
        pools = [captioned_pool(vae, footage, photos, side, frames, count, umt5, generator)
                 for side, frames, count, _ in POOLS]
        pool_file.parent.mkdir(parents=True, exist_ok=True)
        with weights.atomic_file(pool_file) as tmp:
            torch.save(pools, tmp)
    print(f"pools {[list(p['latents'].shape) for p in pools]}: latent std {pools[0]['latents'].float().std():.3f}; "
          f"{(time.time() - start) / 60:.1f} min", flush=True)

    model = new_wan(args.seed)
    if args.init:
        continue_from(model, args.init)
    generator = torch.Generator().manual_seed(args.seed)
    settings = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "ema", "seed")}
    settings["init"] = str(args.init) if args.init else None
    settings["pool_seed"] = pool_seed
    # through JSON, as the checkpoint stores them (tuples become lists), so that a resumed run compares equal
    checkpoint = Checkpoint(checkpoints / "wan.pt", json.loads(json.dumps(settings | {"config": asdict(WAN), "pools": POOLS})))
    ema, losses = train(model, pools, empty, args.steps, args.lr, args.ema, generator, checkpoint, args.save_every,
                        stop_at=args.stop_at)
    weights.save_safetensors(ema.state_dict(), args.out / "wan.safetensors")
    update_json(spec_file, backbone="wan", wan=asdict(WAN))

    window = max(1, args.steps // 20)
    curve = [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 4) for i in range(0, len(losses), window)]
    minutes = (time.time() - start) / 60
    figures = args.out / "figures.json"
    earlier = json.loads(figures.read_text()).get("wan") if args.init and figures.is_file() else None
    update_json(figures, wan={
        **settings, "steps_done": len(losses), "params": sum(t.numel() for t in ema.parameters()),
        "wall_minutes_last_run": round(minutes, 1), "pools": [list(p["latents"].shape) for p in pools],
        "look_shares": {w: round(pools[0]["look"][:, i].float().mean().item(), 3) for i, w in enumerate(LOOKS)},
        "clean_share": CLEAN_SHARE, "empty_share": EMPTY_SHARE,
        "loss_curve_window": window, "loss_curve": curve,
        "probe_loss_ema": probe_loss(ema, pools, empty, seed=1234),
        "probe_loss_raw": probe_loss(model, pools, empty, seed=1234),
        "leverage": leverage(ema, pools[0], umt5, seed=1234),
        "continued_from": earlier,  # the figures of the stage --init came from
    })
    print(f"loss {curve[0]} -> {curve[-1]}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
