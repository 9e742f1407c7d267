"""The miniature's data: clean RGB photographs that ship inside pip wheels, and their fixed train / held-out split.

    python -m mini.images --train mini/train --heldout mini/heldout      # write both folders as PNGs

Sources (read straight from the installed packages' data folders; nothing is downloaded):
  scikit-image  `skimage/data/`                   (pip install scikit-image)
  scikit-learn  `sklearn/datasets/images/`        (pip install scikit-learn)
  sporco        `sporco/data/`                    (pip install --no-deps sporco: only its data files are used)

HELDOUT images are never seen by any training stage: the autoencoder, the transformer and the prompts all train
on TRAIN only. Evaluation uses the fixed 256 x 256 centre crops written to `mini/heldout/` (committed).
Only RGB photographs are used; grayscale images (e.g. skimage's `camera`) are left out, not converted.
"""

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import Tensor

import data

# name -> (package, file inside the package, licence as documented by the package)
SOURCES = {
    "astronaut": ("skimage", "data/astronaut.png", "public domain (NASA)"),
    "chelsea": ("skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    "coffee": ("skimage", "data/coffee.png", "CC0 (Rachel Michetti)"),
    "rocket": ("skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "public domain (NASA)"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "no known copyright restrictions"),
    "retina": ("skimage", "data/retina.jpg", "CC0 (Mikael Haggstrom)"),
    "china": ("sklearn", "datasets/images/china.jpg", "CC-BY 2.0 (danielbuechele, Flickr)"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "CC-BY 2.0 (vultilion, Flickr)"),
    "barbara": ("sporco", "data/barbara.png", "believed freely redistributable (attributed to Allen Gersho)"),
    "kodim23": ("sporco", "data/kodim23.png", "Kodak test image, released for unrestricted use"),
    "monarch": ("sporco", "data/monarch.png", "Waterloo BragZone, free of copyright restrictions"),
    "sail": ("sporco", "data/sail.png", "Waterloo BragZone, free of copyright restrictions"),
    "tulips": ("sporco", "data/tulips.png", "Waterloo BragZone, free of copyright restrictions"),
}
HELDOUT = ("chelsea", "coffee", "flower", "kodim23")
TRAIN = tuple(name for name in SOURCES if name not in HELDOUT)
HELDOUT_SIZE = 256  # side of the held-out centre crops


def source_path(name: str) -> Path:
    """The file of source image `name` inside its installed package (the package is located, not imported)."""
    package, relative, _ = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"image {name!r} ships with the package {package!r}, which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def load(name: str) -> Tensor:
    """Source image `name` as float32 [3, H, W] in [0, 1]."""
    return data.read_image(source_path(name))


def centre_crop(image: Tensor, size: int) -> Tensor:
    """The central size x size pixels of image [3, H, W]."""
    top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
    return image[:, top : top + size, left : left + size]


def random_crops(images: list[Tensor], count: int, size: int, generator: torch.Generator) -> Tensor:
    """`count` random size x size crops [count, 3, size, size] in [0, 1], each from a random image of `images`,
    mirrored left-right with probability 1/2. All draws come from `generator`."""
    crops = []
    for _ in range(count):
        image = images[torch.randint(len(images), (1,), generator=generator).item()]
        top = torch.randint(image.shape[1] - size + 1, (1,), generator=generator).item()
        left = torch.randint(image.shape[2] - size + 1, (1,), generator=generator).item()
        crop = image[:, top : top + size, left : left + size]
        crops.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(crops)


def heldout_crops(folder: str | Path = Path(__file__).parent / "heldout") -> dict[str, Tensor]:
    """The committed held-out crops, name -> [3, 256, 256] in [0, 1]."""
    return {name: data.read_image(Path(folder) / f"{name}.png") for name in HELDOUT}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="write the training images (whole) here")
    p.add_argument("--heldout", type=Path, help=f"write the held-out {HELDOUT_SIZE}px centre crops here")
    args = p.parse_args()
    for folder, names, crop in ((args.train, TRAIN, None), (args.heldout, HELDOUT, HELDOUT_SIZE)):
        if folder is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            image = load(name) if crop is None else centre_crop(load(name), crop)
            data.write_image(folder / f"{name}.png", image)
        print(f"wrote {len(names)} images to {folder}")


if __name__ == "__main__":
    main()
