"""Blind restoration: which degradations does an input show? A small CNN on the pixels, and the prompt bank.

`--prompt auto` (sample.py) restores without being told the degradation: the estimator scores each degradation
of the prompt bank from the degraded pixels (multi-label: a hazy, dark photo scores high on both),
`prompt_weights` turns the scores into prompt weights, and restore.velocity_for mixes the prompts' velocities
with them. It looks only at pixels, so one estimator serves every backbone (FLUX, Wan, the miniatures) and costs
a few milliseconds per image, nothing next to one model evaluation. When one degradation clearly dominates, the
weights collapse to that single prompt, so a blind restoration costs exactly as many model evaluations as a
named one. A bank records its combine rule: "mix" weights every present degradation's prompt (the paper's
average of prompts for a mixed input), "top" takes the most likely one's alone; which restores better depends
on the backbone and is measured (on the miniature, averaging two prompts' velocities dilutes both: mini/blind.py).

    est = fit(photos, ["noise", "blur", "haze", "rain", "lowlight", "snow"])     # synthetic pairs, CPU, minutes
    decided = est.decide(degraded)                  # {"haze": 0.86, "lowlight": 0.14}: prompt_weights of its scores
    save_bank("bank.safetensors", prompt_files, est)
    bank = load_bank("bank.safetensors")            # strict: a foreign, mis-shaped or tampered file is refused

The estimator (`Estimator`, 34,294 parameters) has two branches: an overview of the whole input resized to
`size` x `size` (haze, low light, colour casts: global statistics) and a detail view, the centre `detail` x
`detail` crop at native resolution together with its high-pass residual (noise, blur, rain streaks, snow
flakes: they vanish when an image is shrunk); both also see the input auto-exposed (`exposed`), so that a dark
input's other degradations are seen at a normal brightness. Each branch is three strided 3x3 convolutions whose features are
mean- and max-pooled; a two-layer head gives one logit per degradation. It is trained with a binary
cross-entropy on synthetic pairs from data.DEGRADATIONS on clean photos: clean crops (all labels 0), single
degradations and pairs of them applied in physical order (`ORDER`: the scene's haze, snow and rain first,
then the lens's blur, the exposure and the sensor's noise).

The bank file is one safetensors: the prompts stacked along a new first axis (`prompt.<key>` [n, ...], all
prompts of one site and shape), the estimator's state (`estimator.<key>`) and metadata naming the prompts in
order, each prompt's own metadata, the estimator's config and a SHA-256 over all of it. Besides one prompt per
scored degradation it may hold prompts trained on combinations ("haze+lowlight": both on every training pair);
`Bank.decide` takes such a prompt whole when the estimator detects exactly that combination.

    python estimator.py fit --photos ../shared/data/photos -o est.safetensors --threads 1
    python estimator.py bank --estimator est.safetensors --prompts noise.safetensors blur.safetensors ... -o bank.safetensors
"""

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data
import media
import prompts
import weights

BANK_FORMAT = "ypt-prompt-bank/1"
ESTIMATOR_FORMAT = "ypt-estimator/1"
BANK_NAME = "bank.safetensors"  # a miniature's shipped bank, folder/prompts/bank.safetensors (`--prompt auto`)
ORDER = data.ORDER  # physical order of a mixture
PRESENT = 0.5  # a score at least this: the degradation is present (until `calibrate` chooses the estimator's own)
MINOR = 0.15  # a present degradation whose share of the weight is below this is dropped
COMBINE = ("mix", "top")  # how the present degradations become prompt weights (`prompt_weights`)


def degrade(clean: Tensor, names: Sequence[str], generator: torch.Generator) -> Tensor:
    """clean [3, H, W] (or a video [3, F, H, W]) with every degradation of `names` applied, in `ORDER`."""
    return data.degrade(clean, data.combined(names), generator) if names else clean


# ---------------------------------------------------------------------------------------------- the network


def _branch(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU())


def _pool(features: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, 2C]: mean and max over the positions."""
    return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


def exposed(x: Tensor) -> Tensor:
    """x [B, 3, H, W] scaled to a mean of 0.45 (an auto-exposure), so that what a dark input hides (its blur,
    snow, haze) is seen at a normal brightness; clamped to [0, 2]."""
    return (x * 0.45 / (x.mean(dim=(1, 2, 3), keepdim=True) + 0.02)).clamp(0, 2)


def high_pass(x: Tensor) -> Tensor:
    """x [B, 3, H, W] minus its 3x3 box-filtered self (edges replicated): noise, streaks, flakes and edges."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


class Estimator(nn.Module):
    """Degradation scores from pixels: views (overview [B, 3, size, size], detail [B, 3, d, d]) -> logits [B, n].

    `names`: the degradations scored, in order (the bank's prompts). `size`: the overview's side; `detail`:
    the side of the native-resolution centre crop (smaller inputs are seen whole); `width`: channels of the
    first convolution; `threshold`: the score from which a degradation counts as present (`calibrate`);
    `combine`: "mix" (every present degradation's prompt, weighted by score) or "top" (the most likely one's
    alone), `prompt_weights`' rule, chosen per bank by measuring (`estimator.py bank --combine`)."""

    def __init__(self, names: Sequence[str], size: int = 64, detail: int = 96, width: int = 16,
                 threshold: float = PRESENT, combine: str = "mix"):
        super().__init__()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"the estimator needs distinct degradation names, got {list(names)}")
        if not 0 < threshold < 1:
            raise ValueError(f"the presence threshold must lie in (0, 1), got {threshold}")
        if combine not in COMBINE:
            raise ValueError(f"the combine rule is one of {COMBINE}, got {combine!r}")
        self.names, self.size, self.detail, self.width = list(names), size, detail, width
        self.threshold, self.combine = threshold, combine
        self.overview = _branch(6, width)
        self.fine = _branch(9, width)
        self.head = nn.Sequential(nn.Linear(8 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, len(names)))

    @property
    def config(self) -> dict:
        return {"names": self.names, "size": self.size, "detail": self.detail, "width": self.width,
                "threshold": self.threshold, "combine": self.combine}

    def views(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """image [3, H, W] in [0, 1] -> (overview [3, size, size], detail [3, d, d] with d <= detail)."""
        height, width = image.shape[-2:]
        overview = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                                 align_corners=False)[0]
        top, left = max(0, (height - self.detail) // 2), max(0, (width - self.detail) // 2)
        return overview, image[:, top:top + self.detail, left:left + self.detail]

    def forward(self, overview: Tensor, detail: Tensor) -> Tensor:
        bright = exposed(detail)
        features = [_pool(self.overview(torch.cat([overview * 2 - 1, exposed(overview) - 0.5], dim=1))),
                    _pool(self.fine(torch.cat([detail * 2 - 1, bright - 0.5, 8 * high_pass(bright)], dim=1)))]
        return self.head(torch.cat(features, dim=1))

    @torch.no_grad()
    def scores(self, degraded: Tensor) -> dict[str, float]:
        """degraded [3, H, W] (or a video [3, F, H, W]: the mean over up to 4 frames spread over it) ->
        {degradation: probability in [0, 1]} in the order of `names`."""
        if degraded.ndim == 4:
            frames = degraded.shape[1]
            picks = sorted({round(i * (frames - 1) / 3) for i in range(4)}) if frames > 1 else [0]
            images = [degraded[:, f] for f in picks]
        else:
            images = [degraded]
        if min(degraded.shape[-2:]) < 8:
            raise ValueError(f"the estimator needs at least 8 x 8 pixels, got {list(degraded.shape)}")
        device = next(self.parameters()).device
        probs = []
        for image in images:
            overview, detail = self.views(image.float().to(device))
            probs.append(torch.sigmoid(self.eval()(overview[None], detail[None]))[0])
        mean = torch.stack(probs).mean(dim=0).cpu()
        return {name: float(p) for name, p in zip(self.names, mean)}

    def decide(self, degraded: Tensor) -> dict[str, float]:
        """degraded [3, H, W] or [3, F, H, W] -> prompt weights {degradation: weight} (`prompt_weights`)."""
        return prompt_weights(self.scores(degraded), self.threshold, self.combine)

    def detected(self, degraded: Tensor) -> set[str]:
        """The degradations it sees in `degraded` (present, not minor), whatever the combine rule."""
        return set(prompt_weights(self.scores(degraded), self.threshold, "mix"))


def prompt_weights(scores: dict[str, float], threshold: float = PRESENT, combine: str = "mix") -> dict[str, float]:
    """Scores -> prompt weights summing to 1. "mix": the present degradations (score >= `threshold`) in
    proportion to their scores, dropping those with a share below MINOR; "top": the best-scoring one alone.
    None present: the best-scoring one. A single prompt (weight 1) whenever one clearly dominates, so the
    restoration costs what a named one does."""
    present = {n: s for n, s in scores.items() if s >= threshold}
    if not present or combine == "top":
        best = max(scores, key=scores.get)
        return {best: 1.0}
    total = sum(present.values())
    kept = {n: s for n, s in present.items() if s / total >= MINOR}
    total = sum(kept.values())
    return {n: s / total for n, s in kept.items()}


def describe_weights(decided: dict[str, float]) -> str:
    """{"haze": 0.86, "lowlight": 0.14} -> 'haze 0.86, lowlight 0.14' (largest first)."""
    return ", ".join(f"{n} {w:.2f}" for n, w in sorted(decided.items(), key=lambda item: -item[1]))


# ---------------------------------------------------------------------------------------------- training


def _sample_names(names: Sequence[str], generator: torch.Generator, pairs: bool) -> list[str]:
    """Clean (1 in 7), one degradation (3 in 7, or 6 in 7 without pairs) or two distinct ones (3 in 7)."""
    draw = int(torch.randint(7, (), generator=generator))
    if draw == 0:
        return []
    order = torch.randperm(len(names), generator=generator).tolist()
    count = 2 if pairs and draw >= 4 and len(names) > 1 else 1
    return [names[i] for i in order[:count]]


def make_examples(estimator: Estimator, cleans: Sequence[Tensor], count: int, crop: int, seed: int = 0,
                  pairs: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`count` synthetic training examples: (overviews [N, 3, size, size], details [N, 3, d, d], labels [N, n]).

    Each draws a clean image, a crop x crop window of it, and a label set (`_sample_names`), then degrades it
    (`degrade`); views are stored quantised to 8 bits, as the inputs a user gives are."""
    generator = torch.Generator().manual_seed(seed)
    overviews, details, labels = [], [], []
    for _ in range(count):
        clean = cleans[int(torch.randint(len(cleans), (), generator=generator))]
        height, width = clean.shape[-2:]
        side = min(crop, height, width)
        top = int(torch.randint(height - side + 1, (), generator=generator))
        left = int(torch.randint(width - side + 1, (), generator=generator))
        window = clean[:, top:top + side, left:left + side]
        if int(torch.randint(2, (), generator=generator)):
            window = window.flip(-1)
        chosen = _sample_names(estimator.names, generator, pairs)
        overview, detail = estimator.views(degrade(window, chosen, generator))
        overviews.append(overview.mul(255).round().to(torch.uint8))
        details.append(detail.mul(255).round().to(torch.uint8))
        labels.append(torch.tensor([float(n in chosen) for n in estimator.names]))
    side = min(d.shape[-1] for d in details)
    details = [d[:, :side, :side] for d in details]
    return torch.stack(overviews), torch.stack(details), torch.stack(labels)


def fit(cleans: Sequence[Tensor], names: Sequence[str], count: int = 2400, epochs: int = 12, crop: int = 256,
        batch: int = 64, lr: float = 3e-3, seed: int = 0, size: int = 64, detail: int = 96, width: int = 16,
        log=None) -> Estimator:
    """An estimator for `names` trained on `count` synthetic examples from the clean images `cleans`
    ([3, H, W] in [0, 1], at least `crop` pixels for full-size windows) for `epochs` passes (Adam, BCE)."""
    torch.manual_seed(seed)
    estimator = Estimator(names, size, detail, width)
    overviews, details, labels = make_examples(estimator, cleans, count, crop, seed)
    optimiser = torch.optim.Adam(estimator.parameters(), lr=lr)
    steps = epochs * ((count + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed + 1)
    estimator.train()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for start in range(0, count, batch):
            index = order[start:start + batch]
            logits = estimator(overviews[index].float() / 255, details[index].float() / 255)
            loss = F.binary_cross_entropy_with_logits(logits, labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(index)
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / count:.4f}")
    exact = calibrate(estimator, cleans, max(100, count // 5), crop, seed + 1)
    if log is not None:
        log(f"presence threshold {estimator.threshold}: {exact:.2f} of fresh examples decided exactly")
    return estimator.eval()


@torch.no_grad()
def calibrate(estimator: Estimator, cleans: Sequence[Tensor], count: int = 600, crop: int = 256,
              seed: int = 1) -> float:
    """Choose and set the estimator's presence threshold (0.2, 0.25, ..., 0.6): the one whose decisions
    (`prompt_weights`) match the true label set most often on `count` fresh synthetic examples from `cleans`
    (clean, single and paired, another seed than training's). Returns that exact-set accuracy."""
    overviews, details, labels = make_examples(estimator, cleans, count, crop, seed)
    probs = torch.cat([torch.sigmoid(estimator.eval()(overviews[i:i + 100].float() / 255,
                                                      details[i:i + 100].float() / 255)) for i in range(0, count, 100)])
    truths = [{n for n, y in zip(estimator.names, row) if y > 0} for row in labels]

    def hits(threshold: float) -> float:
        right = 0
        for row, truth in zip(probs, truths):
            scores = dict(zip(estimator.names, row.tolist()))
            right += (set(prompt_weights(scores, threshold)) == truth) if truth else max(scores.values()) < threshold
        return right / count

    best = max((hits(t / 100), -abs(t - 50), t / 100) for t in range(20, 61, 5))
    estimator.threshold = best[2]
    return best[0]


def accuracy(estimator: Estimator, examples: Sequence[tuple[Tensor, Sequence[str]]]) -> dict[str, float]:
    """Exact-set accuracy of the detection (`Estimator.detected` == the true names) per label set ("haze",
    "haze+lowlight", "clean"): examples [(degraded [3, H, W], true names)]."""
    hits: dict[str, list[bool]] = {}
    for degraded, truth in examples:
        decided = estimator.detected(degraded)
        key = "+".join(sorted(truth, key=ORDER.index)) or "clean"
        hits.setdefault(key, []).append(decided == set(truth) if truth else True)
    return {key: sum(h) / len(h) for key, h in hits.items()}


def decision_accuracy(rows: Sequence[dict], names: Sequence[str]) -> dict[str, tuple[float, int]]:
    """`--eval` rows with an "auto" decision -> {degradation: (fraction decided exactly right, count)}: an
    item's truth is its "degradation" split on "+" ("haze+lowlight"); items with degradations outside the
    bank's `names` (e.g. "unknown") are left out."""
    hits: dict[str, list[bool]] = {}
    for row in rows:
        truth = set(row["degradation"].split("+"))
        if "auto" not in row or not truth <= set(names):
            continue
        chosen = {part for name in row["auto"] for part in name.split("+")}  # a combination prompt: its parts
        hits.setdefault(row["degradation"], []).append(chosen == truth)
    return {name: (sum(h) / len(h), len(h)) for name, h in hits.items()}


# ---------------------------------------------------------------------------------------------- files


def _digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (but the digest itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write(path: Path, tensors: dict[str, Tensor], metadata: dict) -> None:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["sha256"] = _digest(tensors, meta)
    weights.save_safetensors(tensors, path, meta)


def _read(path: Path, fmt: str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a file of format `fmt`, refused unless it is one and its digest matches."""
    raw = weights.read_metadata(path)
    if raw.get("format") != fmt:
        raise ValueError(f"{path}: not {what} of this project (no '{fmt}' format tag)")
    tensors = weights.read_state_dict(path)
    if raw.get("sha256") != _digest(tensors, raw):
        raise ValueError(f"{path}: {what} whose contents do not match its SHA-256 (changed after it was written)")
    return tensors, raw


def _estimator_from(path: Path, state: dict[str, Tensor], config: dict) -> Estimator:
    try:
        estimator = Estimator(config["names"], int(config["size"]), int(config["detail"]), int(config["width"]),
                              float(config["threshold"]), config.get("combine", "mix"))  # older files: mix
        weights.load_into(estimator, state)
    except (KeyError, TypeError, ValueError, weights.CheckpointError) as err:
        raise ValueError(f"{path}: the estimator does not fit its config {config}: {err}") from None
    return estimator.eval()


def save_estimator(path: str | os.PathLike, estimator: Estimator, info: dict | None = None) -> None:
    """The estimator alone (before the prompts exist): its state and config, `info` (e.g. what it was fitted
    on) as metadata."""
    _write(Path(path), estimator.state_dict(), {"format": ESTIMATOR_FORMAT, "estimator": estimator.config,
                                                **(info or {})})


def load_estimator(path: str | os.PathLike) -> Estimator:
    tensors, raw = _read(Path(path), ESTIMATOR_FORMAT, "an estimator file")
    return _estimator_from(Path(path), tensors, json.loads(raw["estimator"]))


class Bank:
    """A loaded prompt bank: `names` (the estimator's degradations in its order, then any combinations such as
    "haze+lowlight"), `prompts` [(module, metadata)] in that order, `estimator` scoring the single degradations."""

    def __init__(self, names: list[str], prompt_list: list[tuple[nn.Module, dict]], estimator: Estimator):
        self.names, self.prompts, self.estimator = names, prompt_list, estimator

    def decide(self, degraded: Tensor) -> dict[str, float]:
        """degraded [3, H, W] or [3, F, H, W] -> prompt weights {bank name: weight}: the prompt trained on exactly
        the degradations the estimator detects when the bank has one for that combination, else the estimator's
        decision (its combine rule)."""
        scores = self.estimator.scores(degraded)
        seen = list(prompt_weights(scores, self.estimator.threshold, "mix"))
        if len(seen) > 1 and (both := data.combined(seen)) in self.names:
            return {both: 1.0}
        return prompt_weights(scores, self.estimator.threshold, self.estimator.combine)


def _combination(name: object, singles: Sequence[str]) -> bool:
    """Whether `name` is a bank's combination prompt name: two or more of `singles`, "+"-joined in ORDER."""
    if not isinstance(name, str) or "+" not in name or not set(name.split("+")) <= set(singles):
        return False
    try:
        return data.combined(name.split("+")) == name
    except ValueError:
        return False


def save_bank(path: str | os.PathLike, prompt_files: Sequence[str | os.PathLike], estimator: Estimator) -> None:
    """One file from prompt files (each names its `degradation` in its metadata) and an estimator for exactly
    those degradations, plus optional prompts for combinations of them ("haze+lowlight", trained on both at
    once); stored in the estimator's order, then the combinations sorted, stacked (same site and shapes)."""
    loaded = {}
    for file in prompt_files:
        prompt, meta = prompts.load_prompt(file)
        name = meta.get("degradation")
        if name in loaded:
            raise ValueError(f"{file}: a second prompt for {name!r}")
        loaded[name] = (prompt, meta, Path(file))
    combinations = sorted(n for n in loaded if _combination(n, estimator.names))
    singles = sorted((n for n in loaded if n not in combinations), key=str)
    if singles != sorted(estimator.names):
        raise ValueError(f"the prompts are for {singles}, the estimator scores {sorted(estimator.names)} (and "
                         f"combinations of them, e.g. haze+lowlight)")
    names = estimator.names + combinations
    ordered = [loaded[n] for n in names]
    first_state, first_meta = ordered[0][0].state_dict(), ordered[0][1]
    for prompt, meta, file in ordered[1:]:
        state = prompt.state_dict()
        same = state.keys() == first_state.keys() and all(state[k].shape == first_state[k].shape for k in state)
        if not same or (meta["backbone"], meta["config"], meta["site"]) != \
                (first_meta["backbone"], first_meta["config"], first_meta["site"]):
            raise ValueError(f"{file}: a bank holds prompts of one backbone, site and shape; this one differs from "
                             f"{ordered[0][2]}")
    tensors = {f"prompt.{k}": torch.stack([p.state_dict()[k] for p, _, _ in ordered]) for k in first_state}
    tensors.update({f"estimator.{k}": v for k, v in estimator.state_dict().items()})
    _write(Path(path), tensors, {"format": BANK_FORMAT, "prompts": names,
                                 "prompt_metadata": [m for _, m, _ in ordered], "estimator": estimator.config})


def load_bank(path: str | os.PathLike) -> Bank:
    """Read a bank written by `save_bank`, strictly: the format tag, the digest, the names (prompts and
    estimator alike), every prompt's shapes and the estimator's config must all agree (ValueError otherwise)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a prompt bank is a .safetensors file")
    tensors, raw = _read(path, BANK_FORMAT, "a prompt bank")
    try:
        names, metas, config = (json.loads(raw[k]) for k in ("prompts", "prompt_metadata", "estimator"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: a prompt bank without readable metadata ({err})") from None
    singles = config.get("names") if isinstance(config.get("names"), list) else []
    if (not isinstance(names, list) or not names or len(metas) != len(names) or names[:len(singles)] != singles
            or len(set(names)) != len(names) or not all(_combination(n, singles) for n in names[len(singles):])):
        raise ValueError(f"{path}: the bank names prompts {names} but the estimator scores {config.get('names')}")
    if [m.get("degradation") for m in metas] != names:
        raise ValueError(f"{path}: the prompts' own metadata names {[m.get('degradation') for m in metas]}, "
                         f"the bank {names}")
    stacked = {k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")}
    state = {k[len("estimator."):]: v for k, v in tensors.items() if k.startswith("estimator.")}
    if len(stacked) + len(state) != len(tensors):
        raise ValueError(f"{path}: unexpected tensors {sorted(k for k in tensors if not k.startswith(('prompt.', 'estimator.')))}")
    bad = [f"{k} {list(v.shape)}" for k, v in stacked.items() if v.ndim < 1 or v.shape[0] != len(names)]
    if bad or not stacked:
        raise ValueError(f"{path}: stacked prompts must have {len(names)} along the first axis, got {bad or 'none'}")
    prompt_list = []
    for i, meta in enumerate(metas):
        one = {k: v[i] for k, v in stacked.items()}
        try:
            prompt = _prompt_module(meta["site"], one)
            weights.load_into(prompt, one)
        except (KeyError, IndexError, weights.CheckpointError) as err:
            raise ValueError(f"{path}: prompt {i} ({names[i]}) is wrongly shaped for a {meta.get('site')} prompt: "
                             f"{err}") from None
        prompt_list.append((prompt.eval(), meta))
    return Bank(names, prompt_list, _estimator_from(path, state, config))


def _prompt_module(site: str, state: dict[str, Tensor]) -> nn.Module:
    """An empty prompt module of `site` shaped for `state` (prompts.load_prompt's rule, on one bank entry)."""
    if site == "deep":
        return prompts.DeepPrompt(state["alphas"].shape[0], state["prompts"].shape[1], state["prompts"].shape[2])
    if site == "text":
        pooled = state.get("pooled")
        return prompts.TextPrompt(state["tokens"].shape[1], state["tokens"].shape[2],
                                  0 if pooled is None else pooled.shape[1])
    raise ValueError(f"a bank holds deep or text prompts, not {site!r}")


# ---------------------------------------------------------------------------------------------- command line


def read_photos(folder: Path, limit: int | None = None) -> list[Tensor]:
    """The images under `folder` (searched recursively, sorted), at most `limit` of them, [3, H, W] each."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in media.IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images found")
    return [media.read_image(p) for p in paths[:limit]]


def read_frames(folder: Path, every: int, limit: int | None = None) -> list[Tensor]:
    """Every `every`-th frame of each video under `folder` (sorted), at most `limit` frames, [3, H, W] each."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in media.VIDEO_SUFFIXES)
    if not paths or every < 1:
        raise ValueError(f"{folder}: no videos found" if not paths else f"--every must be at least 1, got {every}")
    frames = [frame for path in paths for frame in media.read_video(path).frames.unbind(1)[::every]]
    return frames[:limit]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train an estimator on synthetic pairs from clean photos or video frames")
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos", type=Path, help="folder of clean training photos (recursive)")
    source.add_argument("--videos", type=Path, help="folder of clean training videos: every --every-th frame of each "
                        "is a clean image (a video backbone's estimator learns what its footage looks like clean)")
    f.add_argument("--every", type=int, default=4, help="with --videos: one frame in this many (default: %(default)s)")
    f.add_argument("--degradations", nargs="+", default=["noise", "blur", "haze", "rain", "lowlight", "snow"])
    f.add_argument("--count", type=int, default=2400, help="synthetic examples (default: %(default)s)")
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--crop", type=int, default=256, help="training window in pixels (default: %(default)s)")
    f.add_argument("--limit", type=int, help="use at most this many photos")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, help="torch CPU threads")
    f.add_argument("-o", "--output", type=Path, required=True)
    b = sub.add_parser("bank", help="one bank file from an estimator and one prompt per degradation")
    b.add_argument("--estimator", type=Path, required=True)
    b.add_argument("--prompts", type=Path, nargs="+", required=True)
    b.add_argument("--combine", choices=COMBINE, help="how present degradations become prompt weights: mix (each "
                   "present one's prompt, weighted by its score) or top (the most likely one's prompt alone); "
                   "default: the estimator's (mix). Measure on your backbone: mini/blind.py")
    b.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.output.exists():
            raise ValueError(f"{args.output} exists; not overwriting it")
        if args.command == "fit":
            if args.threads:
                torch.set_num_threads(args.threads)
            unknown = [n for n in args.degradations if n not in data.DEGRADATIONS]
            if unknown:
                raise ValueError(f"unknown degradation {unknown[0]!r}; choose from {sorted(data.DEGRADATIONS)}")
            cleans = read_photos(args.photos, args.limit) if args.photos else read_frames(args.videos, args.every, args.limit)
            estimator = fit(cleans, args.degradations, args.count, args.epochs, args.crop, seed=args.seed,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
            save_estimator(args.output, estimator, {"photos": str(args.photos or args.videos), "count": args.count,
                                                    "epochs": args.epochs, "crop": args.crop, "seed": args.seed})
        else:
            est = load_estimator(args.estimator)
            est.combine = args.combine or est.combine
            save_bank(args.output, args.prompts, est)
        print(f"wrote {args.output}", file=sys.stderr)
    except (ValueError, FileNotFoundError, weights.CheckpointError) as err:
        sys.exit(f"estimator.py: error: {err}")


if __name__ == "__main__":
    main()
