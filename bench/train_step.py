"""Prompt-training step, ours vs diffusers' implementation: time per step and peak memory.

    python bench/train_step.py --backbone flux            # CPU config, all variants, ~5-10 min on 2 cores
    python bench/train_step.py --backbone wan --repeats 11 --threads 2
    python bench/train_step.py --backbone flux --device cuda --dtype bfloat16

One step = `training.step_loss(bb, prompt, T0, "bridge")(x0, y, eps, t)` forward + backward to the deep prompt
(P and the per-block alphas) only; every backbone weight has requires_grad False. Variants:

  ours            our model, eager
  ours-compiled   the same loss function through torch.compile (inductor), as `train.py --compile` does
  diffusers       diffusers' transformer with a copy of the same weights (converted by diffusers' own converter),
                  the same deep prompt applied by hooks the authors' way (bench/reference.py), the same bridge loss
  diffusers-compiled   (only with --variants) the same through torch.compile

Before timing, every variant's loss and prompt gradients are checked against ours-eager. Timing alternates the
variants (A B C A B C ...) in one process after warm-up; the table gives medians and the paired ratio
ours/diffusers (median over rounds of the two back-to-back times). Peak memory: each variant runs in a FRESH
subprocess; after two warm-up steps the heap is trimmed and the RSS high-water mark reset, and the figure is the
high-water mark during one step minus the RSS just before it (CPU; once with glibc's default malloc, once "live"
with freed blocks returned to the OS at once, see common.LIVE_MALLOC_ENV), or max_memory_allocated minus
memory_allocated before the step (CUDA). JSON: bench/results/train_step_<backbone>[_<device>][_ckpt].json.
"""

import argparse
import sys

import common  # puts the repository root on sys.path
import torch

import bridge
import training
from common import mib, table

T0 = 0.4
VARIANTS = ("ours", "ours-compiled", "diffusers")


def build(kind: str, variant: str, device: str, dtype: torch.dtype, checkpointing: bool, drop_ours: bool = False):
    """(step function, prompt) of one variant: step() runs forward + backward and returns the loss."""
    config = common.CPU_FLUX if kind == "flux" else common.CPU_WAN
    bb = common.make_backbone(kind, config, common.CPU_TEXT_LEN, device, dtype)
    prompt = common.new_deep_prompt(bb, common.CPU_TEXT_LEN)
    x0, y, eps, t = common.step_inputs(kind, device=device)
    if variant.startswith("ours"):
        bb.dit.checkpointing = checkpointing
        loss_fn = training.step_loss(bb, prompt, T0, "bridge")
    else:
        import reference

        ref, velocity = reference.reference_velocity(bb, prompt)
        if checkpointing:
            ref.enable_gradient_checkpointing()
        if drop_ours:
            bb.dit = None  # the diffusers copy holds the weights; ours is not needed in this process

        def loss_fn(x0, y, eps, t):
            return bridge.loss(velocity, x0, y, eps, t, T0, "bridge")

    if variant.endswith("compiled"):
        loss_fn = torch.compile(loss_fn)

    def step() -> torch.Tensor:
        for p in prompt.parameters():
            p.grad = None
        loss = loss_fn(x0, y, eps, t)
        loss.backward()
        return loss.detach()

    return step, prompt


def child_memory(args) -> dict:
    """Run in a fresh process: build one variant, warm up, measure one step's peak memory."""
    dtype = getattr(torch, args.dtype)
    step, _ = build(args.backbone, args.child_memory, args.device, dtype, args.checkpointing, drop_ours=True)
    for _ in range(2):
        step()
    return common.measure_peak(step, args.device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["flux", "wan"], required=True)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all visible cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing on both sides")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--json", help="output path (default: bench/results/train_step_<backbone>.json)")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    if args.child_memory:
        print(json_line(child_memory(args)))
        return

    dtype = getattr(torch, args.dtype)
    variants = args.variants.split(",")
    print(f"train step, {args.backbone}, {args.device} {args.dtype}, {threads} threads, checkpointing "
          f"{args.checkpointing}: building {variants}", flush=True)
    steps, prompts = {}, {}
    for name in variants:
        steps[name], prompts[name] = build(args.backbone, name, args.device, dtype, args.checkpointing)

    # same loss and same prompt gradients on every side
    check = {}
    reference_loss = steps[variants[0]]()
    reference_grads = [q.grad.clone() for q in prompts[variants[0]].parameters()]
    for name in variants[1:]:
        loss = steps[name]()
        grads = [q.grad for q in prompts[name].parameters()]
        check[name] = {
            "loss_abs_diff": abs(loss.item() - reference_loss.item()),
            "grad_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(grads, reference_grads)),
            "grad_max_abs": max(a.abs().max().item() for a in reference_grads),
        }
        print(f"  check {name} vs {variants[0]}: |loss diff| {check[name]['loss_abs_diff']:.2e}, grad max-abs diff "
              f"{check[name]['grad_max_abs_diff']:.2e} (grad max {check[name]['grad_max_abs']:.2e})", flush=True)

    times = common.alternate(steps, args.repeats, args.warmup, args.device, log=lambda s: print(s, flush=True))
    memory, live = {}, {}
    cuda = torch.device(args.device).type == "cuda"
    if not args.no_memory:
        for name in variants:
            child = ["bench/train_step.py", "--backbone", args.backbone, "--device", args.device, "--dtype",
                     args.dtype, "--threads", str(threads), "--child-memory", name]
            child += ["--checkpointing"] if args.checkpointing else []
            memory[name] = common.run_child(child)
            line = f"  memory {name}: step peak {mib(memory[name]['step_peak_bytes']):.1f} MiB"
            if not cuda:
                live[name] = common.run_child(child, env=common.LIVE_MALLOC_ENV)
                line += f", live {mib(live[name]['step_peak_bytes']):.1f} MiB"
            print(line + f" (absolute {mib(memory[name]['peak_bytes']):.0f} MiB)", flush=True)

    base = "diffusers" if "diffusers" in variants else variants[-1]
    rows, record_variants = [], {}
    for name in variants:
        s = common.summary(times[name])
        ratio = common.paired_ratio(times[name], times[base])
        mem, mem_live = memory.get(name), live.get(name)
        mem_ratio = mem["step_peak_bytes"] / memory[base]["step_peak_bytes"] if mem else None
        live_ratio = mem_live["step_peak_bytes"] / live[base]["step_peak_bytes"] if mem_live else None
        row = [name, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}-{s['max_s']:.3f}", f"{ratio:.3f}"]
        row += [f"{mib(mem['step_peak_bytes']):.1f} ({mem_ratio:.2f})" if mem else "-"]
        row += [] if cuda else [f"{mib(mem_live['step_peak_bytes']):.1f} ({live_ratio:.2f})" if mem_live else "-"]
        rows.append(row)
        record_variants[name] = {**s, "times_s": times[name], f"ratio_vs_{base}": ratio, "memory": mem,
                                 f"memory_ratio_vs_{base}": mem_ratio, "memory_live": mem_live,
                                 f"memory_live_ratio_vs_{base}": live_ratio, "check": check.get(name)}
    if cuda:
        headers = ["variant", "median s", "range s", f"time / {base}", f"step peak alloc MiB (/ {base})"]
    else:
        headers = ["variant", "median s", "range s", f"time / {base}", f"step peak RSS MiB (/ {base})",
                   f"live step peak MiB (/ {base})"]
    print()
    print(table(headers, rows))
    record = {
        "benchmark": "train_step", "backbone": args.backbone, "device": args.device, "dtype": args.dtype,
        "checkpointing": args.checkpointing, "threads": threads, "repeats": args.repeats, "warmup": args.warmup,
        "config": repr(common.CPU_FLUX if args.backbone == "flux" else common.CPU_WAN),
        "latent": [1, *common.latent_shape(args.backbone)], "text_tokens": common.CPU_TEXT_LEN,
        "prompt_tokens": common.CPU_TEXT_LEN, "machine": common.machine(args.device), "variants": record_variants,
        "memory_method": "fresh process per variant; step peak = high-water mark during one step (after 2 warm-up "
                         "steps, heap trimmed, mark reset) minus the memory in use right before it. CPU: RSS "
                         "(VmHWM - VmRSS), 'memory' with glibc's default malloc, 'memory_live' with "
                         f"{common.LIVE_MALLOC_ENV} (freed tensors go back to the OS: ~ peak live tensor bytes). "
                         "CUDA: max_memory_allocated - memory_allocated.",
        "command": " ".join(["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    suffix += "_ckpt" if args.checkpointing else ""
    print(f"\nwrote {common.write_json(f'train_step_{args.backbone}{suffix}', record, args.json)}")


def json_line(record: dict) -> str:
    import json

    return json.dumps(record)


if __name__ == "__main__":
    main()
