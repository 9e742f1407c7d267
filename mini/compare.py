"""Miniature, stage 2c: the comparison table, the picture grid and the example image.

    python -m mini.compare --threads 1        # after mini.learn_prompts and mini.restoration_net

Evaluation sets: each of the four held-out crops (mini/heldout/, never trained on) degraded by
`data.DEGRADATIONS[D]` with its own fixed generator seed (`EVAL_SEEDS`), for D in noise, blur, haze, lowlight,
written as PNGs to mini/runs/eval/ (git-ignored) with manifests in the authors' format
(`{"image_path", "target_path", "degradation", "dataset"}`, dataset = D): one per degradation and `all.json`.

Rows (`ROWS`), each measured as PSNR and SSIM in RGB against the clean crop, per image, then averaged per
degradation. The sampled rows are restored and measured as `sample.py --eval` does it (restore.evaluate) with the
default settings (defaults.py: T0 0.4, 20 steps, t_min 1e-4, seed 0); the ceiling and the restoration net do not
sample:

    input     the degraded input itself (sample.py's input_* columns)
    ceiling   the CLEAN crop's autoencoder round trip: no restoration through this autoencoder can do better
    empty     the frozen model on the bridge with no prompt (`--no-prompt`)
    naive     the deep prompt learned on the naive path (`--path naive`)
    deep      the deep prompt learned on the bridge (the method)
    text      the text-output prompt learned on the bridge
    token     the text-token baseline
    net       a plain residual CNN with as many trainable parameters as a deep prompt, trained directly in pixels
    default   what `python sample.py --image x.png` does: all four shipped deep prompts, velocities averaged

Beside the table: the prompts trained 4x longer, where `mini.learn_prompts --steps 1600` made them
(`longer_rows`), and how far the text stream moves the model's velocity (`text_leverage`).

Writes mini/results.json (settings, per-image and mean figures), mini/RESULTS.md (the tables), mini/grid.png
(rows: degradations; columns: input, every method, the clean crop) and mini/example.png (the degraded crop on
which the default restoration gains the most over its input).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

import backbone
import data
import defaults
import media
import restore
import weights
from mini import images
from mini.learn_prompts import DEGRADATIONS, MINI, SETTINGS, baseline_path
from mini.restoration_net import load_net
from prompts import load_prompt

EVAL_SEEDS = {"chelsea": 100, "coffee": 101, "flower": 102, "kodim23": 103}  # generator seed of each crop's degradation
ROWS = {
    "input": "degraded input",
    "ceiling": "clean crop's AE round trip (ceiling)",
    "empty": "bridge, empty prompt (`--no-prompt`)",
    "naive": "naive prompt learning (deep prompt, naive path)",
    "deep": "**bridge deep prompt** (the method)",
    "text": "bridge text-output prompt",
    "token": "text-token optimisation",
    "net": "restoration CNN, same parameter count",
    "default": "embedded default (4 deep prompts averaged)",
}
GRID_ROWS = {"noise": "chelsea", "blur": "coffee", "haze": "flower", "lowlight": "kodim23"}
GRID_TILE = 128  # pixels per grid cell (the 256 px crops halved)


# ---------------------------------------------------------------------------------------------- evaluation sets


def degraded_crop(degradation: str, name: str) -> Tensor:
    """The held-out crop `name` degraded by `degradation` exactly as the evaluation set stores it: [3, 256, 256],
    clamped and rounded to 8 bits (the values of its PNG)."""
    clean = images.heldout_crops()[name]
    degraded = data.DEGRADATIONS[degradation](clean, torch.Generator().manual_seed(EVAL_SEEDS[name]))
    return degraded.clamp(0, 1).mul(255).round().div(255)


def eval_name(degradation: str, name: str) -> str:
    return f"{degradation}-{name}.png"


def build_eval_sets(folder: Path, degradations: tuple[str, ...] = DEGRADATIONS) -> dict[str, Path]:
    """Write the degraded crops and the manifests into `folder`; returns {degradation or "all": manifest path}."""
    folder.mkdir(parents=True, exist_ok=True)
    manifests, everything = {}, []
    for degradation in degradations:
        entries = []
        for name in images.HELDOUT:
            path = folder / eval_name(degradation, name)
            media.write_image(path, degraded_crop(degradation, name))
            entries.append({"image_path": str(path.resolve()), "target_path": str((MINI / "heldout" / f"{name}.png").resolve()),
                            "degradation": degradation, "dataset": degradation})
        manifests[degradation] = folder / f"{degradation}.json"
        manifests[degradation].write_text(json.dumps(entries, indent=1) + "\n")
        everything += entries
    manifests["all"] = folder / "all.json"
    manifests["all"].write_text(json.dumps(everything, indent=1) + "\n")
    return manifests


# ---------------------------------------------------------------------------------------------- measuring


def run_sample(bb: backbone.Backbone, manifest: Path, out: Path, prompts: list[str] | None = None) -> list[dict]:
    """What `sample.py --eval MANIFEST [--prompt P ...] --save-images -o out` computes (restore.evaluate, the
    default sampler settings): the per-image rows; the restored images go to out/images. `prompts` None: the
    miniature's default (all shipped prompts, velocities averaged); []: no prompt (`--no-prompt`)."""
    files = restore.prompt_files(prompts or [], bb.spec, bb.folder, none=prompts == [])
    velocity = restore.velocity_for(bb, [prompt for prompt, _ in restore.load_prompts(files, bb)])
    return restore.evaluate(bb, velocity, restore.evaluation_items(manifest), restore.RestoreOptions(),
                            images=out / "images")


def score(restored: Tensor, clean: Tensor) -> dict[str, float]:
    """PSNR and SSIM in RGB (restore.measure, no resize)."""
    row = restore.measure(restored, clean)
    return {"psnr": row["psnr"], "ssim": row["ssim"]}


def sampled_rows(manifests: dict[str, Path], out: Path) -> dict[str, dict[str, list[dict]]]:
    """{row: {degradation: [per-image {name, psnr, ssim}]}} for the rows that sample, plus "input"."""
    bb = backbone.load_miniature(MINI)
    results: dict[str, dict[str, list[dict]]] = {}

    def keep(row: str, items: list[dict]) -> None:
        for item in items:
            results.setdefault(row, {}).setdefault(item["degradation"], []).append(
                {"image": item["name"], "psnr": item["psnr"], "ssim": item["ssim"]})

    items = run_sample(bb, manifests["all"], out / "empty", prompts=[])
    keep("empty", items)
    keep("input", [{**item, "psnr": item["input_psnr"], "ssim": item["input_ssim"]} for item in items])
    keep("default", run_sample(bb, manifests["all"], out / "default"))
    for method in ("naive", "deep", "text", "token"):
        for degradation in DEGRADATIONS:
            prompt = baseline_path(degradation, method)
            keep(method, run_sample(bb, manifests[degradation], out / method / degradation, [str(prompt)]))
    return results


@torch.no_grad()
def direct_rows(eval_folder: Path, out: Path) -> dict[str, dict[str, list[dict]]]:
    """The rows that do not sample: the clean crops' autoencoder round trip and the restoration CNN."""
    bb = backbone.load_miniature(MINI)
    clean = images.heldout_crops()
    results: dict[str, dict[str, list[dict]]] = {"ceiling": {}, "net": {}}
    round_trips = {name: ((bb.decode(bb.encode(image[None] * 2 - 1))[0] + 1) / 2).clamp(0, 1)
                   for name, image in clean.items()}
    for degradation in DEGRADATIONS:
        net = load_net(baseline_path(degradation, "net"))
        results["ceiling"][degradation] = [{"image": f"{name}.png", **score(round_trips[name], clean[name])}
                                           for name in clean]
        results["net"][degradation] = []
        for name in clean:
            degraded = media.read_image(eval_folder / eval_name(degradation, name))
            restored = net(degraded[None])[0].clamp(0, 1)
            media.write_image(out / "net" / "images" / eval_name(degradation, name), restored)
            results["net"][degradation].append({"image": eval_name(degradation, name), **score(restored, clean[name])})
    for name, image in round_trips.items():
        media.write_image(out / "ceiling" / "images" / f"{name}.png", image)
    return results


def means(per_image: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {degradation: {"psnr": mean, "ssim": mean}}} over the images."""
    return {row: {d: {m: sum(i[m] for i in items) / len(items) for m in ("psnr", "ssim")}
                  for d, items in by_degradation.items()}
            for row, by_degradation in per_image.items()}


LONGER = {"steps": 1600, "degradations": ("haze", "lowlight"), "methods": ("deep", "naive")}  # 4x the table's runs


def longer_rows(manifests: dict[str, Path], out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Mean PSNR/SSIM of the prompts trained 4x longer (`python -m mini.learn_prompts --steps 1600 ...`), where
    they exist: {"deep-1600": {degradation: {"psnr", "ssim"}}}. Not in the main table: only the two
    degradations with room above the input, and only the method and the baseline that the table puts on top."""
    bb = backbone.load_miniature(MINI)
    rows: dict[str, dict[str, list[dict]]] = {}
    for method in LONGER["methods"]:
        for degradation in LONGER["degradations"]:
            prompt = baseline_path(degradation, method, LONGER["steps"])
            if prompt.exists():
                items = run_sample(bb, manifests[degradation], out / f"{method}-{LONGER['steps']}" / degradation,
                                   [str(prompt)])
                rows.setdefault(f"{method}-{LONGER['steps']}", {})[degradation] = items
    return means(rows)


@torch.no_grad()
def text_leverage(folder: Path = MINI, prompt_files: dict[str, Path] | None = None,
                  t: float = defaults.T0) -> dict[str, dict[str, float]]:
    """How far the text stream can move the miniature's velocity, at the bridge's start X_T0 = (1 - T0) Y + T0 eps
    of each degraded held-out latent Y (T0 = t, one seeded eps), as norms relative to the empty-prompt velocity v:

        needed       |v* - v| / |v|, v* = (X_t - X0) / t the velocity whose x0 estimate is the clean latent X0
        random_text  |v(random text tokens of the same std) - v| / |v|
        deep_prompt  |v(shipped deep prompt) - v| / |v|
        gap_closed   1 - |v* - v(prompt)| / |v* - v|: the fraction of the needed correction the prompt makes

    means over the 4 held-out crops, per degradation of `prompt_files` ({degradation: deep prompt file}, by
    default the shipped ones); `folder` holds the miniature."""
    prompt_files = prompt_files or {d: MINI / "prompts" / f"{d}.safetensors" for d in DEGRADATIONS}
    bb = backbone.load_miniature(folder)
    empty_txt = bb.txt
    generator = torch.Generator().manual_seed(0)
    clean = images.heldout_crops()
    times = torch.tensor([t])
    figures = {}
    for degradation, prompt_file in prompt_files.items():
        prompt = bb.attach(load_prompt(prompt_file, backbone="flux")[0].eval())
        rows = []
        for name in images.HELDOUT:
            x0 = bb.encode(clean[name][None] * 2 - 1)
            y = bb.encode(degraded_crop(degradation, name)[None] * 2 - 1)
            x_t = (1 - t) * y + t * torch.randn(y.shape, generator=generator)
            v, v_prompt, v_star = bb.velocity(x_t, times), bb.velocity(x_t, times, prompt), (x_t - x0) / t
            v_random = bb.velocity(x_t, times, txt=torch.randn(empty_txt.shape, generator=generator) * empty_txt.std())
            rows.append({"needed": (v_star - v).norm() / v.norm(), "random_text": (v_random - v).norm() / v.norm(),
                         "deep_prompt": (v_prompt - v).norm() / v.norm(),
                         "gap_closed": 1 - (v_star - v_prompt).norm() / (v_star - v).norm()})
        figures[degradation] = {key: sum(row[key].item() for row in rows) / len(rows) for key in rows[0]}
    return figures


# ---------------------------------------------------------------------------------------------- outputs


def markdown(summary: dict) -> str:
    """Two tables (PSNR dB, SSIM) with a row per method and a column per degradation plus their mean."""
    lines = []
    for metric, unit, digits in (("psnr", "PSNR (dB, RGB)", 2), ("ssim", "SSIM (RGB)", 3)):
        lines += [f"| {unit} | " + " | ".join(DEGRADATIONS) + " | mean |", "| --- |" + " ---: |" * (len(DEGRADATIONS) + 1)]
        for row, label in ROWS.items():
            values = [summary[row][d][metric] for d in DEGRADATIONS]
            cells = [f"{v:.{digits}f}" for v in values + [sum(values) / len(values)]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def longer_markdown(summary: dict, longer: dict) -> str:
    """PSNR of the 400-step and the 1600-step prompts side by side, for the degradations trained longer."""
    if not longer:
        return ""
    steps = LONGER["steps"]
    lines = ["| PSNR (dB), prompt training steps | " + " | ".join(f"{d} 400 | {d} {steps}" for d in LONGER["degradations"])
             + " |", "| --- |" + " ---: |" * (2 * len(LONGER["degradations"]))]
    for method in LONGER["methods"]:
        trained_longer = longer.get(f"{method}-{steps}", {})
        cells = [f"{summary[method][d]['psnr']:.2f} | "
                 + (f"{trained_longer[d]['psnr']:.2f}" if d in trained_longer else "-") for d in LONGER["degradations"]]
        lines.append(f"| {ROWS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def leverage_markdown(leverage: dict) -> str:
    """The text_leverage figures as a table, one row per degradation."""
    keys = ("needed", "random_text", "deep_prompt", "gap_closed")
    lines = ["| at X_T0, relative to the empty-prompt velocity | " + " | ".join(keys) + " |",
             "| --- |" + " ---: |" * len(keys)]
    lines += [f"| {d} | " + " | ".join(f"{leverage[d][k]:.3f}" for k in keys) + " |" for d in DEGRADATIONS]
    return "\n".join(lines) + "\n"


def grid_cell(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((GRID_TILE, GRID_TILE), Image.Resampling.LANCZOS)


def write_grid(target: Path, eval_folder: Path, out: Path) -> list[str]:
    """mini/grid.png: one row per degradation (one held-out crop each), columns input | each method | clean, under
    a header row of column names; returns the column names."""
    columns = ["input", "ceiling", "empty", "naive", "deep", "text", "token", "net", "default", "clean"]
    header = 18
    canvas = Image.new("RGB", (GRID_TILE * len(columns), header + GRID_TILE * len(GRID_ROWS)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((GRID_TILE * c + 4, 3), column if column != "ceiling" else "AE(clean)", fill="black")
    for r, (degradation, name) in enumerate(GRID_ROWS.items()):
        file = eval_name(degradation, name)
        for c, column in enumerate(columns):
            if column == "input":
                path = eval_folder / file
            elif column == "clean":
                path = MINI / "heldout" / f"{name}.png"
            elif column == "ceiling":
                path = out / "ceiling" / "images" / f"{name}.png"
            elif column in ("empty", "default", "net"):
                path = out / column / "images" / file
            else:
                path = out / column / degradation / "images" / file
            canvas.paste(grid_cell(path), (GRID_TILE * c, header + GRID_TILE * r))
        draw.text((4, header + GRID_TILE * r + 3), degradation, fill="white", stroke_width=2, stroke_fill="black")
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(target, optimize=True)
    return columns


def pick_example(per_image: dict, eval_folder: Path) -> dict:
    """The (degradation, image) where the default restoration gains the most PSNR over its degraded input, among
    the degradations whose mean gain is largest; copied to mini/example.png."""
    gains = {d: [(out["psnr"] - inp["psnr"], out["image"]) for out, inp in zip(per_image["default"][d], per_image["input"][d])]
             for d in DEGRADATIONS}
    degradation = max(DEGRADATIONS, key=lambda d: sum(g for g, _ in gains[d]) / len(gains[d]))
    gain, file = max(gains[degradation])
    shutil.copyfile(eval_folder / file, MINI / "example.png")
    name = file.removesuffix(".png").removeprefix(f"{degradation}-")
    psnr_input = next(i["psnr"] for i in per_image["input"][degradation] if i["image"] == file)
    return {"degradation": degradation, "image": name, "seed": EVAL_SEEDS[name], "psnr_input": psnr_input,
            "psnr_default": psnr_input + gain, "gain_db": gain}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=MINI / "runs", help="git-ignored working folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    eval_folder, out = args.work / "eval", args.work / "compare"
    manifests = build_eval_sets(eval_folder)
    per_image = {**sampled_rows(manifests, out), **direct_rows(eval_folder, out)}
    per_image = {row: per_image[row] for row in ROWS}
    summary = means(per_image)
    longer = longer_rows(manifests, out)
    leverage = text_leverage()
    columns = write_grid(MINI / "grid.png", eval_folder, out)
    example = pick_example(per_image, eval_folder)
    seconds = time.time() - start
    result = {
        "protocol": {"sampler": {"t0": defaults.T0, "steps": defaults.STEPS, "t_min": defaults.T_MIN,
                                 "seed": defaults.SEED}, "metrics": "PSNR, SSIM on RGB "
                     "8-bit levels (metrics.py), 256 x 256 crops, no resize", "eval_seeds": EVAL_SEEDS,
                     "prompt_training": SETTINGS, "threads": args.threads},
        "rows": ROWS, "mean": summary, "per_image": per_image, "grid_columns": columns, "grid_rows": GRID_ROWS,
        "longer_training": {"settings": LONGER, "mean": longer}, "text_leverage": leverage,
        "example": example, "wall_s": round(seconds, 1),
    }
    with weights.atomic_file(MINI / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(summary) + "\n" + longer_markdown(summary, longer) + leverage_markdown(leverage)
    with weights.atomic_file(MINI / "RESULTS.md") as tmp:
        tmp.write_text("# The miniature: restoration on the held-out crops\n\nWritten by `python -m mini.compare`; "
                       "means over the 4 held-out crops per degradation (per-image figures in `results.json`).\n\n"
                       + table)
    print(table)
    print(f"example: {example}\nwall time {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
