"""Learn a restoration prompt for a frozen FLUX.1 or Wan2.1 on the degraded-to-clean bridge (training.py).

    python train.py --backbone flux --weights FLUX.1-dev/ --data pairs/ --degradation haze --out runs/flux-haze
    torchrun --nproc_per_node 8 train.py --backbone wan --weights Wan2.1-T2V-1.3B/ --data clips/ ...
    python train.py --backbone mini-flux --data photos/ --synthetic --degradation haze --out runs/mini-haze
    python train.py --preset tiny --backbone flux --steps 60 --out runs/tiny      # CPU, seconds

The backbone is a kind (flux, wan) with --weights DIR (an official snapshot or a miniature folder) or --preset
tiny, or a name of backbone.BACKBONES (mini-flux, tiny-wan, ...). Under torchrun every rank takes its slice of
the same global batch, so N processes compute the same update as one process with the whole batch.

Outputs in --out: `prompt.safetensors` (the learned prompt, with its metadata), `checkpoint.safetensors`
(prompt + optimiser + step + generator state, for --resume) and `log.jsonl` (one line per step).
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

import backbone as backbones
import data
import defaults
import media
import prompts
import runtime
import training
import weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=[*backbones.KINDS, *backbones.BACKBONES], required=True, metavar="NAME",
                   help=f"flux (images) or wan (video) with --weights or --preset; or a backbone by name: "
                   f"{', '.join(backbones.BACKBONES)}")
    g.add_argument("--weights", type=Path, help="snapshot folder of the official release (FLUX.1-dev/-schnell, "
                   "Wan2.1-T2V) or a miniature folder (mini/, mini/wan/)")
    g.add_argument("--preset", choices=["tiny"], help="tiny random backbone and synthetic data: runs on a CPU in seconds")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], help="DiT dtype (default: bfloat16 on GPU, float32 on CPU); the VAE stays float32")
    g.add_argument("--threads", type=int, help="CPU threads (default: the CPUs not kept busy by other work, from "
                   "the load average: oversubscribed threads made a restoration 1.6-10x slower)")
    g.add_argument("--checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile the loss (forward and backward)")
    g.add_argument("--text-cache", type=Path, default=runtime.TEXT_CACHE,
                   help="where the empty-prompt text-encoder outputs are cached (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="a folder with degraded/ and clean/, a JSON manifest, or (with "
                   "--synthetic) a folder of clean images (searched with its sub-folders) or videos")
    g.add_argument("--synthetic", action="store_true", help="degrade clean --data on the fly with --degradation")
    g.add_argument("--degradation", nargs="+", default=["unnamed"], help=f"the degradation this prompt is for; with "
                   f"--synthetic one or several (a mixture, one drawn per pair) of {sorted(data.DEGRADATIONS)}, "
                   "or several joined by + (haze+lowlight: both on every pair) (default: unnamed)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="training crop (default: the backbone's, "
                   "e.g. 1024 1024 FLUX, 480 832 Wan)")
    g.add_argument("--frames", type=int, help=f"frames per training clip, 4k+1 (Wan; default {defaults.TRAIN_FRAMES})")
    g.add_argument("--latent-cache", type=Path, help="encode each training pair once and keep its latents here "
                   "(fixes each pair's crop and degradation; without it they are redrawn every time)")
    g = p.add_argument_group("method")
    g.add_argument("--site", choices=prompts.SITES, default="deep", help="deep: the authors' prompt bank in every "
                   "block; text: offsets on the text encoders' output (the abstract's form); token: the baseline "
                   "learning input-embedding vectors through the frozen text encoders (default: %(default)s)")
    g.add_argument("--prompt-len", type=int, help="prompt tokens K (default: the backbone's, e.g. 512 FLUX, 226 Wan)")
    g.add_argument("--path", choices=["bridge", "naive"], default="bridge", help="training path (default: %(default)s)")
    g.add_argument("--t0", type=float, help=f"bridge end time T0 (default: the backbone's, {defaults.T0} but for "
                   "mini-wan's 0.2: backbone.BACKBONES)")
    g.add_argument("--t-min", type=float, default=defaults.T_MIN, help="smallest training time (default: %(default)s)")
    g.add_argument("--t-power", type=float, default=1.0, help="t = t_min + (T0 - t_min) u^power (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: %(default)s)")
    g.add_argument("--batch", type=int, default=4, help="GLOBAL batch, split over ranks (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds the prompt init and every random draw (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=10, help="progress line every N steps (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors (a changed "
                   "--lr/--weight-decay is applied from there on; a changed set-up is refused)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run (its "
                   "checkpoint, prompt and log are replaced)")
    args = p.parse_args(argv)

    named = args.backbone in backbones.BACKBONES
    if not named and (args.weights is None) == (args.preset is None):
        p.error("give exactly one of --weights DIR (official snapshot or miniature folder) or --preset tiny, or a "
                f"backbone by name ({', '.join(backbones.BACKBONES)})")
    try:
        spec, args.weights = backbones.resolve(args.backbone, args.weights, args.preset)
    except (ValueError, weights.CheckpointError) as err:
        p.error(str(err))
    args.size = tuple(args.size or spec.train_size)
    args.frames = args.frames or spec.train_frames
    args.t0 = spec.t0 if args.t0 is None else args.t0
    if spec.kind == "flux" and args.frames:
        p.error("--frames is for video (Wan)")
    if args.frames is not None and not defaults.is_clip_length(args.frames):
        p.error(f"--frames must be 4k+1 (1, 5, 9, ..., 33, ...), got {args.frames}")
    if args.synthetic:
        for name in args.degradation:
            try:
                data.combined(name.split("+"))
            except ValueError as err:
                p.error(f"--synthetic --degradation {name}: {err}")
    if len(args.degradation) > 1 and not args.synthetic and spec.source != "tiny":
        p.error("several --degradation names make a mixture: only with --synthetic")
    if spec.source != "tiny" and args.data is None:
        p.error("--data is required (except with the tiny preset)")
    if not 0 < args.t_min < args.t0 <= 1:
        p.error("need 0 < --t-min < --t0 <= 1")
    for name in ("steps", "batch", "save_every", "log_every", "prompt_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.t_power > 0:
        p.error(f"--t-power must be positive, got {args.t_power}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    args.degradation = args.degradation[0] if len(args.degradation) == 1 else args.degradation
    args.backbone_name = spec.name
    return args


RUN_FILES = ("checkpoint.safetensors", "prompt.safetensors", "log.jsonl")  # what a run writes into --out


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run never writes over another run's files: refused unless --resume or --overwrite; --overwrite
    removes them (before any model loads)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: an existing file, where a run folder is written")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found == ["log.jsonl"] and not resume:  # a run stopped before its first checkpoint: nothing to keep
        overwrite = True
    if found and not resume and not overwrite:
        raise ValueError(f"--out {out} holds a run ({', '.join(found)}): continue it with --resume, start afresh "
                         "with --overwrite, or choose another folder")
    if overwrite:
        for name in found:
            (out / name).unlink()
    runtime.clean_stale_temp(out)


def check_data(dataset, size: tuple[int, int]) -> None:
    """Every training image readable and at least the crop, checked from its header before step 1 (a bad file
    would otherwise stop the run when it is first drawn). Raises ValueError naming the file."""
    pairs = getattr(dataset, "pairs", None) or [(item.clean, item.degraded) for item in getattr(dataset, "items", [])]
    files = [f for pair in pairs for f in pair] + [s for s in getattr(dataset, "sources", []) if isinstance(s, Path)]
    for path in files:
        if isinstance(path, list) or path.suffix.lower() not in media.IMAGE_SUFFIXES:
            continue  # videos and frame folders: read when drawn
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{path}: not a readable image ({err})") from None
        if height < size[0] or width < size[1]:
            raise ValueError(f"{path}: {height}x{width} (HxW) is smaller than the training crop {size[0]}x{size[1]}")


def make_dataset(args: argparse.Namespace, spec: backbones.Spec):
    video = spec.kind == "wan"
    if spec.source == "tiny" and args.data is None:
        return data.toy_dataset(video, args.degradation, args.size, args.frames, seed=args.seed)
    if args.synthetic:
        return data.Synthetic(args.data, args.degradation, args.size, args.frames)
    if args.data.suffix == ".json":
        return data.Manifest(args.data, args.size, args.frames)
    return data.PairedFolders(args.data, args.size, args.frames)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = backbones.BACKBONES[args.backbone_name]
    try:
        check_out(args.out, args.resume, args.overwrite)
        dataset = make_dataset(args, spec)
        check_data(dataset, args.size)
        rank, world, device = runtime.setup_distributed()
        threads = runtime.set_threads(args.threads)
        if rank == 0:
            print(f"training on {device} with {threads} CPU thread{'s' if threads > 1 else ''}", file=sys.stderr)
        dtype = runtime.default_dtype(device, args.dtype)
        bb = backbones.load(spec.name, args.weights, dtype, device, args.text_cache, args.site == "token")
        args.prompt_len = args.prompt_len or spec.prompt_len or bb.txt.shape[1]
        options = training.TrainOptions(
            prompt_len=args.prompt_len, site=args.site, path=args.path, t0=args.t0, t_min=args.t_min,
            t_power=args.t_power, steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
            seed=args.seed, save_every=args.save_every, log_every=args.log_every, compile=args.compile,
            checkpointing=args.checkpointing)
        identity = {k: str(getattr(args, k)) for k in ("backbone", "preset", "weights", "data", "synthetic",
                                                       "degradation", "size", "frames", "seed")}
        training.train(bb, dataset, options, args.out, resume=args.resume, latent_cache=args.latent_cache,
                       cache_identity=identity, record=runtime.record(vars(args)),
                       metadata={"degradation": args.degradation}, rank=rank, world=world)
    except (ValueError, OSError, FloatingPointError, weights.CheckpointError) as err:  # OSError: a full disk, ...
        sys.exit(f"train.py: error: {err}")
    except training.Stopped as stop:
        sys.exit(f"train.py: {stop}")
    finally:
        runtime.close_distributed()


if __name__ == "__main__":
    main()
