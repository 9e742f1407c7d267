"""Where the image miniature's block texture comes from: measured on validation crops of the TRAINING photos.

    python -m mini.texture --photos ../shared/data/photos --threads 1 --out mini/texture.json

The restored hazy, dark and snowy crops carry a texture on the 8-pixel token grid (4x autoencoder x 2x2 patches).
Each suspect is measured on its own, with `metrics.block_texture` (0: no more steps across the grid lines than
the clean crop has) and PSNR / SSIM against the clean crop:

    roundtrip   the clean crop's autoencoder round trip: the decoder on a perfect latent
    restored    the shipped prompt of the degradation at its trained T0, 20 steps (sample.py's default)
    oracle_err  the decoder on clean latent + (restored latent - clean latent): the same error, decoded alone
    white_err   the decoder on clean latent + white noise of the same per-channel RMS: an error with no token
                structure (is the decoder itself blocky under any error of that size?)
    token_err   the restored latent error's token structure: mean |step| across 2-latent-pixel token borders over
                the mean |step| inside a token (1: none), against the clean latent's own ratio
    hf_energy   the share of the latent error's energy above half the latent Nyquist frequency, and the same share
                of the clean latent itself (residual noise left by the sampler)
    shift_cycle candidate: the token grid moved by one latent pixel from step to step (4 offsets in turn)
    shift_avg4  candidate: the velocity averaged over the 4 grid offsets at every step (4x the model calls)
    steps / T0  the restored figures at 8, 20 and 50 steps and at T0 0.2, 0.4 (trained) and 0.6

Validation crops: four random 256 px crops of the training photos (seed 777, as mini/learn_prompts.py's T0 choice),
each degraded by the training family (`data.DEGRADATIONS`, seeds 7000 + crop). Never the evaluation sets.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import backbone
import bridge
import data
import defaults
import metrics
import restore
from mini import images

VALIDATION_SEED = 777
DEGRADATION_SEED = 7000
CASES = ("haze", "lowlight", "snow", "rain", "noise", "blur")


def validation_crops(photos: Path, count: int) -> list[Tensor]:
    """`count` random 256 px crops [3, 256, 256] of the training photos (seed 777)."""
    pool = images.load_photos(photos, min_side=256)
    return list(images.random_crops(pool, count, 256, torch.Generator().manual_seed(VALIDATION_SEED)))


def token_step_ratio(latent: Tensor, patch: int = 2) -> float:
    """latent [C, h, w]: mean |step| between neighbours across `patch`-pixel token borders over the mean inside."""
    across, inside = [], []
    for steps in ((latent[..., 1:] - latent[..., :-1]).abs(), (latent[..., 1:, :] - latent[..., :-1, :]).abs()
                  .transpose(-1, -2)):
        border = (torch.arange(1, steps.shape[-1] + 1) % patch) == 0
        across.append(steps[..., border].flatten())
        inside.append(steps[..., ~border].flatten())
    return (torch.cat(across).mean() / torch.cat(inside).mean()).item()


def high_frequency_share(latent: Tensor) -> float:
    """latent [C, h, w]: the share of its (mean-removed) energy at spatial frequencies above half the Nyquist."""
    spectrum = torch.fft.fft2(latent - latent.mean(dim=(-2, -1), keepdim=True)).abs().square()
    fy = torch.fft.fftfreq(latent.shape[-2]).abs()[:, None]
    fx = torch.fft.fftfreq(latent.shape[-1]).abs()[None, :]
    high = torch.maximum(fy, fx) > 0.25
    return (spectrum[..., high].sum() / spectrum.sum()).item()


def scores(pred: Tensor, clean: Tensor) -> dict:
    return {"psnr": metrics.psnr(pred, clean), "ssim": metrics.ssim(pred, clean),
            "block": metrics.block_texture(pred, clean), "block4": metrics.block_texture(pred, clean, grid=4)}


SHIFTS = ((0, 0), (1, 1), (0, 1), (1, 0))  # latent-pixel offsets of the token grid (tokens are 2 x 2 latent pixels)


def shifted(velocity, dy: int, dx: int):
    """The velocity with the token grid moved by (dy, dx) latent pixels: reflect-pad, run, crop back."""
    if not (dy or dx):
        return velocity

    def run(x: Tensor, t: Tensor) -> Tensor:
        padded = F.pad(x, (dx, 2 - dx if dx else 0, dy, 2 - dy if dy else 0), mode="reflect")
        return velocity(padded, t)[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]

    return run


def shift_cycle(velocity):
    """Candidate: step i runs with the grid at SHIFTS[i % 4] (one model call a step, as before)."""
    calls = [shifted(velocity, *s) for s in SHIFTS]
    count = [0]

    def run(x: Tensor, t: Tensor) -> Tensor:
        count[0] += 1
        return calls[(count[0] - 1) % len(calls)](x, t)

    return run


def shift_average(velocity):
    """Candidate: every step averages the velocity over the four grid offsets (four model calls a step)."""
    calls = [shifted(velocity, *s) for s in SHIFTS]
    return lambda x, t: sum(call(x, t) for call in calls) / len(calls)


def pixels(bb: backbone.Backbone, latent: Tensor) -> Tensor:
    """The decoder as restore_image runs it on a 256 px crop (in the backbone's tiles)."""
    return ((bb.decode(latent[None], tile=restore.tile_for(bb, restore.RestoreOptions()))[0] + 1) / 2).clamp(0, 1)


def latent(bb: backbone.Backbone, image: Tensor) -> Tensor:
    return bb.encode(image[None] * 2 - 1, tile=restore.tile_for(bb, restore.RestoreOptions()))[0]


def measure_case(bb: backbone.Backbone, name: str, crops: list[Tensor], steps_list=(8, 20, 50),
                 t0_offsets=(-0.2, 0.0, 0.2)) -> dict:
    files = restore.prompt_files([name], bb.spec, bb.folder)
    (prompt, meta), = restore.load_prompts(files, bb)
    latent_tile = restore.tile_for(bb, restore.RestoreOptions()) // bb.vae.downscale  # as restore_image tiles
    velocity = restore.tiled_velocity(restore.velocity_for(bb, [prompt]), latent_tile, defaults.tile_overlap(latent_tile))
    trained = restore.trained_t0([meta])
    rows = {key: [] for key in ("input", "roundtrip", "restored", "oracle_err", "white_err")}
    latent_rows = []
    sweeps: dict[str, list] = {}
    for i, clean in enumerate(crops):
        degraded = data.degrade(clean, name, torch.Generator().manual_seed(DEGRADATION_SEED + i)).mul(255).round() \
            .div(255)
        x0 = latent(bb, clean)
        y = latent(bb, degraded)
        eps = torch.randn(y[None].shape, generator=torch.Generator().manual_seed(0))
        restored = bridge_sample(velocity, y, eps, trained, 20)
        error = restored - x0
        rms = error.square().mean(dim=(-2, -1), keepdim=True).sqrt()
        white = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)) * rms
        rows["input"].append(scores(degraded, clean))
        rows["roundtrip"].append(scores(pixels(bb, x0), clean))
        rows["restored"].append(scores(pixels(bb, restored), clean))
        rows["oracle_err"].append(scores(pixels(bb, x0 + error), clean))
        rows["white_err"].append(scores(pixels(bb, x0 + white), clean))
        latent_rows.append({"token_err": token_step_ratio(error), "token_clean": token_step_ratio(x0),
                            "token_restored": token_step_ratio(restored),
                            "hf_err": high_frequency_share(error), "hf_clean": high_frequency_share(x0),
                            "err_rms": error.square().mean().sqrt().item(), "clean_rms": x0.square().mean().sqrt().item()})
        for label, candidate in (("shift_cycle", shift_cycle), ("shift_avg4", shift_average)):
            sweeps.setdefault(label, []).append(
                scores(pixels(bb, bridge_sample(candidate(velocity), y, eps, trained, 20)), clean))
        for steps in steps_list:
            if steps != 20:
                sweeps.setdefault(f"steps{steps}", []).append(
                    scores(pixels(bb, bridge_sample(velocity, y, eps, trained, steps)), clean))
        for offset in t0_offsets:
            t0 = round(trained + offset, 4)
            if offset and 0 < t0 <= 1:
                sweeps.setdefault(f"t0_{t0}", []).append(
                    scores(pixels(bb, bridge_sample(velocity, y, eps, t0, 20)), clean))
        print(f"  {name} crop {i}: restored {rows['restored'][-1]}", flush=True)
    mean = lambda rs: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}  # noqa: E731
    return {"t0": trained, **{k: mean(v) for k, v in rows.items()}, "latent": mean(latent_rows),
            **{k: mean(v) for k, v in sweeps.items()}}


def bridge_sample(velocity, y: Tensor, eps: Tensor, t0: float, steps: int) -> Tensor:
    return bridge.sample(velocity, y[None], eps, t0, steps=steps)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="the training photos (shared/data/photos)")
    p.add_argument("--count", type=int, default=4, help="validation crops (default: %(default)s)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = backbone.load("mini-flux")
    crops = validation_crops(args.photos, args.count)
    results = {}
    for name in args.cases:
        results[name] = measure_case(bb, name, crops)
        args.out.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name]), flush=True)


if __name__ == "__main__":
    main()
