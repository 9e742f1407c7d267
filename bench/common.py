"""Shared pieces of the benchmarks: the CPU-sized configs, random weights, timing, memory and the machine record.

Nothing in the project imports bench/. Scripts here are run from the repository root as `python bench/NAME.py`;
this module puts the root on sys.path so that `model`, `backbone`, `bridge`, ... import as they do in tests.
"""

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import backbone as backbones  # noqa: E402
from model import flux as flux_model  # noqa: E402
from model import wan as wan_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"

# ---------------------------------------------------------------------------------------------- configs

# CPU-sized FLUX: width 512, 8 heads of 64, 2 double + 4 single blocks, real input widths (T5 4096, CLIP 768).
CPU_FLUX = flux_model.FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=512, mlp_ratio=4.0,
    num_heads=8, depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28], theta=10_000, qkv_bias=True,
    guidance_embed=True,
)
CPU_FLUX_LATENT = (16, 64, 64)  # -> 32 x 32 = 1024 packed image tokens
CPU_WAN = wan_model.WanConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=4)
CPU_WAN_LATENT = (16, 4, 32, 32)  # 4 latent frames (13 video frames) of 32 x 32 -> 4 * 16 * 16 = 1024 tokens
CPU_TEXT_LEN = 128  # text tokens (and deep-prompt tokens K)


def latent_shape(kind: str) -> tuple[int, ...]:
    return CPU_FLUX_LATENT if kind == "flux" else CPU_WAN_LATENT


# ---------------------------------------------------------------------------------------------- weights and backbones


@torch.no_grad()
def random_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and non-trivial (matrices N(0, 1/fan_in), norm scales 1 +- 0.2, vectors +- 0.2),
    generated on the parameter's own device in its own dtype (a 12B model materialises directly on the GPU).
    Works on uninitialised memory (`to_empty`): norm scales are recognised by name."""
    for index, (name, p) in enumerate(sorted(model.named_parameters())):
        generator = torch.Generator(device=p.device).manual_seed(seed * 100_003 + index)
        if p.ndim >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
        else:
            is_scale = name.endswith(".scale") or ("norm" in name and name.endswith(".weight"))
            base = 1.0 if is_scale else 0.0
            p.uniform_(base - 0.2, base + 0.2, generator=generator)
    return model


def make_dit(kind: str, config, device="cpu", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Our FLUX or Wan DiT, built on the meta device and materialised with random weights on `device`."""
    make = flux_model.Flux if kind == "flux" else wan_model.WanModel
    with torch.device("meta"):
        dit = make(config)
    dit = dit.to(dtype).to_empty(device=device)
    return random_weights_(dit, seed).requires_grad_(False).eval()


def make_backbone(kind: str, config, text_len: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """A Backbone around a random DiT (no VAE: the benchmarks time the DiT) with random empty-prompt conditioning."""
    dit = make_dit(kind, config, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "flux":
        txt = torch.randn(1, text_len, config.context_in_dim, generator=g)
        pooled = torch.randn(1, config.vec_in_dim, generator=g)
        return backbones.Backbone("flux", "bench", dit, nn.Identity(), txt.to(device, dtype), pooled.to(device, dtype))
    txt = torch.randn(1, text_len, config.text_dim, generator=g)
    return backbones.Backbone("wan", "bench", dit, nn.Identity(), txt.to(device, dtype))


def new_deep_prompt(bb, length: int, seed: int = 0) -> nn.Module:
    """A deep prompt with NON-zero gates (alpha ~ U(-0.5, 0.5)), so that every block's prompt path does work."""
    prompt = bb.new_prompt("deep", length).to(bb.device)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        prompt.prompts.copy_(torch.randn(prompt.prompts.shape, generator=g) * 0.5)
        prompt.alphas.copy_(torch.rand(prompt.alphas.shape, generator=g) - 0.5)
    return prompt


def step_inputs(kind: str, batch: int = 1, device="cpu", seed: int = 0, shape=None):
    """(x0, y, eps, t) for one bridge-loss step, float32 as in train.py."""
    g = torch.Generator().manual_seed(seed + 3)
    shape = (batch, *(shape or latent_shape(kind)))
    x0, y, eps = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    t = torch.full((batch,), 0.3, device=device)
    return x0, y, eps, t


# ---------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds for one call of fn, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device="cpu",
              log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Time the variants in turn, A B C A B C ..., after `warmup` untimed rounds. Returns seconds per variant.

    Alternating spreads any drift of the machine's speed (other jobs, clocks) over all variants alike.
    """
    for round_ in range(warmup):
        for name, fn in variants.items():
            seconds = time_call(fn, device)
            log(f"  warm-up {round_ + 1}/{warmup} {name}: {seconds:.3f} s")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))
        log(f"  round {round_ + 1}/{repeats}: " + "  ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()))
    return times


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    quart = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "q1_s": quart[0], "q3_s": quart[2], "runs": len(ordered)}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: each ratio compares two runs made back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Return freed heap pages to the OS, reset the RSS high-water mark (VmHWM); returns the RSS now, in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """The RSS high-water mark since the last `reset_peak_rss`, in bytes."""
    return _status_kib("VmHWM") * 1024


def measure_peak(fn: Callable[[], object], device="cpu") -> dict:
    """Peak memory of one call of fn, above what was live before it.

    CPU: RSS high-water mark minus the RSS right before the call (heap trimmed, mark reset just before), and the
    absolute high-water mark. CUDA: the caching allocator's max_memory_allocated minus memory_allocated before.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda max_memory_allocated", "before_bytes": before, "peak_bytes": peak,
                "step_peak_bytes": peak - before}
    before = reset_peak_rss()
    fn()
    peak = peak_rss()
    return {"kind": "RSS high-water mark (VmHWM)", "before_bytes": before, "peak_bytes": peak,
            "step_peak_bytes": peak - before}


# glibc's malloc keeps freed blocks below a moving threshold (up to 32 MiB) in its heap, so the RSS of a process
# depends on the order of its allocations as much as on what is live. With the threshold pinned at 128 KiB every
# tensor-sized block is returned to the OS when freed, and the RSS high-water mark is close to the peak of live
# tensor bytes. Benchmarks report both: the default (what a user's process shows) and this one ("live").
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_child(argv: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh process (extra environment `env`); its last stdout line is a JSON object."""
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- records


def machine(device="cpu") -> dict:
    """What ran the benchmark: CPU model, cores, threads, torch version, load, and the GPU if one was used."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    record = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "cores_visible": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m_5m_15m": list(os.getloadavg()),
    }
    if torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
    return record


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (default: every core this process may use). Returns it."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def write_json(name: str, record: dict, path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table (also valid markdown)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
