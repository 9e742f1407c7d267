"""Learn a restoration prompt for a frozen FLUX.1 or Wan2.1 on the degraded-to-clean bridge.

    python train.py --backbone flux --weights FLUX.1-dev/ --data pairs/ --degradation haze --out runs/flux-haze
    torchrun --nproc_per_node 8 train.py --backbone wan --weights Wan2.1-T2V-1.3B/ --data clips/ ...
    python train.py --preset tiny --backbone flux --steps 60 --out runs/tiny      # CPU, seconds

Each step: draw a global batch of (clean, degraded) pairs, encode both with the frozen VAE, draw bridge times
and noise, and minimise the x0-matching loss of bridge.py with respect to the prompt parameters only. Under
torchrun every rank takes its slice of the same global batch (all randomness comes from one generator that
every rank advances identically) and the prompt's gradients are averaged across ranks, so N processes compute
the same update as one process with the whole batch.

Outputs in --out: `prompt.safetensors` (the learned prompt, with its metadata), `checkpoint.safetensors`
(prompt + optimiser + step + generator state, for --resume) and `log.jsonl` (one line per step).
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import backbone as backbones
import bridge
import data
import prompts
import weights

DEFAULTS = {  # per backbone: training size (H, W), frames, prompt length K (the authors' values)
    "flux": {"size": (1024, 1024), "frames": None, "prompt_len": 512},
    "wan": {"size": (480, 832), "frames": 33, "prompt_len": 226},
}
TINY = {"flux": {"size": (32, 32), "frames": None, "prompt_len": 16}, "wan": {"size": (32, 32), "frames": 9, "prompt_len": 16}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["flux", "wan"], required=True, help="FLUX.1 for images, Wan2.1 for video")
    g.add_argument("--weights", type=Path, help="snapshot folder of the official release (FLUX.1-dev/-schnell, Wan2.1-T2V)")
    g.add_argument("--preset", choices=["tiny"], help="tiny random backbone and synthetic data: runs on a CPU in seconds")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], help="DiT dtype (default: bfloat16 on GPU, float32 on CPU); the VAE stays float32")
    g.add_argument("--checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile the loss (forward and backward)")
    g.add_argument("--text-cache", type=Path, default=Path.home() / ".cache" / "ypt-restore" / "text",
                   help="where the empty-prompt text-encoder outputs are cached (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="a folder with degraded/ and clean/, a JSON manifest, or (with "
                   "--synthetic) a folder of clean images or videos")
    g.add_argument("--synthetic", action="store_true", help="degrade clean --data on the fly with --degradation")
    g.add_argument("--degradation", default="unnamed", help=f"the degradation this prompt is for; with --synthetic one "
                   f"of {sorted(data.DEGRADATIONS)} (default: %(default)s)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="training crop (default: 1024 1024 FLUX, 480 832 Wan)")
    g.add_argument("--frames", type=int, help="frames per training clip, 4k+1 (Wan; default 33)")
    g.add_argument("--latent-cache", type=Path, help="encode each training pair once and keep its latents here "
                   "(fixes each pair's crop and degradation; without it they are redrawn every time)")
    g = p.add_argument_group("method")
    g.add_argument("--site", choices=prompts.SITES, default="deep", help="deep: the authors' prompt bank in every "
                   "block; text: offsets on the text encoders' output (the abstract's form); token: the baseline "
                   "learning input-embedding vectors through the frozen text encoders (default: %(default)s)")
    g.add_argument("--prompt-len", type=int, help="prompt tokens K (default: 512 FLUX, 226 Wan)")
    g.add_argument("--path", choices=["bridge", "naive"], default="bridge", help="training path (default: %(default)s)")
    g.add_argument("--t0", type=float, default=0.4, help="bridge end time T0 (default: %(default)s)")
    g.add_argument("--t-min", type=float, default=1e-4, help="smallest training time (default: %(default)s)")
    g.add_argument("--t-power", type=float, default=1.0, help="t = t_min + (T0 - t_min) u^power (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: %(default)s)")
    g.add_argument("--batch", type=int, default=4, help="GLOBAL batch, split over ranks (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds the prompt init and every random draw (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=10, help="progress line every N steps (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    args = p.parse_args(argv)

    if (args.weights is None) == (args.preset is None):
        p.error("give exactly one of --weights DIR (official snapshot) or --preset tiny")
    defaults = (TINY if args.preset else DEFAULTS)[args.backbone]
    args.size = tuple(args.size or defaults["size"])
    args.frames = args.frames or defaults["frames"]
    args.prompt_len = args.prompt_len or defaults["prompt_len"]
    if args.backbone == "flux" and args.frames:
        p.error("--frames is for video (Wan)")
    if args.synthetic and args.degradation not in data.DEGRADATIONS:
        p.error(f"--synthetic needs --degradation in {sorted(data.DEGRADATIONS)}")
    if args.preset is None and args.data is None:
        p.error("--data is required (except with --preset tiny)")
    if not 0 < args.t_min < args.t0 <= 1:
        p.error("need 0 < --t-min < --t0 <= 1")
    return args


# ---------------------------------------------------------------------------------------------- set-up


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: NCCL on GPUs, gloo on CPUs; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def load_backbone(args: argparse.Namespace, device: torch.device) -> backbones.Backbone:
    if args.preset == "tiny":
        return backbones.tiny(args.backbone).to(device)  # one fixed tiny model, whatever --seed is
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return backbones.load(args.backbone, args.weights, dtype, device, args.text_cache, args.site == "token")


def make_dataset(args: argparse.Namespace):
    if args.preset == "tiny" and args.data is None:
        sources = data.toy_images(8, 64, 64, seed=args.seed) if args.backbone == "flux" else data.toy_videos(
            4, 2 * args.frames, 64, 64, seed=args.seed)
        degradation = args.degradation if args.degradation in data.DEGRADATIONS else "noise"
        return data.Synthetic(sources, degradation, args.size, args.frames)
    if args.synthetic:
        return data.Synthetic(args.data, args.degradation, args.size, args.frames)
    if args.data.suffix == ".json":
        return data.Manifest(args.data, args.size, args.frames)
    return data.PairedFolders(args.data, args.size, args.frames)


class LatentSource:
    """(clean, degraded) latents of dataset items, encoded by the frozen VAE; optionally cached per item.

    Without a cache, every draw of an item gets a fresh crop/degradation (the pair's seed comes from the run's
    generator). With a cache folder, item i always uses seed (run seed, i), so its latents can be reused.
    """

    def __init__(self, bb: backbones.Backbone, dataset, cache: Path | None, identity: dict, seed: int):
        self.bb, self.dataset, self.cache, self.seed = bb, dataset, cache, seed
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            stamp = cache / "identity.json"
            if stamp.exists() and json.loads(stamp.read_text()) != identity:
                raise ValueError(f"{cache} holds latents of another data set-up ({stamp}); use a new --latent-cache")
            if not stamp.exists():
                with weights.atomic_file(stamp) as tmp:
                    tmp.write_text(json.dumps(identity, indent=1))

    def __call__(self, indices: list[int], pair_seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._pair(i, s) for i, s in zip(indices, pair_seeds)]
        return torch.stack([c for c, _ in pairs]), torch.stack([d for _, d in pairs])

    def _pair(self, index: int, pair_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self._encode(index, pair_seed)
        path = self.cache / f"{index}.safetensors"
        if path.exists():
            cached = weights.read_state_dict(path)
            return cached["clean"].to(self.bb.device), cached["degraded"].to(self.bb.device)
        clean, degraded = self._encode(index, self.seed * 1_000_003 + index)
        weights.save_safetensors({"clean": clean, "degraded": degraded}, path)
        return clean, degraded

    def _encode(self, index: int, pair_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean, degraded = self.dataset.pair(index, torch.Generator().manual_seed(pair_seed))
        latents = self.bb.encode(torch.stack([clean, degraded]) * 2 - 1)
        return latents[0], latents[1]


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, prompt, optimizer, step: int, generator: torch.Generator, args) -> None:
    """Prompt, AdamW state, step and the run generator's state in one safetensors file (written atomically)."""
    tensors = {f"prompt.{k}": v for k, v in prompt.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = value
    tensors["generator"] = generator.get_state()
    meta = {"step": step, "param_groups": opt["param_groups"], "args": _args_record(args)}
    weights.save_safetensors(tensors, path, metadata=meta)


def load_checkpoint(path: Path, prompt, optimizer, generator: torch.Generator, args) -> int:
    """Restore what `save_checkpoint` wrote; refuses a checkpoint of a different set-up. Returns the step."""
    meta = {k: json.loads(v) for k, v in weights.read_metadata(path).items()}
    recorded, current = meta["args"], _args_record(args)
    keys = ["backbone", "preset", "weights", "site", "prompt_len", "path", "t0", "t_min", "batch", "seed"]
    differ = [f"{k}: {recorded.get(k)} -> {current.get(k)}" for k in keys if recorded.get(k) != current.get(k)]
    if differ:
        raise ValueError(f"{path} was written by a different run set-up ({'; '.join(differ)})")
    tensors = weights.read_state_dict(path)
    prompt_state = {k.removeprefix("prompt."): v for k, v in tensors.items() if k.startswith("prompt.")}
    weights.check_keys(prompt, prompt_state)
    prompt.load_state_dict(prompt_state)  # copies into the parameters the optimiser holds
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    return meta["step"]


def _args_record(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def prompt_metadata(args, bb: backbones.Backbone, step: int) -> dict:
    return {
        "backbone": bb.kind, "config": bb.config, "site": args.site, "length": args.prompt_len,
        "context_len": bb.txt.shape[1], "t0": args.t0, "t_min": args.t_min, "path": args.path,
        "degradation": args.degradation, "step": step, "train_args": _args_record(args),
    }


# ---------------------------------------------------------------------------------------------- training


def step_loss(bb: backbones.Backbone, prompt: torch.nn.Module, t0: float, path: str):
    """The function a training step differentiates: (x0, y, eps, t) -> bridge loss of the prompted backbone."""

    def loss(x0: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return bridge.loss(lambda x, tt: bb.velocity(x, tt, prompt), x0, y, eps, t, t0, path)

    return loss


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """What DistributedDataParallel does, written out: the prompt is small, so one all-reduce per tensor."""
    if world == 1:
        return
    for param in params:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= world


@dataclass
class Run:
    backbone: backbones.Backbone
    prompt: torch.nn.Module
    losses: list[float]  # mean loss over the global batch, one per step of this run (also in log.jsonl)


def train(args: argparse.Namespace) -> Run:
    """Run the training loop and return the backbone, the learned prompt and this run's losses."""
    rank, world, device = setup_distributed()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    torch.manual_seed(args.seed)

    bb = load_backbone(args, device)
    bb.dit.checkpointing = args.checkpointing
    prompt = bb.new_prompt(args.site, args.prompt_len).to(device)
    params = list(prompt.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)  # every rank draws the same global batch from it

    dataset = make_dataset(args)
    identity = {k: str(getattr(args, k)) for k in ("backbone", "preset", "weights", "data", "synthetic", "degradation",
                                                   "size", "frames", "seed")}
    source = LatentSource(bb, dataset, args.latent_cache, identity, args.seed)
    shape = bb.latent_shape(args.size, args.frames)

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / "checkpoint.safetensors"
    step = 0
    if args.resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        step = load_checkpoint(checkpoint_path, prompt, optimizer, generator, args)
    if world > 1:
        for param in params:  # identical start on every rank, whatever happened before
            dist.broadcast(param.data, src=0)

    loss_fn = step_loss(bb, prompt, args.t0, args.path)
    if args.compile:
        loss_fn = torch.compile(loss_fn)
    local = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    losses, start_time, start_step = [], time.time(), step
    log = open(args.out / "log.jsonl", "a") if rank == 0 else None
    while step < args.steps:
        # one global batch, drawn identically on every rank; this rank keeps its slice
        indices = torch.randint(len(dataset), (args.batch,), generator=generator).tolist()
        pair_seeds = torch.randint(2**62, (args.batch,), generator=generator).tolist()
        t = bridge.draw_times(args.batch, args.t_min, args.t0, generator, args.t_power)
        eps = torch.randn(args.batch, *shape, generator=generator)
        x0, y = source(indices[local], pair_seeds[local])

        loss = loss_fn(x0, y, eps[local].to(device), t[local].to(device))
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        average_gradients(params, world)
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
            mean_loss /= world
        if not math.isfinite(mean_loss.item()) or not all(torch.isfinite(p.grad).all() for p in params):
            raise FloatingPointError(
                f"step {step + 1}: loss {mean_loss.item()} or a gradient is not finite; the prompt was NOT updated "
                f"and the last checkpoint ({checkpoint_path}) is intact. Try a lower --lr or --dtype float32."
            )
        optimizer.step()
        step += 1
        losses.append(mean_loss.item())

        if rank == 0:
            log.write(json.dumps({"step": step, "loss": losses[-1], "time": round(time.time() - start_time, 3)}) + "\n")
            log.flush()
            if step % args.log_every == 0 or step == args.steps:
                print(progress_line(step, args, losses, start_time, start_step), flush=True)
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(checkpoint_path, prompt, optimizer, step, generator, args)
                prompts.save_prompt(prompt, args.out / "prompt.safetensors", prompt_metadata(args, bb, step))
    if log is not None:
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return Run(bb, prompt, losses)


def progress_line(step: int, args, losses: list[float], start_time: float, start_step: int) -> str:
    elapsed = time.time() - start_time
    done = step - start_step
    rate = done * args.batch / elapsed if elapsed > 0 else float("nan")
    eta = elapsed / done * (args.steps - step) if done else float("nan")
    recent = losses[-args.log_every:]
    return (f"step {step}/{args.steps}  loss {sum(recent) / len(recent):.5f}  {rate:.2f} samples/s  "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError, weights.CheckpointError) as err:
        sys.exit(f"train.py: error: {err}")


if __name__ == "__main__":
    main()
