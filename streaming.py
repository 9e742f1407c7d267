"""Streaming video: decode, restore and encode chunk by chunk, so that memory depends on the chunk, not the clip.

(`media.read_video` decodes a whole clip into float32 RAM: 401 frames at 320x240 peaked at 832 MiB, a minute of
1080p would need about 60 GiB. This module keeps one chunk: bench/stream_memory.py measures peak RSS flat in the
clip length.)

    info = media.probe_video(path)                         # frames (counted), fps, size, audio: no decoding
    frames = iter_frames(path)                             # one float32 [3, H, W] frame at a time
    with VideoWriter(out, info.fps, audio_from=path) as w:
        for frame in restore_stream(frames, info.frames, restore_chunk, chunk=17, overlap=8):   # (clip, index)
            w.write(frame)

restore.restore_video_file is this with the backbone's chunk restoration (what `sample.py --video FILE` runs).

`restore_stream` gives exactly what restoring every chunk of `chunk_plan` and cross-fading them over the whole
clip gives (`restore.chunk_plan` and `tiling.blend_chunks`), frame for frame, but holds only one chunk of input frames and one chunk of output
accumulators: a frame is emitted as soon as no later chunk covers it.
"""

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

import defaults
from model import tiling
from weights import atomic_file


def iter_frames(path: str | os.PathLike) -> Iterator[Tensor]:
    """The frames of a video file one at a time, float32 [3, H, W] in [0, 1]."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float().div_(255)


def restore_stream(frames: Iterator[Tensor], total: int, restore_chunk: Callable[[Tensor, int], Tensor], chunk: int,
                   overlap: int) -> Iterator[Tensor]:
    """Restored frames [3, H, W], in order, of a stream of `total` input frames [3, H, W].

    The chunks are those of `restore.chunk_plan(total, chunk, overlap)`; `restore_chunk(clip, index)` maps chunk
    number `index`, [3, L, H, W], to its restoration [3, L, H, W].
    Each output frame is the blend_window-weighted mean of the chunks that cover it, as in `blend_chunks`."""
    length = min(chunk, defaults.clip_length_at_most(total))
    starts = tiling.tile_starts(total, length, min(overlap, length - 1))
    ramp = max(1, min(overlap, length - 1))
    window: list[Tensor] = []  # input frames [first, first + len(window))
    first = 0
    numerator: dict[int, Tensor] = {}  # frame -> weighted sum of the chunks so far
    weight: dict[int, float] = {}
    emitted = 0
    source = iter(frames)
    for index, start in enumerate(starts):
        while first + len(window) < start + length:
            frame = next(source, None)
            if frame is None:
                raise ValueError(f"the video ended after {first + len(window)} of the {total} frames counted")
            window.append(frame)
        clip = torch.stack(window[start - first : start + length - first], dim=1)
        restored = restore_chunk(clip, index)
        w = tiling.blend_window(start, length, total, ramp, 1, torch.device("cpu"))
        for offset in range(length):
            frame = start + offset
            numerator[frame] = numerator.get(frame, 0) + restored[:, offset].float() * w[offset]
            weight[frame] = weight.get(frame, 0.0) + w[offset].item()
        done = starts[index + 1] if index + 1 < len(starts) else total  # later chunks never reach below this
        while emitted < done:
            yield numerator.pop(emitted) / weight.pop(emitted)
            emitted += 1
        window, first = window[done - first :], done
    if next(source, None) is not None:
        raise ValueError(f"the video holds more than the {total} frames counted")


class VideoWriter:
    """An H.264 .mp4 written frame by frame at exactly `fps`, atomically (nothing under the final name until
    `close` succeeds). With `audio_from`, that file's audio is transcoded to AAC packet by packet at the end and
    cut to the video's length. Frames are [3, H, W] in [0, 1]; the first one fixes the size."""

    def __init__(self, path: str | os.PathLike, fps: Fraction, audio_from: str | os.PathLike | None = None,
                 crf: int = 17):
        self.path, self.fps, self.audio_from, self.crf = Path(path), Fraction(fps), audio_from, crf
        self.count = 0

    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_file(self.path)
        self._tmp = self._atomic.__enter__()
        self._out = av.open(str(self._tmp), "w", format="mp4")
        self._stream = None
        return self

    def write(self, frame: Tensor) -> None:
        pixels = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        if self._stream is None:
            height, width = pixels.shape[:2]
            self._stream = self._out.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            self._stream.options = {"crf": str(self.crf)}
            self._audio = self._add_audio()
        video_frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        video_frame.pts = self.count
        self._out.mux(self._stream.encode(video_frame))
        self.count += 1

    def _add_audio(self):
        if self.audio_from is None:
            return None
        source = av.open(str(self.audio_from))
        if not source.streams.audio:
            source.close()
            return None
        layout, rate = source.streams.audio[0].layout.name, source.streams.audio[0].rate
        stream = self._out.add_stream("aac", rate=rate)
        stream.layout = layout
        return source, stream

    def _mux_audio(self) -> None:
        source, stream = self._audio
        with source:
            audio = source.streams.audio[0]
            keep = int(Fraction(self.count) / self.fps * audio.rate)  # samples of the video's length
            resampler = av.AudioResampler(format="fltp", layout=audio.layout.name, rate=audio.rate)
            fifo = av.AudioFifo()
            written = 0
            for frame in source.decode(audio):
                for piece in resampler.resample(frame):
                    piece.pts = None
                    fifo.write(piece)
                while fifo.samples >= 1024 and written < keep:
                    written = self._encode_audio(fifo.read(1024), stream, written, keep)
            for piece in resampler.resample(None):
                piece.pts = None
                fifo.write(piece)
            while fifo.samples and written < keep:
                written = self._encode_audio(fifo.read(min(1024, fifo.samples)), stream, written, keep)
            self._out.mux(stream.encode())

    def _encode_audio(self, frame, stream, written: int, keep: int) -> int:
        samples = frame.to_ndarray()[:, : keep - written]
        piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=frame.layout.name)
        piece.sample_rate, piece.pts = frame.sample_rate, written
        self._out.mux(stream.encode(piece))
        return written + samples.shape[1]

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if error is None:
                if self._stream is None:
                    raise ValueError(f"{self.path}: no frames were written")
                self._out.mux(self._stream.encode())
                if self._audio is not None:
                    self._mux_audio()
        except BaseException as failure:
            self._close()
            self._atomic.__exit__(type(failure), failure, failure.__traceback__)  # removes the temporary file
            raise
        self._close()
        self._atomic.__exit__(kind, error, traceback)  # renames it into place, or (on an error) removes it
        return False

    def _close(self) -> None:
        self._out.close()
        if self._stream is not None and self._audio is not None:
            self._audio[0].close()
