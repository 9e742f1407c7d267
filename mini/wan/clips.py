"""The video miniature's data: short clips of real camera footage, and camera motion over still photographs.

    python -m mini.wan.clips --video ../shared/data/video --photos ../shared/data/photos   # counts, held-out clip

Training clips come from two sources, drawn from one seeded generator:
  - Real footage: every video file under a folder except HELDOUT (`bikes.mp4`, the held-out clip, never trained
    on) and EXCLUDED (`carphone_distorted.mp4`, a compressed copy of `carphone_pristine.mp4`: degraded footage).
    Each video is decoded once and kept as uint8 frames with its short side resized to at most VIDEO_SIDE px.
    A clip is `frames` consecutive frames (or every other frame, as faster motion), a random square window of side
    size * s (s in scales, capped by the frame) resized to `size`, mirrored left-right half the time.
  - Camera motion over photos: a random photo, shrunk by a random scale s, watched through a size x size window
    that pans (up to 2 px per frame in each direction), zooms (up to 2% per frame in or out) and rotates (up to
    1 degree per frame), all linear in time and sampled bilinearly (the photo is shrunk with antialiasing first, so
    the window is never aliased). The camera moves, the scene is still: the motion real video is made of.

Evaluation: `eval_motion_clips`, fixed camera moves over the Kodak24 photos of eval/, and the held-out clip, read by `heldout_clip`: bikes.mp4 resized to HELDOUT_SIZE (H, W), its first HELDOUT_FRAMES
frames, the evaluation clip of every figure of the video miniature.
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import data
import media
from mini import images

HELDOUT = "bikes.mp4"
EXCLUDED = ("carphone_distorted.mp4",)
VIDEO_SIDE = 144  # short side of the decoded training footage (the source videos are 144-576 px high)
HELDOUT_SIZE = (96, 224)  # bikes.mp4 is 272 x 640: resized by 96/272 to 96 x 226, centre-cropped to 224 px wide
HELDOUT_FRAMES = 49
EXAMPLE_LOOK, EXAMPLE_SEED = "rain", 0  # mini/wan/example.mp4: the held-out clip with this degradation
PHOTO_SHARE = 0.5  # share of training clips made by camera motion over photos


def _resize(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """frames [N, 3, H, W] float -> [N, 3, size] (bilinear, antialiased when shrinking), clamped to [0, 1]."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def load_footage(folder: str | Path) -> dict[str, Tensor]:
    """name -> uint8 [F, 3, H, W] of every training video under `folder` (HELDOUT and EXCLUDED left out), the
    short side resized to at most VIDEO_SIDE px."""
    footage = {}
    for path in media.list_videos(folder):
        if path.name == HELDOUT or path.name in EXCLUDED:
            continue
        frames = media.read_video(path).frames.transpose(0, 1)  # [F, 3, H, W] in [0, 1]
        height, width = frames.shape[-2:]
        scale = min(1.0, VIDEO_SIDE / min(height, width))
        size = (round(height * scale), round(width * scale))
        footage[path.name] = torch.cat([_resize(c, size) for c in frames.split(16)]).mul(255).round().to(torch.uint8)
    if not footage:
        raise SystemExit(f"error: no training videos under {folder}")
    return footage


def heldout_clip(folder: str | Path, frames: int = HELDOUT_FRAMES, size: tuple[int, int] = HELDOUT_SIZE) -> Tensor:
    """The held-out clip [3, frames, H, W] in [0, 1]: HELDOUT's first frames, resized to height H, centre-cropped."""
    video = media.read_clip(Path(folder) / HELDOUT, 0, frames).transpose(0, 1)  # [F, 3, 272, 640]
    height, width = video.shape[-2:]
    resized = _resize(video, (size[0], round(width * size[0] / height)))
    left = (resized.shape[-1] - size[1]) // 2
    return resized[..., left : left + size[1]].transpose(0, 1).contiguous()


def _rand(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def footage_clip(footage: dict[str, Tensor], frames: int, size: int, generator: torch.Generator,
                 scales: tuple[float, ...]) -> Tensor:
    """A random clip [3, frames, size, size] in [0, 1] of the real footage (see the module docstring)."""
    names = sorted(footage)
    video = footage[names[torch.randint(len(names), (1,), generator=generator).item()]]
    stride = 2 if torch.rand(1, generator=generator).item() < 0.3 and len(video) >= 2 * frames else 1
    start = torch.randint(len(video) - stride * (frames - 1), (1,), generator=generator).item()
    scale = scales[torch.randint(len(scales), (1,), generator=generator).item()]
    side = min(round(size * scale), *video.shape[-2:])
    top = torch.randint(video.shape[-2] - side + 1, (1,), generator=generator).item()
    left = torch.randint(video.shape[-1] - side + 1, (1,), generator=generator).item()
    window = video[start : start + stride * frames : stride, :, top : top + side, left : left + side].float() / 255
    clip = _resize(window, (size, size))
    if torch.rand(1, generator=generator).item() < 0.5:
        clip = clip.flip(-1)
    return clip.transpose(0, 1).contiguous()


def motion_clip(photos: list[Tensor], frames: int, size: int, generator: torch.Generator,
                scales: tuple[float, ...]) -> Tensor:
    """A random camera move [3, frames, size, size] in [0, 1] over a random photo (see the module docstring)."""
    photo = photos[torch.randint(len(photos), (1,), generator=generator).item()]
    scale = scales[torch.randint(len(scales), (1,), generator=generator).item()]
    scale = min(scale, min(photo.shape[1:]) / (1.5 * size))  # the moving window must stay inside the photo
    height, width = round(photo.shape[1] / scale), round(photo.shape[2] / scale)
    still = _resize(photo[None].float() / 255, (height, width))  # [1, 3, h, w]
    pan = (_rand(generator, -2, 2), _rand(generator, -2, 2))  # px per frame (x, y)
    zoom = math.exp(_rand(generator, -0.02, 0.02))  # window side ratio per frame
    turn = math.radians(_rand(generator, -1, 1))  # per frame
    last = frames - 1
    reach = size / 2 * max(1.0, zoom ** last) * math.sqrt(2) + 2 * last  # farthest the window reaches from its centre
    cx = _rand(generator, min(reach, width / 2), max(width - reach, width / 2))
    cy = _rand(generator, min(reach, height / 2), max(height - reach, height / 2))
    thetas = []
    for f in range(frames):
        half = size / 2 * zoom**f  # half the window side, in pixels of `still`
        angle = turn * f
        x, y = cx + pan[0] * f, cy + pan[1] * f
        # output coords in [-1, 1] -> input coords in [-1, 1] (align_corners=False)
        cos, sin = math.cos(angle) * half, math.sin(angle) * half
        thetas.append([[cos / (width / 2), -sin / (width / 2), x / (width / 2) - 1],
                       [sin / (height / 2), cos / (height / 2), y / (height / 2) - 1]])
    grid = F.affine_grid(torch.tensor(thetas), [frames, 3, size, size], align_corners=False)
    clip = F.grid_sample(still.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).clamp(0, 1)
    if torch.rand(1, generator=generator).item() < 0.5:
        clip = clip.flip(-1)
    return clip.transpose(0, 1).contiguous()


def random_clips(footage: dict[str, Tensor], photos: list[Tensor], count: int, frames: int, size: int,
                 generator: torch.Generator, scales: tuple[float, ...] = (1.0, 2.0)) -> Tensor:
    """`count` training clips [count, 3, frames, size, size] in [0, 1]: camera motion over photos (PHOTO_SHARE)
    or real footage."""
    clips = []
    for _ in range(count):
        if torch.rand(1, generator=generator).item() < PHOTO_SHARE:
            clips.append(motion_clip(photos, frames, size, generator, scales))
        else:
            clips.append(footage_clip(footage, frames, size, generator, scales))
    return torch.stack(clips)


def eval_motion_clips(eval_folder: str | Path, frames: int = 17, size: int = 96, seed: int = 0) -> dict[str, Tensor]:
    """'kodak24/name' -> a fixed camera move [3, frames, size, size] over that Kodak24 photo (shrunk 2x), one seeded
    generator per photo: the camera-motion evaluation clips (never trained on)."""
    clips = {}
    for index, path in enumerate(images.photo_paths(Path(eval_folder) / "kodak24")):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        clips[f"kodak24/{path.stem}"] = motion_clip([images.load_rgb(path)], frames, size, generator, (2.0,))
    return clips


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, required=True, help="the video/ folder")
    p.add_argument("--photos", type=Path, help="the photos/ folder")
    p.add_argument("--strip", type=Path, help="write a strip of a few random training clips' frames (PNG)")
    p.add_argument("--write-heldout", type=Path, metavar="FOLDER", help="write FOLDER/heldout.mp4 (the held-out clip, "
                   f"{HELDOUT_FRAMES} frames at its 25 fps) and FOLDER/example.mp4 (the same clip with {EXAMPLE_LOOK})")
    args = p.parse_args()
    if args.write_heldout:
        clean = heldout_clip(args.video)
        media.write_video(args.write_heldout / "heldout.mp4", clean, 25)
        degraded = data.DEGRADATIONS[EXAMPLE_LOOK](clean, torch.Generator().manual_seed(EXAMPLE_SEED))
        media.write_video(args.write_heldout / "example.mp4", degraded, 25)
    footage = load_footage(args.video)
    print({name: list(v.shape) for name, v in footage.items()})
    print("held-out", list(heldout_clip(args.video).shape))
    if args.strip and args.photos:
        photos = images.load_photos(args.photos)
        clips = random_clips(footage, photos, 6, 9, 64, torch.Generator().manual_seed(0))
        rows = [torch.cat(list(c.unbind(1)), dim=-1) for c in clips]  # [3, 64, 9 * 64]
        media.write_image(args.strip, torch.cat(rows, dim=-2))


if __name__ == "__main__":
    main()
