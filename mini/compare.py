"""Miniature, stage 4: the comparison table, the picture grid and the README's example image.

    python -m mini.compare --eval ../shared/data/eval --threads 1        # after mini.learn_prompts

Evaluation sets (never trained on; every degradation drawn from its own fixed seed, stored as 8-bit values):
    kodak     the first EVAL_COUNT (2) Kodak24 256 x 256 centre crops, each degraded by blur, haze, rain, lowlight and snow
              of `data.DEGRADATIONS` (the training family's settings)
    cbsd68    the first EVAL_COUNT CBSD68 256 x 256 centre crops with white Gaussian noise at sigma 15, 25 and 50
              (the usual denoising benchmark levels), the "noise" column
    unseen    the four mini/heldout/ crops degraded six ways with settings of our own (`mini/unseen.py`)

Rows (`ROWS`), PSNR and SSIM in RGB against the clean crop (restore.measure) and the block texture
(metrics.block_texture), means per column; every sampled row
uses the default sampler (20 steps, t_min 1e-4, seed 0) at the T0 its prompt was trained at, as sample.py does:
0.4 (the backbone's) for every baseline, deep04 and the all-in-one prompt; each degradation's own for deep
(mini/learn_prompts.py T0); the chosen prompts' for auto; the column's deep prompt's for empty and text:

    input     the degraded input itself
    ceiling   the clean crop's autoencoder round trip: no latent method can do better
    empty     the frozen model on the bridge with no prompt
    text      text prompting: the caption "clean" instead of the empty prompt
    naive     the deep prompt learned on the naive path, for the column's degradation
    textsite  offsets on the text encoders' output (`--site text`), learned on the bridge, for the column's degradation
    token     the text-token baseline (`--site token`): input vectors through the frozen tiny encoders, on the bridge
    deep04    the deep prompt learned on the bridge (the method) at T0 0.4, for the column's degradation (the oracle
              choice): the method at the baselines' T0
    deep      the shipped deep prompt of the column's degradation, learned at that degradation's T0
    all       the all-in-one deep prompt, trained on the mixture of the six
    auto      `--prompt auto`: the shipped bank's estimator chooses and weights the six deep prompts per input
    restorer  the reference: a small U-Net trained from scratch on the same pairs for one prompt run's wall time
              (mini/restorer.py; pixels in, pixels out, no frozen prior)
    uniform   all six deep prompts, velocities averaged (six model evaluations a step: Kodak24/CBSD68 only)

Writes mini/results.json, mini/RESULTS.md, mini/grid.png, mini/example.png and the README's first picture,
docs/mini_example.png (one held-out photo per degradation of our own settings: input | default | clean).
"""

import argparse
import dataclasses
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
import metrics
import restore
import weights
from mini import images, restorer
from mini.learn_prompts import ALL, DEGRADATIONS, MINI, ROOT, baseline_path
from mini.unseen import UNSEEN

EVAL_COUNT = 2  # images per Kodak24 / CBSD68 column (CPU time: every row samples every image)
NOISE_SIGMAS = (15, 25, 50)
ROWS = {
    "input": "degraded input",
    "ceiling": "clean crop's AE round trip (ceiling)",
    "empty": "bridge, empty prompt",
    "text": "text prompting (`--text clean`)",
    "naive": "naive prompt learning (deep prompt, naive path)",
    "textsite": "bridge, text-output site (`--site text`)",
    "token": "text-token optimisation (`--site token`)",
    "deep04": "bridge deep prompt at T0 0.4, named degradation (the method at the baselines' T0)",
    "deep": "**bridge deep prompt**, named degradation (the method, at its degradation's T0)",
    "all": "all-in-one deep prompt (no name needed)",
    "auto": "`--prompt auto` (no name needed)",
    "restorer": "reference: small U-Net trained on the pairs, one prompt run's compute",
    "uniform": "six deep prompts averaged (no name needed)",
}
GRID_TILE = 128
METRICS = ("psnr", "ssim", "block")  # block: metrics.block_texture on the 8-pixel token grid (0: none added)
BANK = MINI / "prompts" / "bank.safetensors"  # --prompt auto's bank (estimator.py bank)


# ---------------------------------------------------------------------------------------------- evaluation sets


def quantise(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def eval_items(eval_folder: Path) -> list[dict]:
    """Every (degraded, clean) item: {"set", "column", "name", "degraded" [3, 256, 256], "clean"}."""
    items = []
    kodak = list(images.eval_crops(eval_folder, ("kodak24",)).items())[:EVAL_COUNT]
    for d_index, degradation in enumerate(d for d in DEGRADATIONS if d != "noise"):
        for i, (name, clean) in enumerate(kodak):
            generator = torch.Generator().manual_seed(defaults.mix_seed(1000 + d_index, i))
            items.append({"set": "kodak", "column": degradation, "name": name, "clean": clean,
                          "degraded": quantise(data.DEGRADATIONS[degradation](clean, generator))})
    cbsd = list(images.eval_crops(eval_folder, ("cbsd68",)).items())[:EVAL_COUNT]
    for sigma in NOISE_SIGMAS:
        for i, (name, clean) in enumerate(cbsd):
            generator = torch.Generator().manual_seed(defaults.mix_seed(2000 + sigma, i))
            noisy = clean + sigma / 255 * torch.randn(clean.shape, generator=generator)
            items.append({"set": "cbsd68", "column": f"noise{sigma}", "name": name, "clean": clean,
                          "degraded": quantise(noisy)})
    return items + eval_items_unseen()


def eval_items_unseen() -> list[dict]:
    """The "unseen" set alone: the committed held-out crops with our own degradation settings."""
    items = []
    for d_index, degradation in enumerate(DEGRADATIONS):
        for i, (name, clean) in enumerate(images.heldout_crops().items()):
            generator = torch.Generator().manual_seed(defaults.mix_seed(3000 + d_index, i))
            items.append({"set": "unseen", "column": f"unseen-{degradation}", "name": name, "clean": clean,
                          "degraded": quantise(UNSEEN[degradation](clean, generator))})
    return items


def degradation_of(column: str) -> str:
    """The degradation a column's named prompt is for ("noise25" -> noise, "unseen-haze" -> haze)."""
    return "noise" if column.startswith("noise") else column.removeprefix("unseen-")


# ---------------------------------------------------------------------------------------------- measuring


def velocities(bb: backbone.Backbone) -> dict[str, object]:
    """Row -> (velocity function, T0), or row -> {degradation: (velocity, T0)} for the rows that name the
    degradation; "auto" -> a function of the degraded input. Each prompt is sampled at the T0 it was trained at
    (restore.trained_t0); T0 None (empty, text): the column's shipped deep prompt's, so that each column compares
    the prompts with the frozen model at one T0."""
    def prompt(path: Path):
        return restore.load_prompts([path], bb)[0]

    deep = {d: prompt(MINI / "prompts" / f"{d}.safetensors") for d in DEGRADATIONS}
    rows = {"empty": (restore.velocity_for(bb), None),
            "text": (restore.velocity_for(bb, conditioning=restore.text_conditioning(bb, "clean")), None),
            "deep": {d: (restore.velocity_for(bb, [p]), restore.trained_t0([meta])) for d, (p, meta) in deep.items()},
            "uniform": (restore.velocity_for(bb, [p for p, _ in deep.values()]),
                        restore.trained_t0([meta for _, meta in deep.values()]))}
    if (MINI / "prompts" / f"{ALL}.safetensors").exists():
        module, meta = prompt(MINI / "prompts" / f"{ALL}.safetensors")
        rows["all"] = (restore.velocity_for(bb, [module]), restore.trained_t0([meta]))
    for method, row in (("deep", "deep04"), ("naive", "naive"), ("text", "textsite"), ("token", "token")):
        trained = {d: prompt(baseline_path(d, method)) for d in DEGRADATIONS if baseline_path(d, method).exists()}
        if trained:  # (the degradations whose baseline prompt was trained)
            rows[row] = {d: (restore.velocity_for(bb, [p]), restore.trained_t0([meta]))
                         for d, (p, meta) in trained.items()}
    if BANK.exists():
        bank = restore.load_bank(BANK, bb)

        def auto(degraded: Tensor, options: restore.RestoreOptions):  # one decision per input, at its prompts' T0
            velocity, decided = restore.blind_velocity(bb, bank, degraded)
            return velocity, restore.decided_options(bank, decided, options)
        rows["auto"] = auto
    return rows


@torch.no_grad()
def measure_rows(bb: backbone.Backbone, items: list[dict], rows: list[str], out: Path) -> list[dict]:
    """One record per (row, item): {"row", "set", "column", "name", "psnr", "ssim", "t0"}; restored images to out/."""
    options = restore.RestoreOptions(t0=bb.spec.t0, prompt_t0=True)
    chosen = velocities(bb)
    reference = restorer.load() if restorer.TARGET.exists() else None
    records = []
    start = time.time()
    for row in rows:
        for k, item in enumerate(items):
            t0 = None
            if row == "input":
                result = item["degraded"]
            elif row == "ceiling":
                result = ((bb.decode(bb.encode(item["clean"][None] * 2 - 1))[0] + 1) / 2).clamp(0, 1)
            elif row == "restorer":
                if not restorer.TARGET.exists():
                    continue
                result = restorer.restore(reference, item["degraded"])
            elif row not in chosen or (row == "uniform" and item["set"] == "unseen"):
                continue  # (uniform costs six model evaluations a step: measured on the training family only)
            else:
                if row == "auto":
                    velocity, run = chosen[row](item["degraded"], options)
                else:
                    entry = chosen[row]
                    if isinstance(entry, dict):
                        if degradation_of(item["column"]) not in entry:
                            continue
                        entry = entry[degradation_of(item["column"])]
                    velocity, t0 = entry
                    t0 = t0 or chosen["deep"][degradation_of(item["column"])][1] or bb.spec.t0
                    run = dataclasses.replace(options, t0=t0)
                t0 = run.t0
                result = restore.restore_image(bb, velocity, item["degraded"], run)
            scores = restore.measure(result, item["clean"])
            records.append({"row": row, "set": item["set"], "column": item["column"], "name": item["name"],
                            "psnr": scores["psnr"], "ssim": scores["ssim"],
                            "block": metrics.block_texture(result, item["clean"]), "t0": t0})
            if row not in ("input", "ceiling"):
                media.write_image(out / row / f"{item['column']}-{Path(item['name']).name}.png", result)
        print(f"{row}: done, {(time.time() - start) / 60:.1f} min", flush=True)
    return records


def summarise(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {column: {"psnr", "ssim"}}} means over each column's images."""
    table: dict = {}
    for r in records:
        table.setdefault(r["row"], {}).setdefault(r["column"], []).append(r)
    return {row: {c: {m: round(sum(x[m] for x in v) / len(v), 2 if m == "psnr" else 4) for m in METRICS}
                  for c, v in cols.items()} for row, cols in table.items()}


def markdown(summary: dict, columns: list[str], metric: str = "psnr") -> str:
    name = {"psnr": "PSNR", "ssim": "SSIM", "block": "block texture"}[metric]
    lines = [f"| {name} | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for row, label in ROWS.items():
        if row in summary:
            digits = 2 if metric == "psnr" else 3
            lines.append(f"| {label} | " + " | ".join(f"{summary[row][c][metric]:.{digits}f}" if c in summary[row]
                                                   else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def default_table(summary: dict, columns: list[str], default: str) -> str:
    """The README's table: per column, the degraded input against the default (PSNR dB, SSIM, block texture)."""
    lines = ["| | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for metric, digits in (("psnr", 2), ("ssim", 3), ("block", 3)):
        name = {"psnr": "PSNR", "ssim": "SSIM", "block": "block texture"}[metric]
        cells = [f"{summary['input'][c][metric]:.{digits}f} -> **{summary[default][c][metric]:.{digits}f}**"
                 for c in columns]
        lines.append(f"| {name}, input -> default | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_grid(target: Path, items: list[dict], out: Path, rows: list[str]) -> None:
    """One row per Kodak/CBSD column (its first image): input | each sampled row | clean."""
    firsts = {}
    for item in items:
        if item["set"] != "unseen":
            firsts.setdefault(item["column"], item)
    columns = ["input", *[r for r in rows if r not in ("input", "ceiling") and (out / r).exists()], "clean"]
    header = 18
    canvas = Image.new("RGB", (GRID_TILE * len(columns), header + GRID_TILE * len(firsts)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((GRID_TILE * c + 4, 3), column, fill="black")
    for r, (column, item) in enumerate(firsts.items()):
        for c, name in enumerate(columns):
            if name in ("input", "clean"):
                pixels = item["degraded" if name == "input" else "clean"]
                cell = Image.fromarray(pixels.mul(255).round().byte().permute(1, 2, 0).numpy())
            elif (out / name / f"{column}-{Path(item['name']).name}.png").exists():
                cell = Image.open(out / name / f"{column}-{Path(item['name']).name}.png").convert("RGB")
            else:  # a row not measured on this column (e.g. a naive prompt that was not trained)
                cell = Image.new("RGB", (GRID_TILE, GRID_TILE), "lightgray")
            canvas.paste(cell.resize((GRID_TILE, GRID_TILE), Image.Resampling.LANCZOS), (GRID_TILE * c, header + GRID_TILE * r))
        draw.text((4, header + GRID_TILE * r + 3), column, fill="white", stroke_width=2, stroke_fill="black")
    canvas.save(target, optimize=True)


def write_first_picture(target: Path, items: list[dict], out: Path, row: str) -> None:
    """The README's first picture: one held-out photo per degradation of our own settings (degradation i on
    mini/heldout/'s photo i mod 4, fixed in advance: not the best case), input | `row` (the default) | clean."""
    chosen = [next(i for i in items if i["column"] == f"unseen-{d}" and i["name"] == images.HELDOUT[k % 4])
              for k, d in enumerate(DEGRADATIONS)]
    header, labels = 18, ("input", f"default ({row})", "clean")
    canvas = Image.new("RGB", (GRID_TILE * 2 * 3, header + GRID_TILE * 2 * len(chosen)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((GRID_TILE * 2 * c + 4, 3), label, fill="black")
    for r, item in enumerate(chosen):
        cells = [item["degraded"], None, item["clean"]]
        for c, pixels in enumerate(cells):
            if pixels is None:
                cell = Image.open(out / row / f"{item['column']}-{item['name']}.png").convert("RGB")
            else:
                cell = Image.fromarray(pixels.mul(255).round().byte().permute(1, 2, 0).numpy())
            canvas.paste(cell, (GRID_TILE * 2 * c, header + GRID_TILE * 2 * r))
        draw.text((4, header + GRID_TILE * 2 * r + 3), f"{item['column']} ({item['name']})", fill="white",
                  stroke_width=2, stroke_fill="black")
    canvas.save(target, optimize=True)


def pick_example(records: list[dict], items: list[dict], row: str) -> dict:
    """mini/example.png, the README's first command's input: among the held-out crops degraded with our own
    settings where `row` (the default) gains in both PSNR and SSIM over its input, the one with the largest SSIM
    gain (what a viewer sees: structure, not only brightness); written as the degraded PNG."""
    inputs = {(r["column"], r["name"]): r for r in records if r["row"] == "input" and r["set"] == "unseen"}
    gains = [(r["ssim"] - inputs[(r["column"], r["name"])]["ssim"], r["psnr"] - inputs[(r["column"], r["name"])]["psnr"], r)
             for r in records if r["row"] == row and r["set"] == "unseen"]
    _, gain, best = max((g for g in gains if g[0] > 0 and g[1] > 0), key=lambda g: g[0])
    item = next(i for i in items if i["column"] == best["column"] and i["name"] == best["name"])
    media.write_image(MINI / "example.png", item["degraded"])
    return {"image": best["name"], "column": best["column"], "psnr_input": inputs[(best["column"], best["name"])]["psnr"],
            "psnr_default": best["psnr"], "gain_db": round(gain, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=Path, required=True, help="the eval/ folder (kodak24/, cbsd68/)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to measure (default: all)")
    p.add_argument("--part", type=Path, help="write this process's records here (run several processes with "
                   "disjoint --rows, then once with --merge)")
    p.add_argument("--merge", type=Path, nargs="+", help="combine part files into the results")
    p.add_argument("--work", type=Path, default=MINI / "runs" / "compare", help="restored images (git-ignored)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    items = eval_items(args.eval)
    if args.merge:
        records = [r for part in args.merge for r in json.loads(part.read_text())]
    else:
        start = time.time()
        bb = backbone.load_miniature(MINI)
        records = measure_rows(bb, items, args.rows, args.work)
        print(f"{len(records)} records in {(time.time() - start) / 60:.1f} min")
        if args.part:
            args.part.write_text(json.dumps(records) + "\n")
            return
    summary = summarise(records)
    columns = list(dict.fromkeys(r["column"] for r in records))
    seen = [c for c in columns if not c.startswith("unseen")]
    unseen = [c for c in columns if c.startswith("unseen")]
    rows = [r for r in ROWS if r in summary]
    write_grid(MINI / "grid.png", items, args.work, rows)
    default = "auto" if isinstance(restore.default_prompt(backbone.BACKBONES["mini-flux"], MINI), Path) else "all"
    example = pick_example(records, items, default) if default in summary else None
    if default in summary:
        write_first_picture(ROOT / "docs" / "mini_example.png", items, args.work, default)
    result = {"protocol": {"t0": "each prompt's (records)", "steps": defaults.STEPS, "t_min": defaults.T_MIN, "seed": defaults.SEED,
                           "eval_count": EVAL_COUNT, "grid_shift": backbone.BACKBONES["mini-flux"].grid_shift,
                           "metrics": "PSNR, SSIM on RGB 8-bit levels, block texture (metrics.block_texture, 8 px "
                                      "grid), 256 px crops"},
              "rows": ROWS, "default": default, "mean": summary, "example": example, "records": records}
    with weights.atomic_file(MINI / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    text = ("# The miniature: restoration on photos it never saw\n\nWritten by `python -m mini.compare`.\n\n"
            "Block texture: how much sharper luma steps are across the 8-pixel token grid's lines than elsewhere, "
            "minus the clean crop's figure (`metrics.block_texture`; 0: none added).\n\n"
            + (f"## The default (`{default}`) against its input\n\n" + default_table(summary, seen, default) + "\n"
               + default_table(summary, unseen, default) + "\n" if default in summary else "")
            + "## Training-family degradations (Kodak24 crops; CBSD68 crops for noise)\n\n"
            + "\n".join(markdown(summary, seen, m) for m in METRICS)
            + "\n## Our own degradation settings (mini/unseen.py, mini/heldout/)\n\n"
            + "\n".join(markdown(summary, unseen, m) for m in METRICS))
    with weights.atomic_file(MINI / "RESULTS.md") as tmp:
        Path(tmp).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
