"""Achieved FLOP/s of our eager prompt-training step, as a share of this machine's measured matmul rate.

    python bench/flops.py                      # both backbones, CPU config, float32
    python bench/flops.py --backbone wan --threads 1 --repeats 9 --profile

FLOPs of one step (forward + backward to the prompt) are counted with torch.utils.flop_counter.FlopCounterMode
(matmuls and attention; elementwise work counts zero). The CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward) are not in torch's table: they are counted here
with torch's own SDPA formulas (forward 2 matmuls, backward 5 including the recomputed scores). The yardstick is
a large square float32 matmul (`--matmul-size`, default 2048) timed the same way in the same run, alternating with
the step (step, matmul, step, matmul, ...): achieved = FLOPs / median step time; % = achieved / matmul rate.
`--profile` adds where the step's time goes (torch.profiler self times grouped into GEMM, attention, the rest).
"""

import argparse
import statistics
import sys

import common  # puts the repository root on sys.path
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import training
from common import table



def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flops,
}


def our_step(kind: str, device: str, dtype: torch.dtype, checkpointing: bool = False):
    config = common.CPU_FLUX if kind == "flux" else common.CPU_WAN
    bb = common.make_backbone(kind, config, common.CPU_TEXT_LEN, device, dtype)
    bb.dit.checkpointing = checkpointing
    prompt = common.new_deep_prompt(bb, common.CPU_TEXT_LEN)
    x0, y, eps, t = common.step_inputs(kind, device=device)
    loss_fn = training.step_loss(bb, prompt, 0.4, "bridge")

    def step():
        for p in prompt.parameters():
            p.grad = None
        loss_fn(x0, y, eps, t).backward()

    return step


def count_flops(step) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def matmul(size: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    return (lambda: a @ b), 2 * size**3


def category(name: str) -> str:
    if "attention" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm"):
        return "GEMM"
    if name.startswith("aten::") or name.startswith("mkldnn"):
        return "other ops (elementwise, copies, norms, reductions)"
    return None  # autograd wrappers and python ranges: their children are counted


def profile_shares(step, device: str) -> dict[str, float]:
    """Self time of one step grouped into GEMM / attention / other ops, in seconds."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
        common.sync(device)
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        group = category(event.key)
        if group is None:
            continue
        seconds = (event.self_device_time_total if device.startswith("cuda") else event.self_cpu_time_total) / 1e6
        shares[group] = shares.get(group, 0.0) + seconds
    return shares


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["flux", "wan", "both"], default="both")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all visible cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="also report GEMM / attention / other time shares")
    p.add_argument("--json", help="output path (default: bench/results/flops.json)")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kinds = ["flux", "wan"] if args.backbone == "both" else [args.backbone]

    print(f"achieved FLOP/s, {args.device} {args.dtype}, {threads} threads", flush=True)
    mm, mm_flops = matmul(args.matmul_size, args.device, dtype)
    variants, flops, per_op = {}, {}, {}
    for kind in kinds:
        variants[kind] = our_step(kind, args.device, dtype)
        variants[kind]()  # first call outside the counter: one-time set-up
        flops[kind], per_op[kind] = count_flops(variants[kind])
        print(f"  {kind}: {flops[kind] / 1e9:.2f} GFLOP per step", flush=True)
    variants["matmul"] = mm
    times = common.alternate(variants, args.repeats, args.warmup, args.device, log=lambda s: print(s, flush=True))
    peak = mm_flops / statistics.median(times["matmul"])

    rows, record = [], {}
    for kind in kinds:
        seconds = statistics.median(times[kind])
        achieved = flops[kind] / seconds
        record[kind] = {"gflop_per_step": flops[kind] / 1e9, "flops_per_op": per_op[kind], **common.summary(times[kind]),
                        "achieved_gflops": achieved / 1e9, "share_of_matmul_peak": achieved / peak}
        rows.append([kind, f"{flops[kind] / 1e9:.1f}", f"{seconds:.3f}", f"{achieved / 1e9:.1f}",
                     f"{100 * achieved / peak:.0f}%"])
        if args.profile:
            shares = profile_shares(variants[kind], args.device)
            total = sum(shares.values())
            record[kind]["profile_self_seconds"] = shares
            print(f"  {kind} time shares: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares.items()))
    rows.append([f"matmul {args.matmul_size}^3", f"{mm_flops / 1e9:.1f}", f"{statistics.median(times['matmul']):.3f}",
                 f"{peak / 1e9:.1f}", "100%"])
    print()
    print(table(["what", "GFLOP", "median s", "GFLOP/s", "of matmul peak"], rows))
    out = {
        "benchmark": "flops", "device": args.device, "dtype": args.dtype, "threads": threads, "repeats": args.repeats,
        "matmul_size": args.matmul_size, "matmul": {**common.summary(times["matmul"]), "gflops": peak / 1e9},
        "backbones": record, "machine": common.machine(args.device),
        "command": " ".join(["python", "bench/flops.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    print(f"\nwrote {common.write_json(f'flops{suffix}', out, args.json)}")


if __name__ == "__main__":
    main()
