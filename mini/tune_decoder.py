"""Image miniature, a candidate against the block texture: the decoder fine-tuned on the transformer's own outputs.

    python -m mini.tune_decoder pairs --photos ../shared/data/photos --threads 1      # A: restorations to learn from
    python -m mini.tune_decoder train --threads 1                                     # B: the decoder only
    python -m mini.tune_decoder judge --photos ../shared/data/photos --threads 1      # C: the rule, on validation

Why (mini/texture.py, validation crops of the training photos): the texture is in the LATENT the sampler returns
(steps across the 2 x 2-latent-pixel token borders 19-29% above those inside a token; the clean latent: 0.99),
and the shipped decoder passes it on; given white latent error of the same size it makes none. A decoder that has
seen the transformer's errors can learn to not draw them. Only the decoder changes: the encoder is frozen, so every
latent, every learned prompt and the estimator stay valid.

A (resumable, appends to mini/runs/decoder/pairs.pt): batches of 8 random 128 px crops of the training photos
  (seed 4242, never the validation crops' 777), each batch one of the six training degradations (data.DEGRADATIONS,
  a fresh seed per crop) or none; a degraded batch is restored by that degradation's shipped prompt at its trained
  T0 with sample.py's sampler (20 steps, the starting noise seeded per batch) and its final x0 estimate kept; a clean
  batch keeps its posterior mean plus white noise of a random size (RMS 0 to 0.7, the measured restoration errors'
  range). Stored: the latents (float16) and the clean crops (uint8).
B: the decoder alone, from the shipped weights, on (latent -> clean crop) in random 64 px windows: L1 + MSE, AdamW
  (mini/pretrain_ae.py's loop and checkpoint), batch 8; every --clean-every-th batch the clean crops' own posterior
  means, so that the round trip is kept. Writes --candidate (the shipped encoder, the tuned decoder).
C: the rule, fixed before the result (mini/README.md): on the four validation crops x six degradations of
  mini/texture.py, the default restoration decoded by the shipped and by the tuned decoder (the same latents):
  adopt iff mean SSIM over the six rises, mean block texture falls, no degradation's PSNR falls by more than 0.2 dB,
  and the clean validation crops' round trip loses at most 0.5 dB.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

import backbone
import bridge
import data
import defaults
import metrics
import restore
import weights
from mini import images, pretrain_ae, texture
from mini.learn_prompts import DEGRADATIONS, MINI

RUNS = MINI / "runs" / "decoder"
PAIRS = RUNS / "pairs.pt"
SIZE, BATCH = 128, 8
WINDOW = 64  # training windows of the pairs (pixels): a quarter of a pair's compute; the decoder is convolutional
PAIR_SEED = 4242
NOISE_RMS = 0.7  # largest white-noise RMS added to clean latents (restoration errors measured 0.29-0.69)


def velocities(bb: backbone.Backbone) -> dict[str, tuple]:
    """degradation -> (velocity of its shipped prompt, the prompt's trained T0)."""
    out = {}
    for name in DEGRADATIONS:
        (prompt, meta), = restore.load_prompts(restore.prompt_files([name], bb.spec, bb.folder), bb)
        out[name] = restore.velocity_for(bb, [prompt]), restore.trained_t0([meta])
    return out


@torch.no_grad()
def make_pairs(photos: Path, count: int) -> None:
    bb = backbone.load("mini-flux")
    prompts = velocities(bb)
    pool = images.load_photos(photos, min_side=SIZE)
    stored = torch.load(PAIRS, weights_only=True) if PAIRS.is_file() else {"latents": [], "clean": [], "kinds": []}
    generator = torch.Generator().manual_seed(PAIR_SEED)
    kinds = ("clean",) + DEGRADATIONS
    start = time.time()
    for index in range(count // BATCH):
        crops = images.random_crops(pool, BATCH, SIZE, generator, scales=(1.0, 2.0))
        kind = kinds[torch.randint(len(kinds), (1,), generator=generator).item()]
        rms = torch.rand(BATCH, 1, 1, 1, generator=generator) * NOISE_RMS
        if index < len(stored["kinds"]):  # made by an earlier run: the draws above keep the sequence the same
            continue
        x0 = bb.encode(crops * 2 - 1)
        if kind == "clean":
            latent = x0 + rms * torch.randn(x0.shape, generator=torch.Generator().manual_seed(PAIR_SEED + index))
        else:
            degraded = torch.stack([data.degrade(c, kind, torch.Generator().manual_seed(defaults.mix_seed(PAIR_SEED,
                                    index * BATCH + i))) for i, c in enumerate(crops)]).mul(255).round().div(255)
            velocity, t0 = prompts[kind]
            y = bb.encode(degraded * 2 - 1)
            eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(PAIR_SEED + index))
            latent = bridge.sample(velocity, y, eps, t0)
        stored["latents"].append(latent.half())
        stored["clean"].append(crops.mul(255).round().to(torch.uint8))
        stored["kinds"].append(kind)
        if (index + 1) % 5 == 0 or index + 1 == count // BATCH:
            RUNS.mkdir(parents=True, exist_ok=True)
            with weights.atomic_file(PAIRS) as tmp:
                torch.save(stored, tmp)
            done = len(stored["kinds"])
            print(f"pairs: {done * BATCH}/{count} ({(time.time() - start) / 60:.1f} min)", flush=True)


def train(steps: int, lr: float, seed: int, clean_every: int, target: Path) -> None:
    stored = torch.load(PAIRS, weights_only=True)
    latents = torch.cat(stored["latents"]).float()
    clean = torch.cat(stored["clean"]).float().div(255)
    kinds = stored["kinds"]
    print(f"{len(clean)} pairs (" + ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))) + ")", flush=True)
    bb = backbone.load("mini-flux")
    ae = bb.vae
    ae.requires_grad_(False)
    ae.decoder.requires_grad_(True)
    with torch.no_grad():  # the clean crops' own posterior means, for the round-trip batches
        means = torch.cat([ae.encode(clean[i:i + 64] * 2 - 1) for i in range(0, len(clean), 64)])
    generator = torch.Generator().manual_seed(seed)
    batch_latents: dict[str, Tensor] = {}
    draws = [0]

    factor = ae.downscale

    def draw(size: int, batch: int) -> Tensor:  # a random size x size window of each pair (its latent's window)
        picks = torch.randint(len(clean), (batch,), generator=generator)
        top, left = (torch.randint((SIZE - size) // factor + 1, (1,), generator=generator).item() for _ in range(2))
        source = means if draws[0] % clean_every == clean_every - 1 else latents
        draws[0] += 1
        window = source[picks][..., top:top + size // factor, left:left + size // factor]
        batch_latents["z"] = window / ae.params.scale_factor + ae.params.shift_factor
        return clean[picks][..., top * factor:top * factor + size, left * factor:left * factor + size]

    def loss_fn(decoder: torch.nn.Module, target: Tensor) -> tuple[Tensor, Tensor]:
        recon = (decoder(batch_latents["z"]) + 1) / 2
        error = recon - target
        return error.abs().mean() + error.square().mean(), recon

    settings = {"steps": steps, "lr": lr, "seed": seed, "pairs": len(clean), "clean_every": clean_every}
    checkpoint = pretrain_ae.Checkpoint(target.with_suffix(".pt"), settings)
    pretrain_ae.train(ae.decoder, draw, loss_fn, steps, lr, generator, checkpoint, save_every=100,
                      crops=((WINDOW, BATCH),), label="decoder")
    weights.save_safetensors(ae.state_dict(), target)
    print(f"wrote {target}", flush=True)


@torch.no_grad()
def judge(photos: Path, candidate: Path, out: Path) -> dict:
    bb = backbone.load("mini-flux")
    shipped = {k: v.clone() for k, v in bb.vae.state_dict().items()}
    tuned = weights.read_state_dict(candidate)
    crops = texture.validation_crops(photos, 4)
    tile = restore.tile_for(bb, restore.RestoreOptions())
    latent_tile = tile // bb.vae.downscale
    results = {}

    def decoded(state: dict, latent: Tensor) -> Tensor:
        bb.vae.load_state_dict(state)
        return texture.pixels(bb, latent)

    options = restore.RestoreOptions()
    for name, (velocity, t0) in velocities(bb).items():
        rows = {"input": [], "shipped": [], "tuned": []}
        for i, clean in enumerate(crops):
            degraded = data.degrade(clean, name, torch.Generator().manual_seed(texture.DEGRADATION_SEED + i)) \
                .mul(255).round().div(255)
            bb.vae.load_state_dict(shipped)
            y = texture.latent(bb, degraded)
            eps = torch.randn(y[None].shape, generator=torch.Generator().manual_seed(0))
            default = restore.sampler_velocity(bb, velocity, options, latent_tile)  # sample.py's, grid shift included
            x0 = texture.bridge_sample(default, y, eps, t0, defaults.STEPS)
            rows["input"].append(texture.scores(degraded, clean))
            rows["shipped"].append(texture.scores(decoded(shipped, x0), clean))
            rows["tuned"].append(texture.scores(decoded(tuned, x0), clean))
        results[name] = {k: {m: sum(r[m] for r in v) / len(v) for m in v[0]} for k, v in rows.items()}
        print(name, json.dumps(results[name]), flush=True)
    bb.vae.load_state_dict(shipped)
    latents = [texture.latent(bb, clean) for clean in crops]
    results["roundtrip"] = {label: sum(metrics.psnr(decoded(state, z), c) for z, c in zip(latents, crops)) / len(crops)
                            for label, state in (("shipped", shipped), ("tuned", tuned))}
    mean = lambda key, label: sum(results[d][label][key] for d in DEGRADATIONS) / len(DEGRADATIONS)  # noqa: E731
    verdict = {
        "ssim_rises": mean("ssim", "tuned") > mean("ssim", "shipped"),
        "block_falls": mean("block", "tuned") < mean("block", "shipped"),
        "psnr_within_0.2_db": all(results[d]["tuned"]["psnr"] >= results[d]["shipped"]["psnr"] - 0.2
                                  for d in DEGRADATIONS),
        "round_trip_within_0.5_db": results["roundtrip"]["tuned"] >= results["roundtrip"]["shipped"] - 0.5,
    }
    results["rule"] = verdict | {"adopt": all(verdict.values())}
    with weights.atomic_file(out) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1))
    print(json.dumps(results["rule"]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["pairs", "train", "judge"])
    p.add_argument("--photos", type=Path, help="the training photos (shared/data/photos): pairs, judge")
    p.add_argument("--count", type=int, default=640, help="pairs to make (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600, help="decoder training steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-every", type=int, default=4, help="train: every N-th batch is the clean crops' own "
                   "posterior means, for the round trip (default: %(default)s)")
    p.add_argument("--candidate", type=Path, default=RUNS / "ae.safetensors", help="train: where the tuned "
                   "autoencoder goes (its checkpoint beside it, .pt); judge: the one judged")
    p.add_argument("--out", type=Path, default=RUNS / "judge.json", help="judge: where the figures go")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage in ("pairs", "judge") and args.photos is None:
        p.error(f"{args.stage} needs --photos")
    if args.stage == "pairs":
        make_pairs(args.photos, args.count)
    elif args.stage == "train":
        train(args.steps, args.lr, args.seed, args.clean_every, args.candidate)
    else:
        judge(args.photos, args.candidate, args.out)


if __name__ == "__main__":
    main()
