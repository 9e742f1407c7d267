"""Peak memory of a video restoration against clip length: streamed (streaming.py) vs whole-clip (media.read_video).

    python bench/stream_memory.py                          # 50, 200, 800, 3200 frames at 320x240; ~3 min, one core
    python bench/stream_memory.py --model tiny --frames 20 60  # the tiny preset's Wan on the bridge per chunk (slow)

For every clip length a synthetic source clip is written (a panned toy image, streamed to disk, so making it needs
no memory either), then each variant restores it in a FRESH subprocess and reports that process's peak RSS
(getrusage ru_maxrss):
  streamed    media.probe_video, streaming.iter_frames / restore_stream / VideoWriter, chunks of 17 frames, overlap 8
  whole-clip  media.read_video (all frames as float32), the same chunks restored and blended, media.write_video of the
              whole result: what the command line did before streaming
The restoration of a chunk is, by default (--model box), a 3x3 box filter per frame: what is measured is the memory
of the video pipeline around the model, since a model's activations depend on the chunk alone in both variants.
With --model tiny it is the tiny preset's Wan backbone on the bridge (2 steps: real encode, DiT, decode), about 2 s a
frame at 320x240 on one core. Both variants' outputs are the same frames (tests/test_streaming.py checks
restore_stream against blend_chunks exactly); here the frame count and rate of the output are checked.
JSON: bench/results/stream_memory.json.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common  # puts the repository root on sys.path
import torch

CHUNK, OVERLAP = 17, 8


def make_source(path: Path, frames: int, height: int, width: int) -> None:
    import data
    import streaming

    image = data.toy_images(1, height, width + frames, seed=0)[0]
    with streaming.VideoWriter(path, 16) as writer:
        for f in range(frames):
            writer.write(image[:, :, f : f + width])


def restore_chunk_fn(model: str):
    if model == "box":
        return lambda clip, _: torch.nn.functional.avg_pool2d(clip.transpose(0, 1), 3, 1, 1,
                                                             count_include_pad=False).transpose(0, 1)
    import backbone
    import restore

    bb, options = backbone.tiny("wan"), restore.RestoreOptions(steps=2)
    return lambda clip, index: restore.restore_chunk(bb, bb.velocity, clip, options, index)


def run_variant(variant: str, model: str, source: Path, target: Path) -> None:
    """In a fresh process: restore `source` into `target`, print the peak RSS in MiB."""
    import media
    import streaming

    torch.set_num_threads(1)
    restore = restore_chunk_fn(model)
    with torch.no_grad():
        if variant == "streamed":
            info = media.probe_video(source)
            with streaming.VideoWriter(target, info.fps, audio_from=source) as writer:
                for frame in streaming.restore_stream(streaming.iter_frames(source), info.frames, restore, CHUNK, OVERLAP):
                    writer.write(frame)
        else:
            video = media.read_video(source)  # the whole clip as float32, restored, then written whole
            frames = streaming.restore_stream(iter(video.frames.unbind(1)), video.frames.shape[1], restore, CHUNK, OVERLAP)
            media.write_video(target, torch.stack(list(frames), dim=1), video.fps)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[50, 200, 800, 3200])
    p.add_argument("--model", choices=["box", "tiny"], default="box", help="per-chunk restoration (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    p.add_argument("--whole-max", type=int, default=800, help="longest clip the whole-clip variant is run on "
                   "(it needs about 5 MiB a frame at 320x240; default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/stream_memory"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return run_variant(args.variant, args.model, args.source, args.target)

    import media

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for frames in args.frames:
        source = args.work / f"source_{frames}.mp4"
        make_source(source, frames, *args.size)
        row = {"frames": frames, "size": args.size, "model": args.model}
        variants = ("streamed", "whole-clip") if frames <= args.whole_max else ("streamed",)
        for variant in variants:
            target = args.work / f"{variant}_{frames}.mp4"
            start = time.time()
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--source", str(source),
                                  "--target", str(target), "--model", args.model], capture_output=True, text=True, check=True)
            row[variant] = {"peak_rss_mib": round(json.loads(out.stdout.splitlines()[-1])["peak_rss_mib"], 1),
                            "wall_s": round(time.time() - start, 1)}
        for variant in variants:
            info = media.probe_video(args.work / f"{variant}_{frames}.mp4")
            if info.frames != frames or info.fps != 16:
                raise SystemExit(f"error: {variant} wrote {info.frames} frames at {info.fps} fps, not {frames} at 16")
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = Path(__file__).parent / "results" / "stream_memory.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| frames | streamed peak RSS (MiB) | whole-clip peak RSS (MiB) |\n|---|---|---|")
    for row in rows:
        whole = row["whole-clip"]["peak_rss_mib"] if "whole-clip" in row else "not run"
        print(f"| {row['frames']} | {row['streamed']['peak_rss_mib']} | {whole} |")


if __name__ == "__main__":
    main()
