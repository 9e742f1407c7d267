"""Video miniature, stage 1: a small Wan2.1-architecture causal video VAE trained on real footage and camera motion.

    python -m mini.wan.pretrain_vae --video ../shared/data/video --photos ../shared/data/photos \
        --eval ../shared/data/eval --out mini/wan --threads 1

The network is `model/wan_vae.py` unchanged, at a small config (CONFIG): width 32 at every level, 4x spatial
downsampling (two levels, where Wan2.1 has three and 8x), no temporal downsampling, no residual block in the
encoder's levels and one in each decoder level, the usual residual-attention-residual middle blocks, 16 latent
channels. Why no temporal compression: 16 numbers per 4 x 4 pixels is the code that lets the image miniature's
autoencoder pass 30 dB; 16 per 4 x 4 x 4 (Wan's rule) is 4x more compression, and a 25-minute CPU training of a
small model does not get a round trip a restoration could live with out of it. The convolutions are still causal
3x3x3 in time, so every latent frame sees the two frames before it, and the VAE streams frame by frame.

Each step draws a batch of clips from `mini.wan.clips` (5 frames; 64 px, batch 4, or 96 px, batch 2; half real
footage, half camera motion over photos), encodes the whole clip as one causal piece, decodes a posterior SAMPLE
mean + std * noise, and minimises L1 + MSE between clip and reconstruction, plus 10 x the MSE of their 4 x 4
average-pooled frames (colour), plus a small KL(posterior || N(0, I)) that keeps the latent bounded. AdamW with
a linear warm-up and a cosine decay; every draw comes from one seeded generator. The last conv of every residual
branch starts at zero (each block starts as the identity).

Resumable: a checkpoint every --save-every steps in --checkpoints (default <out>/checkpoints); the same command
continues from it. Afterwards the 16 per-channel latent statistics (the config's latents_mean / latents_std, as
Wan2.1 publishes them) are measured on fixed training clips. Writes `wan_vae.safetensors` (official key names),
the "wan_vae" entry of `miniature.json` and of `figures.json` (losses, wall time, round-trip PSNR on the held-out
clip and on camera moves over the Kodak24 photos).
"""

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import weights
from mini import images
from mini import pretrain_ae as image_stage
from mini.pretrain_ae import Checkpoint, kl_divergence, mean, psnr, update_json
from mini.wan import clips
from model.wan_vae import ResidualBlock, WanVAE, WanVAEConfig

CONFIG = WanVAEConfig(
    dim=32, z_dim=16, dim_mult=(1, 1, 1), num_res_blocks=0, temperal_downsample=(False, False),
    latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16,  # measured after training
)
FRAMES = 5
CROPS = ((64, 4), (96, 2))  # (clip side, batch): 82k and 92k pixels per step


def zero_residual_branches(vae: WanVAE) -> None:
    """Zero the last conv of every residual block: each block starts as the identity."""
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.residual[6].weight)
            nn.init.zeros_(module.residual[6].bias)


def reconstruction_loss(vae: WanVAE, clip: Tensor, lowfreq_weight: float, kl_weight: float,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(loss, reconstruction in [0, 1]) of clips [B, 3, F, H, W] in [0, 1] through a posterior sample; the clip is
    fed as one causal piece (the same result as WanVAE's chunked encode / decode)."""
    mean_, logvar = vae.conv1(vae.encoder(clip * 2 - 1, {})).chunk(2, dim=1)
    noise = torch.randn(mean_.shape, generator=generator)
    z = mean_ + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    recon = (vae.decoder(vae.conv2(z), {}) + 1) / 2
    error = recon - clip
    colour = F.avg_pool3d(recon, (1, 4, 4)) - F.avg_pool3d(clip, (1, 4, 4))
    loss = error.abs().mean() + error.square().mean() + lowfreq_weight * colour.square().mean()
    return loss + kl_weight * kl_divergence(mean_, logvar), recon


def train(vae: WanVAE, draw, steps: int, lr: float, lowfreq_weight: float, kl_weight: float,
          generator: torch.Generator, checkpoint: Checkpoint, save_every: int, log_every: int = 25) -> list[float]:
    """Train `vae` in place on batches `draw(size, batch)`, continuing from `checkpoint`; returns every loss (the
    image autoencoder's training loop, with this stage's clips, loss and CROPS)."""
    return image_stage.train(
        vae, draw, lambda model, clip: reconstruction_loss(model, clip, lowfreq_weight, kl_weight, generator),
        steps, lr, generator, checkpoint, save_every, crops=CROPS, label="vae", log_every=log_every)


@torch.no_grad()
def latent_statistics(vae: WanVAE, batches: list[Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of the unnormalised posterior means of the clips [B, 3, F, H, W] in `batches`."""
    mus = [vae.conv1(vae.encoder(b * 2 - 1, {})).chunk(2, dim=1)[0] for b in batches]
    mus = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1)  # [16, N]
    return [round(v, 4) for v in mus.mean(1).tolist()], [round(v, 4) for v in mus.std(1).tolist()]


@torch.no_grad()
def round_trip_psnr(vae: WanVAE, videos: dict[str, Tensor]) -> dict[str, float]:
    """PSNR (dB, all frames together) of WanVAE.decode(WanVAE.encode(clip)) for clips [3, F, H, W] in [0, 1]."""
    return {name: round(psnr((vae.decode(vae.encode(v[None] * 2 - 1)) + 1) / 2, v[None]), 2)
            for name, v in videos.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, required=True, help="folder of training videos (the held-out clip is skipped)")
    p.add_argument("--photos", type=Path, required=True, help="folder of photographs for the camera-motion clips")
    p.add_argument("--eval", type=Path, required=True, help="the eval/ folder (kodak24/): camera-motion figures")
    p.add_argument("--out", type=Path, default=Path("mini/wan"), help="the video miniature's folder (default: %(default)s)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: <out>/checkpoints)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--lowfreq-weight", type=float, default=10.0)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.save_every < 1:
        p.error("--steps and --save-every must be positive")
    for folder in (args.video, args.photos, args.eval):
        if not folder.is_dir():
            p.error(f"{folder} is not a folder")

    start = time.time()
    footage, photos = clips.load_footage(args.video), images.load_photos(args.photos)
    print(f"{len(footage)} training videos, {len(photos)} photos", flush=True)
    torch.manual_seed(args.seed)  # the module initialisers draw from the global generator
    generator = torch.Generator().manual_seed(args.seed)
    vae = WanVAE(CONFIG)
    zero_residual_branches(vae)
    settings = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "lowfreq_weight", "kl_weight", "seed")}
    checkpoint = Checkpoint((args.checkpoints or args.out / "checkpoints") / "wan_vae.pt",  # through JSON, as stored
                            json.loads(json.dumps(settings | {"config": asdict(CONFIG), "frames": FRAMES})))

    def draw(size: int, batch: int) -> Tensor:
        return clips.random_clips(footage, photos, batch, FRAMES, size, generator)

    losses = train(vae, draw, args.steps, args.lr, args.lowfreq_weight, args.kl_weight, generator, checkpoint,
                   args.save_every)
    vae.eval()

    stats_generator = torch.Generator().manual_seed(args.seed + 1)
    batches = [clips.random_clips(footage, photos, 8, 9, 64, stats_generator) for _ in range(8)]
    shift, scale = latent_statistics(vae, batches)
    config = replace(CONFIG, latents_mean=tuple(shift), latents_std=tuple(scale))
    args.out.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(vae.state_dict(), args.out / "wan_vae.safetensors")
    update_json(args.out / "miniature.json", wan_vae=asdict(config))

    reloaded = weights.build(WanVAE, config, args.out / "wan_vae.safetensors", dtype=torch.float32)
    heldout = round_trip_psnr(reloaded, {"heldout": clips.heldout_clip(args.video)})["heldout"]
    motion = round_trip_psnr(reloaded, clips.eval_motion_clips(args.eval))
    minutes = (time.time() - start) / 60
    window = max(1, args.steps // 20)
    update_json(args.out / "figures.json", wan_vae={
        **settings, "params": sum(t.numel() for t in vae.parameters()), "wall_minutes_last_run": round(minutes, 1),
        "loss_first_window": round(sum(losses[:window]) / window, 4),
        "loss_last_window": round(sum(losses[-window:]) / window, 4),
        "heldout_clip_psnr_db": heldout, "kodak24_motion_psnr_db": motion,
        "kodak24_motion_psnr_mean_db": mean(motion.values()),
    })
    print(f"round trip: held-out clip {heldout} dB, Kodak24 camera moves {mean(motion.values())} dB; {minutes:.1f} min")


if __name__ == "__main__":
    main()
