"""The video miniature (mini/wan/): its data rules (the held-out clip is never trained on; camera moves are
moves), its loader (strict, the empty prompt pre-training used), and, once shipped, its weights' figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import media
import weights
from mini.pretrain_ae import Checkpoint, continue_from, psnr
import backbone
from mini.wan import clips, evaluate, pretrain_vae, pretrain_wan
from model import wan as wan_model
from model.t5 import UMT5Encoder
from model.wan_vae import WanVAE, WanVAEConfig

WAN_MINI = Path(__file__).resolve().parent.parent / "mini" / "wan"
SHIPPED = (WAN_MINI / "miniature.json").is_file() and json.loads((WAN_MINI / "miniature.json").read_text()).get(
    "backbone") == "wan"


def textured(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A random smooth-ish video [3, F, H, W] in [0, 1] (a panned toy image)."""
    return data.toy_videos(1, frames, height, width, seed=seed)[0]


def test_held_out_and_degraded_footage_are_never_loaded(tmp_path):
    for name in ("bikes.mp4", "carphone_distorted.mp4", "street.mp4"):
        media.write_video(tmp_path / name, textured(5, 48, 64, seed=len(name)), 16)
    footage = clips.load_footage(tmp_path)
    assert list(footage) == ["street.mp4"]
    assert footage["street.mp4"].shape == (5, 3, 48, 64) and footage["street.mp4"].dtype == torch.uint8


def test_footage_clips_are_consecutive_frames_of_the_video():
    video = (torch.arange(12).float() * 20).view(12, 1, 1, 1).expand(12, 3, 40, 40).to(torch.uint8)
    clip = clips.footage_clip({"v": video}, 5, 16, torch.Generator().manual_seed(3), (1.0,))
    levels = clip[0, :, 0, 0] * 255 / 20  # frame index of every clip frame
    steps = levels[1:] - levels[:-1]
    assert clip.shape == (3, 5, 16, 16)
    assert torch.allclose(steps, steps[0].expand(4), atol=1e-4) and steps[0].item() in (1.0, 2.0)


def test_camera_moves_move_and_are_deterministic():
    photo = (torch.rand(3, 200, 300, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = clips.motion_clip([photo], 9, 32, torch.Generator().manual_seed(1), (1.0,))
    b = clips.motion_clip([photo], 9, 32, torch.Generator().manual_seed(1), (1.0,))
    assert a.shape == (3, 9, 32, 32) and torch.equal(a, b)
    assert (a[:, -1] - a[:, 0]).abs().mean() > 0.02  # the last frame is not the first: the camera moved


def tiny_miniature(folder: Path) -> None:
    """A random video miniature at the recipe's network classes (small widths), written as the recipe writes it."""
    torch.manual_seed(0)
    vae_config = WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 1, 1), num_res_blocks=0, temperal_downsample=(False, False),
                              latents_mean=(0.1,) * 16, latents_std=(2.0,) * 16)
    config = wan_model.WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=pretrain_wan.UMT5.d_model,
                                 text_len=pretrain_wan.TEXT_LEN)
    umt5 = pretrain_wan.make_text_encoder(folder, seed=0)
    assert isinstance(umt5, UMT5Encoder)
    weights.save_safetensors(WanVAE(vae_config).state_dict(), folder / "wan_vae.safetensors")
    weights.save_safetensors(wan_model.WanModel(config).state_dict(), folder / "wan.safetensors")
    spec = json.loads((folder / "miniature.json").read_text())
    spec.update(backbone="wan", wan_vae=vae_config.__dict__, wan=config.__dict__)
    (folder / "miniature.json").write_text(json.dumps(spec))


def test_loader_is_strict_and_conditions_on_the_pretraining_empty_prompt(tmp_path):
    tiny_miniature(tmp_path)
    bb = backbone.load_miniature(tmp_path)
    umt5 = weights.build(UMT5Encoder, pretrain_wan.UMT5, tmp_path / "umt5.safetensors")
    assert bb.kind == "wan" and bb.config == backbone.BACKBONES["mini-wan"].config
    assert torch.equal(bb.txt, pretrain_wan.encode_caption([], umt5))
    # the text-token site with no learned token gives that same context (the baseline starts from it)
    site_txt, _ = bb.token_site(torch.zeros(1, 0, umt5.config.d_model))
    assert torch.allclose(site_txt, bb.txt, atol=1e-6)
    clip = textured(5, 32, 32, seed=1)[None] * 2 - 1
    assert bb.encode(clip).shape == (1, 16, 5, 8, 8)  # 4x in space, no temporal compression
    state = weights.read_state_dict(tmp_path / "wan.safetensors")
    state.pop("head.modulation")
    weights.save_safetensors(state, tmp_path / "wan.safetensors")
    with pytest.raises(weights.CheckpointError):
        backbone.load_miniature(tmp_path)


def test_vae_training_reduces_the_loss_and_resumes_exactly(tmp_path):
    """A few steps of the stage-1 loop on toy clips: the loss falls, and a stopped run resumed from its checkpoint
    ends bit-identical to an uninterrupted one."""
    videos = [textured(5, 32, 32, seed=s) for s in range(4)]

    def run(folder: Path, stop_at: int | None = None) -> tuple[WanVAE, list[float]]:
        torch.manual_seed(0)
        vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 1, 1), num_res_blocks=0,
                                  temperal_downsample=(False, False), latents_mean=(0.0,) * 16,
                                  latents_std=(1.0,) * 16))
        pretrain_vae.zero_residual_branches(vae)
        generator = torch.Generator().manual_seed(0)
        calls = []

        def draw(size: int, batch: int) -> torch.Tensor:
            calls.append(size)
            if len(calls) == stop_at:
                raise KeyboardInterrupt  # the run is killed while drawing this step's batch
            return torch.stack([videos[i] for i in torch.randint(4, (batch,), generator=generator)])

        checkpoint = Checkpoint(folder / "vae.pt", {"steps": 30})
        return vae, pretrain_vae.train(vae, draw, 30, 3e-3, 10.0, 1e-4, generator, checkpoint, save_every=15)

    straight, losses = run(tmp_path / "a")
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=18)  # killed in step 18; the checkpoint holds step 15
    resumed, _ = run(tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.skipif(not SHIPPED, reason="the video miniature's weights are not shipped yet")
def test_shipped_vae_round_trip_on_the_committed_heldout_clip():
    bb = backbone.load_miniature(WAN_MINI)
    figures = json.loads((WAN_MINI / "figures.json").read_text())["wan_vae"]
    clean = media.read_video(WAN_MINI / "heldout.mp4").frames[:, :17]
    recon = (bb.decode(bb.encode(clean[None] * 2 - 1))[0] + 1) / 2
    measured = psnr(recon, clean)
    print(f"held-out round trip {measured:.2f} dB (figures.json: {figures['heldout_clip_psnr_db']} dB)")
    assert measured >= figures["heldout_clip_psnr_db"] - 1.0


def test_dit_partial_run_resumes_to_the_uninterrupted_one(tmp_path):
    """Stage 2's loop: a run stopped with stop_at and continued ends bit-identical (model and EMA) to a straight
    run of the same schedule; the checkpoint's settings compare equal after their JSON round trip."""
    config = wan_model.WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=64, text_len=4)
    generator = torch.Generator().manual_seed(0)
    pools = [{"latents": torch.randn(6, 16, frames, side, side, generator=generator).to(torch.bfloat16),
              "txt": torch.randn(6, 4, 64, generator=generator)} for frames, side in ((3, 4), (5, 6))]
    settings = json.loads(json.dumps({"config": config.__dict__, "pools": pretrain_wan.POOLS}))

    def run(folder: Path, stop_at: int | None = None):
        torch.manual_seed(0)
        model = wan_model.WanModel(config)
        checkpoint = Checkpoint(folder / "wan.pt", settings)
        return pretrain_wan.train(model, pools, torch.zeros(1, 4, 64), 8, 1e-3, 0.9,
                                  torch.Generator().manual_seed(1), checkpoint, save_every=100, stop_at=stop_at)

    straight, losses = run(tmp_path / "a")
    _, partial = run(tmp_path / "b", stop_at=5)
    resumed, resumed_losses = run(tmp_path / "b")
    assert len(partial) == 5 and resumed_losses == losses
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_continuation_stage_starts_at_the_finished_stages_weights(tmp_path):
    """--init: the model starts at the saved weights exactly (a bfloat16 file comes back as float32, as shipped
    weights are stored), whatever its own seed drew; a file with other keys is refused by name."""
    config = wan_model.WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=64, text_len=4)
    torch.manual_seed(0)
    finished = wan_model.WanModel(config)
    weights.save_safetensors({k: v.to(torch.bfloat16) for k, v in finished.state_dict().items()}, tmp_path / "a.safetensors")
    torch.manual_seed(1)
    model = continue_from(wan_model.WanModel(config), tmp_path / "a.safetensors")
    for (k, a), b in zip(finished.state_dict().items(), model.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b), k
    assert all(p.requires_grad for p in model.parameters())
    weights.save_safetensors({"foreign.weight": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(Exception, match="foreign.weight|missing"):
        continue_from(wan_model.WanModel(config), tmp_path / "b.safetensors")


@pytest.mark.skipif(not SHIPPED, reason="the video miniature is not shipped in this checkout")
def test_the_cards_command_restores_the_example_clip(tmp_path):
    """`python sample.py --video mini/wan/example.mp4` as a user runs it (no model folder, no prompt: the shipped
    video miniature, blind through its bank), on the first 17 frames of the held-out clip with rain: more than 2 dB
    over the degraded input, the frame count and rate kept, and less frame-to-frame change than the input has."""
    out = tmp_path / "restored.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--video", "mini/wan/example.mp4", "--first-frames", "17",
                             "-o", str(out)], cwd=WAN_MINI.parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            check=True, capture_output=True, text=True)
    assert "auto: rain" in result.stderr
    restored = media.read_video(out)
    degraded = media.read_video(WAN_MINI / "example.mp4")
    clean = media.read_video(WAN_MINI / "heldout.mp4").frames[:, :17]
    assert restored.frames.shape == clean.shape and restored.fps == degraded.fps
    before, after = (psnr(x, clean) for x in (degraded.frames[:, :17], restored.frames))
    print(f"example.mp4, 17 frames: {before:.2f} -> {after:.2f} dB")
    assert after > before + 2
    assert evaluate.flicker(restored.frames) < evaluate.flicker(degraded.frames[:, :17])
