"""Full-size figures on one GPU (run through bench/gpu.sh; < 8 minutes on an H100/H200).

    bash bench/gpu.sh                 # writes gpu.json + gpu.md into $OUT (if set) or bench/results/
    python bench/gpu.py --smoke       # tiny configs, any device: checks that the script runs end to end

1. FLUX.1-dev-size transformer (model/flux.py CONFIGS["flux-dev"], 12B parameters, random weights materialised
   directly on the GPU in bfloat16), prompt-training step at 1024x1024 (4096 image tokens, 512 text tokens, deep
   prompt K=512, batch 1) with per-block activation checkpointing: seconds per step, peak memory, MFU against the
   chip's dense bf16 peak (datasheet, by device name) and against a bf16 matmul measured in the same run. Then the
   same step without checkpointing, if it fits.
2. Wan2.1-1.3B-size DiT (CONFIGS["wan2.1-t2v-1.3b"], random weights, bfloat16): bridge sampling of a 33-frame
   480x832 clip (latent 16x9x60x104, 14040 tokens, 226 context tokens, deep prompt) in 20 steps: seconds.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on one step. "hardware" FLOPs are what ran
(checkpointing recomputes each block's forward); "model" FLOPs leave that recomputation out (hardware minus one
counted forward pass), the usual basis of MFU.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common  # puts the repository root on sys.path
import torch
from torch.utils.flop_counter import FlopCounterMode

import bridge
import defaults
import training
from model import flux as flux_model
from model import wan as wan_model

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}

SMOKE_FLUX = flux_model.FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=4,
    depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True, guidance_embed=True,
)
SMOKE_WAN = wan_model.WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=64)


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return name, peak * 1e12
    return name, None


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        common.time_call(fn, device)
    return [common.time_call(fn, device) for _ in range(repeats)]


def peak_memory(fn, device) -> dict:
    if device.type == "cuda":
        return common.measure_peak(fn, device)
    return {"kind": "not measured off CUDA"}


def flux_train(args, device, dtype, log) -> dict:
    config = SMOKE_FLUX if args.smoke else flux_model.CONFIGS["flux-dev"]
    size = 64 if args.smoke else 1024  # pixels; latent = size / 8, packed tokens = (size / 16)^2
    text_len = 16 if args.smoke else 512
    start = time.perf_counter()
    bb = common.make_backbone("flux", config, text_len, device, dtype)
    common.sync(device)
    log(f"FLUX: {sum(p.numel() for p in bb.dit.parameters()) / 1e9:.2f}B parameters materialised on {device} in "
        f"{time.perf_counter() - start:.1f} s")
    prompt = common.new_deep_prompt(bb, text_len)
    x0, y, eps, t = common.step_inputs("flux", device=device, shape=(16, size // 8, size // 8))
    loss = training.step_loss(bb, prompt, defaults.T0, "bridge")  # training.py imports no video code

    def step():
        for p in prompt.parameters():
            p.grad = None
        loss(x0, y, eps, t).backward()

    def forward():
        with torch.no_grad():
            loss(x0, y, eps, t)

    record = {"config": "flux-dev" if not args.smoke else "smoke", "image": [size, size],
              "image_tokens": (size // 16) ** 2, "text_tokens": text_len, "prompt_tokens": text_len}
    forward_flops = count(forward)
    for checkpointing in (True, False):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        bb.dit.checkpointing = checkpointing
        try:
            times = timed(step, device, args.warmup, args.repeats)
            memory = peak_memory(step, device)
            flops = count(step)
        except torch.OutOfMemoryError as err:
            record[key] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            log(f"FLUX step, {key}: out of memory")
            torch.cuda.empty_cache()
            continue
        model_flops = flops - forward_flops if checkpointing else flops
        seconds = statistics.median(times)
        record[key] = {**common.summary(times), "times_s": times, "hardware_tflop": flops / 1e12,
                       "model_tflop": model_flops / 1e12, "memory": memory,
                       "achieved_model_tflops": model_flops / seconds / 1e12,
                       "achieved_hardware_tflops": flops / seconds / 1e12}
        log(f"FLUX step, {key}: {seconds:.3f} s, {model_flops / 1e12:.1f} model TFLOP "
            f"({flops / 1e12:.1f} run), peak {common.mib(memory.get('peak_bytes', 0)) / 1024:.1f} GiB")
    record["forward_tflop"] = forward_flops / 1e12
    del bb, prompt, loss
    return record


def wan_sample(args, device, dtype, log) -> dict:
    config = SMOKE_WAN if args.smoke else wan_model.CONFIGS["wan2.1-t2v-1.3b"]
    latent = (16, 3, 4, 6) if args.smoke else (16, 9, 60, 104)  # 33 frames at 480x832 -> 9 x 60 x 104
    context_len = 16 if args.smoke else 226
    steps = 2 if args.smoke else args.wan_steps
    bb = common.make_backbone("wan", config, context_len, device, dtype)
    prompt = common.new_deep_prompt(bb, context_len).requires_grad_(False)  # sampling: no gradients
    _, y, eps, _ = common.step_inputs("wan", device=device, shape=latent)

    def sample():
        return bridge.sample(lambda x, t: bb.velocity(x, t, prompt), y, eps, steps=steps)

    common.time_call(sample, device)  # warm-up (kernel selection, allocator)
    times = [common.time_call(sample, device) for _ in range(args.wan_repeats)]
    with torch.no_grad():
        step_flops = count(lambda: bb.velocity(eps, torch.full((1,), 0.3, device=device), prompt))
    seconds = statistics.median(times)
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    log(f"Wan sampling: {steps} steps of {tokens} tokens in {seconds:.2f} s ({seconds / steps:.3f} s/step)")
    return {"config": "wan2.1-t2v-1.3b" if not args.smoke else "smoke", "latent": [1, *latent], "tokens": tokens,
            "context_tokens": context_len, "steps": steps, **common.summary(times), "times_s": times,
            "seconds_per_step": seconds / steps, "tflop_per_step": step_flops / 1e12,
            "achieved_tflops": step_flops * steps / seconds / 1e12}


def matmul_rate(device, dtype, smoke: bool) -> float:
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = timed(lambda: a @ b, device, 3, 10)
    return 2 * n**3 / statistics.median(times)


def markdown(result: dict) -> str:
    m, f, w = result["machine"], result["flux_train"], result["wan_sample"]
    lines = [f"# GPU figures ({m['date_utc']} UTC)", "",
             f"{m.get('gpu', 'no GPU')}, torch {m['torch']}, {result['dtype']}. Command: `{result['command']}`.", "",
             "| FLUX.1-dev-size prompt-training step, 1024x1024 | s/step | model TFLOP | MFU (datasheet) | "
             "of measured matmul | peak GiB (of it: the step) |", "|---|---|---|---|---|---|"]
    for key in ("checkpointing", "no_checkpointing"):
        r = f.get(key, {})
        if "median_s" not in r:
            lines.append(f"| {key.replace('_', ' ')} | {r.get('error', '-')} | | | | |")
            continue
        achieved = r["achieved_model_tflops"] * 1e12
        mfu = f"{100 * achieved / result['datasheet_peak_flops']:.0f}%" if result["datasheet_peak_flops"] else "-"
        lines.append(f"| {key.replace('_', ' ')} | {r['median_s']:.3f} | {r['model_tflop']:.1f} | {mfu} | "
                     f"{100 * achieved / result['matmul_flops']:.0f}% | "
                     f"{r['memory'].get('peak_bytes', 0) / 2**30:.1f} ({r['memory'].get('step_peak_bytes', 0) / 2**30:.1f}) |")
    lines += ["", "Peak = max_memory_allocated during one step, weights included; in brackets what the step adds "
              "above the memory allocated before it (weights, inputs, prompt).",
              f"Measured bf16 matmul (8192^3): {result['matmul_flops'] / 1e12:.0f} TFLOP/s; datasheet dense bf16 peak: "
              f"{(result['datasheet_peak_flops'] or 0) / 1e12:.0f} TFLOP/s. MFU uses model FLOPs (checkpointing's "
              "recomputation left out).", "",
              f"Wan2.1-1.3B-size bridge sampling, latent {w['latent']} ({w['tokens']} tokens), {w['steps']} steps: "
              f"**{w['median_s']:.2f} s** ({w['seconds_per_step']:.3f} s/step, "
              f"{w['achieved_tflops']:.0f} TFLOP/s achieved).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny configs: check the script end to end (any device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed FLUX steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--wan-steps", type=int, default=20)
    p.add_argument("--wan-repeats", type=int, default=2, help="timed Wan samplings (default: %(default)s)")
    p.add_argument("--out", help="folder for gpu.json and gpu.md (default: $OUT, else bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if device.type == "cpu":
        common.set_threads(None)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    name, peak = datasheet_peak(device)
    log(f"device {name}, datasheet dense bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    result = {"benchmark": "gpu", "smoke": args.smoke, "device": str(device), "dtype": "bfloat16",
              "datasheet_peak_flops": peak, "machine": common.machine(str(device)),
              "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])}
    result["matmul_flops"] = matmul_rate(device, dtype, args.smoke)
    log(f"bf16 matmul: {result['matmul_flops'] / 1e12:.1f} TFLOP/s")
    result["flux_train"] = flux_train(args, device, dtype, log)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["wan_sample"] = wan_sample(args, device, dtype, log)
    result["total_seconds"] = time.perf_counter() - started

    out = Path(args.out or os.environ.get("OUT") or common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_smoke" if args.smoke else "gpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print()
    print(markdown(result))
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
