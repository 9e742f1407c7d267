"""Miniature, stage 1: a small FLUX-architecture autoencoder trained on random crops of the clean training images.

    python -m mini.pretrain_ae --out mini

The network is `model/autoencoder.py` unchanged, at a small config: 8x spatial downsampling (4 levels), width 64
at every level, no resnet in the encoder's levels and one in each decoder level, the usual resnet-attention-resnet
mid blocks, 16 latent channels. (Why 64: GroupNorm has 32 groups, and at width 32 each group is one channel, so
the last norm erases every channel's mean and the decoder can hardly reproduce flat colours; 64 reconstructed
better than 32 in short trial runs, and a resnet per encoder level cost twice the time for no gain there.) The last layer
of every residual branch starts at zero, so each resnet and attention block starts as the identity.
Each step takes random crops (64, 96 or 128 px, with left-right flips) of the TRAIN images (mini/images.py),
encodes them, decodes a posterior SAMPLE mean + std * noise, and minimises L1 + MSE between image and
reconstruction, plus 10 x the MSE between their 8 x 8 average-pooled versions (the colours; GroupNorm makes them
the slowest part to learn, and this term helped in a 500-step trial: 19.8 vs 19.3 dB held-out), plus a small
KL(posterior || N(0, I)), which keeps the latent bounded and the decoder tolerant of small latent errors. AdamW with a linear warm-up and a cosine decay; every draw comes from one seeded generator.

Afterwards the latent normalisation is set as FLUX did: shift = mean and scale = 1 / std of the posterior means
over fixed training crops, so `encode` returns latents of roughly zero mean and unit variance.
Writes `ae.safetensors` (official key names), the "autoencoder" entry of `miniature.json` and the "autoencoder"
entry of `figures.json` (losses, wall time, held-out reconstruction PSNR).
"""

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import weights
from mini import images
from model.autoencoder import AttnBlock, AutoEncoder, AutoEncoderParams, ResnetBlock

CONFIG = AutoEncoderParams(
    resolution=128, in_channels=3, ch=64, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=0, z_channels=16,
    scale_factor=1.0, shift_factor=0.0,  # set from the latent statistics after training
)
CROPS = ((64, 8), (96, 4), (128, 2))  # (crop side, batch): 33k-37k pixels per step


def update_json(path: Path, **entries) -> None:
    """Merge `entries` into the JSON object in `path` (created if absent), written atomically."""
    spec = json.loads(path.read_text()) if path.is_file() else {}
    spec.update(entries)
    with weights.atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=2) + "\n")


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


def train(ae: AutoEncoder, train_images: list[Tensor], steps: int, lr: float, lowfreq_weight: float,
          kl_weight: float, generator: torch.Generator, log_every: int = 25) -> list[float]:
    """Train `ae` in place; returns the loss of every step."""
    optimizer = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    losses, start = [], time.time()
    for step in range(steps):
        size, batch = CROPS[torch.randint(len(CROPS), (1,), generator=generator).item()]
        pixels = images.random_crops(train_images, batch, size, generator)
        mean, logvar = ae.encoder(pixels * 2 - 1).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator)
        recon = (ae.decoder(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) + 1) / 2
        error = recon - pixels
        colour_error = F.avg_pool2d(recon, 8) - F.avg_pool2d(pixels, 8)
        loss = error.abs().mean() + error.square().mean() + lowfreq_weight * colour_error.square().mean()
        loss = loss + kl_weight * kl_divergence(mean, logvar)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"ae step {step + 1}/{steps}  loss {recent:.4f}  batch psnr {psnr(recon.clamp(0, 1), pixels):.2f} dB  "
                  f"{elapsed / 60:.1f} min, eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min", flush=True)
    return losses


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, train_images: list[Tensor], generator: torch.Generator,
                      count: int = 256, size: int = 128) -> tuple[float, float]:
    """(mean, std) of the unnormalised posterior means of `count` random training crops, over all elements."""
    means = []
    for chunk in images.random_crops(train_images, count, size, generator).split(16):
        means.append(ae.encoder(chunk * 2 - 1).chunk(2, dim=1)[0])
    means = torch.cat(means)
    return means.mean().item(), means.std().item()


@torch.no_grad()
def heldout_psnr(ae: AutoEncoder) -> dict[str, float]:
    """Reconstruction PSNR (dB) through the posterior mean, per held-out 256 px crop."""
    result = {}
    for name, image in images.heldout_crops().items():
        recon = (ae.decode(ae.encode(image[None] * 2 - 1)).float().clamp(-1, 1) + 1) / 2
        result[name] = round(psnr(recon[0], image), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mini"), help="the miniature's folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--lowfreq-weight", type=float, default=10.0, help="weight of the 8x8-pooled MSE (default: %(default)s)")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    torch.manual_seed(args.seed)  # the module initialisers draw from the global generator
    generator = torch.Generator().manual_seed(args.seed)
    ae = AutoEncoder(CONFIG)
    zero_residual_branches(ae)
    train_images = [images.load(name) for name in images.TRAIN]
    losses = train(ae, train_images, args.steps, args.lr, args.lowfreq_weight, args.kl_weight, generator)
    ae.eval()

    shift, std = latent_statistics(ae, train_images, generator)
    ae.params = replace(CONFIG, scale_factor=round(1 / std, 4), shift_factor=round(shift, 4))
    args.out.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(ae.state_dict(), args.out / "ae.safetensors")
    update_json(args.out / "miniature.json", autoencoder=asdict(ae.params))

    reloaded = weights.build(AutoEncoder, ae.params, args.out / "ae.safetensors", dtype=torch.float32)
    scores = heldout_psnr(reloaded)
    minutes = (time.time() - start) / 60
    window = max(1, args.steps // 20)
    update_json(args.out / "figures.json", autoencoder={
        "steps": args.steps, "lr": args.lr, "lowfreq_weight": args.lowfreq_weight, "kl_weight": args.kl_weight,
        "seed": args.seed, "cpu_minutes": round(time.process_time() / 60, 1),
        "params": sum(t.numel() for t in ae.parameters()), "wall_minutes": round(minutes, 1),
        "loss_first_window": round(sum(losses[:window]) / window, 4),
        "loss_last_window": round(sum(losses[-window:]) / window, 4),
        "latent_shift": ae.params.shift_factor, "latent_scale": ae.params.scale_factor,
        "heldout_psnr_db": scores, "heldout_psnr_mean_db": round(sum(scores.values()) / len(scores), 2),
    })
    print(f"held-out reconstruction PSNR {scores}; shift {shift:.4f}, scale {1 / std:.4f}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
