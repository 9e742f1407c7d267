"""Restoration-time costs: seconds per bridge step (ours vs diffusers' DiT) and VAE encode + decode.

    python bench/sampler.py                       # CPU config, ~5 min on 2 cores
    python bench/sampler.py --threads 1 --repeats 9 --steps 4

Bridge step: `bridge.sample(velocity, y, eps, steps=N)` with the model's velocity under a deep prompt (non-zero
gates), divided by N; the DiTs are the CPU configs of bench/common.py (FLUX: 1024 image + 128 text tokens; Wan:
4 latent frames of 32x32 = 1024 tokens, 128 context tokens), ours and diffusers' with the same weights and the
same prompt (bench/reference.py). VAE: full-size architectures with random weights, float32:
FLUX AE (ch 128, ch_mult 1,2,4,4) on one 256x256 image, Wan2.1 VAE (base dim 96) on one 33-frame 64x64 clip;
one encode followed by one decode. All variants alternate (A B C ... A B C ...) after warm-up; medians.
JSON: bench/results/sampler.json.
"""

import argparse
import sys

import common  # puts the repository root on sys.path
import torch

import bridge
from common import table
from model.autoencoder import CONFIGS as AE_CONFIGS
from model.autoencoder import AutoEncoder
from model.wan_vae import CONFIGS as WAN_VAE_CONFIGS
from model.wan_vae import WanVAE


def bridge_variants(kind: str, steps: int, device: str, dtype: torch.dtype, with_diffusers: bool) -> dict:
    config = common.CPU_FLUX if kind == "flux" else common.CPU_WAN
    bb = common.make_backbone(kind, config, common.CPU_TEXT_LEN, device, dtype)
    prompt = common.new_deep_prompt(bb, common.CPU_TEXT_LEN)
    _, y, eps, _ = common.step_inputs(kind, device=device)
    velocities = {f"{kind} ours": lambda x, t: bb.velocity(x, t, prompt)}
    if with_diffusers:
        import reference

        velocities[f"{kind} diffusers"] = reference.reference_velocity(bb, prompt)[1]
    first = None
    for name, velocity in velocities.items():  # the two sides restore the same latent
        out = bridge.sample(velocity, y, eps, steps=2)
        if first is None:
            first = out
        else:
            print(f"  check {name}: max-abs vs ours {(out - first).abs().max().item():.2e} "
                  f"(output max {first.abs().max().item():.2e})", flush=True)
    return {name: (lambda v=v: bridge.sample(v, y, eps, steps=steps)) for name, v in velocities.items()}


@torch.no_grad()
def vae_variants(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ae = common.random_weights_(AutoEncoder(AE_CONFIGS["flux"])).to(device).eval().requires_grad_(False)
    image = (torch.rand(1, 3, 256, 256, generator=g) * 2 - 1).to(device)
    wan_vae = common.random_weights_(WanVAE(WAN_VAE_CONFIGS["wan2.1"])).to(device).eval().requires_grad_(False)
    clip = (torch.rand(1, 3, 33, 64, 64, generator=g) * 2 - 1).to(device)

    @torch.no_grad()
    def flux_ae():
        return ae.decode(ae.encode(image))

    @torch.no_grad()
    def wan():
        return wan_vae.decode(wan_vae.encode(clip))

    return {"FLUX AE 256x256": flux_ae, "Wan VAE 33x64x64": wan}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["flux", "wan", "both"], default="both")
    p.add_argument("--steps", type=int, default=4, help="bridge steps per timed sample (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all visible cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="DiT dtype (VAEs: float32)")
    p.add_argument("--no-diffusers", action="store_true", help="time our DiT only")
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--json", help="output path (default: bench/results/sampler.json)")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kinds = ["flux", "wan"] if args.backbone == "both" else [args.backbone]
    print(f"sampler, {args.device} {args.dtype}, {threads} threads, {args.steps} bridge steps per sample", flush=True)

    variants, per_call = {}, {}
    for kind in kinds:
        for name, fn in bridge_variants(kind, args.steps, args.device, dtype, not args.no_diffusers).items():
            variants[name], per_call[name] = fn, args.steps
    if not args.no_vae:
        for name, fn in vae_variants(args.device).items():
            variants[name], per_call[name] = fn, 1
    times = common.alternate(variants, args.repeats, args.warmup, args.device, log=lambda s: print(s, flush=True))

    rows, record = [], {}
    for name, seconds in times.items():
        s = common.summary(seconds)
        unit = s["median_s"] / per_call[name]
        base = name.replace("ours", "diffusers")
        ratio = common.paired_ratio(seconds, times[base]) if "ours" in name and base in times else None
        record[name] = {**s, "calls_per_sample": per_call[name], "seconds_per_call": unit, "ratio_vs_diffusers": ratio}
        what = "s / bridge step" if per_call[name] > 1 else "s / encode+decode"
        rows.append([name, f"{unit:.3f}", what, f"{ratio:.3f}" if ratio else "-",
                     f"{s['min_s'] / per_call[name]:.3f}-{s['max_s'] / per_call[name]:.3f}"])
    print()
    print(table(["what", "median s", "per", "ours / diffusers", "range s"], rows))
    out = {"benchmark": "sampler", "device": args.device, "dtype": args.dtype, "threads": threads,
           "steps": args.steps, "repeats": args.repeats, "variants": record, "machine": common.machine(args.device),
           "command": " ".join(["python", "bench/sampler.py", *(argv if argv is not None else sys.argv[1:])])}
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    print(f"\nwrote {common.write_json(f'sampler{suffix}', out, args.json)}")


if __name__ == "__main__":
    main()
