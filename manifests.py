"""Test manifests from the on-disk layouts of the datasets the paper's task family uses.

`python data.py manifest --layout NAME DIR -o test.json` writes a JSON manifest (data.Manifest's format: a list
of {"image_path", "target_path", "degradation", "dataset"}, paths relative to the manifest's folder). Layouts
(DIR is the folder named first; each pair is matched by name, and an unmatched file is an error):

    sots      RESIDE SOTS: DIR/hazy/ID_A_B.ext with DIR/gt/ID.ext (or DIR/clear/); DIR may also hold
              indoor/ and outdoor/, each laid out so (datasets SOTS-indoor, SOTS-outdoor)
    rain100l  Rain100L, rain100h Rain100H, rain13k Rain13K: DIR/input/NAME with DIR/target/NAME (the
              MPRNet/Restormer test sets), or DIR/rainy/rain-N.png with DIR/norain/norain-N.png, or both
              kinds of file in DIR itself
    gopro     GoPro: DIR/SEQUENCE/blur/NAME with DIR/SEQUENCE/sharp/NAME (DIR: GOPRO_Large/test), or
              DIR/input/ with DIR/target/
    lol-v1    LOL: DIR/low/NAME with DIR/high/NAME; DIR may be the release's root holding eval15/
    lol-v2    LOL-v2: DIR/Low/lowN.png with DIR/Normal/normalN.png (Real_captured/Test) or equal names
              (Synthetic/Test); DIR may hold Real_captured/ and Synthetic/ (their Test/ folders are used)
    snow100k  Snow100K: DIR/synthetic/NAME with DIR/gt/NAME (DIR: Snow100K-S, -M or -L), or DIR holding those
    cbsd68, kodak24, mcmaster   clean images in DIR; degraded copies with Gaussian noise of --sigma (8-bit
              levels) from --seed are written beside the manifest, in NAME_sigmaS/ (never over a file)
    pair      any degraded/clean folder pair: DIR/degraded/NAME with DIR/clean/NAME (--degradation names it)
"""

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

import media
import runtime

Pairs = list[tuple[Path, Path]]  # (degraded, clean)


def _images(folder: Path) -> list[Path]:
    return media.list_images(folder)


def match(degraded: list[Path], clean: list[Path], key_degraded: Callable[[str], str] = lambda s: s,
          key_clean: Callable[[str], str] = lambda s: s) -> Pairs:
    """Pair files by a key of their stems (default: the stem itself); an unmatched degraded file is a
    ValueError naming a few."""
    by_key = {key_clean(p.stem): p for p in clean}
    missing = [p.name for p in degraded if key_degraded(p.stem) not in by_key]
    if missing:
        raise ValueError(f"{degraded[0].parent}: no clean image for {len(missing)} file(s), e.g. {missing[:3]}")
    return [(p, by_key[key_degraded(p.stem)]) for p in degraded]


def _folder_pair(root: Path, degraded: str, clean: str, **keys) -> Pairs:
    return match(_images(root / degraded), _images(root / clean), **keys)


def sots(root: Path) -> dict[str, Pairs]:
    if not (root / "hazy").is_dir():
        parts = {f"SOTS-{p.name}": p for p in sorted(root.iterdir()) if (p / "hazy").is_dir()}
        if not parts:
            raise ValueError(f"{root}: no hazy/ folder (nor indoor/, outdoor/ holding one): not a SOTS layout")
        return {name: sots(part)["SOTS"] for name, part in parts.items()}
    clean = "gt" if (root / "gt").is_dir() else "clear"
    return {"SOTS": _folder_pair(root, "hazy", clean, key_degraded=lambda s: s.split("_")[0])}


def rain(root: Path, name: str) -> dict[str, Pairs]:
    if (root / "input").is_dir():
        return {name: _folder_pair(root, "input", "target")}
    strip = lambda s: re.sub(r"^(no)?rain[-_]?", "", s)  # noqa: E731  rain-1 / norain-1 -> 1
    if (root / "rainy").is_dir():
        return {name: _folder_pair(root, "rainy", "norain", key_degraded=strip, key_clean=strip)}
    files = _images(root)
    degraded = [p for p in files if p.stem.startswith("rain")]
    clean = [p for p in files if p.stem.startswith("norain")]
    if not degraded:
        raise ValueError(f"{root}: no input/, rainy/ nor rain-N images: not a {name} layout")
    return {name: match(degraded, clean, key_degraded=strip, key_clean=strip)}


def gopro(root: Path) -> dict[str, Pairs]:
    if (root / "input").is_dir():
        return {"GoPro": _folder_pair(root, "input", "target")}
    if (root / "test").is_dir():
        root = root / "test"
    pairs = []
    for sequence in sorted(p for p in root.iterdir() if (p / "blur").is_dir()):
        pairs += _folder_pair(sequence, "blur", "sharp")
    if not pairs:
        raise ValueError(f"{root}: no SEQUENCE/blur/ folders (nor input/): not a GoPro layout")
    return {"GoPro": pairs}


def lol_v1(root: Path) -> dict[str, Pairs]:
    if (root / "eval15").is_dir():
        root = root / "eval15"
    return {"LOL-v1": _folder_pair(root, "low", "high")}


def lol_v2(root: Path) -> dict[str, Pairs]:
    if not (root / "Low").is_dir():
        parts = {f"LOL-v2-{'real' if p.name.startswith('Real') else 'synthetic'}": p / "Test"
                 for p in sorted(root.iterdir()) if (p / "Test" / "Low").is_dir()}
        if not parts:
            raise ValueError(f"{root}: no Low/ folder (nor Real_captured/Test, Synthetic/Test): not a LOL-v2 layout")
        return {name: lol_v2(part)["LOL-v2"] for name, part in parts.items()}
    strip = lambda s: re.sub(r"^(low|normal)", "", s)  # noqa: E731  low00690 / normal00690 -> 00690
    return {"LOL-v2": _folder_pair(root, "Low", "Normal", key_degraded=strip, key_clean=strip)}


def snow100k(root: Path) -> dict[str, Pairs]:
    if (root / "synthetic").is_dir():
        return {"Snow100K": _folder_pair(root, "synthetic", "gt")}
    parts = {p.name: p for p in sorted(root.iterdir()) if (p / "synthetic").is_dir()}
    if not parts:
        raise ValueError(f"{root}: no synthetic/ folder (nor Snow100K-*/synthetic): not a Snow100K layout")
    return {name: _folder_pair(part, "synthetic", "gt") for name, part in parts.items()}


def noisy_copies(root: Path, dataset: str, sigma: float, seed: int, out: Path) -> dict[str, Pairs]:
    """Each clean image of `root` with Gaussian noise of std `sigma` (8-bit levels) added, clamped, written as
    PNG to out/DATASET_sigmaS/ (image i's noise from a generator seeded `seed` + i)."""
    if sigma <= 0:
        raise ValueError(f"the noise level --sigma must be positive, got {sigma}")
    folder = out / f"{dataset}_sigma{sigma:g}"
    clean = _images(root)
    targets = [folder / f"{p.stem}.png" for p in clean]
    taken = [t.name for t in targets if t.exists()]
    if taken:
        raise ValueError(f"{folder}: already holds {taken[:3]}; choose another output folder")
    for i, (source, target) in enumerate(zip(clean, targets)):
        image = media.read_image(source)
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed + i))
        media.write_image(target, (image + sigma / 255 * noise).clamp(0, 1))
    return {dataset: list(zip(targets, clean))}


LAYOUTS = {  # name: (degradation, how to find the pairs)
    "sots": ("haze", sots),
    "rain100l": ("rain", lambda root: rain(root, "Rain100L")),
    "rain100h": ("rain", lambda root: rain(root, "Rain100H")),
    "rain13k": ("rain", lambda root: rain(root, "Rain13K")),
    "gopro": ("blur", gopro),
    "lol-v1": ("lowlight", lol_v1),
    "lol-v2": ("lowlight", lol_v2),
    "snow100k": ("snow", snow100k),
    "cbsd68": ("noise", None),
    "kodak24": ("noise", None),
    "mcmaster": ("noise", None),
    "pair": (None, lambda root: {root.name: _folder_pair(root, "degraded", "clean")}),
}
NOISE_NAMES = {"cbsd68": "CBSD68", "kodak24": "Kodak24", "mcmaster": "McMaster"}


def build(layout: str, root: str | os.PathLike, out: str | os.PathLike, degradation: str | None = None,
          sigma: float | None = None, seed: int = 0) -> list[dict]:
    """The manifest entries of the dataset at `root` in `layout`, paths relative to the folder of the manifest
    file `out` (noisy copies are written there)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    kind, find = LAYOUTS[layout]
    if (find is None) != (sigma is not None):
        raise ValueError("--sigma (the noise level) goes with the cbsd68, kodak24 and mcmaster layouts, and they "
                         "need it")
    if layout == "pair" and degradation is None:
        raise ValueError("the pair layout needs --degradation NAME")
    datasets = find(root) if find is not None else noisy_copies(root, NOISE_NAMES[layout], sigma, seed, out.parent)
    base = out.parent.resolve()
    return [{"image_path": os.path.relpath(degraded.resolve(), base), "target_path": os.path.relpath(clean.resolve(), base),
             "degradation": degradation or kind, "dataset": dataset}
            for dataset, pairs in datasets.items() for degraded, clean in pairs]


def write(entries: list[dict], out: str | os.PathLike) -> None:
    """Write the manifest atomically; an existing file is never overwritten."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose another output file")
    with runtime.atomic_file(out) as tmp:
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
