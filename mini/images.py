"""The miniatures' data: a folder of real photographs for training, the standard evaluation sets for testing.

    python -m mini.images --eval-crops ../shared/data/eval      # how many 256 px evaluation crops each set gives

Training reads every JPEG/PNG under a folder given on the command line (the project uses the ~500 photographs of
`shared/data/photos/`: BSDS500, LIVE1, Debian wallpapers, OpenCV samples; sources and licences in mini/README.md);
the photos are never committed. Evaluation uses only
  - `eval/` sets (CBSD68, Kodak24, McMaster18; never trained on): fixed 256 x 256 centre crops, and
  - `mini/heldout/` (committed): four 256 x 256 crops of photos that ship in pip wheels (chelsea, coffee, flower,
    kodim23), the pictures of the README.
Photos are kept in memory as uint8 (about 250 MB for the 500); crops are drawn from one seeded generator.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

HELDOUT = ("chelsea", "coffee", "flower", "kodim23")
HELDOUT_FOLDER = Path(__file__).parent / "heldout"
EVAL_SIZE = 256  # side of every evaluation crop
SUFFIXES = (".jpg", ".jpeg", ".png")


def load_rgb(path: Path) -> Tensor:
    """One image file as uint8 [3, H, W] (EXIF orientation applied; grayscale and alpha converted to RGB: these are
    the recipe's own training photos, not a user's input)."""
    from PIL import ImageOps

    with Image.open(path) as image:
        pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def photo_paths(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted, so that the pool's order does not depend on the disk."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no .jpg/.png photographs under {folder}")
    return paths


def load_photos(folder: str | Path, min_side: int = 128) -> list[Tensor]:
    """Every photo under `folder` as uint8 [3, H, W]; photos whose short side is under `min_side` are left out."""
    photos = [load_rgb(p) for p in photo_paths(folder)]
    return [p for p in photos if min(p.shape[1:]) >= min_side]


def random_crops(photos: list[Tensor], count: int, size: int, generator: torch.Generator,
                 scales: tuple[float, ...] = (1.0,)) -> Tensor:
    """`count` random crops [count, 3, size, size] in [0, 1]. Each comes from a random photo: a square of side
    size * s (s drawn from `scales`, capped by the photo) resized to `size` (bilinear with antialias when it shrinks),
    mirrored left-right with probability 1/2. Several scales show the model both fine texture and whole-scene layout."""
    crops = []
    for _ in range(count):
        photo = photos[torch.randint(len(photos), (1,), generator=generator).item()]
        scale = scales[torch.randint(len(scales), (1,), generator=generator).item()]
        side = min(round(size * scale), *photo.shape[1:])
        top = torch.randint(photo.shape[1] - side + 1, (1,), generator=generator).item()
        left = torch.randint(photo.shape[2] - side + 1, (1,), generator=generator).item()
        crop = photo[:, top : top + side, left : left + side].float().div(255)
        if side != size:
            crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                                   antialias=True, align_corners=False)[0].clamp(0, 1)
        crops.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(crops)


def centre_crop(image: Tensor, size: int) -> Tensor:
    """The central size x size pixels of image [3, H, W]."""
    top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
    return image[:, top : top + size, left : left + size]


def eval_crops(eval_folder: str | Path, sets: tuple[str, ...] = ("kodak24", "cbsd68")) -> dict[str, Tensor]:
    """'set/name' -> the 256 x 256 centre crop [3, 256, 256] in [0, 1] of every image of the chosen eval sets."""
    crops = {}
    for name in sets:
        for path in photo_paths(Path(eval_folder) / name):
            crops[f"{name}/{path.stem}"] = centre_crop(load_rgb(path), EVAL_SIZE).float().div(255)
    return crops


def heldout_crops(folder: str | Path = HELDOUT_FOLDER) -> dict[str, Tensor]:
    """The committed held-out crops, name -> [3, 256, 256] in [0, 1]."""
    return {name: load_rgb(Path(folder) / f"{name}.png").float().div(255) for name in HELDOUT}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, help="count the training photos under this folder")
    p.add_argument("--eval-crops", type=Path, metavar="EVAL", help="count the evaluation crops of this eval/ folder")
    args = p.parse_args()
    if args.photos:
        photos = load_photos(args.photos)
        print(f"{len(photos)} photos, {sum(p.numel() for p in photos) / 2**20:.0f} MiB as uint8")
    if args.eval_crops:
        print(f"{len(eval_crops(args.eval_crops))} evaluation crops")


if __name__ == "__main__":
    main()
