"""Restore images and videos with a frozen FLUX.1 / Wan2.1 and learned prompts; evaluate restorations.

    python sample.py --image photo.png                         # the shipped miniature and its prompts, CPU, seconds
    python sample.py --image photos/ --flux FLUX.1-dev/ --prompt haze.safetensors -o restored/
    python sample.py --video clip.mp4 --wan Wan2.1-T2V-1.3B/ --prompt rain.safetensors -o clip_restored.mp4
    python sample.py --image x.png --flux FLUX.1-dev/ --prompt blur.safetensors --prompt lowlight.safetensors
    python sample.py --eval test.json --flux FLUX.1-dev/ --prompt blur.safetensors -o results/
    torchrun --nproc_per_node 8 sample.py --eval test.json ...        # the items are shared out over the ranks

A restoration encodes the degraded input, walks the bridge from T0 to t_min with the prompted model (bridge.py;
several --prompt files average their velocities, the paper's recipe for mixed degradations) and decodes. Sizes
are kept exactly: images are reflect-padded to a multiple of 16 and cropped back, never resized; large images
are restored in overlapping tiles blended without seams; videos of any length are restored in overlapping
4k+1-frame chunks blended across the overlap, keeping the frame rate, the frame count and the audio.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import backbone as backbones
import bridge
import data
import metrics
import prompts
import text
import tiling
import weights
from train import setup_distributed

MINIATURE = Path(__file__).resolve().parent / "mini"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input (one of)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an RGB image, or a folder of them")
    source.add_argument("--video", type=Path, help="a video file (mp4, mov, mkv, webm, avi) or a folder of frames")
    source.add_argument("--eval", type=Path, help="a JSON manifest or a folder with degraded/ and clean/: restore "
                        "every input and measure it against its target (writes results.json and results.md)")
    g = p.add_argument_group("model")
    g.add_argument("--flux", type=Path, help="FLUX.1 snapshot folder (default for images: the shipped miniature, "
                   f"{MINIATURE.name}/)")
    g.add_argument("--wan", type=Path, help="Wan2.1-T2V snapshot folder (needed for video)")
    g.add_argument("--preset", choices=["tiny"], help="tiny random backbone (as in train.py): tests and study, no weights")
    g.add_argument("--prompt", action="append", default=[], metavar="FILE",
                   help="learned prompt file (repeat to average several prompts' velocities); with the miniature "
                   "also the name of a shipped prompt (noise, blur, haze, lowlight). Default: none for official "
                   "weights (the plain pre-trained model on the bridge), all shipped prompts for the miniature")
    g.add_argument("--no-prompt", action="store_true", help="the plain pre-trained model on the bridge, no learned "
                   "prompt (the no-learning baseline; also with the miniature)")
    g.add_argument("--text", help="text-prompting baseline: condition on this text instead of the empty prompt "
                   "(official snapshots only), e.g. 'a sharp, clean, high quality photo'")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], help="DiT dtype (default: bfloat16 on GPU, float32 on "
                   "CPU); the VAE always runs in float32")
    g.add_argument("--text-cache", type=Path, default=Path.home() / ".cache" / "ypt-restore" / "text",
                   help="cache of text-encoder outputs (default: %(default)s)")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=20, help="model evaluations on the bridge (default: %(default)s)")
    g.add_argument("--t0", type=float, default=0.4, help="bridge start time T0 (default: %(default)s)")
    g.add_argument("--t-min", type=float, default=1e-4, help="last time of the sampler (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    g = p.add_argument_group("size")
    g.add_argument("--tile", type=int, help="restore images larger than TILE x TILE pixels in overlapping tiles "
                   "(multiple of 32; default: 1024 for FLUX, 256 for the miniature and the tiny preset)")
    g.add_argument("--chunk-frames", type=int, default=33, help="video frames per chunk, 4k+1 (default: %(default)s)")
    g.add_argument("--chunk-overlap", type=int, default=8, help="frames shared by neighbouring chunks (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", type=Path, help="output file (single image/video) or folder (image folder, "
                   "evaluation); default: <name>_restored.png|.mp4 here, restored/ or results/")
    g.add_argument("--side-by-side", action="store_true", help="write input | output next to each other")
    g.add_argument("--resize-512", action="store_true", help="evaluation: resize prediction and target to 512x512 "
                   "before measuring (the paper's protocol)")
    g.add_argument("--save-images", action="store_true", help="evaluation: also write the restored images")
    g.add_argument("--lpips-weights", type=Path, action="append", help="evaluation: LPIPS weight file(s), see "
                   "metrics.load_lpips (repeatable; LPIPS is skipped without them, never computed with random weights)")
    args = p.parse_args(argv)
    if args.video is not None and args.wan is None and args.preset is None:
        p.error("--video needs --wan DIR (a Wan2.1-T2V snapshot) or --preset tiny")
    if args.flux is not None and args.wan is not None:
        p.error("give --flux or --wan, not both")
    if args.video is not None and args.flux is not None:
        p.error("videos are restored with Wan2.1: use --wan DIR")
    if args.no_prompt and args.prompt:
        p.error("--no-prompt and --prompt exclude each other")
    if args.tile is not None and (args.tile % 32 or args.tile < 64):
        p.error("--tile must be a multiple of 32, at least 64")
    if (args.chunk_frames - 1) % 4 or not 0 <= args.chunk_overlap < args.chunk_frames:
        p.error("--chunk-frames must be 4k+1 and --chunk-overlap in [0, chunk-frames)")
    return args


# ---------------------------------------------------------------------------------------------- the model


def load(args: argparse.Namespace, device: torch.device):
    """(backbone, velocity function, description) from the arguments."""
    kind = "wan" if args.wan is not None or args.video is not None or is_video_manifest(args.eval) else "flux"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    miniature = kind == "flux" and args.flux is None and args.preset is None
    files = [prompt_path(file, miniature) for file in args.prompt]
    if miniature and not files and not args.no_prompt:
        files = sorted((MINIATURE / "prompts").glob("*.safetensors"))
    keep_encoders = any(weights.read_metadata(f).get("site") == "token" for f in files if f.suffix == ".safetensors")
    if args.preset == "tiny":
        bb, source = backbones.tiny(kind).to(device), "the tiny random preset"
    elif miniature:
        if not (MINIATURE / backbones.MINIATURE_FILE).is_file():
            raise ValueError(f"no --flux snapshot given and the shipped miniature is missing ({MINIATURE})")
        bb = backbones.load("flux", MINIATURE, dtype, device)
        source = f"the shipped miniature ({MINIATURE.name}/, a small FLUX-architecture model trained on this project's CPU)"
    else:
        folder = args.flux or args.wan
        bb, source = backbones.load(kind, folder, dtype, device, args.text_cache, keep_encoders), str(folder)
    if args.text is not None:
        use_text(bb, args)
    loaded = [load_prompt(file, bb) for file in files]
    velocity_fns = [lambda x, t, p=prompt.to(device): bb.velocity(x, t, p) for prompt, _ in loaded]
    velocity = bridge.average_velocity(velocity_fns) if velocity_fns else bb.velocity
    names = ", ".join(f"{meta.get('degradation', '?')} ({Path(f).name})" for f, (_, meta) in zip(files, loaded))
    how = f"prompts: {names}" + (" (velocities averaged)" if len(loaded) > 1 else "") if loaded else "no prompt"
    return bb, velocity, f"{bb.config} from {source}; {how}" + (f"; text {args.text!r}" if args.text else "")


def is_video_manifest(path: Path | None) -> bool:
    """Whether an --eval manifest lists videos (lists of frame paths) rather than images."""
    return path is not None and path.suffix == ".json" and isinstance(data.Manifest(path, None).items[0].degraded, list)


def prompt_path(file: str, miniature: bool) -> Path:
    """A --prompt argument as a path; with the miniature a bare name (e.g. "haze") means a shipped prompt."""
    path = Path(file)
    if miniature and not path.suffix and not path.exists():
        path = MINIATURE / "prompts" / f"{path.name}.safetensors"
        if not path.is_file():
            shipped = sorted(p.stem for p in (MINIATURE / "prompts").glob("*.safetensors"))
            raise ValueError(f"no shipped miniature prompt named {file!r}; shipped: {shipped}")
    return path


def load_prompt(path: Path, bb: backbones.Backbone):
    """A prompt file, checked against the backbone and attached to it."""
    prompt, meta = prompts.load_prompt(path, backbone=bb.kind)
    if meta["config"] != bb.config:
        raise ValueError(f"{path}: this prompt was trained for {meta['config']}, the backbone is {bb.config}")
    return bb.attach(prompt.eval()), meta


def use_text(bb: backbones.Backbone, args: argparse.Namespace) -> None:
    """The text-prompting baseline: replace the empty-prompt conditioning by that of `args.text`."""
    snapshot = args.flux if bb.kind == "flux" else args.wan
    if snapshot is None or bb.config in ("miniature", "tiny-flux", "tiny-wan"):
        raise ValueError("--text needs an official snapshot with its text encoders and tokenizers (--flux or --wan)")
    length = bb.txt.shape[1]
    if bb.kind == "flux":
        bb.txt, bb.pooled = text.flux_text([args.text], snapshot, length, bb.device, bb.dtype, args.text_cache)
    else:
        bb.txt = text.wan_text([args.text], snapshot, length, bb.device, bb.dtype, args.text_cache)


# ---------------------------------------------------------------------------------------------- restoring


class Progress:
    """A status line on stderr: what is being restored, model evaluations done, time per step and ETA.

    On a terminal the line is rewritten in place; in a log (stderr not a terminal) a line is printed at every
    tenth of the work."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start = 0, time.time()
        self.live = sys.stderr.isatty()

    def __call__(self, *_) -> None:
        self.done += 1
        if not self.enabled or not (self.live or self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            return
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        line = (f"{self.label}: step {self.done}/{self.total}  {elapsed / self.done:.2f} s/step  "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        if self.live:
            print(f"\r{line}", end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def tiled_velocity(velocity: bridge.VelocityFn, tile: int, overlap: int) -> bridge.VelocityFn:
    """Velocity on latents [B, C, h, w] larger than `tile` latent pixels, from overlapping tiles cross-faded."""

    def tiled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= tile and x.shape[-1] <= tile:
            return velocity(x, t)
        return tiling.run_tiled(lambda crop: velocity(crop, t), x, tile, overlap, in_scale=1, out_scale=1)

    return tiled


def pad_to_16(pixels: torch.Tensor) -> torch.Tensor:
    """Reflect-pad the last two axes (H, W) up to multiples of 16; crop the result back with [..., :H, :W]."""
    height, width = pixels.shape[-2:]
    if min(height, width) < 16:
        raise ValueError(f"the input is {height}x{width} pixels; the smallest size that can be restored is 16x16")
    pad_h, pad_w = -height % 16, -width % 16
    if not pad_h and not pad_w:
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:]) if pixels.ndim > 3 else pixels[None]
    padded = F.pad(flat, (0, pad_w, 0, pad_h), mode="reflect")
    return padded.reshape(*pixels.shape[:-2], height + pad_h, width + pad_w)


def restore_image(bb, velocity, image: torch.Tensor, args, tile: int, label: str) -> torch.Tensor:
    """image [3, H, W] in [0, 1] -> restored [3, H, W] in [0, 1]. Larger than `tile` pixels: tiled throughout."""
    height, width = image.shape[-2:]
    pixels = pad_to_16(image)[None] * 2 - 1
    large = max(pixels.shape[-2:]) > tile
    y = bb.encode(pixels, tile=tile if large else None)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(args.seed)).to(y.device)
    down = bb.vae.downscale  # image pixels per latent pixel
    velocity = tiled_velocity(velocity, tile // down, tile // (4 * down)) if large else velocity
    progress = Progress(args.steps, label, enabled=args.rank == 0)
    x0 = bridge.sample(velocity, y, eps, args.t0, args.t_min, args.steps, on_step=progress)
    out = bb.decode(x0, tile=tile if large else None)
    return ((out[0] + 1) / 2).clamp(0, 1)[:, :height, :width].cpu()


def chunk_plan(frames: int, chunk: int, overlap: int) -> tuple[int, list[int]]:
    """(chunk length, chunk starts) covering `frames`: chunks of 4k+1 frames (at most `chunk`, at most the clip)
    whose neighbours share at least `overlap` frames (fewer when the clip is too short to allow it)."""
    length = min(chunk, (frames - 1) // 4 * 4 + 1)
    return length, tiling.tile_starts(frames, length, min(overlap, length - 1))


def restore_video(bb, velocity, video: torch.Tensor, args, label: str) -> torch.Tensor:
    """video [3, F, H, W] in [0, 1] -> restored [3, F, H, W]: overlapping 4k+1-frame chunks, cross-faded.

    Under torchrun the chunks are shared out over the ranks; every rank returns the blended whole."""
    height, width = video.shape[2:]
    length, starts = chunk_plan(video.shape[1], args.chunk_frames, args.chunk_overlap)
    mine = list(range(args.rank, len(starts), args.world))
    progress = Progress(len(mine) * args.steps, f"{label} ({len(starts)} chunks of {length} frames)",
                        enabled=args.rank == 0)
    restored = {}
    for index in mine:
        clip = pad_to_16(video[:, starts[index] : starts[index] + length])[None] * 2 - 1
        y = bb.encode(clip)
        noise = torch.Generator().manual_seed(args.seed * 100_003 + index)
        eps = torch.randn(y.shape, generator=noise).to(y.device)
        x0 = bridge.sample(velocity, y, eps, args.t0, args.t_min, args.steps, on_step=progress)
        restored[index] = ((bb.decode(x0)[0] + 1) / 2).clamp(0, 1)[:, :, :height, :width].cpu()
    return blend_chunks(gather(restored, args.world), starts, length, args.chunk_overlap)


def blend_chunks(chunks: dict[int, torch.Tensor], starts: list[int], length: int, overlap: int) -> torch.Tensor:
    """Chunks [3, length, H, W] starting at `starts` -> one video [3, F, H, W], cross-faded linearly over each
    overlap (weights normalised, so frames covered by one chunk are that chunk's exactly)."""
    frames = starts[-1] + length
    out = torch.zeros(chunks[0].shape[0], frames, *chunks[0].shape[2:])
    weight = torch.zeros(frames)
    overlap = max(1, min(overlap, length - 1))
    for index, start in enumerate(starts):
        w = tiling.blend_window(start, length, frames, overlap, 1, torch.device("cpu"))
        out[:, start : start + length] += chunks[index] * w[None, :, None, None]
        weight[start : start + length] += w
    return out / weight[None, :, None, None]


def gather(pieces: dict, world: int) -> dict:
    """Merge every rank's dict of results (all ranks receive all of them)."""
    if world == 1:
        return pieces
    everything = [None] * world
    dist.all_gather_object(everything, pieces)
    return {k: v for part in everything for k, v in part.items()}


# ---------------------------------------------------------------------------------------------- commands


def side_by_side(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return torch.cat([before, after], dim=-1)


def run_image(args, bb, velocity, tile: int) -> None:
    paths = data.list_images(args.image) if args.image.is_dir() else [args.image]
    folder = args.image.is_dir()
    out_dir = args.output or Path("restored")
    for number, path in enumerate(paths):
        if number % args.world != args.rank:
            continue
        image = data.read_image(path)
        restored = restore_image(bb, velocity, image, args, tile, f"{path.name} ({number + 1}/{len(paths)})")
        target = out_dir / f"{path.stem}.png" if folder else (args.output or Path(f"{path.stem}_restored.png"))
        data.write_image(target, side_by_side(image, restored) if args.side_by_side else restored)
        print(f"wrote {target}", file=sys.stderr)


def run_video(args, bb, velocity) -> None:
    video = data.read_video(args.video)
    restored = restore_video(bb, velocity, video.frames, args, args.video.name)
    if args.rank == 0:
        target = args.output or Path(f"{args.video.stem}_restored.mp4")
        frames = side_by_side(video.frames, restored) if args.side_by_side else restored
        audio = args.video if args.video.is_file() and video.has_audio else None
        data.write_video(target, frames, video.fps, audio_from=audio)
        print(f"wrote {target} ({restored.shape[1]} frames at {video.fps} fps)", file=sys.stderr)


def run_eval(args, bb, velocity, tile: int) -> None:
    """Restore every item of a manifest or paired folder and measure it; rank 0 writes the results."""
    dataset = data.Manifest(args.eval, None) if args.eval.suffix == ".json" else data.PairedFolders(args.eval, None)
    items = evaluation_items(dataset)
    out_dir = args.output or Path("results")
    lpips = metrics.load_lpips(args.lpips_weights, device=bb.device) if args.lpips_weights else None
    rows = {}
    for number, (name, degraded_path, clean_path, degradation, group) in enumerate(items):
        if number % args.world != args.rank:
            continue
        label = f"{name} ({number + 1}/{len(items)})"
        if isinstance(degraded_path, list):
            degraded = data.read_clip(degraded_path, 0, len(degraded_path))
            clean = data.read_clip(clean_path, 0, len(clean_path))
            restored = restore_video(bb, velocity, degraded, args, label)
        else:
            degraded, clean = data.read_image(degraded_path), data.read_image(clean_path)
            restored = restore_image(bb, velocity, degraded, args, tile, label)
        if degraded.shape != clean.shape:
            raise ValueError(f"{name}: input {list(degraded.shape)} and target {list(clean.shape)} differ in size")
        rows[number] = {"name": name, "dataset": group, "degradation": degradation,
                        **measure(restored, clean, args.resize_512, lpips),
                        **{f"input_{k}": v for k, v in measure(degraded, clean, args.resize_512, lpips).items()}}
        if args.save_images and not isinstance(degraded_path, list):
            data.write_image(out_dir / "images" / f"{Path(name).stem}.png", restored)
    rows = gather(rows, args.world)
    if args.rank == 0:
        ordered = [rows[i] for i in sorted(rows)]
        summary = metrics.summarise(ordered)
        with weights.atomic_file(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps({"summary": summary, "items": ordered, "settings": settings(args)}, indent=1))
        with weights.atomic_file(out_dir / "results.md") as tmp:
            tmp.write_text(metrics.markdown_table(summary) + "\n")
        print(metrics.markdown_table(summary))


def evaluation_items(dataset) -> list[tuple]:
    """(name, degraded, clean, degradation, dataset name) for a Manifest or PairedFolders."""
    if isinstance(dataset, data.Manifest):
        return [(_name(item.degraded), item.degraded, item.clean, item.degradation, item.dataset)
                for item in dataset.items]
    return [(_name(degraded), degraded, clean, "unknown", "paired") for clean, degraded in dataset.pairs]


def _name(source) -> str:
    return source[0].parent.name if isinstance(source, list) else source.name


def measure(pred: torch.Tensor, target: torch.Tensor, resize: bool, lpips) -> dict:
    """PSNR and SSIM (RGB and Y; metrics.py states the conventions), LPIPS if its weights were given."""
    if resize:
        pred, target = metrics.resize_to(pred, 512), metrics.resize_to(target, 512)
    video = True if pred.ndim == 4 else None  # [3, F, H, W]: a video, scored as the mean over frames
    row = {"psnr": metrics.psnr(pred, target, video=video), "ssim": metrics.ssim(pred, target, video=video),
           "psnr_y": metrics.psnr(pred, target, channel="y", video=video),
           "ssim_y": metrics.ssim(pred, target, channel="y", video=video)}
    if lpips is not None:
        row["lpips"] = lpips.score(pred.to(lpips_device(lpips)), target.to(lpips_device(lpips)), video=video)
    return row


def lpips_device(lpips) -> torch.device:
    return next(lpips.parameters()).device


def settings(args) -> dict:
    keys = ("flux", "wan", "preset", "prompt", "text", "steps", "t0", "t_min", "seed", "tile", "resize_512")
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items() if k in keys}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.rank, args.world, device = setup_distributed()
        bb, velocity, description = load(args, device)
        if args.rank == 0:
            print(f"restoring with {description}", file=sys.stderr)
        tile = args.tile or (1024 if bb.config.startswith("flux") else 256)
        with torch.no_grad():
            if args.image is not None:
                run_image(args, bb, velocity, tile)
            elif args.video is not None:
                run_video(args, bb, velocity)
            else:
                run_eval(args, bb, velocity, tile)
    except (ValueError, FileNotFoundError, weights.CheckpointError) as err:
        sys.exit(f"sample.py: error: {err}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
