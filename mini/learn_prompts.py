"""Miniature, stage 3: learn the restoration prompts (the method and its prompt-learning baselines) with train.py.

    python -m mini.learn_prompts --photos ../shared/data/photos --threads 1     # 6 x 4 runs + the all-in-one prompt

For every degradation (noise, blur, haze, rain, lowlight, snow) and method, one `train.py` run on the frozen
miniature with crops of the training photos degraded on the fly (`--synthetic`), all with the same settings
(`SETTINGS`); plus one all-in-one deep prompt ("all-deep") trained on the mixture of the six (each pair draws one),
and deep prompts for three pairs of degradations applied together (`PAIRS`, "haze+lowlight-deep": both on every
training pair), which the blind bank uses when its estimator sees exactly that pair:

    deep   --site deep                 the authors' deep prompt bank on the bridge (the method)
    text   --site text                 offsets on the text encoders' output, on the bridge (the abstract's form)
    naive  --site deep --path naive    the deep prompt trained on the model's own forward path from the degraded latent
    token  --site token                the text-token baseline: 15 input embeddings (one position is </s>) through
                                       the frozen tiny encoders
    deep-t0  --site deep --t0 T0[d]    the method at its degradation's own bridge T0 (`T0`), for the degradations
                                       whose best T0 is not the backbone's 0.4, blur+noise and the all-in-one
                                       (the mean of theirs): these are the shipped prompts

Every method but deep-t0 runs at the backbone's T0 0.4, so the table compares methods at one T0. `T0` was chosen
on validation crops of the TRAINING photos (four random 256 px crops, seed 777, the training degradations), in two
steps (mini/README.md): the T0 among 0.05 ... 0.6 at which the deep prompt trained at 0.4 restored best is the
candidate; the prompt retrained there is kept only if it beats the 0.4 prompt at 0.4 (haze's did not). Light
degradations lose less to the sampler's regenerated detail at a small T0 (noise 23.6 dB at 0.4 -> 26.0 retrained
at 0.1); low light wants more room (15.9 -> 16.4 at 0.5).

train.py reads one folder of images, so the photos (in sub-folders) are linked flat into mini/runs/photos/ first.
Runs go to mini/runs/{degradation}-{method}/ (git-ignored: log.jsonl, checkpoint). The learned prompts are copied
to mini/prompts/baselines/{degradation}-{method}.safetensors, and the deep-t0 ones (deep where there is none) also
to mini/prompts/{degradation}.safetensors (and the all-in-one to mini/prompts/all.safetensors): the shipped prompts.
Wall times go to mini/prompts/baselines/runs.json. A run whose prompt file already exists is skipped (--force
redoes it).
"""

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import defaults
from mini import images

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "mini"
PHOTOS = MINI / "runs" / "photos"  # the training photos linked flat (train.py reads one folder)
DEGRADATIONS = ("noise", "blur", "haze", "rain", "lowlight", "snow")
ALL = "all"  # the all-in-one prompt: trained on the mixture of DEGRADATIONS
PAIRS = ("haze+lowlight", "blur+noise", "haze+rain")  # deep prompts for two degradations at once (the bank's pairs)
METHODS = {  # method -> train.py flags that make it
    "deep": ["--site", "deep"],
    "text": ["--site", "text"],
    "naive": ["--site", "deep", "--path", "naive"],
    "token": ["--site", "token"],
    "deep-t0": ["--site", "deep"],  # + --t0 T0[degradation]
}
T0 = {"noise": 0.1, "blur": 0.05, "rain": 0.1, "lowlight": 0.5}  # deep-t0's; haze and snow keep 0.4
# A prompt for several degradations (a pair, the all-in-one) trains at the mean of theirs, the T0 that averaging
# their prompts' velocities samples at (restore.trained_t0), where that won on validation (mini/blind.py's
# validation crops): blur+noise 21.60 dB at 0.075 vs 20.74 at 0.4; haze+rain (14.87 at 0.25 vs 15.65) and
# haze+lowlight (14.42 at 0.45 vs 14.66) keep 0.4.
T0["blur+noise"] = round((T0["blur"] + T0["noise"]) / 2, 6)
T0[ALL] = round(sum(T0.get(d, defaults.T0) for d in DEGRADATIONS) / len(DEGRADATIONS), 6)
# One set of optimisation settings for every run (fairness), picked by the pilot described in mini/README.md.
SETTINGS = {"steps": 900, "batch": 4, "lr": 0.2}
PROMPT_LEN = 16  # the miniature's text length: a longer deep prompt would be cut to it
# The text-token baseline splices its vectors in before the end-of-text token, so one position fewer is free.
TOKEN_PROMPT_LEN = PROMPT_LEN - 1


def train_args(degradation: str, method: str, out: Path, settings: dict = SETTINGS) -> list[str]:
    """train.py's command line for one run ("all": the mixture of every degradation)."""
    return [
        "--backbone", "flux", "--weights", str(MINI), "--data", str(PHOTOS), "--synthetic",
        "--degradation", *(DEGRADATIONS if degradation == ALL else [degradation]),
        "--prompt-len", str(TOKEN_PROMPT_LEN if method == "token" else PROMPT_LEN), "--size", "128", "128", "--seed", "0",
        "--steps", str(settings["steps"]), "--batch", str(settings["batch"]), "--lr", str(settings["lr"]),
        "--save-every", str(settings["steps"]), "--log-every", "50", "--out", str(out), *METHODS[method],
        *(["--t0", str(T0[degradation])] if method == "deep-t0" else []),
    ]


def run_name(degradation: str, method: str, steps: int = SETTINGS["steps"]) -> str:
    """"haze-deep" for the table's runs; "haze-deep-1600" for a longer run (not shipped, not in the table)."""
    return f"{degradation}-{method}" + ("" if steps == SETTINGS["steps"] else f"-{steps}")


def baseline_path(degradation: str, method: str, steps: int = SETTINGS["steps"]) -> Path:
    return MINI / "prompts" / "baselines" / f"{run_name(degradation, method, steps)}.safetensors"


def shipped_method(degradation: str) -> str:
    """The method whose prompt is shipped as mini/prompts/{degradation}.safetensors."""
    return "deep-t0" if degradation in T0 else "deep"


def run(degradation: str, method: str, threads: int, steps: int) -> float:
    """One train.py run in a subprocess (OMP_NUM_THREADS = threads); copies its prompt; returns the wall time."""
    out = MINI / "runs" / run_name(degradation, method, steps)
    if out.exists():
        shutil.rmtree(out)  # a fresh run, not a resumed or appended one
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    args = train_args(degradation, method, out, {**SETTINGS, "steps": steps})
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, check=True)
    seconds = time.time() - start
    target = baseline_path(degradation, method, steps)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "prompt.safetensors", target)
    if shipped_method(degradation) == method and steps == SETTINGS["steps"]:
        (MINI / "prompts").mkdir(exist_ok=True)
        shutil.copyfile(out / "prompt.safetensors", MINI / "prompts" / f"{degradation}.safetensors")
    return seconds


def trained_by(method: str, chosen: list[str]) -> list[str]:
    """Which of the chosen degradations `method` trains: deep every one (singles, pairs, the all-in-one), deep-t0
    those with a T0 of their own (`T0`), the baselines the six singles."""
    if method == "deep":
        return chosen
    return [d for d in chosen if d in (T0 if method == "deep-t0" else DEGRADATIONS)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of training photographs (searched recursively)")
    p.add_argument("--degradation", nargs="+", choices=[*DEGRADATIONS, ALL, *PAIRS],
                   default=[*DEGRADATIONS, ALL, *PAIRS])
    p.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: %(default)s)")
    p.add_argument("--steps", type=int, default=SETTINGS["steps"],
                   help="training steps (default: %(default)s, the table's; other counts are kept apart as "
                   "baselines/{degradation}-{method}-{steps}.safetensors and never shipped)")
    p.add_argument("--force", action="store_true", help="redo runs whose prompt file exists")
    args = p.parse_args()
    link_photos(args.photos)

    for method in args.method:  # method by method: the method's prompts first
        for degradation in trained_by(method, args.degradation):
            name = run_name(degradation, method, args.steps)
            if baseline_path(degradation, method, args.steps).exists() and not args.force:
                print(f"{name}: exists, skipped")
                continue
            seconds = run(degradation, method, args.threads, args.steps)
            record_run(name, {"wall_s": round(seconds, 1), "threads": args.threads, **SETTINGS, "steps": args.steps,
                              **({"t0": T0[degradation]} if method == "deep-t0" else {})})
            print(f"{name}: {seconds / 60:.1f} min", flush=True)


def link_photos(folder: Path) -> None:
    """Link every training photo under `folder` into PHOTOS as <subfolder>_<name> (links already there are kept:
    several recipes may run side by side)."""
    PHOTOS.mkdir(parents=True, exist_ok=True)
    for path in images.photo_paths(folder):
        link = PHOTOS / f"{path.parent.name}_{path.name}"
        if not link.is_symlink():
            link.symlink_to(path.resolve())


def record_run(name: str, entry: dict) -> None:
    """Add one run's entry to mini/prompts/baselines/runs.json (locked: several recipes may run side by side)."""
    path = MINI / "prompts" / "baselines" / "runs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (MINI / "runs").mkdir(exist_ok=True)
    with open(MINI / "runs" / "runs.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(path.read_text()) if path.exists() else {}
        record[name] = entry
        path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
