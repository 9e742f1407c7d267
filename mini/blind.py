"""`--prompt auto` on the image miniature: blind restoration against the named prompts, uniform averaging and the
all-in-one prompt, on held-out crops with single degradations and with pairs (issue 15).

    python -m mini.blind accuracy --eval ../shared/data/eval --estimator est.safetensors      # seconds, no model
    python -m mini.blind restore --eval ../shared/data/eval --bank mini/prompts/bank.safetensors --count 4
    python -m mini.blind restore --photos ../shared/data/photos --count 4 --records val.json   # choose rules here

Inputs: the 256 px centre crops of Kodak24 and the committed mini/heldout/ crops (never trained on), each
degraded by `estimator.degrade` with one degradation or two (applied in physical order), seeds
defaults.mix_seed(5000 + case, image), quantised to 8 bits; with --photos, random 256 px crops of the training
photos instead (seed 99; degradation seeds 7000 + case), the validation set on which the shipped bank's combine
rule was chosen. `accuracy`: the estimator's exact-set decision
accuracy on every crop, for every single degradation, every pair and the clean crop. `restore`: per case and
image the restorations (PSNR, 20 steps, seed 0, each at its prompts' trained T0) with
  named    the correct prompt (a pair: each of its two prompts alone, both averaged (the paper's recipe), and
           the bank's prompt trained on the pair itself when it has one)
  auto     the bank's estimator's prompts and weights by the bank's combine rule (when it decides one prompt
           that was restored already, that restoration is reused: the computation is the same)
  mix      the estimator's "mix" rule whatever the bank's: every present degradation's prompt, weighted by score
  uniform  all the bank's prompts averaged (the default before issue 15; six evaluations a step, so a
           second pass, `--fill uniform`, adds it to the records; `--fill all` likewise)
  all      the all-in-one prompt, trained on the mixture of every degradation (mini/prompts/all.safetensors)
Cases are visited image-major (every case's first image, then every case's second, ...), and the results are
rewritten after each, so a run stopped early still covers every case (and a new run resumes it: delete the
records for another bank). Writes mini/runs/blind/records.json and
the markdown table (`--table`).
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import backbone
import defaults
import estimator
import restore
import runtime
from mini import images

MINI = Path(__file__).parent
SINGLES = ["noise", "blur", "haze", "rain", "lowlight", "snow"]
PAIRS = [("haze", "lowlight"), ("blur", "noise"), ("haze", "rain")]


VALIDATION_SEED = 99  # the training-photo crops on which the shipped bank's combine rule was chosen (--photos)
HELDOUT_BASE, VALIDATION_BASE = 5000, 7000  # degradation seeds: defaults.mix_seed(base + case, image)


def crops(eval_folder: Path, count: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """Held-out clean crops: the mini/heldout/ four first, then Kodak24's centre crops ([3, 256, 256] each)."""
    out = list(images.heldout_crops().items()) + list(images.eval_crops(eval_folder, ("kodak24",)).items())
    return out if count is None else out[:count]


def validation_crops(photos: Path, count: int) -> list[tuple[str, torch.Tensor]]:
    """`count` random 256 px crops of the *training* photos ("train0", ...): where design choices are made."""
    pool = images.random_crops(images.load_photos(photos, min_side=256), count, 256,
                               torch.Generator().manual_seed(VALIDATION_SEED))
    return [(f"train{i}", crop) for i, crop in enumerate(pool)]


def degraded_input(clean: torch.Tensor, names: tuple[str, ...], case: int, image: int,
                   base: int = HELDOUT_BASE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(defaults.mix_seed(base + case, image))
    return estimator.degrade(clean, list(names), generator).mul(255).round().div(255)


def cases() -> list[tuple[str, ...]]:
    return [(d,) for d in SINGLES] + PAIRS


def accuracy_table(est: estimator.Estimator, eval_folder: Path, count: int | None = None) -> str:
    """Markdown: the decision accuracy per label set over the first `count` held-out crops (None: all 28)."""
    pool = crops(eval_folder, count)
    label_sets = [()] + [(d,) for d in SINGLES] + list(itertools.combinations(SINGLES, 2))
    lines = ["| input | crops | decided exactly | mean weight on the true prompts |", "|---|---|---|---|"]
    start, count = time.time(), 0
    for case, names in enumerate(label_sets):
        hits, mass = [], []
        for i, (_, clean) in enumerate(pool):
            x = degraded_input(clean, names, 100 + case, i) if names else clean
            scores = est.scores(x)
            decided = estimator.prompt_weights(scores, est.threshold)  # what it detects, any combine rule
            count += 1
            hits.append(set(decided) == set(names) if names else max(scores.values()) < est.threshold)
            mass.append(sum(w for n, w in decided.items() if n in names) if names else float("nan"))
        label = "+".join(names) or "clean (nothing scored present)"
        weight = f"{sum(mass) / len(mass):.2f}" if names else "-"
        lines.append(f"| {label} | {len(pool)} | {sum(hits) / len(hits):.2f} | {weight} |")
    ms = (time.time() - start) / count * 1000
    return "\n".join(lines) + f"\n\n{count} decisions, {ms:.1f} ms each including the degradation (one CPU thread)\n"


def restore_records(bank_path: Path, eval_folder: Path, count: int, steps: int, out: Path,
                    fill: str | None = None, fill_out: Path | None = None, photos: Path | None = None) -> list[dict]:
    """The records of `restore` (written to `out` after each), or with `fill` ("uniform" or "all"), that row's
    PSNR for the records in `out` that lack it, written to `fill_out` (a second pass, which may run beside
    another: the uniform average costs six model evaluations a step). `photos`: on `validation_crops` of the
    training photos instead of the held-out crops."""
    bb = backbone.load_miniature(MINI)
    bank = restore.load_bank(bank_path, bb)
    named = {n: p for n, (p, _) in zip(bank.names, bank.prompts)}
    metas = {n: meta for n, (_, meta) in zip(bank.names, bank.prompts)}
    options = restore.RestoreOptions(steps=steps)

    def at(names: list[str], mix: list[float] | None = None, extra: list[dict] = ()) -> restore.RestoreOptions:
        """The options of a restoration with these prompts: at the T0 they were trained at (as sample.py)."""
        return restore.at_trained_t0(options, [metas[n] for n in names] + list(extra), mix)

    all_path = MINI / "prompts" / f"{defaults.ALL_IN_ONE}.safetensors"
    rows = {}
    if all_path.exists():
        all_prompt, all_meta = restore.load_prompts([all_path], bb)[0]
        rows["all"] = (restore.velocity_for(bb, [all_prompt]), at([], extra=[all_meta]))
    pool = validation_crops(photos, count) if photos else crops(eval_folder, count)
    base = VALIDATION_BASE if photos else HELDOUT_BASE
    if fill is not None:
        records = json.loads(out.read_text())
        average, run = ((restore.velocity_for(bb, list(named.values())), at(list(named))) if fill == "uniform"
                        else rows[fill])
        for record in records:
            if fill in record:
                continue
            case = [tuple(c) for c in cases()].index(tuple(record["case"].split("+")))
            i, clean = next((i, c) for i, (n, c) in enumerate(pool) if n == record["image"])
            x = degraded_input(clean, tuple(record["case"].split("+")), case, i, base)
            record[fill] = restore.measure(restore.restore_image(bb, average, x, run), clean)["psnr"]
            with runtime.atomic_file(fill_out or out) as tmp:
                tmp.write_text(json.dumps(records, indent=1))
            print(f"{record['case']} {record['image']}: {fill} {record[fill]:.2f}", flush=True)
        return records
    records = json.loads(out.read_text()) if out.exists() else []  # a stopped run resumes (same bank!)
    done = {(r["case"], r["image"]) for r in records}
    for i, (name, clean) in enumerate(pool):
        for case, names in enumerate(cases()):
            if ("+".join(names), name) in done:
                continue
            x = degraded_input(clean, names, case, i, base)
            record = {"case": "+".join(names), "image": name, "input": restore.measure(x, clean)["psnr"]}
            timer = time.time()
            record["decided"] = bank.decide(x)
            record["estimate_ms"] = (time.time() - timer) * 1000
            record["mixed"] = estimator.prompt_weights(bank.estimator.scores(x), bank.estimator.threshold, "mix")
            results = {}
            for n in names:
                results[f"named {n}"] = restore.restore_image(bb, restore.velocity_for(bb, [named[n]]), x, at([n]))
            if len(names) > 1:
                both = restore.velocity_for(bb, [named[n] for n in names])
                results["named both"] = restore.restore_image(bb, both, x, at(list(names)))
                if record["case"] in named:  # the bank's prompt trained on this pair
                    pair = restore.velocity_for(bb, [named[record["case"]]])
                    results[f"named {record['case']}"] = restore.restore_image(bb, pair, x, at([record["case"]]))
            for row, weights in (("auto", record["decided"]), ("mix", record["mixed"])):
                timer = time.time()
                single = f"named {next(iter(weights))}" if len(weights) == 1 else None
                if single not in results:  # a single correct prompt: its named restoration is reused
                    chosen = [named[n] for n in weights]
                    results[single or row] = restore.restore_image(
                        bb, restore.velocity_for(bb, chosen, mix=list(weights.values())), x,
                        at(list(weights), list(weights.values())))
                results[row] = results[single or row]
                record[f"{row}_s"] = time.time() - timer
            for row, (v, run) in rows.items():
                timer = time.time()
                results[row] = restore.restore_image(bb, v, x, run)
                record[f"{row}_s"] = time.time() - timer
            record.update({k: restore.measure(r, clean)["psnr"] for k, r in results.items()})
            records.append(record)
            with runtime.atomic_file(out) as tmp:
                tmp.write_text(json.dumps(records, indent=1))
            print(f"{record['case']} {name}: auto {estimator.describe_weights(record['decided'])}; " +
                  ", ".join(f"{k} {v:.2f}" for k, v in record.items() if isinstance(v, float) and not
                            k.endswith(("_s", "_ms"))), flush=True)
    return records


def restore_table(records: list[dict]) -> str:
    """Markdown: mean PSNR per case of input, auto, the mix rule, named (single / each of a pair / both), uniform,
    all-in-one, and how often auto chose only true prompts."""
    lines = ["| input | images | degraded | auto | mix rule | named (correct) | named, each alone | pair's own prompt "
             "| uniform (6) | all-in-one | auto chose only true prompts |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def mean(rows, key):  # over the records that have the row; "(n of m)" when not all have it
        values = [r[key] for r in rows if key in r]
        partial = f" ({len(values)} of {len(rows)})" if 0 < len(values) < len(rows) else ""
        return f"{sum(values) / len(values):.2f}{partial}" if values else "-"

    groups = {}
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    singles, pairs = [], []
    for case, rows in groups.items():
        names = case.split("+")
        true = sum({p for n in r["decided"] for p in n.split("+")} <= set(names) for r in rows) / len(rows)
        correct = f"named {names[0]}" if len(names) == 1 else "named both"
        each = " / ".join(mean(rows, f"named {n}") for n in names) if len(names) > 1 else "="
        lines.append(f"| {case} | {len(rows)} | {mean(rows, 'input')} | {mean(rows, 'auto')} | {mean(rows, 'mix')} "
                     f"| {mean(rows, correct)} | {each} | {mean(rows, f'named {case}') if len(names) > 1 else '='} "
                     f"| {mean(rows, 'uniform')} | {mean(rows, 'all')} | {true:.2f} |")
        (singles if len(names) == 1 else pairs).extend(rows)
    for label, rows in (("singles, mean", singles), ("pairs, mean", pairs)):
        if rows:
            key = "named both" if label.startswith("pairs") else None
            named = [r.get(key) if key else r[f"named {r['case']}"] for r in rows]
            named_mean = f"{sum(named) / len(named):.2f}"
            lines.append(f"| **{label}** | {len(rows)} | {mean(rows, 'input')} | {mean(rows, 'auto')} "
                         f"| {mean(rows, 'mix')} | {named_mean} | | | {mean(rows, 'uniform')} | {mean(rows, 'all')} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["accuracy", "restore", "table"])
    p.add_argument("--eval", type=Path, default=MINI.parent.parent / "shared" / "data" / "eval")
    p.add_argument("--estimator", type=Path, help="accuracy: an estimator file (or take the bank's)")
    p.add_argument("--bank", type=Path, default=MINI / "prompts" / estimator.BANK_NAME)
    p.add_argument("--count", type=int, help="images per case (default: restore 2, accuracy all 28)")
    p.add_argument("--photos", type=Path, help="restore: on random crops of these *training* photos instead (where "
                   "the shipped bank's combine rule was chosen: --count 4)")
    p.add_argument("--steps", type=int, default=defaults.STEPS)
    p.add_argument("--records", type=Path, default=MINI / "runs" / "blind" / "records.json")
    p.add_argument("--fill", choices=["uniform", "all"], help="restore: add this row to the records, written to "
                   "--fill-out")
    p.add_argument("--fill-out", type=Path)
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="table: records files whose rows are added")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "accuracy":
        est = estimator.load_estimator(args.estimator) if args.estimator else estimator.load_bank(args.bank).estimator
        print(accuracy_table(est, args.eval, args.count))
    elif args.command == "restore":
        args.records.parent.mkdir(parents=True, exist_ok=True)
        restore_records(args.bank, args.eval, args.count or 2, args.steps, args.records,
                        args.fill, args.fill_out, args.photos)
        print(restore_table(json.loads(args.records.read_text())))
    else:
        records = json.loads(args.records.read_text())
        for extra in args.merge:
            more = {(r["case"], r["image"]): r for r in json.loads(extra.read_text())}
            records = [{**more.get((r["case"], r["image"]), {}), **r} for r in records]
        print(restore_table(records))


if __name__ == "__main__":
    main()
