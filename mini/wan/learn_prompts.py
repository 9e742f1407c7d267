"""Video miniature, stage 3: the video restoration prompts, learned with train.py on the frozen video miniature.

    python -m mini.wan.learn_prompts --video ../shared/data/video --photos ../shared/data/photos --threads 1

For each degradation (rain, haze, lowlight, snow, blur, noise; in that order) one deep prompt (the method: the
bridge, the prompt bank in every block) and one all-in-one deep prompt ("all", trained on the mixture of the six:
each pair draws one), all with the same settings (SETTINGS), each one train.py run:

    train.py --backbone wan --weights mini/wan --synthetic --data <clips> --degradation D --frames 9 --size 64 64 ...

The clean training clips (train.py --synthetic reads one folder of videos) are written first to
<runs>/clips (--runs, default <out>/runs; never committed): the real training footage at the pre-training scale
(mini.wan.clips.load_footage: the held-out clip is never among them) and MOTION_CLIPS camera moves over the
training photos, as mp4 files. Prompts go to <out>/prompts/<D>.safetensors (the all-in-one to all.safetensors),
wall times to <out>/prompts/runs.json. A prompt that exists is skipped (--force redoes it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import backbone
import media
from mini import images
from mini.wan import clips

ROOT = Path(__file__).resolve().parent.parent.parent
FOLDER = backbone.BACKBONES["mini-wan"].folder

DEGRADATIONS = ("rain", "haze", "lowlight", "snow", "blur", "noise")
ALL = "all"
SETTINGS = {"steps": 500, "batch": 4, "lr": 0.2, "frames": 9, "size": 64}  # lr: the image pilot (mini/README.md)
PROMPT_LEN = 16  # the miniature's context length
MOTION_CLIPS = 48  # camera moves over photos, 25 frames at 96 px each


def write_clips(video: Path, photos: Path, folder: Path, seed: int = 0) -> None:
    """The clean clips train.py reads (see the module docstring); written once (a complete folder is kept)."""
    done = folder / "complete"
    if done.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, frames in clips.load_footage(video).items():
        media.write_video(folder / name, frames.float().div(255).transpose(0, 1), 16)
    generator = torch.Generator().manual_seed(seed)
    pool = images.load_photos(photos)
    for index in range(MOTION_CLIPS):
        clip = clips.motion_clip(pool, 25, 96, generator, (1.0, 2.0))
        media.write_video(folder / f"motion_{index:03d}.mp4", clip, 16)
    done.write_text("ok\n")


def train_argv(degradation: str, weights: Path, clip_folder: Path, out: Path) -> list[str]:
    """train.py's command line for one run ("all": the mixture of every degradation)."""
    s = SETTINGS
    return [
        "--backbone", "mini-wan", "--weights", str(weights), "--data", str(clip_folder), "--synthetic",
        "--degradation", *(DEGRADATIONS if degradation == ALL else [degradation]),
        "--frames", str(s["frames"]), "--size", str(s["size"]), str(s["size"]), "--prompt-len", str(PROMPT_LEN),
        "--site", "deep", "--seed", "0", "--steps", str(s["steps"]), "--batch", str(s["batch"]), "--lr", str(s["lr"]),
        "--save-every", "50", "--log-every", "25", "--out", str(out),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, required=True, help="the video/ folder (the held-out clip is skipped)")
    p.add_argument("--photos", type=Path, required=True, help="folder of training photographs")
    p.add_argument("--out", type=Path, default=FOLDER, help="the video miniature (default: %(default)s)")
    p.add_argument("--runs", type=Path, help="run folders and the clean clips (default: <out>/runs)")
    p.add_argument("--degradation", nargs="+", choices=[ALL, *DEGRADATIONS], default=[ALL, *DEGRADATIONS])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    runs = args.runs or args.out / "runs"
    write_clips(args.video, args.photos, runs / "clips")
    (args.out / "prompts").mkdir(parents=True, exist_ok=True)
    record_file = args.out / "prompts" / "runs.json"
    for degradation in args.degradation:
        target = args.out / "prompts" / f"{degradation}.safetensors"
        if target.is_file() and not args.force:
            print(f"{degradation}: exists, skipped")
            continue
        out = runs / degradation
        resume = (out / "checkpoint.safetensors").is_file()
        start = time.time()
        argv = train_argv(degradation, args.out, runs / "clips", out) + (["--resume"] if resume else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, check=True)
        seconds = time.time() - start
        shutil.copyfile(out / "prompt.safetensors", target)
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        record[degradation] = {"wall_s": round(seconds, 1), "threads": args.threads, "resumed": resume, **SETTINGS}
        record_file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{degradation}: {seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
