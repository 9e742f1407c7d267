"""The comparison's reference: a small restorer trained from scratch with the compute of one prompt run.

    python -m mini.restorer --photos ../shared/data/photos --threads 1      # -> mini/prompts/baselines/restorer.safetensors

What a prompt buys is best judged against the plainest supervised alternative: a small convolutional network
trained directly on the same (degraded, clean) pairs, given the same budget. It sees exactly what the all-in-one
prompt sees (the training photos linked by mini.learn_prompts, 128 px crops, `data.Synthetic` over the mixture of
the six degradations, batch 4, the same pair seeds) and trains for as many CPU seconds (one thread) as the
all-in-one prompt run's wall time (read from mini/prompts/baselines/runs.json; that run had a core to itself, so
its wall time is its CPU time; counting CPU time keeps the budget fair on a shared machine), with no frozen prior
at all. It is blind (no name), like the all-in-one prompt.

The network (`Restorer`, 0.47 M parameters): a residual U-Net of two scales, predicting the correction added to
its input, so that it starts as the identity. It is a reference for the table, never shipped as a restorer.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import data
import defaults
import weights
from mini.learn_prompts import ALL, DEGRADATIONS, MINI, PHOTOS, link_photos, run_name

TARGET = MINI / "prompts" / "baselines" / "restorer.safetensors"
SIZE, BATCH, LR, SEED = 128, 4, 1e-3, 0


def _block(channels_in: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU())


class Restorer(nn.Module):
    """[B, 3, H, W] in [0, 1] (H, W multiples of 4) -> restored [B, 3, H, W]: input + a predicted correction."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.enc1, self.enc2 = _block(3, width), _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), _block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), _block(2 * width, width)
        self.out = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)                                             # [B, w, H, W]
        e2 = self.enc2(nn.functional.avg_pool2d(e1, 2))               # [B, 2w, H/2, W/2]
        m = self.mid(nn.functional.avg_pool2d(e2, 2))                 # [B, 4w, H/4, W/4]
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return x + self.out(d1)


def restore(model: Restorer, image: Tensor) -> Tensor:
    """image [3, H, W] in [0, 1] -> [3, H, W]: padded by reflection to a multiple of 4, clamped."""
    height, width = image.shape[-2:]
    padded = nn.functional.pad(image[None], (0, -width % 4, 0, -height % 4), mode="reflect")
    with torch.no_grad():
        return model(padded)[0, :, :height, :width].clamp(0, 1)


def budget_seconds() -> float:
    """The all-in-one prompt run's wall time (the table's budget for one prompt)."""
    runs = json.loads((MINI / "prompts" / "baselines" / "runs.json").read_text())
    return runs[run_name(ALL, "deep")]["wall_s"]


def train(seconds: float, log_every: int = 50) -> tuple[Restorer, dict]:
    """Train on the mixture of the six degradations for `seconds` of this process's CPU time; returns (model,
    record)."""
    torch.manual_seed(SEED)
    model = Restorer()
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    pairs = data.Synthetic(PHOTOS, list(DEGRADATIONS), SIZE)
    order = torch.Generator().manual_seed(SEED)
    start, cpu, step, recent = time.time(), time.process_time(), 0, []
    while time.process_time() - cpu < seconds:
        batch = [pairs.pair(int(torch.randint(len(pairs), (), generator=order)),
                            torch.Generator().manual_seed(defaults.mix_seed(SEED, step * BATCH + b))) for b in range(BATCH)]
        clean, degraded = (torch.stack(t) for t in zip(*batch))
        loss = (model(degraded) - clean).abs().mean()  # L1: the usual restoration loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step, recent = step + 1, [*recent[-log_every + 1:], loss.item()]
        if step % log_every == 0:
            print(f"step {step}  L1 {sum(recent) / len(recent):.4f}  CPU {time.process_time() - cpu:.0f}/{seconds:.0f} s",
                  flush=True)
    record = {"steps": step, "cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.time() - start, 1),
              "batch": BATCH, "lr": LR, "size": SIZE,
              "parameters": sum(p.numel() for p in model.parameters())}
    return model, record


def load(path: Path = TARGET) -> Restorer:
    model = Restorer()
    weights.check_keys(model, state := weights.read_state_dict(path))
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of training photographs (searched recursively)")
    p.add_argument("--seconds", type=float, help="training CPU seconds (default: the all-in-one prompt run's wall time)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    link_photos(args.photos)
    model, record = train(args.seconds or budget_seconds())
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(model.state_dict(), TARGET, {"recipe": "mini.restorer", **record})
    print(json.dumps(record))


if __name__ == "__main__":
    main()
