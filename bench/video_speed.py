"""Seconds per output frame and peak RSS of the default commands at real sizes, on this CPU.

    python bench/video_speed.py                       # videos 256x144, 640x360, 1280x720; images 256 .. 4000x3000
    python bench/video_speed.py --frames 9 --steps 20 --images 256 1024

Each case runs `sample.py` as a user would (the shipped miniatures, their default prompt choice, `--threads`
fixed) in a fresh process on an input written first: a video of `--frames` frames panned over a photo of
`mini/heldout/` (a real picture, upscaled) at each size, and images of each size. Recorded per case: wall
seconds of the whole command, seconds per output frame (video) or per megapixel (image), the peak RSS of the
process (its own `resource.getrusage(RUSAGE_SELF)`), and the cost per pixel relative to the smallest size (1.0:
linear in area). Writes bench/results/video_speed.json and prints a table.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common  # puts the repository root on sys.path
import torch
import torch.nn.functional as F

VIDEO_SIZES = ((256, 144), (640, 360), (1280, 720))  # (width, height)
IMAGE_SIZES = ((256, 256), (1024, 1024), (2048, 2048), (4000, 3000))


def source_picture(width: int, height: int) -> torch.Tensor:
    """A real photo (mini/heldout/coffee.png) resized to width x height, [3, H, W] in [0, 1]."""
    from mini import images

    photo = images.heldout_crops()["coffee"][None]
    return F.interpolate(photo, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def write_inputs(work: Path, frames: int, video_sizes, image_sizes) -> dict:
    import media
    import streaming

    paths = {}
    for width, height in video_sizes:
        path = work / f"clip_{width}x{height}_{frames}.mp4"
        if not path.exists():
            wide = source_picture(width + 2 * frames, height)
            with streaming.VideoWriter(path, 16) as writer:
                for f in range(frames):
                    writer.write(wide[:, :, 2 * f : 2 * f + width])
        paths[("video", width, height)] = path
    for width, height in image_sizes:
        path = work / f"photo_{width}x{height}.png"
        if not path.exists():
            media.write_image(path, source_picture(width, height))
        paths[("image", width, height)] = path
    return paths


PEAK = ("import json, resource, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path('sample.py', run_name='__main__')\n"
        "finally:\n    print('PEAK ' + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), file=sys.stderr)\n")


def run_case(kind: str, path: Path, out: Path, steps: int, threads: int) -> dict:
    """sample.py on one input in a fresh process: wall seconds, its own peak RSS, its plan line."""
    start = time.time()
    result = subprocess.run([sys.executable, "-c", PEAK, "sample.py", f"--{kind}", str(path), "-o", str(out),
                             "--steps", str(steps), "--threads", str(threads), "--max-pixels", str(1 << 26)],
                            cwd=common.ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {path.name}: {result.stderr.strip().splitlines()[-2:]}")
    peak = int(next(line for line in result.stderr.splitlines() if line.startswith("PEAK ")).split()[1])  # KiB
    plan = next((line for line in result.stdout.splitlines() if " px " in line), "")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024, 1), "plan": plan.split(": ", 1)[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=9, help="frames of each test clip (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default: %(default)s, sample.py's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--videos", nargs="*", default=[f"{w}x{h}" for w, h in VIDEO_SIZES], help="WxH sizes")
    p.add_argument("--images", nargs="*", default=[f"{w}x{h}" for w, h in IMAGE_SIZES], help="WxH sizes")
    p.add_argument("--work", type=Path, default=Path("/tmp/video_speed"))
    args = p.parse_args()
    sizes = {kind: [tuple(int(v) for v in s.split("x")) for s in getattr(args, kind + "s")] for kind in ("video", "image")}
    args.work.mkdir(parents=True, exist_ok=True)
    paths = write_inputs(args.work, args.frames, sizes["video"], sizes["image"])
    rows, record = [], {"machine": common.machine(), "frames": args.frames, "steps": args.steps,
                        "threads": args.threads, "cases": []}
    for (kind, width, height), path in sorted(paths.items(), key=lambda kv: (kv[0][0], kv[0][1] * kv[0][2])):
        out = args.work / f"out_{path.stem}{'.mp4' if kind == 'video' else '.png'}"
        case = {"kind": kind, "width": width, "height": height, **run_case(kind, path, out, args.steps, args.threads)}
        megapixels = width * height / 1e6
        case["s_per_unit"] = case["wall_s"] / (args.frames if kind == "video" else 1)
        case["s_per_megapixel_frame"] = case["s_per_unit"] / megapixels
        smallest = next(c for c in record["cases"] + [case] if c["kind"] == kind)
        case["cost_per_pixel_vs_smallest"] = round(case["s_per_megapixel_frame"] / smallest["s_per_megapixel_frame"], 2)
        record["cases"].append(case)
        rows.append([kind, f"{width}x{height}", case["wall_s"], round(case["s_per_unit"], 2),
                     case["cost_per_pixel_vs_smallest"], case["peak_rss_mib"], case["plan"]])
        print(common.table(["input", "size", "wall s", "s per frame", "cost per pixel vs smallest", "peak RSS MiB",
                            "plan"], rows[-1:]), flush=True)
    print(common.table(["input", "size", "wall s", "s per frame", "cost per pixel vs smallest", "peak RSS MiB",
                        "plan"], rows))
    print(f"wrote {common.write_json('video_speed', record)}")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
