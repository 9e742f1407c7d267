"""Tests for data.py: image/video IO round trips and refusals, degradations, paired datasets."""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import data
from data import (
    DEGRADATIONS,
    Manifest,
    PairedFolders,
    Synthetic,
    list_images,
    read_clip,
    read_image,
    read_video,
    video_length,
    write_image,
    write_video,
)


def natural(height: int, width: int, top: int = 40, left: int = 150) -> torch.Tensor:
    """A crop of skimage's astronaut photo (CC0) as [3, H, W] in [0, 1] (8-bit values)."""
    pixels = skdata.astronaut()[top:top + height, left:left + width]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def moving(frames: int, height: int, width: int) -> torch.Tensor:
    """A natural video [3, F, H, W]: the astronaut crop panning 3 pixels per frame."""
    return torch.stack([natural(height, width, left=150 + 3 * f) for f in range(frames)], dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def find_crop(source: torch.Tensor, crop: torch.Tensor) -> tuple[int, ...] | None:
    """Where `crop` [..., h, w] (and for video [3, f, h, w] the start frame) sits in `source`, or None."""
    h, w = crop.shape[-2:]
    starts = range(source.shape[1] - crop.shape[1] + 1) if crop.ndim == 4 else [None]
    for s in starts:
        clip = source if s is None else source[:, s:s + crop.shape[1]]
        for top in range(source.shape[-2] - h + 1):
            for left in range(source.shape[-1] - w + 1):
                if torch.equal(clip[..., top:top + h, left:left + w], crop):
                    return (top, left) if s is None else (s, top, left)
    return None


# ============================================================================================ image IO


def test_png_round_trip_is_exact_and_jpeg_is_close(tmp_path):
    image = natural(37, 53)  # odd, non-square
    write_image(tmp_path / "a.png", image)
    assert torch.equal(read_image(tmp_path / "a.png"), image)
    write_image(tmp_path / "a.jpg", image)
    back = read_image(tmp_path / "a.jpg")
    assert back.shape == image.shape and back.dtype == torch.float32
    assert psnr(back, image) > 30  # quality 95
    assert leftovers(tmp_path) == ["a.jpg", "a.png"]  # no temporary files left


def test_palette_without_transparency_is_read_exactly(tmp_path):
    rgb = (natural(20, 30) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"))
    assert torch.equal(read_image(tmp_path / "p.png"), torch.from_numpy(expected.copy()).permute(2, 0, 1) / 255)


def make_refused(tmp_path: Path, kind: str) -> Path:
    rgb = np.zeros((8, 8, 3), np.uint8)
    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "palette-transparent":
        image = Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    elif kind == "CMYK":
        path = tmp_path / "cmyk.jpg"
        Image.fromarray(rgb).convert("CMYK").save(path)
    elif kind == "animated":
        path = tmp_path / "anim.webp"
        Image.fromarray(rgb).save(path, save_all=True, append_images=[Image.fromarray(rgb + 50)])
    elif kind == "I;16":  # a 16-bit grayscale PNG
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(path)
    elif kind in ("I", "F"):  # 32-bit grayscale: TIFF holds these
        path = tmp_path / f"{kind}.tif"
        Image.fromarray(rgb).convert(kind).save(path)
    elif kind != "missing":
        Image.fromarray(rgb).convert(kind).save(path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("L", "grayscale"), ("I;16", "grayscale"), ("I", "grayscale"), ("F", "grayscale"), ("1", "black-and-white"),
    ("RGBA", "alpha"), ("LA", "alpha"), ("palette-transparent", "transparent"), ("CMYK", "CMYK"),
    ("animated", "animated"), ("text", "cannot read"), ("truncated", "cannot read"), ("missing", "cannot read"),
])
def test_read_image_refuses_non_rgb_and_broken_files(tmp_path, kind, message):
    path = make_refused(tmp_path, kind)
    if kind in ("L", "I;16", "I", "F", "1", "RGBA", "LA", "CMYK"):
        assert Image.open(path).mode == kind  # the file really holds what the case says
    with pytest.raises(ValueError, match=message) as err:
        read_image(path)
    assert str(path) in str(err.value)
    if kind in ("L", "RGBA", "CMYK", "palette-transparent"):
        assert "convert it to RGB first" in str(err.value)


@pytest.mark.parametrize("name, image, message", [
    ("a.png", natural(8, 8) * 1.5, r"in \[0, 1\]"),
    ("a.png", natural(8, 8) - 1, r"in \[0, 1\]"),
    ("a.png", torch.full((3, 8, 8), float("nan")), "finite"),
    ("a.png", natural(8, 8)[None], r"\[3, H, W\]"),
    ("a.png", natural(8, 8)[:1], r"\[3, H, W\]"),
    ("a.png", (natural(8, 8) * 255).to(torch.uint8), "float"),
    ("a.gif", natural(8, 8), "writes .png"),
])
def test_write_image_refuses_bad_input_and_leaves_nothing(tmp_path, name, image, message):
    with pytest.raises(ValueError, match=message):
        write_image(tmp_path / name, image)
    assert leftovers(tmp_path) == []


def test_list_images_sorted_filtered_and_empty(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "notes.txt", "d.tif"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")


# ============================================================================================ video IO

# crf 17 H.264 of a small natural clip: measured 36.5 dB (48x64, yuv420p) and 38.4 dB (47x63, yuv444p).
VIDEO_PSNR_BOUND = 33.0


@pytest.mark.parametrize("fps, height, width", [(Fraction(24000, 1001), 48, 64), (12, 47, 63)])
def test_video_round_trip_keeps_frames_size_and_rate(tmp_path, fps, height, width):
    clip = moving(9, height, width)
    write_video(tmp_path / "v.mp4", clip, fps)
    video = read_video(tmp_path / "v.mp4")
    assert video.frames.shape == (3, 9, height, width) and video.frames.dtype == torch.float32
    assert video.fps == fps and isinstance(video.fps, Fraction)
    assert not video.has_audio
    print(f"video round trip {height}x{width} @ {fps}: PSNR {psnr(video.frames, clip):.2f} dB")
    assert psnr(video.frames, clip) > VIDEO_PSNR_BOUND
    assert video_length(tmp_path / "v.mp4") == 9
    assert torch.equal(read_clip(tmp_path / "v.mp4", 3, 5), video.frames[:, 3:8])
    assert leftovers(tmp_path) == ["v.mp4"]


def test_float_rate_is_kept_exactly(tmp_path):
    write_video(tmp_path / "v.mp4", moving(5, 16, 16), 30000 / 1001)
    assert read_video(tmp_path / "v.mp4").fps == Fraction(30000, 1001)


def make_clip_with_audio(path: Path, seconds: float = 2.0, rate: int = 44100, hz: float = 440.0) -> None:
    """A .mov with 12 fps H.264 video and a stereo PCM sine (so write_video has to transcode it to AAC)."""
    clip = (moving(24, 32, 32) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=12)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=rate)
        audio.layout = "stereo"
        for pixels in clip:
            out.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode())
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)
        interleaved = np.repeat(wave, 2)[None]
        for offset in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(interleaved[:, 2 * offset:2 * offset + 2048]),
                                               format="s16", layout="stereo")
            frame.sample_rate, frame.pts = rate, offset
            out.mux(audio.encode(frame))
        out.mux(audio.encode())


def test_audio_is_carried_over_when_present(tmp_path):
    make_clip_with_audio(tmp_path / "src.mov")
    source = read_video(tmp_path / "src.mov")
    assert source.has_audio and source.frames.shape == (3, 24, 32, 32) and source.fps == 12

    write_video(tmp_path / "out.mp4", source.frames[:, :9], source.fps, audio_from=tmp_path / "src.mov")
    assert read_video(tmp_path / "out.mp4").has_audio
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, stream.layout.name) == ("aac", 44100, "stereo")
        samples = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
    seconds = samples.shape[1] / 44100
    assert abs(seconds - 9 / 12) < 0.05, seconds  # cut to the video's 0.75 s (AAC works in 1024-sample frames)
    peak = np.argmax(np.abs(np.fft.rfft(samples[0]))) * 44100 / samples.shape[1]
    assert abs(peak - 440) < 5, peak
    assert abs(np.sqrt((samples ** 2).mean()) - 0.3 / np.sqrt(2)) < 0.03

    write_video(tmp_path / "silent.mp4", source.frames[:, :5], 12)
    assert not read_video(tmp_path / "silent.mp4").has_audio
    write_video(tmp_path / "silent2.mp4", source.frames[:, :5], 12, audio_from=tmp_path / "silent.mp4")
    assert not read_video(tmp_path / "silent2.mp4").has_audio


def test_frame_folder_reads_sorted_frames_with_default_or_given_rate(tmp_path):
    clip = moving(5, 16, 24)
    for f in range(5):
        write_image(tmp_path / "frames" / f"{f:03d}.png", clip[:, f])
    video = read_video(tmp_path / "frames")
    assert torch.equal(video.frames, clip) and video.fps == data.DEFAULT_FOLDER_FPS == 16
    assert not video.has_audio
    assert read_video(tmp_path / "frames", fps=24000 / 1001).fps == Fraction(24000, 1001)
    assert video_length(tmp_path / "frames") == 5
    assert torch.equal(read_clip(tmp_path / "frames", 1, 3), clip[:, 1:4])


def test_read_video_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        read_video(tmp_path / "empty")

    write_image(tmp_path / "mixed" / "0.png", natural(16, 16))
    write_image(tmp_path / "mixed" / "1.png", natural(16, 18))
    with pytest.raises(ValueError, match=f"{tmp_path / 'mixed'}: mixed frame sizes"):
        read_video(tmp_path / "mixed")

    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="junk.mp4: cannot open this video file"):
        read_video(tmp_path / "junk.mp4")

    # a container with a video stream but no video frames (only an audio packet)
    with av.open(str(tmp_path / "noframes.mkv"), "w") as out:
        video = out.add_stream("libx264", rate=12)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        audio = out.add_stream("aac", rate=8000)
        audio.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(audio.encode(frame))
        out.mux(audio.encode())
    with pytest.raises(ValueError, match="noframes.mkv: the video has no frames"):
        read_video(tmp_path / "noframes.mkv")

    write_video(tmp_path / "v.mp4", moving(5, 16, 16), 12)
    with pytest.raises(ValueError, match="fps is only for folders"):
        read_video(tmp_path / "v.mp4", fps=12)
    with pytest.raises(ValueError, match="frames 3..6 of a 5-frame video"):
        read_clip(tmp_path / "v.mp4", 3, 4)


@pytest.mark.parametrize("name, frames, message", [
    ("v.mp4", moving(5, 16, 16) * 2, r"in \[0, 1\]"),
    ("v.mp4", natural(16, 16), r"\[3, F, H, W\]"),
    ("v.mp4", moving(5, 16, 16)[:, :0], r"\[3, F, H, W\]"),
    ("v.avi", moving(5, 16, 16), "writes .mp4"),
])
def test_write_video_refuses_bad_input_and_leaves_nothing(tmp_path, name, frames, message):
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / name, frames, 12)
    assert leftovers(tmp_path) == []


def test_failed_video_writes_leave_nothing(tmp_path, monkeypatch):
    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="junk.mp4: cannot read audio"):
        write_video(tmp_path / "out.mp4", moving(5, 16, 16), 12, audio_from=tmp_path / "junk.mp4")
    assert leftovers(tmp_path) == ["junk.mp4"]

    # fail in the middle of encoding: the temporary file had frames in it and must be gone
    made = []

    def failing_from_ndarray(pixels, format):
        made.append(1)
        if len(made) == 4:
            raise RuntimeError("disk full")
        return original(pixels, format=format)

    original = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_from_ndarray)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(tmp_path / "out.mp4", moving(9, 16, 16), 12)
    assert len(made) == 4 and leftovers(tmp_path) == ["junk.mp4"]


# ======================================================================================== degradations

# PSNR vs clean on the 64x64 crop below, worst (highest) over seeds 0..39: noise 24.6, blur 28.0, motion-blur
# 26.6, haze 17.6, rain 33.5 (a sparse draw), lowlight 8.4, snow 25.5, jpeg 29.4 dB. Seeds 0..2, tested here,
# all stay below this bound (measured 16.0 .. 28.5 dB).
DEGRADED_PSNR_BOUND = 31.0
# Degradations whose randomness is only in their parameters: every frame of a static clip is degraded alike.
PARAMETER_ONLY = ("blur", "motion-blur", "haze", "jpeg")


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_degradation_is_deterministic_in_range_and_degrades(name):
    degrade = DEGRADATIONS[name]
    image = natural(64, 64, top=20, left=180)
    first, again, other = degrade(image, gen(0)), degrade(image, gen(0)), degrade(image, gen(1))
    assert first.shape == image.shape and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0 <= first.min() and first.max() <= 1
    scores = [psnr(degrade(image, gen(seed)), image) for seed in range(3)]
    print(f"{name}: PSNR vs clean {[round(s, 1) for s in scores]} dB")
    assert max(scores) < DEGRADED_PSNR_BOUND

    static = image[:, None].expand(3, 5, 64, 64)
    video = degrade(static, gen(0))
    assert video.shape == (3, 5, 64, 64) and 0 <= video.min() and video.max() <= 1
    assert torch.equal(video, degrade(static, gen(0)))
    assert not torch.equal(video, degrade(static, gen(1)))
    if name in PARAMETER_ONLY:  # same parameters for every frame, and the same as for the image
        for f in range(5):
            assert torch.allclose(video[:, f], first, atol=1e-6)
    else:  # fresh noise / drops / moving flakes per frame
        assert not torch.equal(video[:, 0], video[:, 1])


def test_degradations_refuse_wrong_shapes():
    for bad in (torch.rand(1, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"\[3, H, W\] or a video \[3, F, H, W\]"):
            DEGRADATIONS["noise"](bad, gen(0))


def test_snow_flakes_drift_down_between_frames():
    """The snow layer of frame 1 is (mostly) the snow of frame 0 shifted down: flakes move, they don't blink."""
    black = torch.zeros(3, 2, 96, 96)
    snowy = DEGRADATIONS["snow"](black, gen(3))[0]  # one channel [2, H, W]
    flakes0, flakes1 = snowy[0] - snowy[0].min(), snowy[1] - snowy[1].min()
    best = min(range(0, 6), key=lambda dy: (flakes0.roll(dy, 0) - flakes1).abs().mean().item())
    assert best > 0
    assert (flakes0.roll(best, 0) - flakes1).abs().mean() < 0.5 * (flakes0 - flakes1).abs().mean()


# ============================================================================================ datasets


def write_pairs(root: Path, names: list[str], height: int = 40, width: int = 56) -> dict[str, torch.Tensor]:
    """clean/NAME.png and degraded/NAME.png = 1 - clean (an exact, position-checkable relation)."""
    cleans = {}
    for i, name in enumerate(names):
        clean = natural(height, width, top=10 * i, left=150 + 7 * i)
        write_image(root / "clean" / f"{name}.png", clean)
        write_image(root / "degraded" / f"{name}.png", 1 - clean)
        cleans[name] = clean
    return cleans


def test_paired_folders_images(tmp_path):
    cleans = write_pairs(tmp_path, ["b", "a", "c"])
    dataset = PairedFolders(tmp_path, size=(24, 32))
    assert len(dataset) == 3
    clean, degraded = dataset.pair(0, gen(0))
    assert clean.shape == degraded.shape == (3, 24, 32)
    assert torch.allclose(degraded, 1 - clean, atol=1e-6)  # the same crop of both
    assert find_crop(cleans["a"], clean) is not None  # sorted by name: index 0 is "a"
    assert all(torch.equal(x, y) for x, y in zip(dataset.pair(0, gen(0)), (clean, degraded)))
    assert not torch.equal(dataset.pair(0, gen(1))[0], clean)
    whole_clean, whole_degraded = PairedFolders(tmp_path, size=None).pair(2, gen(0))
    assert torch.equal(whole_clean, cleans["c"])


def test_paired_folders_match_by_name_without_suffix(tmp_path):
    write_image(tmp_path / "clean" / "x.png", natural(16, 16))
    (tmp_path / "degraded").mkdir()
    pixels = (natural(16, 16) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "degraded" / "x.bmp")  # lossless, another suffix
    clean, degraded = PairedFolders(tmp_path, size=8).pair(0, gen(0))
    assert torch.equal(clean, degraded)


def test_paired_folders_errors(tmp_path):
    write_pairs(tmp_path, ["a", "b"], height=20, width=20)
    write_image(tmp_path / "clean" / "only_clean.png", natural(20, 20))
    write_image(tmp_path / "degraded" / "only_degraded.png", natural(20, 20))
    unpaired = r"unpaired files: in degraded/ only \['only_degraded'\].*in clean/ only \['only_clean'\]"
    with pytest.raises(ValueError, match=unpaired):
        PairedFolders(tmp_path, size=16)
    (tmp_path / "clean" / "only_clean.png").unlink()
    (tmp_path / "degraded" / "only_degraded.png").unlink()

    with pytest.raises(ValueError, match="is smaller than the crop 32x16") as err:
        PairedFolders(tmp_path, size=(32, 16)).pair(0, gen(0))
    assert "a.png" in str(err.value) and "20x20" in str(err.value)

    write_image(tmp_path / "degraded" / "b.png", natural(20, 22))
    with pytest.raises(ValueError, match="pair of different sizes") as err:
        PairedFolders(tmp_path, size=16).pair(1, gen(0))
    assert "clean/b.png" in str(err.value) and "degraded/b.png" in str(err.value)

    with pytest.raises(IndexError):
        PairedFolders(tmp_path, size=16).pair(2, gen(0))
    with pytest.raises(ValueError, match="not a folder"):
        PairedFolders(tmp_path / "nowhere", size=16)


def write_frame_video(folder: Path, clip: torch.Tensor) -> None:
    for f in range(clip.shape[1]):
        write_image(folder / f"{f:04d}.png", clip[:, f])


def test_paired_folders_video_frame_folders(tmp_path):
    clip = moving(9, 20, 28)
    write_frame_video(tmp_path / "clean" / "walk", clip)
    write_frame_video(tmp_path / "degraded" / "walk", 1 - clip)
    dataset = PairedFolders(tmp_path, size=16, frames=5)
    clean, degraded = dataset.pair(0, gen(0))
    assert clean.shape == degraded.shape == (3, 5, 16, 16)
    assert torch.allclose(degraded, 1 - clean, atol=1e-6)
    assert find_crop(clip, clean) is not None
    starts = {find_crop(clip, dataset.pair(0, gen(seed))[0])[0] for seed in range(8)}
    assert len(starts) > 1  # the start frame is random too
    assert all(torch.equal(x, y) for x, y in zip(dataset.pair(0, gen(0)), (clean, degraded)))

    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        PairedFolders(tmp_path, size=16, frames=8)
    with pytest.raises(ValueError, match="9 frames, shorter than the clip of 13 frames"):
        PairedFolders(tmp_path, size=16, frames=13).pair(0, gen(0))
    (tmp_path / "degraded" / "walk" / "0008.png").unlink()
    with pytest.raises(ValueError, match="different lengths"):
        dataset.pair(0, gen(0))


def test_paired_folders_video_files(tmp_path):
    clip = moving(9, 24, 32)
    write_video(tmp_path / "clean" / "a.mp4", clip, 12)
    write_video(tmp_path / "degraded" / "a.mp4", 1 - clip, 12)
    dataset = PairedFolders(tmp_path, size=(16, 24), frames=5)
    clean, degraded = dataset.pair(0, gen(0))
    assert clean.shape == degraded.shape == (3, 5, 16, 24)
    assert (degraded - (1 - clean)).abs().mean() < 0.03  # lossy codec, but the same frames and place
    assert all(torch.equal(x, y) for x, y in zip(dataset.pair(0, gen(0)), (clean, degraded)))


def test_manifest_images_and_video(tmp_path):
    cleans = write_pairs(tmp_path / "set", ["a", "b"])
    entries = [
        {"image_path": "set/degraded/a.png", "target_path": "set/clean/a.png", "degradation": "haze", "dataset": "X"},
        {"image_path": str(tmp_path / "set/degraded/b.png"), "target_path": "set/clean/b.png",
         "degradation": "rain", "dataset": "Y"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(entries))
    manifest = Manifest(tmp_path / "m.json", size=16)
    assert len(manifest) == 2
    assert [(i.degradation, i.dataset) for i in manifest.items] == [("haze", "X"), ("rain", "Y")]
    clean, degraded = manifest.pair(1, gen(0))
    assert clean.shape == (3, 16, 16) and torch.allclose(degraded, 1 - clean, atol=1e-6)
    assert find_crop(cleans["b"], clean) is not None

    clip = moving(9, 20, 20)
    write_frame_video(tmp_path / "vid" / "clean", clip)
    write_frame_video(tmp_path / "vid" / "degraded", 1 - clip)
    frames = [f"{f:04d}.png" for f in range(9)]
    video_entries = [{"image_path": [f"vid/degraded/{n}" for n in frames],
                      "target_path": [f"vid/clean/{n}" for n in frames], "degradation": "snow", "dataset": "V"}]
    (tmp_path / "v.json").write_text(json.dumps(video_entries))
    clean, degraded = Manifest(tmp_path / "v.json", size=16, frames=5).pair(0, gen(0))
    assert clean.shape == (3, 5, 16, 16) and torch.allclose(degraded, 1 - clean, atol=1e-6)
    assert find_crop(clip, clean) is not None

    with pytest.raises(ValueError, match="entry 0 is a video .* frames=None"):
        Manifest(tmp_path / "v.json", size=16).pair(0, gen(0))
    with pytest.raises(ValueError, match="entry 0 is an image, but clips of 5 frames"):
        Manifest(tmp_path / "m.json", size=16, frames=5).pair(0, gen(0))
    (tmp_path / "bad.json").write_text(json.dumps([{"image_path": "a.png", "target_path": "b.png"}]))
    with pytest.raises(ValueError, match="entry 0 must be an object with keys"):
        Manifest(tmp_path / "bad.json", size=16)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="cannot read this JSON manifest"):
        Manifest(tmp_path / "broken.json", size=16)


def test_synthetic_images_and_videos(tmp_path):
    sources = [natural(40, 48), natural(40, 48, top=60)]
    dataset = Synthetic(sources, "blur", size=24)
    clean, degraded = dataset.pair(1, gen(0))
    assert clean.shape == degraded.shape == (3, 24, 24)
    assert find_crop(sources[1], clean) is not None
    assert not torch.equal(clean, degraded) and psnr(degraded, clean) < 40
    assert all(torch.equal(x, y) for x, y in zip(dataset.pair(1, gen(0)), (clean, degraded)))
    assert not torch.equal(dataset.pair(1, gen(1))[1], degraded)

    write_image(tmp_path / "imgs" / "0.png", sources[0])
    from_folder = Synthetic(tmp_path / "imgs", "jpeg", size=24)
    from_paths = Synthetic([tmp_path / "imgs" / "0.png"], "jpeg", size=24)
    assert all(torch.equal(x, y) for x, y in zip(from_folder.pair(0, gen(5)), from_paths.pair(0, gen(5))))

    clip = moving(9, 24, 24)
    write_video(tmp_path / "vids" / "a.mp4", clip, 12)
    for video_dataset in (Synthetic([clip], "rain", size=16, frames=5), Synthetic(tmp_path / "vids", "rain", 16, 5)):
        clean, degraded = video_dataset.pair(0, gen(0))
        assert clean.shape == degraded.shape == (3, 5, 16, 16)
        assert psnr(degraded, clean) < DEGRADED_PSNR_BOUND
    assert find_crop(clip, Synthetic([clip], "noise", size=16, frames=5).pair(0, gen(2))[0]) is not None

    with pytest.raises(ValueError, match="unknown degradation 'fog'; choose from"):
        Synthetic(sources, "fog", size=24)
    with pytest.raises(ValueError, match=r"expected float tensors \[3, F, H, W\]"):
        Synthetic(sources, "blur", size=24, frames=5)
    with pytest.raises(ValueError, match="source tensor .* is smaller than the crop 64x64"):
        Synthetic(sources, "blur", size=64).pair(0, gen(0))
    with pytest.raises(ValueError, match="shorter than the clip of 13 frames"):
        Synthetic([clip], "blur", size=16, frames=13).pair(0, gen(0))
