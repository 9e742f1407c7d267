"""`python data.py manifest --layout NAME DIR -o test.json` on small fake trees in each dataset's layout: every
degraded file paired with its own clean file, the manifest readable by data.Manifest, noisy copies seeded."""

import json

import pytest
import torch

import data
import manifests
import media


def image(path, value: float) -> None:
    media.write_image(path, torch.full((3, 8, 8), value))


def tree(root, files: dict[str, float]):
    for name, value in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image(root / name, value)
    return root


def run(layout, root, out, *extra):
    data.main(["manifest", "--layout", layout, str(root), "-o", str(out), *extra])
    return data.Manifest(out, None).items


def pairs(items) -> set[tuple[str, str, str, str]]:
    """(degraded path's last two parts, clean's, degradation, dataset) of each item."""
    def tail(p):
        return "/".join(p.parts[-2:])
    return {(tail(i.degraded), tail(i.clean), i.degradation, i.dataset) for i in items}


# Each layout: the files of a fake tree (value = image level, degraded and clean of one pair share it) and the
# expected pairs.
LAYOUTS = {
    "sots": ({"outdoor/hazy/0001_0.8_0.2.jpg": 0.1, "outdoor/hazy/0002_0.9_0.1.jpg": 0.2, "outdoor/gt/0001.png": 0.1,
              "outdoor/gt/0002.png": 0.2, "indoor/hazy/1400_1.png": 0.3, "indoor/gt/1400.png": 0.3},
             {("hazy/0001_0.8_0.2.jpg", "gt/0001.png", "haze", "SOTS-outdoor"),
              ("hazy/0002_0.9_0.1.jpg", "gt/0002.png", "haze", "SOTS-outdoor"),
              ("hazy/1400_1.png", "gt/1400.png", "haze", "SOTS-indoor")}),
    "rain100l": ({"input/1.png": 0.1, "input/2.png": 0.2, "target/1.png": 0.1, "target/2.png": 0.2},
                 {("input/1.png", "target/1.png", "rain", "Rain100L"), ("input/2.png", "target/2.png", "rain", "Rain100L")}),
    "rain100h": ({"rainy/rain-001.png": 0.1, "norain/norain-001.png": 0.1},
                 {("rainy/rain-001.png", "norain/norain-001.png", "rain", "Rain100H")}),
    "rain13k": ({"input/a.jpg": 0.1, "target/a.jpg": 0.1}, {("input/a.jpg", "target/a.jpg", "rain", "Rain13K")}),
    "gopro": ({"test/GOPR0384_11_00/blur/000001.png": 0.1, "test/GOPR0384_11_00/sharp/000001.png": 0.1,
               "test/GOPR0410_11_00/blur/000002.png": 0.2, "test/GOPR0410_11_00/sharp/000002.png": 0.2},
              {("blur/000001.png", "sharp/000001.png", "blur", "GoPro"),
               ("blur/000002.png", "sharp/000002.png", "blur", "GoPro")}),
    "lol-v1": ({"eval15/low/1.png": 0.1, "eval15/high/1.png": 0.1, "our485/low/2.png": 0.2,
                "our485/high/2.png": 0.2}, {("low/1.png", "high/1.png", "lowlight", "LOL-v1")}),
    "lol-v2": ({"Real_captured/Test/Low/low00690.png": 0.1, "Real_captured/Test/Normal/normal00690.png": 0.1,
                "Synthetic/Test/Low/r000da54ft.png": 0.2, "Synthetic/Test/Normal/r000da54ft.png": 0.2},
               {("Low/low00690.png", "Normal/normal00690.png", "lowlight", "LOL-v2-real"),
                ("Low/r000da54ft.png", "Normal/r000da54ft.png", "lowlight", "LOL-v2-synthetic")}),
    "snow100k": ({"Snow100K-L/synthetic/beach_1.jpg": 0.1, "Snow100K-L/gt/beach_1.jpg": 0.1,
                  "Snow100K-S/synthetic/city_2.jpg": 0.2, "Snow100K-S/gt/city_2.jpg": 0.2},
                 {("synthetic/beach_1.jpg", "gt/beach_1.jpg", "snow", "Snow100K-L"),
                  ("synthetic/city_2.jpg", "gt/city_2.jpg", "snow", "Snow100K-S")}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_pairs_each_file_with_its_own_target(tmp_path, layout):
    files, expected = LAYOUTS[layout]
    root = tree(tmp_path / "dataset", files)
    items = run(layout, root, tmp_path / "lists" / "test.json")
    assert pairs(items) == expected
    for item in items:  # a pair's two images share their level: the right files were paired
        assert (media.read_image(item.degraded) - media.read_image(item.clean)).abs().max() < 0.02
    entries = json.loads((tmp_path / "lists" / "test.json").read_text())
    assert all(not entry["image_path"].startswith("/") for entry in entries)  # relative to the manifest


def test_an_unmatched_file_and_an_existing_manifest_are_errors(tmp_path, capsys):
    root = tree(tmp_path / "d", {"input/1.png": 0.1, "input/2.png": 0.2, "target/1.png": 0.1})
    with pytest.raises(SystemExit, match="no clean image for 1 file"):
        data.main(["manifest", "--layout", "rain100l", str(root), "-o", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(SystemExit, match="exists"):
        data.main(["manifest", "--layout", "gopro", str(root), "-o", str(tmp_path / "t.json")])
    assert (tmp_path / "t.json").read_text() == "[]"


def test_generic_pair_needs_a_degradation_name(tmp_path):
    root = tree(tmp_path / "mine", {"degraded/a.png": 0.1, "clean/a.png": 0.1})
    with pytest.raises(SystemExit, match="--degradation"):
        data.main(["manifest", "--layout", "pair", str(root), "-o", str(tmp_path / "t.json")])
    items = run("pair", root, tmp_path / "t.json", "--degradation", "haze")
    assert pairs(items) == {("degraded/a.png", "clean/a.png", "haze", "mine")}


@pytest.mark.parametrize("layout", ["cbsd68", "kodak24", "mcmaster"])
def test_noise_layouts_write_seeded_noisy_copies(tmp_path, layout):
    root = tmp_path / "clean"
    root.mkdir()
    clean = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5)).mul(255).round().div(255)
    media.write_image(root / "kodim01.png", clean)
    items = run(layout, root, tmp_path / "out" / "test.json", "--sigma", "25", "--seed", "7")
    name = manifests.NOISE_NAMES[layout]
    assert pairs(items) == {(f"{name}_sigma25/kodim01.png", "clean/kodim01.png", "noise", name)}
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    expected = (clean + 25 / 255 * noise).clamp(0, 1)
    assert (media.read_image(items[0].degraded) - expected).abs().max() <= 0.5 / 255 + 1e-6
    assert (media.read_image(items[0].degraded) - clean).std() == pytest.approx(25 / 255, rel=0.2)
    with pytest.raises(SystemExit, match="already holds"):  # never over a noisy copy already there
        data.main(["manifest", "--layout", layout, str(root), "-o", str(tmp_path / "out" / "again.json"),
                   "--sigma", "25"])
    with pytest.raises(SystemExit, match="--sigma"):
        data.main(["manifest", "--layout", layout, str(root), "-o", str(tmp_path / "x.json")])
