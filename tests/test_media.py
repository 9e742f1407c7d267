"""Tests for media.py: image and video files, round trips and refusals, audio carried over."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pictures import moving, natural, psnr

import media
from media import list_images, read_clip, read_image, read_video, video_length, write_image, write_video


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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
    elif kind == "RGBA":  # a translucent alpha (an opaque one is read as its RGB)
        Image.fromarray(np.dstack([rgb, np.full((8, 8), 128, np.uint8)]), "RGBA").save(path)
    elif kind in ("I", "F"):  # 32-bit grayscale: TIFF holds these
        path = tmp_path / f"{kind}.tif"
        Image.fromarray(rgb).convert(kind).save(path)
    elif kind != "missing":
        Image.fromarray(rgb).convert(kind).save(path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("L", "grayscale"), ("I;16", "grayscale"), ("I", "grayscale"), ("F", "grayscale"), ("1", "black-and-white"),
    ("RGBA", "alpha"), ("LA", "alpha"), ("palette-transparent", "transparent"), ("CMYK", "CMYK"),
    ("animated", "animated"), ("text", "cannot read"), ("truncated", "a PNG image that cannot be decoded"), ("missing", "cannot read"),
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
    assert torch.equal(video.frames, clip) and video.fps == media.DEFAULT_FOLDER_FPS == 16
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


def test_a_variable_rate_video_keeps_its_duration(tmp_path):
    """An MKV whose frames come at irregular times over 2 s (the container states 30 fps): the rate read is the
    constant one that keeps the duration, so the written clip lasts about as long and keeps its 2.04 s of audio."""
    import av
    from fractions import Fraction

    from media import probe_video

    path = tmp_path / "vfr.mkv"
    container = av.open(str(path), "w", format="matroska")
    video = container.add_stream("libx264", rate=30)
    video.width = video.height = 32
    video.pix_fmt = "yuv420p"
    video.codec_context.time_base = Fraction(1, 1000)
    audio = container.add_stream("aac", rate=16000)
    audio.layout = "mono"
    for i, ms in enumerate([0, 40, 80, 500, 540, 580, 1200, 1240, 1800, 2000]):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
        frame.pts, frame.time_base = ms, Fraction(1, 1000)
        container.mux(video.encode(frame))
    container.mux(video.encode())
    samples = int(2.04 * 16000)
    for offset in range(0, samples, 1024):
        piece = av.AudioFrame.from_ndarray(np.zeros((1, min(1024, samples - offset)), np.float32), format="fltp",
                                           layout="mono")
        piece.sample_rate, piece.pts = 16000, offset
        container.mux(audio.encode(piece))
    container.mux(audio.encode())
    container.close()
    info = probe_video(path)
    assert info.frames == 10 and info.fps == Fraction(9, 2)  # 9 intervals over 2.0 s
    clip = read_video(path)
    assert clip.fps == info.fps
    write_video(tmp_path / "out.mp4", clip.frames, clip.fps, audio_from=path)
    with av.open(str(tmp_path / "out.mp4")) as out:
        assert out.duration / 1e6 > 2.0
        assert out.streams.audio[0].duration * out.streams.audio[0].time_base > 2.0
