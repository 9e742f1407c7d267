"""The video miniature's restoration table: the held-out clip and camera moves over Kodak24, degraded six ways.

    python -m mini.wan.evaluate --video ../shared/data/video --eval ../shared/data/eval --threads 1

Rows (PSNR and SSIM over all frames of a clip, the flicker and the block texture of `metrics.block_texture` on the
8-pixel token grid, means over clips; every clip degraded with a fixed seed per degradation):
  degraded       the degraded input itself
  vae ceiling    the CLEAN clip through the VAE round trip: no latent method can do better than this
  empty prompt   the bridge with the plain pre-trained model (no learned prompt)
  method         the bridge with the degradation's own deep prompt (mini/wan/prompts/<degradation>.safetensors)
  all-in-one     the bridge with the deep prompt trained on the mixture (mini/wan/prompts/all.safetensors)
  auto           `--prompt auto`: the shipped bank's estimator chooses and weights the prompts (mini/wan/prompts/
                 bank.safetensors), decided on the clip's first chunk as sample.py does
  default        what `sample.py --video` does with no --prompt (restore.default_prompt: auto when the miniature
                 ships a bank, else the all-in-one prompt): a copy of that row, not a second run
Restoration runs as `sample.py --video` does it (restore.restore_video: 17-frame chunks overlapping by 8,
cross-faded), at the sampler's defaults (the backbone's T0 and frame noise, 0.2 and shared for mini-wan:
backbone.BACKBONES; seed 0; --steps, default 20).
Flicker: the output's mean absolute frame-to-frame change divided by the clean clip's (1 = as steady as the truth).
Writes the "restoration" entry of mini/wan/figures.json and prints a markdown table; rows whose prompt file is
missing are left out (and say so).
"""

import argparse
import time
from pathlib import Path
import torch

import backbone
import data
import estimator
import media
import metrics
import restore
from mini.pretrain_ae import update_json
from mini.wan import clips

FOLDER = backbone.BACKBONES["mini-wan"].folder

DEGRADATIONS = ("rain", "haze", "lowlight", "snow", "blur", "noise")


def flicker(video: torch.Tensor) -> float:
    """Mean |frame[t+1] - frame[t]| of a clip [3, F, H, W]."""
    return (video[:, 1:] - video[:, :-1]).abs().mean().item()


def degrade(clean: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    return data.DEGRADATIONS[name](clean, torch.Generator().manual_seed(seed))


def restorer(bb, prompt_files: list[Path] | Path, steps: int, chunk_frames: int, chunk_overlap: int):
    """clip [3, F, H, W] -> restored clip, the way sample.py --video restores (its chunking and sampler); several
    prompt files: their velocities averaged, as sample.py does; a prompt bank (one Path): --prompt auto, decided
    on the clip's first chunk."""
    options = restore.RestoreOptions(steps=steps, t0=bb.spec.t0, chunk_frames=chunk_frames, chunk_overlap=chunk_overlap,
                                     frame_noise=bb.spec.frame_noise, prompt_t0=True)
    if isinstance(prompt_files, Path):
        bank = restore.load_bank(prompt_files, bb)

        def blind(clip):
            length, _ = restore.chunk_plan(clip.shape[1], chunk_frames, chunk_overlap)
            velocity, decided = restore.blind_velocity(bb, bank, clip[:, :length])
            print(f"  auto: {estimator.describe_weights(decided)}", flush=True)
            return restore.restore_video(bb, velocity, clip, restore.decided_options(bank, decided, options))
        return blind
    loaded = restore.load_prompts(prompt_files, bb)
    velocity = restore.velocity_for(bb, [prompt for prompt, _ in loaded])
    options = restore.at_trained_t0(options, [meta for _, meta in loaded])  # (the prompts' own T0, as sample.py)
    return lambda clip: restore.restore_video(bb, velocity, clip, options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, required=True, help="the video/ folder (for the held-out clip)")
    p.add_argument("--eval", type=Path, required=True, help="the eval/ folder (kodak24/)")
    p.add_argument("--miniature", type=Path, default=FOLDER)
    p.add_argument("--frames", type=int, default=17, help="frames of the held-out clip evaluated (default: %(default)s)")
    p.add_argument("--motion-clips", type=int, default=4, help="Kodak24 camera moves evaluated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--degradations", nargs="+", default=list(DEGRADATIONS), choices=DEGRADATIONS)
    p.add_argument("--strip", type=Path, help="also write this PNG: for rain, haze and low light, frames 0, 8 and 16 "
                   "of the degraded held-out clip | the same frames restored as sample.py --video does by default")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    bb = backbone.load_miniature(args.miniature)
    motion = dict(list(clips.eval_motion_clips(args.eval).items())[: args.motion_clips])
    sets = {"heldout": {"heldout": clips.heldout_clip(args.video, args.frames)}, "kodak24_motion": motion}
    prompt_dir = args.miniature / "prompts"
    rows = {"empty prompt": [], "method": None}  # method: the degradation's own prompt, if shipped
    if (prompt_dir / "all.safetensors").is_file():
        rows["all-in-one"] = [prompt_dir / "all.safetensors"]
    else:
        print(f"no {prompt_dir / 'all.safetensors'}: the all-in-one row is left out")
    if (prompt_dir / estimator.BANK_NAME).is_file():
        rows["auto"] = prompt_dir / estimator.BANK_NAME
    default = restore.default_prompt(bb.spec, args.miniature)  # what sample.py --video uses with no --prompt
    default_row = next((row for row, files in rows.items() if files == default), None)
    table = {}
    for set_name, videos in sets.items():
        for degradation in args.degradations:
            cell = table.setdefault(set_name, {}).setdefault(degradation, {})
            scores: dict[str, list[dict]] = {}
            for index, (clip_name, clean) in enumerate(videos.items()):
                degraded = degrade(clean, degradation, seed=1000 + index)
                outputs = {"degraded": degraded,
                           "vae ceiling": ((bb.decode(bb.encode(clean[None] * 2 - 1))[0] + 1) / 2).clamp(0, 1)}
                for row, files in rows.items():
                    if row == "method":
                        files = [prompt_dir / f"{degradation}.safetensors"]
                        if not files[0].is_file():
                            continue
                    outputs[row] = restorer(bb, files, args.steps, 17, 8)(degraded)
                if default_row is not None:
                    outputs["default"] = outputs[default_row]
                for row, out in outputs.items():
                    scores.setdefault(row, []).append({
                        "psnr": metrics.psnr(out, clean, video=True), "ssim": metrics.ssim(out, clean, video=True),
                        "flicker": flicker(out) / flicker(clean), "block": metrics.block_texture(out, clean)})
            for row, measured in scores.items():
                cell[row] = {key: round(sum(m[key] for m in measured) / len(measured), 2 if key == "psnr" else 3)
                             for key in measured[0]}
            print(set_name, degradation, {r: v["psnr"] for r, v in cell.items()}, f"{(time.time() - start) / 60:.1f} min",
                  flush=True)
    minutes = round((time.time() - start) / 60, 1)
    update_json(args.miniature / "figures.json", restoration={
        "table": table, "wall_minutes": minutes, "steps": args.steps, "heldout_frames": args.frames,
        "motion_clips": list(motion), "rows": list(rows), "default": default_row})
    if args.strip:
        clean = sets["heldout"]["heldout"]
        restore_default = restorer(bb, default, args.steps, 17, 8)
        lines = []
        for degradation in ("rain", "haze", "lowlight"):
            degraded = degrade(clean, degradation, seed=1000)
            restored = restore_default(degraded)
            lines.append(torch.cat([degraded[:, f] for f in (0, 8, 16)] + [restored[:, f] for f in (0, 8, 16)], dim=-1))
        media.write_image(args.strip, torch.cat(lines, dim=-2))
    for set_name, cells in table.items():
        names = list(next(iter(cells.values())))
        print(f"\n{set_name}\n| degradation | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
        for degradation, cell in cells.items():
            print(f"| {degradation} | " + " | ".join(f"{cell[n]['psnr']:.2f} / {cell[n]['ssim']:.3f}" if n in cell
                                                   else "-" for n in names) + " |")


if __name__ == "__main__":
    main()
