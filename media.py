"""Pixels on disk: image and video files, read and written exactly.

Conventions used everywhere:

- an image is a float32 tensor [3, H, W] with values in [0, 1] (RGB);
- a video is a float32 tensor [3, F, H, W] in [0, 1]: channels first, frames second, which is the layout the
  video VAE takes once a batch axis is added in front.

    image = read_image("photo.png")                            # [3, H, W]; grayscale, alpha, CMYK are refused
    write_image("out.png", image)                              # atomically; 8-bit PNG round trips are exact
    video = read_video("clip.mp4")                             # Video(frames [3, F, H, W], fps, has_audio)
    info = probe_video("clip.mp4")                             # frames, fps, size, audio: no frame decoded
    write_video("out.mp4", video.frames, video.fps, audio_from="clip.mp4")
    clip = read_clip("clip.mp4", start=8, count=9)             # [3, 9, H, W]; also folders or lists of frames
"""

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from runtime import atomic_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
# Frame rate of a folder of frames when the caller gives none: Wan2.1 generates and was trained at 16 fps.
DEFAULT_FOLDER_FPS = Fraction(16)

# Pillow modes that read_image refuses, with the reason shown to the user. Anything else that is not RGB or P
# (palette) is refused too, as an "unsupported mode".
_REFUSED_MODES = {
    "1": "a black-and-white (1-bit) image",
    "L": "a grayscale image",
    "I": "a grayscale (32-bit integer) image",
    "I;16": "a grayscale (16-bit) image",
    "I;16B": "a grayscale (16-bit) image",
    "I;16L": "a grayscale (16-bit) image",
    "F": "a grayscale (32-bit float) image",
    "LA": "a grayscale image with an alpha channel",
    "La": "a grayscale image with an alpha channel",
    "RGBA": "an image with an alpha channel",
    "RGBa": "an image with an alpha channel",
    "PA": "a palette image with an alpha channel",
    "CMYK": "a CMYK image (converting it to RGB properly needs its colour profile)",
}


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files directly inside `folder` (png/jpg/jpeg/bmp/webp/tif/tiff), sorted by name; with
    `recursive`, those in its sub-folders too (sorted by path; links to folders are not followed).

    Raises ValueError when `folder` is not a folder or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if recursive:
        files = sorted(Path(parent) / name for parent, _, names in os.walk(folder) for name in names
                       if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        where = "in this folder or its sub-folders" if recursive else "in this folder"
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) {where}")
    return files


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The videos directly inside `folder`, sorted by name: video files (mp4/mov/mkv/webm/avi) and sub-folders
    (each sub-folder is one video stored as frame images). Raises ValueError when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    videos = sorted(p for p in folder.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)}) or frame sub-folders in it")
    return videos


def check_decoded_size(what: str, width: int, height: int, max_pixels: int | None, frames: int = 1) -> None:
    """Refuse, before decoding, an input whose declared size is empty or whose width x height x frames exceeds
    `max_pixels` (None: no bound). Raises ValueError naming `what` and the size."""
    if width < 1 or height < 1:
        raise ValueError(f"{what}: declares a size of {width}x{height} (WxH); nothing to decode")
    if max_pixels is not None and width * height * frames > max_pixels:
        size = f"{width}x{height} (WxH)" + (f" x {frames} frames" if frames > 1 else "")
        raise ValueError(f"{what}: {size} is {width * height * frames / 1e6:.1f} million pixels decoded; at most "
                         f"{max_pixels / 1e6:.1f} million are taken (--max-pixels)")


def _open_image(path: Path) -> Image.Image:
    """Open an image file lazily (its header read, no pixel decoded); ValueError for a file Pillow cannot identify
    and for one declaring more pixels than Pillow decodes safely."""
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: callers check the size themselves
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path}: the image declares more pixels than can be decoded safely ({err})") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read this image file ({err})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) an image file's header declares, no pixel decoded (ValueError as `_open_image`)."""
    with _open_image(Path(path)) as image:
        return image.size


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Tensor:
    """Read an RGB image file as float32 [3, H, W] in [0, 1].

    Only RGB pixels are accepted, nothing is converted behind your back: grayscale, alpha (RGBA, LA, or a
    palette with a transparent colour), CMYK and animated images raise ValueError. A palette ("P") image
    without transparency IS accepted: its palette entries are RGB colours, so the lookup is exact. EXIF
    orientation tags are applied (a phone photo comes upright, as a viewer shows it). An RGBA image whose alpha
    is 255 everywhere (opaque) is read as its RGB; 16-bit RGB is read at 8 bits as Pillow decodes it, like any
    other RGB file. Unreadable or corrupt files raise ValueError. With `max_pixels`, the size the header declares
    is checked before any pixel is decoded (`check_decoded_size`).
    """
    path = Path(path)
    image = _open_image(path)
    kind = image.format or "known"
    try:
        with image:
            check_decoded_size(str(path), *image.size, max_pixels)
            if getattr(image, "n_frames", 1) > 1:
                raise ValueError(f"{path}: an animated image with {image.n_frames} frames; save one frame as PNG")
            mode = image.mode
            if mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
                image, mode = image.convert("RGB"), "RGB"  # opaque: the alpha channel says nothing
            if mode == "P" and "transparency" in image.info:
                raise ValueError(f"{path}: a palette image with a transparent colour; convert it to RGB first")
            if mode in _REFUSED_MODES:
                raise ValueError(f"{path}: {_REFUSED_MODES[mode]}; convert it to RGB first")
            if mode not in ("RGB", "P"):
                raise ValueError(f"{path}: unsupported image mode {mode!r}; convert it to RGB first")
            image.load()
            image = ImageOps.exif_transpose(image.convert("RGB") if mode == "P" else image)
            pixels = np.asarray(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # a known format, broken inside
        raise ValueError(f"{path}: a {kind} image that cannot be decoded ({err})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)


def _to_uint8(pixels: Tensor, expected: str, what: str) -> np.ndarray:
    """[3, ...] float in [0, 1] -> uint8 array with the channel axis last. `expected` names the shape."""
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point() or pixels.shape[0] != 3 or not pixels.numel():
        raise ValueError(f"{what}: expected a float tensor {expected}, got {describe(pixels)}")
    pixels = pixels.detach().float().cpu()
    if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"{what}: values must be finite and in [0, 1] (clamp first), got range "
                         f"[{pixels.min().item():.4g}, {pixels.max().item():.4g}]")
    return pixels.mul(255).round_().to(torch.uint8).movedim(0, -1).numpy()


def describe(x: object) -> str:
    """A tensor's dtype and shape, or another object's type, for error messages."""
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def write_image(path: str | os.PathLike, image: Tensor, jpeg_quality: int = 95) -> None:
    """Write an image [3, H, W] in [0, 1] as PNG (.png) or JPEG (.jpg/.jpeg, at `jpeg_quality`), atomically.

    Values are rounded to 8 bits, so a PNG round trip of an image read by `read_image` is exact. Values
    outside [0, 1] raise ValueError (clamp first). The file appears under its name only when complete.
    """
    path = Path(path)
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if path.suffix.lower() not in formats:
        raise ValueError(f"{path}: write_image writes .png, .jpg or .jpeg, not {path.suffix!r}")
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise ValueError(f"{path}: expected an image tensor [3, H, W], got {describe(image)}")
    pixels = _to_uint8(image, "[3, H, W]", str(path))
    options = {"quality": jpeg_quality} if formats[path.suffix.lower()] == "JPEG" else {}
    with atomic_file(path) as tmp:
        Image.fromarray(pixels, "RGB").save(tmp, format=formats[path.suffix.lower()], **options)


@dataclass
class Video:
    """A decoded video. `frames`: float32 [3, F, H, W] in [0, 1]; `fps`: the exact frame rate (e.g.
    Fraction(24000, 1001)); `has_audio`: whether the source file has an audio stream."""

    frames: Tensor
    fps: Fraction
    has_audio: bool


def _as_fraction(fps: Fraction | float | int, what: str) -> Fraction:
    """A frame rate as an exact Fraction; floats are snapped to the nearest ratio with denominator <= 10000,
    so 23.976023976... becomes 24000/1001."""
    rate = Fraction(fps).limit_denominator(10000) if isinstance(fps, float) else Fraction(fps)
    if rate <= 0:
        raise ValueError(f"{what}: frame rate must be positive, got {fps}")
    return rate


@dataclass
class VideoInfo:
    """What a video file holds (`probe_video`): frames counted, the rate that keeps its duration, the size."""

    frames: int
    fps: Fraction
    height: int
    width: int
    has_audio: bool


def probe_video(path: str | os.PathLike, max_frames: int | None = None) -> VideoInfo:
    """What a video file holds, without decoding a frame. The size and audio come from the header; the frame count
    from the video stream's packets, counted (a header's count can be wrong or absent: never trusted); the rate is
    the stream's stated average unless its timestamps say otherwise by more than 1% (a variable-rate file), then
    the constant rate that keeps the clip's duration, (frames - 1) / (last - first timestamp). With `max_frames`,
    counting stops past max_frames (`frames` is then max_frames + 1: the caller refuses the file)."""
    path = Path(path)
    with _open_video(path) as container:
        stream = container.streams.video[0]
        count, first, last = 0, None, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's empty flush packet
                    continue
                count += 1
                if packet.pts is not None:
                    first = packet.pts if first is None else min(first, packet.pts)
                    last = packet.pts if last is None else max(last, packet.pts)
                if max_frames is not None and count > max_frames:
                    break
        except av.FFmpegError as err:
            raise ValueError(f"{path}: cannot read this video ({err})") from None
        if not count:
            raise ValueError(f"{path}: the video has no frames")
        rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
        if count > 1 and first is not None and last > first and (max_frames is None or count <= max_frames):
            measured = (Fraction(count - 1) / ((last - first) * stream.time_base)).limit_denominator(1001000)
            if not rate or abs(measured / rate - 1) > Fraction(1, 100):
                rate = measured
        if not rate:
            raise ValueError(f"{path}: the video stream states no frame rate")
        return VideoInfo(count, rate, stream.height, stream.width, bool(container.streams.audio))


def read_video(path: str | os.PathLike, fps: Fraction | float | int | None = None,
               max_pixels: int | None = None) -> Video:
    """Read a whole video: a file PyAV can decode (mp4/mov/mkv/webm/avi) or a folder of frame images.

    A folder's frames are its image files sorted by name; its rate is `fps`, or DEFAULT_FOLDER_FPS (16, Wan's
    rate) when none is given, and `has_audio` is False. For a file the rate is `probe_video`'s (`fps` must then be
    None). With `max_pixels`, a file whose width x height x frames exceeds it is refused before decoding. Zero
    frames, an unreadable file, frames of different sizes, or fewer/more decoded frames than packets counted
    raise ValueError.
    """
    path = Path(path)
    if path.is_dir():
        rate = DEFAULT_FOLDER_FPS if fps is None else _as_fraction(fps, str(path))
        return Video(_read_frame_images(list_images(path), str(path)), rate, has_audio=False)
    if fps is not None:
        raise ValueError(f"{path}: fps is only for folders of frames; a video file carries its own rate")
    info = probe_video(path)
    check_decoded_size(str(path), info.width, info.height, max_pixels, info.frames)
    with _open_video(path) as container:
        frames = _decode_frames(container, path, start=0, count=None)
    if frames.shape[1] != info.frames:
        raise ValueError(f"{path}: {frames.shape[1]} frames decoded from {info.frames} counted packets; the file "
                         "is damaged or packs several frames per packet")
    return Video(frames, info.fps, info.has_audio)


def video_length(path: str | os.PathLike) -> int:
    """Number of frames of a video file (its packets, counted: `probe_video`) or of a folder of frames."""
    path = Path(path)
    if path.is_dir():
        return len(list_images(path))
    return probe_video(path).frames


def read_clip(source: str | os.PathLike | Sequence[str | os.PathLike], start: int, count: int) -> Tensor:
    """Frames [start, start + count) of a video file, a folder of frames, or a list of frame image paths,
    as float32 [3, count, H, W]. Raises ValueError when the video has fewer frames."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_dir():
        with _open_video(Path(source)) as container:
            return _decode_frames(container, Path(source), start, count)
    paths = list_images(source) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"frames {paths[0]} ..."
    if start + count > len(paths):
        raise ValueError(f"{name}: asked for frames {start}..{start + count - 1} of a {len(paths)}-frame video")
    return _read_frame_images(paths[start:start + count], name)


def _read_frame_images(paths: Sequence[Path], name: str) -> Tensor:
    """Read frame images that must all have one size -> [3, F, H, W]."""
    frames = [read_image(p) for p in paths]
    for p, frame in zip(paths, frames):
        if frame.shape != frames[0].shape:
            raise ValueError(f"{name}: mixed frame sizes: {paths[0].name} is {hw_text(frames[0])} but "
                             f"{p.name} is {hw_text(frame)}")
    return torch.stack(frames, dim=1)


def hw_text(x: Tensor) -> str:
    """The height and width of [..., H, W] for error messages."""
    return f"{x.shape[-2]}x{x.shape[-1]} (HxW)"


def _open_video(path: Path) -> av.container.InputContainer:
    """Open a file with PyAV, with a readable ValueError when it is not a video."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot open this video file ({err})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: the file has no video stream")
    return container


def _decode_frames(container: av.container.InputContainer, path: Path, start: int, count: int | None) -> Tensor:
    """Decode frames [start, start + count) (all from `start` when count is None) -> [3, F, H, W]."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    frames: list[np.ndarray] = []
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index < start:
                continue
            if count is not None and len(frames) == count:
                break
            pixels = frame.to_ndarray(format="rgb24")
            if frames and pixels.shape != frames[0].shape:
                raise ValueError(f"{path}: mixed frame sizes: frame {start} is {frames[0].shape[:2]} (HxW) but "
                                 f"frame {index} is {pixels.shape[:2]}")
            frames.append(pixels)
    except av.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode this video ({err})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames" + (f" from frame {start} on" if start else ""))
    if count is not None and len(frames) < count:
        raise ValueError(f"{path}: asked for frames {start}..{start + count - 1} of a "
                         f"{start + len(frames)}-frame video")
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float().div_(255)


def write_video(
    path: str | os.PathLike,
    frames: Tensor,
    fps: Fraction | float | int,
    audio_from: str | os.PathLike | None = None,
    crf: int = 17,
) -> None:
    """Write frames [3, F, H, W] in [0, 1] as an H.264 .mp4 at exactly `fps`, atomically.

    Even sizes are encoded as yuv420p (plays everywhere). yuv420p cannot hold an odd width or height, so odd
    sizes are encoded as yuv444p (H.264 High 4:4:4: exact size, plays in ffmpeg/VLC, not in every browser).
    `crf` is x264's constant rate factor (lower = better; 17 is visually lossless).

    When `audio_from` names a media file with an audio stream, that audio (from its start, cut to the length
    of the written video) is transcoded to AAC and muxed in; a file without audio adds none. Values outside
    [0, 1], a wrong shape or an unreadable `audio_from` raise ValueError and leave no file behind.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: write_video writes .mp4 files, not {path.suffix!r}")
    if not isinstance(frames, Tensor) or frames.ndim != 4:
        raise ValueError(f"{path}: expected a video tensor [3, F, H, W], got {describe(frames)}")
    pixels = _to_uint8(frames, "[3, F, H, W]", str(path))  # [F, H, W, 3]
    rate = _as_fraction(fps, str(path))
    _, height, width, _ = pixels.shape
    seconds = Fraction(len(pixels)) / rate
    audio = None if audio_from is None else _read_audio(Path(audio_from), seconds)
    with atomic_file(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        video_stream = out.add_stream("libx264", rate=rate)
        video_stream.width, video_stream.height = width, height
        video_stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        video_stream.options = {"crf": str(crf)}
        if audio is not None:
            samples, sample_rate, layout = audio
            audio_stream = out.add_stream("aac", rate=sample_rate)
            audio_stream.layout = layout
        for index, frame_pixels in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(frame_pixels, format="rgb24")
            frame.pts = index  # in units of 1/rate, the codec's time base
            out.mux(video_stream.encode(frame))
        out.mux(video_stream.encode())
        if audio is not None:
            for offset in range(0, samples.shape[1], 1024):  # AAC encodes 1024 samples per frame
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, offset:offset + 1024]),
                                                   format="fltp", layout=layout)
                chunk.sample_rate, chunk.pts = sample_rate, offset
                out.mux(audio_stream.encode(chunk))
            out.mux(audio_stream.encode())


def _read_audio(path: Path, seconds: Fraction) -> tuple[np.ndarray, int, str] | None:
    """The first audio stream of `path`, decoded to planar float32 [channels, samples] and cut to `seconds`,
    with its sample rate and channel layout name; None when the file has no audio stream."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            layout = stream.layout.name
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=stream.rate)
            chunks = [resampled.to_ndarray() for frame in container.decode(stream)
                      for resampled in resampler.resample(frame)]
            chunks += [resampled.to_ndarray() for resampled in resampler.resample(None)]
    except (av.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot read audio from this file ({err})") from None
    if not chunks:
        return None
    samples = np.concatenate(chunks, axis=1)[:, :round(seconds * stream.rate)]
    return samples.astype(np.float32), stream.rate, layout
