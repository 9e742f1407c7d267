"""Miniature, stage 2b: the prompt-sized restoration network, a baseline trained directly in pixel space.

    python -m mini.restoration_net --threads 1         # one network per degradation (noise, blur, haze, lowlight)

The question it answers: what do ~2k trainable parameters buy when they ARE the restoration model, rather than a
prompt steering a frozen pre-trained one? A deep prompt for the miniature has 16 x 128 + 8 = 2056 parameters;
`RestorationNet` has 2373: a plain residual CNN of four 3 x 3 convolutions (width 10, dilations 1, 2, 4, 1, so a
17 x 17 pixel receptive field) with ReLUs, predicting a correction added to its input, no normalisation.

Training uses the prompt runs' data pipeline: `data.Synthetic(mini/train, D, 128)`, every step a batch of items
and pair seeds drawn from one generator seeded 0 (as train.py does), MSE in pixels (the loss PSNR measures),
AdamW with a cosine learning-rate decay. The weights (with their metadata) go to
mini/prompts/baselines/{degradation}-net.safetensors; the wall times to mini/prompts/baselines/runs.json.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data
import media
import weights
from mini.learn_prompts import record_run

MINI = Path(__file__).resolve().parent
DEGRADATIONS = ("noise", "blur", "haze", "lowlight")
WIDTH, DILATIONS = 10, (1, 2, 4, 1)
# Settings for every degradation: 1500 x 8 = 12000 training pairs, 7.5x what one prompt run sees (400 x 4), so
# the reference point is not starved; about 3 minutes on one thread.
SETTINGS = {"steps": 1500, "batch": 8, "lr": 3e-3, "size": 128}


class RestorationNet(nn.Module):
    """x [B, 3, H, W] in [0, 1] -> x + f(x): four 3 x 3 convolutions (3 -> W -> W -> W -> 3), ReLU between them,
    dilations `DILATIONS` with matching zero padding, so the size is kept. The last convolution starts at zero:
    the untrained network is the identity."""

    def __init__(self, width: int = WIDTH, dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        channels = [3] + [width] * (len(dilations) - 1) + [3]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d)
                                   for c_in, c_out, d in zip(channels[:-1], channels[1:], dilations))
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RestorationNet expects images [B, 3, H, W], got {list(x.shape)}")
        h = x
        for conv in self.convs[:-1]:
            h = F.relu(conv(h))
        return x + self.convs[-1](h)


def load_net(path: str | Path) -> RestorationNet:
    """A trained network from its safetensors file (strict), in eval mode."""
    meta = weights.read_metadata(path)
    net = RestorationNet(int(meta["width"]), tuple(json.loads(meta["dilations"])))
    weights.load_into(net, weights.read_state_dict(path))
    return net.eval()


def train(degradation: str, steps: int, batch: int, lr: float, size: int, seed: int = 0) -> tuple[RestorationNet, list[float]]:
    """Train one network on synthetic pairs of the training photographs; returns it and the per-step losses."""
    torch.manual_seed(seed)
    net = RestorationNet().to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU
    photos = [media.read_image(path) for path in media.list_images(MINI / "train")]  # decoded once, same pairs
    dataset = data.Synthetic(photos, degradation, size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        indices = torch.randint(len(dataset), (batch,), generator=generator).tolist()
        pair_seeds = torch.randint(2**62, (batch,), generator=generator).tolist()
        pairs = [dataset.pair(i, torch.Generator().manual_seed(s)) for i, s in zip(indices, pair_seeds)]
        clean, degraded = torch.stack([c for c, _ in pairs]), torch.stack([d for _, d in pairs])
        degraded = degraded.contiguous(memory_format=torch.channels_last)
        loss = (net(degraded) - clean).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"{degradation} step {step + 1}/{steps}  loss {sum(losses[-250:]) / 250:.5f}", flush=True)
    return net.eval(), losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--degradation", nargs="+", choices=DEGRADATIONS, default=list(DEGRADATIONS))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    p.add_argument("--steps", type=int, default=SETTINGS["steps"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {**SETTINGS, "steps": args.steps}

    folder = MINI / "prompts" / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    for degradation in args.degradation:
        start = time.time()
        net, losses = train(degradation, **settings)
        seconds = time.time() - start
        count = sum(p.numel() for p in net.parameters())
        window = max(1, len(losses) // 10)
        meta = {"model": "RestorationNet", "width": WIDTH, "dilations": list(DILATIONS),
                "parameters": count, "degradation": degradation, "settings": settings,
                "loss_first_tenth": sum(losses[:window]) / window, "loss_last_tenth": sum(losses[-window:]) / window}
        weights.save_safetensors(net.state_dict(), folder / f"{degradation}-net.safetensors", metadata=meta)
        record_run(f"{degradation}-net", {"wall_s": round(seconds, 1), "threads": args.threads, "parameters": count,
                                          **settings})
        print(f"{degradation}: {count} parameters, loss {meta['loss_first_tenth']:.5f} -> "
              f"{meta['loss_last_tenth']:.5f}, {seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
