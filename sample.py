"""Restore images and videos with a frozen FLUX.1 / Wan2.1 and learned prompts; evaluate restorations.

    python sample.py --image photo.png                         # the shipped miniature and its prompts, on a CPU
    python sample.py --image photos/ --flux FLUX.1-dev/ --prompt haze.safetensors -o restored/
    python sample.py --video clip.mp4 --wan Wan2.1-T2V-1.3B/ --prompt rain.safetensors -o clip_restored.mp4
    python sample.py --image x.png --flux FLUX.1-dev/ --prompt blur.safetensors --prompt lowlight.safetensors
    python sample.py --eval test.json --flux FLUX.1-dev/ --prompt blur.safetensors -o results/
    python sample.py --image x.png --prompt auto               # blind: the bank's estimator chooses the prompt
    torchrun --nproc_per_node 8 sample.py --eval test.json ...        # the items are shared out over the ranks

A restoration encodes the degraded input, walks the bridge from T0 to t_min with the prompted model (bridge.py;
several --prompt files average their velocities, the paper's recipe for mixed degradations) and decodes. Sizes
are kept exactly: images are reflect-padded to a multiple of 16 and cropped back, never resized; large images
are restored in overlapping tiles blended without seams; videos of any length are restored in overlapping
4k+1-frame chunks blended across the overlap, keeping the frame rate, the frame count and the audio.
This file is the command line; the restoration itself is restore.py.
"""

import argparse
import importlib.util
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import backbone as backbones
import data
import defaults
import estimator
import media
import metrics
import prompts
import protocol
import restore
import runtime
import streaming
import weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input (one of)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an RGB image, or a folder of them")
    source.add_argument("--video", type=Path, help="a video file (mp4, mov, mkv, webm, avi) or a folder of frames")
    source.add_argument("--eval", type=Path, help="a JSON manifest or a folder with degraded/ and clean/: restore "
                        "every input and measure it against its target (writes results.json and results.md)")
    g = p.add_argument_group("model")
    g.add_argument("--flux", type=Path, help="FLUX.1 snapshot folder, or a miniature's (default for images: the "
                   "shipped miniature, mini/)")
    g.add_argument("--wan", type=Path, help="Wan2.1-T2V snapshot folder, or a miniature's (default for video: the "
                   "shipped video miniature, mini/wan/, when it is there)")
    g.add_argument("--preset", choices=["tiny"], help="tiny random backbone (as in train.py): tests and study, no weights")
    g.add_argument("--backbone", choices=sorted(backbones.BACKBONES), metavar="NAME", help="a backbone by name (as "
                   f"in train.py): {', '.join(backbones.BACKBONES)}; a snapshot's folder then comes with --flux/--wan")
    g.add_argument("--prompt", action="append", default=[], metavar="FILE",
                   help="learned prompt file (repeat to average several prompts' velocities); with a miniature "
                   "also the name of a shipped prompt (e.g. noise, blur, haze, lowlight). Default: none for "
                   "official weights (the plain pre-trained model on the bridge); for a miniature its recorded "
                   "default (miniature.json: 'auto' with its shipped bank, else its all-in-one prompt). "
                   "'auto': blind restoration, the prompt bank's estimator (estimator.py) chooses the prompt(s) "
                   "from each input by the bank's rule: the most likely degradation's, or the present ones' "
                   "weighted; a prompt the bank holds for exactly the pair it sees (a miniature's shipped bank, "
                   "or --bank)")
    g.add_argument("--bank", type=Path, metavar="FILE", help="the prompt bank of --prompt auto (estimator.py bank; "
                   f"default for a miniature: its prompts/{estimator.BANK_NAME})")
    g.add_argument("--no-prompt", action="store_true", help="the plain pre-trained model on the bridge, no learned "
                   "prompt (the no-learning baseline; also with the miniature)")
    g.add_argument("--text", help="text-prompting baseline: condition on this text instead of the empty prompt "
                   "(official snapshots only), e.g. 'a sharp, clean, high quality photo'")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="DiT dtype (default: bfloat16 on "
                   "GPU, float32 on CPU; float16 also runs the DiT under autocast, the authors' way); the VAE "
                   "always runs in float32")
    g.add_argument("--threads", type=int, help="CPU threads (default: the CPUs not kept busy by other work, from "
                   "the load average: oversubscribed threads made a restoration 1.6-10x slower)")
    g.add_argument("--text-cache", type=Path, default=runtime.TEXT_CACHE,
                   help="cache of text-encoder outputs (default: %(default)s)")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=defaults.STEPS, help="model evaluations on the bridge "
                   "(default: %(default)s)")
    g.add_argument("--t0", type=float, help="bridge start time T0 (default: the T0 the prompts were trained at, "
                   "their mean when several differ; --prompt auto: per input, its chosen prompts'; no prompt: the "
                   f"backbone's, {defaults.T0} but for mini-wan's 0.2: backbone.BACKBONES)")
    g.add_argument("--t-min", type=float, default=defaults.T_MIN, help="last time of the sampler "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, help=f"seed of the starting noise (default: {defaults.SEED}; "
                   f"--protocol paper: {protocol.PAPER_SEED})")
    g = p.add_argument_group("protocol (protocol.py: ours by default; --protocol paper sets every part below, "
                             "each part's flag overrides it)")
    g.add_argument("--protocol", choices=sorted(protocol.PROTOCOLS), default="ours", help="ours: native sizes, "
                   "all frames, continuous t; paper: the authors' inference and evaluation protocol")
    g.add_argument("--size-policy", choices=["native", "paper"], help="native: keep the input's size; paper: "
                   "resize to 1024x1024 (FLUX) / 480x832 (Wan), PIL bicubic, aspect not kept, output at that size")
    g.add_argument("--first-frames", type=int, metavar="N", help="videos: restore only the first min(n, N) "
                   f"frames (cut to 4k+1) in one pass (paper: {protocol.PAPER_FRAMES})")
    g.add_argument("--timesteps", choices=["continuous", "scheduler"], help="the time fed to the DiT: continuous, "
                   "or rounded to the scheduler's grid (FLUX k/1000 in float16, Wan UniPC integers)")
    g.add_argument("--vae-sample", action="store_true", default=None, help="encode with a posterior draw "
                   f"(latent_dist.sample(), generator seeded {protocol.PAPER_VAE_SEED}) instead of the mean")
    g.add_argument("--fixed-noise", action="store_true", default=None, help="the same starting noise (--seed) on "
                   "every call, every video chunk included")
    g.add_argument("--grid-shift", action=argparse.BooleanOptionalAction, help="move the DiT's token grid one "
                   "latent pixel per step, so that its per-token errors do not stack into a block texture (default: "
                   "the backbone's: on for the image miniature, where it was measured; off for FLUX.1 and Wan2.1)")
    g.add_argument("--frame-noise", choices=restore.FRAME_NOISE, help="video: the bridge's starting noise drawn "
                   "anew for every latent frame, or one noise frame shared by all (steadier; default: the backbone's, "
                   "shared for the video miniature, independent for Wan2.1)")
    g.add_argument("--manifest-paths", choices=["manifest", "cwd"], help="evaluation: manifest paths relative to "
                   "the manifest's folder, or to the working directory (the authors' manifests)")
    g.add_argument("--lenient-manifest", action="store_true", default=None, help="evaluation: `degradation` "
                   "optional, a degraded input of another size than its target resized to it")
    g.add_argument("--paper-metrics", action="store_true", default=None, help="evaluation: also the authors' PSNR "
                   "(float RGB) and SSIM (scikit-image's default) at 512x512, bicubic without antialias")
    g = p.add_argument_group("size")
    g.add_argument("--tile", type=int, help="restore images and video frames larger than TILE x TILE pixels in "
                   f"overlapping tiles (multiple of 32; default: the backbone's: {backbones.BACKBONES['flux-dev'].tile} "
                   f"for FLUX.1, {backbones.BACKBONES['wan-1.3b'].tile} for Wan2.1, "
                   f"{backbones.BACKBONES['mini-flux'].tile} for the image miniature, "
                   f"{backbones.BACKBONES['mini-wan'].tile} for the video miniature and the tiny presets)")
    g.add_argument("--chunk-frames", type=int, default=defaults.CHUNK_FRAMES, help="video frames per chunk, 4k+1 "
                   "(default: %(default)s)")
    g.add_argument("--chunk-overlap", type=int, default=defaults.CHUNK_OVERLAP, help="frames shared by neighbouring "
                   "chunks (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", type=Path, help="output file (single image/video) or folder (image folder, "
                   "evaluation); default: <name>_restored.png|.mp4 here, restored/ or results/")
    g.add_argument("--side-by-side", action="store_true", help="write input | output next to each other")
    g.add_argument("--max-pixels", type=int, default=defaults.MAX_PIXELS, help="largest image or video frame "
                   "(width x height) taken, checked from the file's header before decoding (default: %(default)s, "
                   "a 4096x4096 photo)")
    g.add_argument("--resize-512", action="store_true", help=f"evaluation: resize prediction and target to "
                   f"{defaults.EVAL_RESIZE}x{defaults.EVAL_RESIZE} before measuring (the paper's protocol)")
    g.add_argument("--save-images", action="store_true", help="evaluation: also write the restored images")
    g.add_argument("--no-reference", action="append", metavar="NAME", help="evaluation: a no-reference metric "
                   "of the optional package pyiqa, e.g. clipiqa+, musiq (repeatable; refused when pyiqa is absent)")
    g.add_argument("--dists-weights", type=Path, action="append", help="evaluation: DISTS weight file(s), see "
                   "metrics.load_dists (DISTS is skipped without them, never computed with random weights)")
    g.add_argument("--lpips-weights", type=Path, action="append", help="evaluation: LPIPS weight file(s), see "
                   "metrics.load_lpips (repeatable; LPIPS is skipped without them, never computed with random weights)")
    args = p.parse_args(argv)
    video_miniature = backbones.BACKBONES["mini-wan"].folder / backbones.MINIATURE_FILE
    if args.video is not None and args.wan is None and args.preset is None and args.backbone is None \
            and not video_miniature.is_file():
        p.error("--video needs --wan DIR (a Wan2.1-T2V snapshot) or --preset tiny (the video miniature, mini/wan/, "
                "is not there)")
    if args.flux is not None and args.wan is not None:
        p.error("give --flux or --wan, not both")
    if args.video is not None and args.flux is not None:
        p.error("videos are restored with Wan2.1: use --wan DIR")
    if args.backbone is not None and args.preset is not None:
        p.error("--backbone NAME and --preset exclude each other (the tiny presets are named tiny-flux, tiny-wan)")
    if args.no_prompt and args.prompt:
        p.error("--no-prompt and --prompt exclude each other")
    if "auto" in args.prompt and args.prompt != ["auto"]:
        p.error("--prompt auto chooses the prompts itself: give no other --prompt")
    if args.bank is not None and args.prompt != ["auto"]:
        p.error("--bank goes with --prompt auto")
    if args.prompt == ["auto"] and args.text is not None:
        p.error("--prompt auto and --text exclude each other")
    apply_protocol(args)
    if args.no_reference and importlib.util.find_spec("pyiqa") is None:
        p.error("--no-reference needs the optional package pyiqa (pip install pyiqa), which is not installed")
    if args.eval is not None and args.size_policy == "paper" and not args.resize_512:
        p.error("--size-policy paper restores at another size than the targets: --eval then needs --resize-512")
    try:
        args.options = restore_options(args)
    except ValueError as err:
        p.error(str(err))
    return args


def apply_protocol(args: argparse.Namespace) -> None:
    """Fill every protocol part the user did not give from the --protocol table (protocol.PROTOCOLS)."""
    chosen = protocol.PROTOCOLS[args.protocol]
    parts = {"size_policy": chosen.size_policy, "first_frames": chosen.first_frames, "timesteps": chosen.timesteps,
             "dtype": chosen.dtype, "vae_sample": chosen.vae_sample_seed is not None,
             "fixed_noise": chosen.fixed_noise_seed is not None, "manifest_paths": chosen.manifest_paths,
             "lenient_manifest": chosen.lenient_manifests, "paper_metrics": chosen.eval_paper_metrics,
             "seed": chosen.fixed_noise_seed if chosen.fixed_noise_seed is not None else defaults.SEED}
    for name, value in parts.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.resize_512 = args.resize_512 or chosen.eval_paper_metrics


def restore_options(args: argparse.Namespace, kind: str | None = None, t0: float = defaults.T0,
                    frame_noise: str = "independent") -> restore.RestoreOptions:
    """The restoration's options; `kind` ("flux", "wan") sizes --size-policy paper (None: not yet known), `t0` (the
    named prompts' trained T0, else the backbone's) and `frame_noise` (the backbone's, Spec) are used unless --t0 /
    --frame-noise give them; without --t0, --prompt auto samples each input at its chosen prompts' T0."""
    size = protocol.PAPER_SIZE[kind] if args.size_policy == "paper" and kind is not None else None
    prompt_t0, t0 = args.t0 is None, t0 if args.t0 is None else args.t0
    return restore.RestoreOptions(steps=args.steps, t0=t0, prompt_t0=prompt_t0, t_min=args.t_min, seed=args.seed,
                                  tile=args.tile, chunk_frames=args.chunk_frames, chunk_overlap=args.chunk_overlap,
                                  size=size, first_frames=args.first_frames, timesteps=args.timesteps,
                                  autocast="float16" if args.dtype == "float16" else None,
                                  vae_sample_seed=protocol.PAPER_VAE_SEED if args.vae_sample else None,
                                  fixed_noise=args.fixed_noise, grid_shift=args.grid_shift,
                                  frame_noise=frame_noise if args.frame_noise is None else args.frame_noise)


IMAGE_OUTPUTS = (".png", ".jpg", ".jpeg")  # what media.write_image writes
VIDEO_OUTPUTS = (".mp4",)  # what media.write_video / streaming write


def check_paths(args: argparse.Namespace) -> None:
    """Inputs exist, outputs can be written and never replace an input: checked before any model loads.
    Raises ValueError naming the path."""
    source = args.image if args.image is not None else args.video if args.video is not None else args.eval
    try:
        source.stat()
    except FileNotFoundError:
        raise ValueError(f"{source}: no such file or folder") from None
    except OSError as err:  # e.g. a symbolic link loop
        raise ValueError(f"{source}: {err.strerror.lower()}") from None
    if args.image is not None and source.is_file():  # sizes from the header: a bomb is refused before any model
        media.check_decoded_size(str(source), *media.image_size(source), args.max_pixels)
    if args.video is not None and source.is_file():  # one frame at a time: the frame's size is what counts
        info = media.probe_video(source, max_frames=1)  # the header's size; the frames are counted later
        media.check_decoded_size(str(source), info.width, info.height, args.max_pixels)
    folder_out = args.eval is not None or (args.image is not None and args.image.is_dir())
    if args.output is None:
        return
    out = args.output
    if folder_out:
        if out.exists() and not out.is_dir():
            raise ValueError(f"-o {out}: an existing file, where a folder of results is written")
        if args.image is not None and out.resolve() == args.image.resolve():
            raise ValueError(f"-o {out} is the input folder: its images would be replaced; choose another folder")
        writable_folder(out)
        return
    if out.is_dir():
        raise ValueError(f"-o {out}: an existing folder, where a file is written (give a file name)")
    allowed = IMAGE_OUTPUTS if args.image is not None else VIDEO_OUTPUTS
    if out.suffix.lower() not in allowed:
        raise ValueError(f"-o {out}: writes {', '.join(allowed)}, not {out.suffix or 'a name without suffix'!r}")
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"-o {out} is the input: it would be replaced; choose another name")
    writable_folder(out.parent)


def writable_folder(folder: Path) -> None:
    """`folder` exists and can be written, or can be made (its nearest existing ancestor is a writable folder)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{folder}: cannot be made, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing}: not writable (permission denied)")


def choose_backbone(args: argparse.Namespace) -> tuple[backbones.Spec, Path | None]:
    """(spec, folder) from --backbone/--flux/--wan/--preset and the input (videos and video manifests: Wan)."""
    folder = args.flux or args.wan
    if args.backbone is not None:
        spec, folder = backbones.resolve(args.backbone, folder)
    else:
        video = args.wan is not None or args.video is not None or is_video_manifest(args.eval)
        spec, folder = backbones.resolve("wan" if video else "flux", folder, args.preset)
    if spec.kind == "flux" and args.video is not None:
        raise ValueError(f"videos are restored with Wan2.1, not {spec.name}")
    return spec, folder


def is_video_manifest(path: Path | None) -> bool:
    """Whether an --eval manifest lists videos (lists of frame paths) rather than images."""
    return path is not None and path.suffix == ".json" and isinstance(data.Manifest(path, None, lenient=True).items[0].degraded, list)


def describe(bb: backbones.Backbone, files: list[Path], metas: list[dict], words: str | None) -> str:
    """One line: which backbone from where, which prompts."""
    spec = bb.spec
    if spec.source == "tiny":
        source = "the tiny random preset"
    elif spec.source == "miniature" and bb.folder == spec.folder:
        model = "a small FLUX-architecture image" if spec.kind == "flux" else "a small Wan-architecture video"
        where = spec.folder.relative_to(backbones.MINI.parent)
        source = f"the shipped miniature ({where}/, {model} model trained by this project)"
    else:
        source = str(bb.folder)
    names = ", ".join(f"{meta.get('degradation', '?')} ({f.name})" for f, meta in zip(files, metas))
    how = f"prompts: {names}" + (" (velocities averaged)" if len(files) > 1 else "") if files else "no prompt"
    return f"{bb.config} from {source}; {how}" + (f"; text {words!r}" if words else "")


class Progress:
    """The progress callback of the command line, on stdout: the plan at once (`plan`), then a line per model
    evaluation with the steps done, seconds per step and the ETA, and after the first one the whole run's
    estimate. On a terminal the step line is rewritten in place."""

    def __init__(self, label: str, enabled: bool = True, plan: str | None = None):
        self.label, self.enabled = label, enabled
        self.start = time.time()
        self.live = sys.stdout.isatty()
        if enabled and plan:
            print(f"{label}: {plan}", flush=True)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = time.strftime('%H:%M:%S', time.gmtime(elapsed / done * (total - done)))
        if done == 1 and total > 1:
            whole = time.strftime('%H:%M:%S', time.gmtime(elapsed * total))
            print(("\n" if self.live else "") + f"{self.label}: first step after {elapsed:.1f} s: about {whole} "
                  f"for all {total}", flush=True)
        line = f"{self.label}: step {done}/{total}  {elapsed / done:.2f} s/step  ETA {eta}"
        print(f"\r{line}" if self.live else line, end="\n" if done == total or not self.live else "", flush=True)


def side_by_side(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return torch.cat([before, after], dim=-1)


def bank_file(args: argparse.Namespace, spec: backbones.Spec, folder: Path | None) -> Path:
    """The prompt bank of --prompt auto: --bank, else a miniature's shipped one; checked before any loading."""
    path = args.bank
    if path is None:
        if spec.source != "miniature":
            raise ValueError(f"--prompt auto with {spec.name} needs --bank FILE (a prompt bank: estimator.py bank)")
        path = folder / "prompts" / estimator.BANK_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no such prompt bank (build one with `python estimator.py bank`)")
    return path


def decide(bb, bank, degraded: torch.Tensor, label: str, options: restore.RestoreOptions):
    """--prompt auto on one input: its (velocity, options), after printing what the estimator decided."""
    velocity, decided = restore.blind_velocity(bb, bank, degraded)
    options = restore.decided_options(bank, decided, options)
    print(f"{label}: auto: {estimator.describe_weights(decided)}" +
          (f" (T0 {options.t0})" if options.prompt_t0 else ""), file=sys.stderr)
    return velocity, options


def run_image(args, bb, velocity, rank: int, world: int, bank=None) -> None:
    paths = media.list_images(args.image) if args.image.is_dir() else [args.image]
    folder = args.image.is_dir()
    out_dir = args.output or Path("restored")
    if folder:
        runtime.clean_stale_temp(out_dir)
    stems = restore.distinct_stems(paths)  # x.png and x.jpg -> x_png.png, x_jpg.png: no output lost to a clash
    failed = []
    for number, (path, stem) in enumerate(zip(paths, stems)):
        if number % world != rank:
            continue
        try:
            image = media.read_image(path, max_pixels=args.max_pixels)
            options = args.options
            if bank is not None:
                velocity, options = decide(bb, bank, image, path.name, options)
            progress = Progress(f"{path.name} ({number + 1}/{len(paths)})", enabled=rank == 0,
                                plan=restore.describe_plan(bb, *image.shape[-2:], options))
            restored = restore.restore_image(bb, velocity, image, options, progress)
            target = out_dir / f"{stem}.png" if folder else (args.output or Path(f"{path.stem}_restored.png"))
            media.write_image(target, side_by_side(image, restored) if args.side_by_side else restored)
        except ValueError as err:
            if not folder:
                raise
            reason = str(err) if str(path) in str(err) else f"{path}: {err}"
            print(f"sample.py: error: {reason}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"wrote {target}", file=sys.stderr)
    if folder:
        mine = len(range(rank, len(paths), world))
        print(f"restored {mine - len(failed)} of {mine} images into {out_dir}" +
              (f"; failed: {', '.join(p.name for p in failed)}" if failed else ""), file=sys.stderr)
        if failed:
            raise SystemExit(1)


def run_video(args, bb, velocity, rank: int, world: int, bank=None) -> None:
    whole = args.options.first_frames is None and args.options.size is None  # else: the first frames, resized
    if args.video.is_file() and world == 1 and whole:  # a stream: memory bounded by one chunk, whatever the length
        target = args.output or Path(f"{args.video.stem}_restored.mp4")
        info = media.probe_video(args.video)
        length, starts = restore.chunk_plan(info.frames, args.options.chunk_frames, args.options.chunk_overlap)
        options = args.options
        if bank is not None:  # decided on the first chunk's frames
            first = list(itertools.islice(streaming.iter_frames(args.video), length))
            velocity, options = decide(bb, bank, torch.stack(first, dim=1), args.video.name, options)
        progress = Progress(args.video.name, plan=restore.describe_plan(bb, info.height, info.width, options,
                                                                         info.frames))
        restore.restore_video_file(bb, velocity, args.video, target, options, progress, args.side_by_side)
        print(f"wrote {target} ({info.frames} frames at {info.fps} fps)", file=sys.stderr)
        return
    video = media.read_video(args.video)
    length, starts = restore.chunk_plan(video.frames.shape[1], args.options.chunk_frames, args.options.chunk_overlap)
    if args.options.first_frames is not None:  # one pass over the first frames
        length, starts = defaults.clip_length_at_most(min(video.frames.shape[1], args.options.first_frames)), [0]
    options = args.options
    if bank is not None:
        velocity, options = decide(bb, bank, video.frames, args.video.name, options)
    progress = Progress(args.video.name, enabled=rank == 0, plan=restore.describe_plan(
        bb, *video.frames.shape[-2:], options, video.frames.shape[1] if args.options.first_frames is None else length))
    restored = restore.restore_video(bb, velocity, video.frames, options, progress, rank, world)
    if rank == 0:
        target = args.output or Path(f"{args.video.stem}_restored.mp4")
        frames = side_by_side(video.frames, restored) if args.side_by_side else restored
        audio = args.video if args.video.is_file() and video.has_audio else None
        media.write_video(target, frames, video.fps, audio_from=audio)
        print(f"wrote {target} ({restored.shape[1]} frames at {video.fps} fps)", file=sys.stderr)


def run_eval(args, bb, velocity, rank: int, world: int, bank=None) -> None:
    """Restore every item of a manifest or paired folder and measure it; rank 0 writes the results."""
    items = restore.evaluation_items(args.eval, Path.cwd() if args.manifest_paths == "cwd" else None,
                                     args.lenient_manifest)
    out_dir = args.output or Path("results")
    runtime.clean_stale_temp(out_dir)
    runtime.clean_stale_temp(out_dir / "images")
    lpips = metrics.load_lpips(args.lpips_weights, device=bb.device) if args.lpips_weights else None
    dists = metrics.load_dists(args.dists_weights, device=bb.device) if args.dists_weights else None
    no_reference = metrics.no_reference(args.no_reference, bb.device) if args.no_reference else None
    rows = restore.evaluate(bb, velocity, items, args.options, defaults.EVAL_RESIZE if args.resize_512 else None,
                            lpips, out_dir / "images" if args.save_images else None,
                            lambda label: Progress(label, enabled=rank == 0), rank, world, bank,
                            paper=args.paper_metrics, dists=dists, resize_mismatch=args.lenient_manifest,
                            no_reference=no_reference)
    failed = [row for row in rows if "error" in row]
    if rank == 0:
        summary = metrics.summarise([row for row in rows if "error" not in row])
        keys = ("backbone", "flux", "wan", "preset", "prompt", "text", "steps", "t0", "t_min", "seed", "tile",
                "resize_512", "protocol", "size_policy", "first_frames", "timesteps", "dtype", "vae_sample",
                "fixed_noise", "manifest_paths", "lenient_manifest", "paper_metrics", "grid_shift")
        settings = runtime.record({k: v for k, v in vars(args).items() if k in keys} |
                                  {"t0": args.options.t0, "t0_per_input": bank is not None and args.options.prompt_t0,
                                   "frame_noise": args.options.frame_noise})
        with runtime.atomic_file(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps({"summary": summary, "items": rows, "settings": settings}, indent=1))
        with runtime.atomic_file(out_dir / "results.md") as tmp:
            tmp.write_text(metrics.markdown_table(summary) + "\n")
        print(metrics.markdown_table(summary))
        for row in failed:
            print(f"sample.py: error: {row['error']}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} of {len(rows)} items failed (recorded in {out_dir / 'results.json'})",
                  file=sys.stderr)
        if bank is not None:
            hits = estimator.decision_accuracy(rows, bank.names)
            print("estimator accuracy (chosen prompts == the item's degradations): " +
                  (", ".join(f"{name} {hit:.2f} ({count})" for name, (hit, count) in hits.items()) or
                   "no item names one of the bank's degradations"))
    if failed:
        raise SystemExit(1)


def stop_on_signal(signum, frame) -> None:
    """SIGTERM ends a restoration as Ctrl-C does: unwinding, so no half-written output stays behind."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        check_paths(args)
        spec, folder = choose_backbone(args)
        if not args.prompt and not args.no_prompt and args.text is None and args.bank is None \
                and isinstance(restore.default_prompt(spec, folder), Path):
            args.prompt = ["auto"]  # the miniature's recorded default: blind restoration with its shipped bank
        auto = bank_file(args, spec, folder) if args.prompt == ["auto"] else None
        files = restore.prompt_files(args.prompt, spec, folder, args.no_prompt) if auto is None else []
        t0 = restore.trained_t0([prompts.read_meta(f) for f in files]) or spec.t0  # the prompts' own T0
        args.options = restore_options(args, spec.kind, t0, spec.frame_noise)
        if args.text is not None:
            restore.check_text_prompting(spec)
        rank, world, device = runtime.setup_distributed()
        threads = runtime.set_threads(args.threads)
        bb = backbones.load(spec.name, folder, runtime.default_dtype(device, args.dtype), device, args.text_cache,
                            restore.needs_text_encoders(files))
        loaded = restore.load_prompts(files, bb)
        conditioning = restore.text_conditioning(bb, args.text, args.text_cache) if args.text is not None else None
        velocity = restore.velocity_for(bb, [prompt for prompt, _ in loaded], conditioning)
        bank = restore.load_bank(auto, bb) if auto is not None else None
        if rank == 0:
            metas = [meta for _, meta in loaded]
            how = describe(bb, files, metas, args.text)
            if bank is not None:
                how = how.replace("no prompt", f"--prompt auto over the bank {auto} ({', '.join(bank.names)})")
                metas = [meta for _, meta in bank.prompts]
                files = [Path(f"{auto.name}[{name}]") for name in bank.names]
            print(f"restoring with {how} ({device}, {threads} CPU thread{'s' if threads > 1 else ''})", file=sys.stderr)
            decided_t0 = bank is not None and args.options.prompt_t0  # (each input at its chosen prompts' T0)
            for warning in [] if decided_t0 else restore.t0_warnings(files, metas, args.options.t0):
                print(f"sample.py: warning: {warning}", file=sys.stderr)
        run = run_image if args.image is not None else run_video if args.video is not None else run_eval
        run(args, bb, velocity, rank, world, bank)
    except (ValueError, OSError, weights.CheckpointError) as err:  # OSError: a full disk, a vanished folder, ...
        sys.exit(f"sample.py: error: {err}")
    except KeyboardInterrupt:
        sys.exit("sample.py: stopped (nothing half-written was left)")
    finally:
        runtime.close_distributed()


if __name__ == "__main__":
    main()
