"""streaming.py: chunked restoration that holds one chunk (never the clip), cross-faded without seams, and a frame-by-
frame writer that keeps the frame count, the exact frame rate and the audio."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import data
import media
import streaming
from model import tiling


def counting(frames: list[torch.Tensor], pulled: list[int]):
    for frame in frames:
        pulled.append(1)
        yield frame


@pytest.mark.parametrize("total, chunk, overlap", [(49, 17, 8), (17, 17, 8), (10, 17, 8), (100, 33, 8), (23, 9, 4)])
def test_restore_stream_blends_chunks_and_holds_one_chunk(total, chunk, overlap):
    video = torch.rand(3, total, 4, 5, generator=torch.Generator().manual_seed(total))
    calls, pulled, lag = [], [], []

    def restore(clip, index):  # each chunk's output is its input plus the chunk's own constant
        calls.append(clip.shape[1])
        assert index == len(calls) - 1
        return clip + len(calls)

    out = []
    for frame in streaming.restore_stream(counting(list(video.unbind(1)), pulled), total, restore, chunk, overlap):
        out.append(frame)
        lag.append(len(pulled) - len(out))
    out = torch.stack(out, dim=1)
    length = min(chunk, (total - 1) // 4 * 4 + 1)
    starts = tiling.tile_starts(total, length, min(overlap, length - 1))
    assert out.shape == video.shape and calls == [length] * len(starts)
    assert max(lag) < length  # never more than one chunk of input frames held ahead of the output
    offset = out - video  # the blended chunk constants: 1 .. len(starts)
    for index, start in enumerate(starts):
        alone = [f for f in range(start, start + length)
                 if all(not s <= f < s + length for j, s in enumerate(starts) if j != index)]
        assert torch.allclose(offset[:, alone], torch.tensor(index + 1.0))  # covered by one chunk: exactly it
    per_frame = offset[0, :, 0, 0]
    assert torch.all(per_frame[1:] >= per_frame[:-1] - 1e-6)  # cross-fades only ramp from one chunk to the next
    assert torch.allclose(offset, per_frame.view(1, -1, 1, 1).expand_as(offset))


def test_restore_stream_of_identity_is_the_input():
    video = torch.rand(3, 40, 6, 6)
    out = torch.stack(list(streaming.restore_stream(iter(video.unbind(1)), 40, lambda c, _: c, 17, 8)), dim=1)
    assert torch.allclose(out, video, atol=1e-6)


def test_writer_keeps_frames_rate_and_audio(tmp_path):
    rate, sample_rate = Fraction(30000, 1001), 16000
    source = tmp_path / "with_audio.mp4"
    with av.open(str(source), "w") as out:  # a 13-frame clip with a 440 Hz tone a little longer than the video
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = out.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for i in range(13):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        tone = np.sin(np.arange(sample_rate) * 2 * np.pi * 440 / sample_rate).astype(np.float32)[None]
        for start in range(0, tone.shape[1], 1024):
            piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp",
                                               layout="mono")
            piece.sample_rate, piece.pts = sample_rate, start
            out.mux(audio.encode(piece))
        out.mux(audio.encode())
    info = media.probe_video(source)
    assert (info.frames, info.fps, info.has_audio) == (13, rate, True)

    target = tmp_path / "copy.mp4"
    with streaming.VideoWriter(target, info.fps, audio_from=source) as writer:
        for frame in streaming.iter_frames(source):
            writer.write(frame)
    copied = media.probe_video(target)
    assert (copied.frames, copied.fps, copied.has_audio, copied.height, copied.width) == (13, rate, True, 32, 32)
    with av.open(str(target)) as container:
        audio = container.streams.audio[0]
        seconds = sum(frame.samples for frame in container.decode(audio)) / audio.rate
    assert abs(seconds - 13 / float(rate)) < 0.05  # the audio is cut to the video's length (AAC pads a little)
    frames = media.read_video(target).frames
    assert (frames[:, :, 8:24, 8:24].mean(dim=(0, 2, 3)) * 255 - 10 * torch.arange(13)).abs().max() < 3


def test_writer_leaves_nothing_behind_on_an_error(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with streaming.VideoWriter(target, 16) as writer:
            writer.write(torch.rand(3, 16, 16))
            raise RuntimeError("the restoration failed")
    with pytest.raises(ValueError, match="no frames"):
        with streaming.VideoWriter(target, 16):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_output_reads_like_the_whole_clip_writer(tmp_path):
    video = data.toy_videos(1, 9, 32, 48, seed=0)[0]
    media.write_video(tmp_path / "whole.mp4", video, 16)
    with streaming.VideoWriter(tmp_path / "streamed.mp4", 16) as writer:
        for frame in video.unbind(1):
            writer.write(frame)
    whole, streamed = (media.read_video(tmp_path / name) for name in ("whole.mp4", "streamed.mp4"))
    assert streamed.fps == whole.fps and torch.equal(streamed.frames, whole.frames)


def test_restore_video_file_is_restore_video_in_a_stream(tmp_path, monkeypatch):
    """The streamed restoration of a file hands the writer the frames the whole-clip restoration gives (the tiny Wan
    preset on the bridge, several chunks), and the file keeps the frame count and rate."""
    import backbone
    import restore

    bb = backbone.tiny("wan")
    video = data.toy_videos(1, 21, 32, 32, seed=2)[0]
    source = tmp_path / "clip.mp4"
    media.write_video(source, video, Fraction(25))
    options = restore.RestoreOptions(steps=2, chunk_frames=9, chunk_overlap=4)
    whole = restore.restore_video(bb, bb.velocity, media.read_video(source).frames, options)
    # compared before the lossy H.264 encoder, where a last-bit float difference can move whole 8-bit blocks
    written, write = [], streaming.VideoWriter.write
    monkeypatch.setattr(streaming.VideoWriter, "write", lambda self, frame: written.append(frame) or write(self, frame))
    calls = []
    info = restore.restore_video_file(bb, bb.velocity, source, tmp_path / "streamed.mp4", options,
                                      progress=lambda done, total: calls.append((done, total)))
    streamed = media.read_video(tmp_path / "streamed.mp4")
    assert info.frames == 21 and streamed.fps == Fraction(25) and streamed.frames.shape == whole.shape
    torch.testing.assert_close(torch.stack(written, dim=1), whole, atol=1e-4, rtol=0)  # last bits: kernels
    chunks = len(restore.chunk_plan(21, 9, 4)[1])
    assert chunks > 1 and calls[-1] == (chunks * 2, chunks * 2)
