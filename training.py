"""Learning a prompt for a frozen backbone on the degraded-to-clean bridge: the loss a step differentiates, the
training loop, its checkpoints. train.py is the command line over `train`.

    options = TrainOptions(site="deep", prompt_len=512, steps=2000, batch=4, lr=1e-3)
    run = train(bb, dataset, options, Path("runs/haze"), metadata={"degradation": "haze"})
    run.prompt, run.losses

Each step: draw a global batch of (clean, degraded) pairs, encode both with the frozen VAE, draw bridge times
and noise, and minimise the x0-matching loss of bridge.py with respect to the prompt parameters only. With
several processes (torchrun; `rank`, `world`) every rank takes its slice of the same global batch (all
randomness comes from one generator that every rank advances identically) and the prompt's gradients are
averaged across ranks, so N processes compute the same update as one process with the whole batch.

Writes into the run folder: `prompt.safetensors` (the learned prompt, with its metadata), `checkpoint.safetensors`
(prompt + optimiser + step + generator state, for resuming) and `log.jsonl` (one line per step). Imports no
data or video code (a dataset is anything with `len`, `size`, `frames` and `pair(index, generator)`), so a bare
GPU image can run the step (bench/gpu.py).
"""

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import backbone as backbones
import bridge
import defaults
import prompts
import runtime
import weights

# What a resumed run must share with the run that wrote its checkpoint (keys of the run record).
# Changing any of these changes what is learned, so a resumed run refuses it; --lr and --weight-decay are applied
# (the optimiser's groups take the new values), --steps/--save-every/--log-every simply take effect.
RESUME_KEYS = ("backbone", "preset", "weights", "site", "prompt_len", "path", "t0", "t_min", "t_power", "batch",
               "seed", "data", "synthetic", "degradation", "size", "frames")


class Stopped(Exception):
    """Training stopped by SIGTERM after a step; the checkpoint of that step was written."""


@dataclass(frozen=True)
class TrainOptions:
    """The method's and the optimiser's settings of one training run."""

    prompt_len: int  # prompt tokens K
    site: str = "deep"  # prompts.SITES: deep (the authors' prompt bank), text (output offsets), token (baseline)
    path: str = "bridge"  # "bridge" (the method) or "naive" (the model's own path from the degraded latent)
    t0: float = defaults.T0
    t_min: float = defaults.T_MIN
    t_power: float = 1.0  # t = t_min + (T0 - t_min) u^power
    steps: int = 2000
    batch: int = 4  # the GLOBAL batch, split over the ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0  # seeds the prompt's initialisation and every random draw
    save_every: int = 200  # checkpoint and prompt file every N steps (and at the end)
    log_every: int = 10  # progress line every N steps
    compile: bool = False  # torch.compile the loss (forward and backward)
    checkpointing: bool = False  # recompute block activations in backward (less memory)

    def __post_init__(self):
        if self.site not in prompts.SITES:
            raise ValueError(f"unknown prompt site {self.site!r}; choose one of {prompts.SITES}")
        if self.path not in ("bridge", "naive"):
            raise ValueError(f"path must be 'bridge' or 'naive', got {self.path!r}")
        if not 0 < self.t_min < self.t0 <= 1:
            raise ValueError(f"need 0 < t_min < T0 <= 1, got t_min={self.t_min}, T0={self.t0}")
        if self.prompt_len < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("prompt length, steps and batch must be positive")


# ---------------------------------------------------------------------------------------------- the step


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


class LatentSource:
    """(clean, degraded) latents of dataset items, encoded by the frozen VAE; optionally cached per item.

    Without a cache, every draw of an item gets a fresh crop/degradation (the pair's seed comes from the run's
    generator). With a cache folder, item i always uses seed mix_seed(run seed, i), so its latents can be reused;
    `identity` (the data set-up) is stamped into the folder, and a folder of another set-up is refused.
    """

    def __init__(self, bb: backbones.Backbone, dataset, cache: Path | None, identity: dict, seed: int):
        self.bb, self.dataset, self.cache, self.seed = bb, dataset, cache, seed
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            stamp = cache / "identity.json"
            if stamp.exists() and json.loads(stamp.read_text()) != identity:
                raise ValueError(f"{cache} holds latents of another data set-up ({stamp}); use a new --latent-cache")
            if not stamp.exists():
                with runtime.atomic_file(stamp) as tmp:
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
        clean, degraded = self._encode(index, defaults.mix_seed(self.seed, index))
        weights.save_safetensors({"clean": clean, "degraded": degraded}, path)
        return clean, degraded

    def _encode(self, index: int, pair_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean, degraded = self.dataset.pair(index, torch.Generator().manual_seed(pair_seed))
        latents = self.bb.encode(torch.stack([clean, degraded]) * 2 - 1)
        return latents[0], latents[1]


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, prompt, optimizer, step: int, generator: torch.Generator, record: dict) -> None:
    """Prompt, AdamW state, step and the run generator's state in one safetensors file (written atomically), with
    the run's record (its settings) in the metadata."""
    tensors = {f"prompt.{k}": v for k, v in prompt.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = value
    tensors["generator"] = generator.get_state()
    meta = {"step": step, "param_groups": opt["param_groups"], "args": record}
    weights.save_safetensors(tensors, path, metadata=meta)


def load_checkpoint(path: Path, prompt, optimizer, generator: torch.Generator, record: dict) -> int:
    """Restore what `save_checkpoint` wrote; refuses a checkpoint of a different set-up (RESUME_KEYS of the two
    records). Returns the step."""
    meta = {k: json.loads(v) for k, v in weights.read_metadata(path).items()}
    recorded, now = meta["args"], json.loads(json.dumps(record))  # compared as JSON values (tuples are lists)
    differ = [f"{k}: {recorded.get(k)} -> {now.get(k)}" for k in RESUME_KEYS if recorded.get(k) != now.get(k)]
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
    for group in optimizer.param_groups:  # this run's lr and weight decay, as its record says
        group["lr"], group["weight_decay"] = now.get("lr", group["lr"]), now.get("weight_decay", group["weight_decay"])
    generator.set_state(tensors["generator"])
    return meta["step"]


def prompt_metadata(bb: backbones.Backbone, options: TrainOptions, step: int, record: dict, extra: dict) -> dict:
    """What a prompt file records: the backbone it fits, the site, K, the bridge it was trained on, the step and
    the run's settings, plus `extra` (e.g. the degradation)."""
    return {
        "backbone": bb.kind, "config": bb.config, "site": options.site, "length": options.prompt_len,
        "context_len": bb.txt.shape[1], "t0": options.t0, "t_min": options.t_min, "path": options.path,
        "degradation": "unnamed", **extra, "step": step, "train_args": record,
    }


# ---------------------------------------------------------------------------------------------- training


@dataclass
class Run:
    backbone: backbones.Backbone
    prompt: torch.nn.Module
    losses: list[float]  # mean loss over the global batch, one per step of this run (also in log.jsonl)


def train(
    bb: backbones.Backbone,
    dataset,
    options: TrainOptions,
    out: Path,
    *,
    resume: bool = False,
    latent_cache: Path | None = None,
    cache_identity: dict | None = None,
    record: dict | None = None,
    metadata: dict | None = None,
    rank: int = 0,
    world: int = 1,
    log: Callable[[str], None] | None = None,
) -> Run:
    """Learn a prompt for `bb` on `dataset` (pairs at the training size: it has `size` and `frames`) into the run
    folder `out`; returns the backbone, the learned prompt and this run's losses.

    `resume` continues from out/checkpoint.safetensors. `latent_cache`: encode each pair once and keep its
    latents there (fixes each pair's crop and degradation; `cache_identity` describes the data set-up).
    `record`: the run's settings as the command line has them (kept in the checkpoint and the prompt file, beside
    `options`); `metadata`: more entries for the prompt file (e.g. {"degradation": "haze"}). `log` gets a
    progress line every `options.log_every` steps on rank 0 (default: printed). Raises ValueError for a batch
    that the ranks cannot share or a checkpoint of another set-up, FloatingPointError for a non-finite loss
    (the prompt is then not updated and the last checkpoint stays intact).
    """
    if options.batch % world:
        raise ValueError(f"--batch {options.batch} must be divisible by the number of processes ({world})")
    record = {**runtime.record(asdict(options)), **(record or {})}
    device = bb.device
    torch.manual_seed(options.seed)
    bb.dit.checkpointing = options.checkpointing
    prompt = bb.new_prompt(options.site, options.prompt_len).to(device)
    params = list(prompt.parameters())
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)  # every rank draws the same global batch from it

    source = LatentSource(bb, dataset, latent_cache, cache_identity or {}, options.seed)
    shape = bb.latent_shape(dataset.size, dataset.frames)

    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.safetensors"
    step = 0
    if resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        step = load_checkpoint(checkpoint_path, prompt, optimizer, generator, record)
    if world > 1:
        for param in params:  # identical start on every rank, whatever happened before
            dist.broadcast(param.data, src=0)

    loss_fn = step_loss(bb, prompt, options.t0, options.path)
    if options.compile:
        loss_fn = torch.compile(loss_fn)
    batch = options.batch
    local = slice(rank * batch // world, (rank + 1) * batch // world)
    losses, start_time, start_step = [], time.time(), step
    if rank == 0:
        trim_log(out / "log.jsonl", step)  # a resumed run logs its steps again from the checkpoint's on
    log_file = open(out / "log.jsonl", "a") if rank == 0 else None
    stop: list[int] = []  # the signal, once SIGTERM arrives: the step in progress finishes, is saved, and we stop
    previous = _catch_sigterm(stop)
    try:
        while step < options.steps:
            # one global batch, drawn identically on every rank; this rank keeps its slice
            indices = torch.randint(len(dataset), (batch,), generator=generator).tolist()
            pair_seeds = torch.randint(2**62, (batch,), generator=generator).tolist()
            t = bridge.draw_times(batch, options.t_min, options.t0, generator, options.t_power)
            eps = torch.randn(batch, *shape, generator=generator)
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
                    f"step {step + 1}: loss {mean_loss.item()} or a gradient is not finite; the prompt was NOT "
                    f"updated and the last checkpoint ({checkpoint_path}) is intact. Try a lower --lr or --dtype "
                    "float32."
                )
            optimizer.step()
            step += 1
            losses.append(mean_loss.item())

            if rank == 0:
                log_file.write(json.dumps({"step": step, "loss": losses[-1],
                                           "time": round(time.time() - start_time, 3)}) + "\n")
                log_file.flush()
                if step % options.log_every == 0 or step == options.steps:
                    (log or _print)(progress_line(step, options, losses, start_time, start_step))
                if step % options.save_every == 0 or step == options.steps or stop:
                    save_checkpoint(checkpoint_path, prompt, optimizer, step, generator, record)
                    prompts.save_prompt(prompt, out / "prompt.safetensors",
                                        prompt_metadata(bb, options, step, record, metadata or {}))
            if stop:
                raise Stopped(f"stopped by SIGTERM after step {step}; {checkpoint_path} holds it (--resume continues)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log_file is not None:
            log_file.close()
    if world > 1:
        dist.barrier()
    return Run(bb, prompt, losses)


def trim_log(path: Path, step: int) -> None:
    """Keep only the lines of log.jsonl up to `step` (the checkpoint's): those after it are redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a kill: redone too
            continue
    with runtime.atomic_file(path) as tmp:
        tmp.write_text("".join(kept))


def _catch_sigterm(stop: list[int]):
    """Note SIGTERM in `stop` instead of dying mid-step (clusters send it before killing a job); returns the
    previous handler, or None where no handler can be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))


def _print(line: str) -> None:
    print(line, flush=True)


def progress_line(step: int, options: TrainOptions, losses: list[float], start_time: float, start_step: int) -> str:
    elapsed = time.time() - start_time
    done = step - start_step
    rate = done * options.batch / elapsed if elapsed > 0 else float("nan")
    eta = elapsed / done * (options.steps - step) if done else float("nan")
    recent = losses[-options.log_every:]
    return (f"step {step}/{options.steps}  loss {sum(recent) / len(recent):.5f}  {rate:.2f} samples/s  "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'}")
