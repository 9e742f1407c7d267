"""Miniature, stage 1: a small FLUX-architecture autoencoder trained on random crops of real photographs.

    python -m mini.pretrain_ae --photos ../shared/data/photos --eval ../shared/data/eval --out mini

The network is `model/autoencoder.py` unchanged, at a small config: 4x spatial downsampling (three levels, where
FLUX has four and 8x), width 64 at every level, no resnet in the encoder's levels and one in each decoder level,
the usual resnet-attention-resnet mid blocks, 16 latent channels. Why 4x: 16 numbers per 8 x 8 patch cap even the
best linear code (PCA) at 28 dB on Kodak24, 16 numbers per 4 x 4 patch allow 38 dB; the previous 8x miniature sat at
21.7 dB and every latent method inherited that ceiling. Why width 64: GroupNorm has 32 groups; at width 32 each group
is one channel and the last norm erases every channel's mean, so flat colours and overall brightness (what low light
and haze change) cannot be reproduced. The last layer of every residual branch starts at zero, so each resnet and
attention block starts as the identity.

Each step takes random crops (64, 96 or 128 px, of squares 1x, 2x or 4x that side resized down, left-right flips) of
the photos, encodes them, decodes a posterior SAMPLE mean + std * noise, and minimises L1 + MSE between image and
reconstruction, plus 10 x the MSE between their 4 x 4 average-pooled versions (colours are the slowest part to learn
through GroupNorm), plus a small KL(posterior || N(0, I)) that keeps the latent bounded. AdamW with a linear warm-up
and a cosine decay; every draw comes from one seeded generator.

Resumable: a checkpoint (weights, optimizer, generator, losses) is written every --save-every steps to
`<out>/checkpoints/ae.pt`; running the same command again continues from it. Afterwards the latent normalisation is
set as FLUX did (shift = mean, scale = 1 / std of the posterior means over fixed training crops). Writes
`ae.safetensors` (official key names), the "autoencoder" entry of `miniature.json` and of `figures.json` (losses, wall
time, round-trip PSNR on the Kodak24 and CBSD68 256 px centre crops and on mini/heldout/).
"""

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import weights
from mini import images
from model.autoencoder import AttnBlock, AutoEncoder, AutoEncoderParams, ResnetBlock

CONFIG = AutoEncoderParams(
    resolution=128, in_channels=3, ch=64, out_ch=3, ch_mult=[1, 1, 1], num_res_blocks=0, z_channels=16,
    scale_factor=1.0, shift_factor=0.0,  # set from the latent statistics after training
)
CROPS = ((64, 8), (96, 4), (128, 2))  # (crop side, batch): 33k-37k pixels per step
SCALES = (1.0, 2.0, 4.0)  # a crop shows a square of side*scale pixels of the photo, resized to side


def update_json(path: Path, **entries) -> None:
    """Merge `entries` into the JSON object in `path` (created if absent), written atomically."""
    spec = json.loads(path.read_text()) if path.is_file() else {}
    spec.update(entries)
    with weights.atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=2) + "\n")


def continue_from(model: nn.Module, path: Path) -> nn.Module:
    """A continuation stage: `model` starts at a finished stage's weights (cast to float32, keys checked strictly);
    its optimizer, EMA and learning-rate schedule start afresh. Returns the model."""
    return weights.load_into(model, weights.read_state_dict(path), dtype=torch.float32)


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (any shape), over all their pixels together."""
    return (10 * torch.log10(1 / (a.float() - b.float()).square().mean())).item()


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all latent elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then a cosine decay to 1% of it at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def zero_residual_branches(ae: AutoEncoder) -> None:
    """Zero the last layer of every resnet and attention block: each block starts as the identity."""
    for module in ae.modules():
        last = module.conv2 if isinstance(module, ResnetBlock) else module.proj_out if isinstance(module, AttnBlock) else None
        if last is not None:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


class Checkpoint:
    """A resumable training state in one file: {"model", "optimizer", "generator", "step", "losses", "settings"}.
    Written atomically; `load` refuses a checkpoint made with other settings (a changed recipe must start afresh)."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings

    def save(self, model: nn.Module, optimizer, generator: torch.Generator, step: int, losses: list[float],
             **extra: Tensor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "step": step, "losses": torch.tensor(losses), "settings": json.dumps(self.settings, sort_keys=True)}
        state.update(extra)
        with weights.atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, model: nn.Module, optimizer, generator: torch.Generator) -> tuple[int, list[float], dict]:
        """Restore into model, optimizer and generator; return (step, losses, the whole state) or (0, [], {})."""
        if not self.path.is_file():
            return 0, [], {}
        state = torch.load(self.path, weights_only=True)
        if json.loads(state["settings"]) != self.settings:
            raise SystemExit(f"error: {self.path} was made with other settings ({state['settings']}); "
                             f"delete it to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        print(f"resuming from {self.path} at step {state['step']}", flush=True)
        return state["step"], state["losses"].tolist(), state


def reconstruction_loss(ae: AutoEncoder, pixels: Tensor, lowfreq_weight: float, kl_weight: float,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(loss, reconstruction in [0, 1]) of pixels [B, 3, H, W] in [0, 1] through a posterior sample."""
    mean, logvar = ae.encoder(pixels * 2 - 1).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator)
    recon = (ae.decoder(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) + 1) / 2
    error = recon - pixels
    colour_error = F.avg_pool2d(recon, 4) - F.avg_pool2d(pixels, 4)
    loss = error.abs().mean() + error.square().mean() + lowfreq_weight * colour_error.square().mean()
    return loss + kl_weight * kl_divergence(mean, logvar), recon


def train(model: nn.Module, draw: Callable[[int, int], Tensor],
          loss_fn: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]], steps: int, lr: float,
          generator: torch.Generator, checkpoint: Checkpoint, save_every: int,
          crops: tuple[tuple[int, int], ...] = CROPS, label: str = "ae", log_every: int = 25,
          bf16: bool = False) -> list[float]:
    """Train an autoencoder `model` in place (continuing from `checkpoint` if it exists); returns every step's loss.

    Each step draws a (side, batch) of `crops` from `generator`, a batch `draw(side, batch)` in [0, 1] and its
    (loss, reconstruction) `loss_fn(model, batch)`, under bfloat16 autocast if `bf16` (the weights, the optimizer
    and the loss stay float32; convolutions run 2.3x faster on a CPU with AMX). The video miniature's VAE stage
    trains through this loop too."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first, losses, _ = checkpoint.load(model, optimizer, generator)
    start = time.time()
    for step in range(first, steps):
        size, batch = crops[torch.randint(len(crops), (1,), generator=generator).item()]
        pixels = draw(size, batch)
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, recon = loss_fn(model, pixels)
        loss, recon = loss.float(), recon.float()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, done = time.time() - start, step + 1 - first
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"{label} step {step + 1}/{steps}  loss {recent:.4f}  batch psnr {psnr(recon.clamp(0, 1), pixels):.2f} dB  "
                  f"{elapsed / 60:.1f} min, eta {elapsed / done * (steps - step - 1) / 60:.1f} min", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            checkpoint.save(model, optimizer, generator, step + 1, losses)
    return losses


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, photos: list[Tensor], generator: torch.Generator,
                      count: int = 256, size: int = 128) -> tuple[float, float]:
    """(mean, std) of the unnormalised posterior means of `count` random training crops, over all elements."""
    means = []
    for chunk in images.random_crops(photos, count, size, generator, SCALES).split(16):
        means.append(ae.encoder(chunk * 2 - 1).chunk(2, dim=1)[0])
    means = torch.cat(means)
    return means.mean().item(), means.std().item()


@torch.no_grad()
def round_trip_psnr(ae: AutoEncoder, crops: dict[str, Tensor]) -> dict[str, float]:
    """Reconstruction PSNR (dB) through the posterior mean, per crop [3, H, W] in [0, 1] (outputs clamped)."""
    return {name: round(psnr((ae.decode(ae.encode(image[None] * 2 - 1)).float().clamp(-1, 1) + 1) / 2, image[None]), 2)
            for name, image in crops.items()}


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of training photographs (searched recursively)")
    p.add_argument("--eval", type=Path, required=True, help="the eval/ folder (kodak24/, cbsd68/): round-trip figures")
    p.add_argument("--out", type=Path, default=Path("mini"), help="the miniature's folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--lowfreq-weight", type=float, default=10.0, help="weight of the 4x4-pooled MSE (default: %(default)s)")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (2.3x faster on a CPU with AMX; "
                   "weights and optimizer stay float32; on a CPU without native bfloat16, e.g. AVX2 only, it is "
                   "emulated and about 20x SLOWER)")
    p.add_argument("--init", type=Path, help="start from these autoencoder weights (an ae.safetensors of this config) "
                   "instead of from scratch: a longer schedule continued in another session or on another machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.save_every < 1:
        p.error("--steps and --save-every must be positive")
    if args.init is not None and not args.init.is_file():
        p.error(f"--init {args.init}: no such file")

    start = time.time()
    photos = images.load_photos(args.photos)
    eval_crops = images.eval_crops(args.eval)
    print(f"{len(photos)} training photos, {len(eval_crops)} evaluation crops", flush=True)
    torch.manual_seed(args.seed)  # the module initialisers draw from the global generator
    generator = torch.Generator().manual_seed(args.seed)
    ae = AutoEncoder(CONFIG)
    zero_residual_branches(ae)
    if args.init is not None:
        weights.load_into(ae, weights.read_state_dict(args.init), dtype=torch.float32)
    settings = {k: v for k, v in vars(args).items()
                if k in ("steps", "lr", "lowfreq_weight", "kl_weight", "seed", "bf16")}
    settings["init"] = args.init.name if args.init is not None else None
    checkpoint = Checkpoint(args.out / "checkpoints" / "ae.pt", settings | {"config": asdict(CONFIG)})
    losses = train(ae, lambda size, batch: images.random_crops(photos, batch, size, generator, SCALES),
                   lambda model, pixels: reconstruction_loss(model, pixels, args.lowfreq_weight, args.kl_weight, generator),
                   args.steps, args.lr, generator, checkpoint, args.save_every, bf16=args.bf16)
    ae.eval()

    shift, std = latent_statistics(ae, photos, generator)
    ae.params = replace(CONFIG, scale_factor=round(1 / std, 4), shift_factor=round(shift, 4))
    args.out.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(ae.state_dict(), args.out / "ae.safetensors")
    update_json(args.out / "miniature.json", autoencoder=asdict(ae.params))

    reloaded = weights.build(AutoEncoder, ae.params, args.out / "ae.safetensors", dtype=torch.float32)
    scores = round_trip_psnr(reloaded, eval_crops)
    heldout = round_trip_psnr(reloaded, images.heldout_crops())
    minutes = (time.time() - start) / 60
    window = max(1, args.steps // 20)
    update_json(args.out / "figures.json", autoencoder={
        **settings, "params": sum(t.numel() for t in ae.parameters()), "wall_minutes_last_run": round(minutes, 1),
        "loss_first_window": round(sum(losses[:window]) / window, 4),
        "loss_last_window": round(sum(losses[-window:]) / window, 4),
        "latent_shift": ae.params.shift_factor, "latent_scale": ae.params.scale_factor,
        "round_trip_psnr_mean_db": {s: mean(v for k, v in scores.items() if k.startswith(s)) for s in ("kodak24", "cbsd68")},
        "round_trip_psnr_mean_db_all": mean(scores.values()),
        "heldout_psnr_db": heldout, "heldout_psnr_mean_db": mean(heldout.values()),
    })
    print(f"round trip: Kodak24+CBSD68 {mean(scores.values())} dB, held-out {heldout}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
