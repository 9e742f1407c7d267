"""Miniature, stage 3: the figures in mini/README.md, measured on the shipped files through `backbone.load_miniature`.

    python -m mini.evaluate --out mini

All on the held-out 256 px crops (mini/heldout/), never seen in training; every random draw is seeded.
1. Autoencoder: reconstruction PSNR (posterior mean) per image.
2. Denoising: latents noised to t in {0.1, 0.2, 0.4}; mean squared error (latent space) of the model's clean
   estimate x0_hat = x_t - t v(x_t, t), of the noised input x_t itself, and of the best per-element linear
   estimate a * x_t (a = (1 - t) s / ((1 - t)^2 s + t^2), s = the mean square of x0), which knows no image
   structure: beating it means the model uses what it learned about images.
3. The bridge WITHOUT a prompt (the empty-prompt baseline of later stages): each image degraded by
   `data.DEGRADATIONS["noise"]` and `["blur"]`, encoded, restored by `bridge.sample` (T0 = 0.4, 20 steps),
   decoded; PSNR against the clean image, beside the PSNR of the degraded input and of its autoencoder round trip.
4. Samples: 8 images generated from pure noise at 128 px by Euler steps of the velocity from t = 1 to t = 0,
   saved as the grid `samples.png`.
Writes the "evaluation" entry of `figures.json`.
"""

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

import backbone
import bridge
import data
import defaults
import media
from mini import images
from mini.pretrain_ae import psnr, update_json

DEGRADATIONS = ("noise", "blur")
NOISE_LEVELS = (0.1, 0.2, 0.4)


def to_latent(bb: backbone.Backbone, pixels: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> latent."""
    return bb.encode(pixels * 2 - 1)


def to_pixels(bb: backbone.Backbone, latent: Tensor) -> Tensor:
    """latent -> [B, 3, H, W] in [0, 1]."""
    return (bb.decode(latent) + 1) / 2


@torch.no_grad()
def denoising(bb: backbone.Backbone, clean: Tensor, seed: int) -> dict[str, dict[str, float]]:
    """Latent MSE of x0_hat, x_t and the linear estimate against x0 per noise level, over `clean` [B, 3, H, W]."""
    x0 = to_latent(bb, clean)
    power = x0.square().mean()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    result = {}
    for level in NOISE_LEVELS:
        t = torch.full((x0.shape[0],), level)
        x_t = (1 - level) * x0 + level * eps
        x0_hat = bridge.predict_x0(x_t, t, bb.velocity(x_t, t))
        linear = (1 - level) * power / ((1 - level) ** 2 * power + level**2) * x_t
        result[f"t={level}"] = {name: round((estimate - x0).square().mean().item(), 4) for name, estimate in
                                (("mse_x0_hat", x0_hat), ("mse_x_t", x_t), ("mse_linear", linear))}
    return result


@torch.no_grad()
def restore_without_prompt(bb: backbone.Backbone, clean: Tensor, degradation: str, seed: int) -> dict[str, float]:
    """Mean PSNRs (dB) over the batch: degraded input, its autoencoder round trip, and the no-prompt bridge."""
    generator = torch.Generator().manual_seed(seed)
    degraded = torch.stack([data.DEGRADATIONS[degradation](image, generator) for image in clean])
    y = to_latent(bb, degraded)
    eps = torch.randn(y.shape, generator=generator)
    restored = to_pixels(bb, bridge.sample(lambda x, t: bb.velocity(x, t), y, eps, defaults.T0, steps=defaults.STEPS))

    def mean_psnr(images_: Tensor) -> float:
        return round(sum(psnr(a, b) for a, b in zip(images_, clean)) / len(clean), 2)

    return {"degraded": mean_psnr(degraded), "degraded_ae_round_trip": mean_psnr(to_pixels(bb, y)),
            "bridge_no_prompt": mean_psnr(restored)}


@torch.no_grad()
def generate(bb: backbone.Backbone, count: int, size: int, steps: int, seed: int) -> Tensor:
    """`count` images [count, 3, size, size] in [0, 1] from pure noise: Euler steps x += (t_next - t) v, t 1 -> 0."""
    x = torch.randn(count, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    times = torch.linspace(1, 0, steps + 1).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * bb.velocity(x, torch.full((count,), t))
    return to_pixels(bb, x)


def grid(batch: Tensor, columns: int) -> Tensor:
    """[N, 3, H, W] -> one image [3, rows * H, columns * W], row by row."""
    rows = batch.shape[0] // columns
    return batch[: rows * columns].unflatten(0, (rows, columns)).permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mini"), help="the miniature's folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    bb = backbone.load_miniature(args.out)
    heldout = images.heldout_crops()
    clean = torch.stack(list(heldout.values()))
    reconstructions = to_pixels(bb, to_latent(bb, clean))
    results = {
        "ae_psnr_db": {name: round(psnr(r, c), 2) for name, r, c in zip(heldout, reconstructions, clean)},
        "denoising_latent_mse": denoising(bb, clean, args.seed),
        "bridge_psnr_db": {d: restore_without_prompt(bb, clean, d, args.seed) for d in DEGRADATIONS},
    }
    media.write_image(args.out / "samples.png", grid(generate(bb, 8, 128, 30, args.seed), columns=4))
    results["wall_minutes"] = round((time.time() - start) / 60, 1)
    results["cpu_minutes"] = round(time.process_time() / 60, 1)
    update_json(args.out / "figures.json", evaluation=results)
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
