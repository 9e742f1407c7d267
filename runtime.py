"""What both command lines need around the method: processes and devices, default dtype and cache, run records,
files written whole.

    rank, world, device = setup_distributed()          # under torchrun: one process per GPU (gloo on CPUs)
    dtype = default_dtype(device)                       # bfloat16 on GPU, float32 on CPU
    everything = gather(mine, world)                    # every rank's dict of results, on every rank
    with atomic_file("results.json") as tmp: tmp.write_text(...)   # appears only when complete
"""

import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

TEXT_CACHE = Path.home() / ".cache" / "ypt-restore" / "text"  # text-encoder outputs (text.py), per snapshot


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


def close_distributed() -> None:
    """End the process group, if `setup_distributed` started one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(pieces: dict, world: int) -> dict:
    """Merge every rank's dict of results (all ranks receive all of them)."""
    if world == 1:
        return pieces
    everything = [None] * world
    dist.all_gather_object(everything, pieces)
    return {k: v for part in everything for k, v in part.items()}


def default_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The DiT's dtype: `name` ("bfloat16", "float32") if given, else bfloat16 on a GPU and float32 on a CPU."""
    return getattr(torch, name or ("bfloat16" if device.type == "cuda" else "float32"))


def set_threads(requested: int | None = None) -> int:
    """Set torch's CPU threads and return them: `requested`, or the CPUs this process may use less the ones other
    work keeps busy (the 1-minute load average, rounded), at least 1. Measured on 2 CPUs (a 256 px crop, 8 steps,
    medians of 3 whole runs): quiet, 2 threads 4.9 s vs 1 thread 5.8 s; beside one busy process, 2 threads 10.2 s
    vs 1 thread 6.2 s (a user saw 5-10x with more load): oversubscribed threads wait on each other. So the rule
    costs at most 1.2x when the load average lags behind a machine that just went quiet, never the 1.6-10x."""
    if requested is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = max(1, min(cpus, cpus - round(os.getloadavg()[0])))
    if requested < 1:
        raise ValueError(f"--threads must be at least 1, got {requested}")
    torch.set_num_threads(requested)
    return requested


def record(settings: Mapping) -> dict:
    """Settings (e.g. `vars(args)`) as JSON values for a run's record: paths as strings, lists of them too."""

    def plain(value):
        if isinstance(value, os.PathLike):
            return str(value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, os.PathLike) for v in value):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in settings.items()}


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on any error it is removed.

    Nothing is ever left half-written under the final name. The temporary name keeps the suffix of `path`
    so that writers choosing a format from the suffix (Pillow, PyAV) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode(path))  # mkstemp makes 0600; the result gets what open() would have given it
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_mode(path: Path) -> int:
    """The mode a file written to `path` keeps: an existing file's own, else 0666 less the process's umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


# atomic_file's temporary names, ".{stem}.{8 random characters of mkstemp}.tmp{suffix}", and the one safetensors
# writes beside its target before renaming it (".tmp" and 6 random characters)
TEMP_NAME = re.compile(r"^\..*\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$|^\.tmp[A-Za-z0-9]{6}$")


def clean_stale_temp(folder: str | os.PathLike, older_than: float = 3600.0) -> list[Path]:
    """Remove what an interrupted `atomic_file` left in `folder` (only names of its own pattern, unchanged for
    `older_than` seconds, so a writer still at work beside us keeps its file). Returns the removed paths."""
    folder, now, removed = Path(folder), time.time(), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        try:
            if TEMP_NAME.match(entry.name) and entry.is_file() and now - entry.stat().st_mtime > older_than:
                entry.unlink()
                removed.append(entry)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed
