"""Reading, checking and writing checkpoints.

Official checkpoints are loaded as they are published: the modules in `model/` use the official key names as
their attribute names, so a state dict goes straight into `load_state_dict` without any renaming.

    state = read_state_dict("flux1-dev.safetensors")       # or a *.index.json of shards, or a .pth
    model = build(Flux, CONFIGS["flux-dev"], state, dtype=torch.bfloat16)

`build` creates the model on the meta device (no memory) and then *assigns* the checkpoint tensors to it, so
a 12B model never exists twice in memory. Every mismatch is reported by name; nothing is fixed silently.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model import CheckpointError  # raised here and by the networks' own key checks (model/t5.py, model/clip.py)
from runtime import atomic_file


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into CPU memory.

    `path` is a `.safetensors` file, a sharded safetensors checkpoint given by its `*.index.json`, or a torch
    pickle (`.pth`, `.pt`, `.bin`) that is opened with `weights_only=True` (no code in the file is ever run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on damage
            raise CheckpointError(
                f"{path}: cannot be loaded with weights_only=True (corrupt, or it pickles code/custom classes): {err}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a flat dict of tensors, found {type(state).__name__}")
        return state
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .index.json, .pth, .pt, .bin)")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint split into shards listed by a Hugging Face style `*.index.json` weight map."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a valid shard index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: not a valid shard index (weight_map must map tensor names to shard "
                              f"file names, got {type(weight_map).__name__})")
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_state_dict(index_path.parent / shard)
        listed = {key for key, name in weight_map.items() if name == shard}
        if set(tensors) != listed:
            raise CheckpointError(
                f"{index_path}: shard {shard} holds {len(tensors)} tensors, the index lists {len(listed)} "
                f"(differences: {_first(set(tensors) ^ listed)})"
            )
        state.update(tensors)
    return state


def tensor_shape(path: str | os.PathLike, key: str) -> tuple[int, ...]:
    """The shape of one tensor of a safetensors checkpoint (single file or `*.index.json`), read from the header
    without loading any tensor: e.g. to tell which published size a snapshot holds."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            path = path.parent / json.loads(path.read_text())["weight_map"][key]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: no tensor {key!r} in this shard index ({err})") from None
    try:
        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} from the header: {err}") from None


def find_file(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """The first of `names` (file names or glob patterns) that exists in `folder`, e.g. a snapshot folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    names = list(names)
    for name in names:
        found = sorted(folder.glob(name))
        if found:
            return found[0]
    raise CheckpointError(f"{folder}: none of {names} found (is this the right snapshot folder?)")


# ---------------------------------------------------------------------------------------------- loading


def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Raise a CheckpointError naming the missing, unexpected and mis-shaped keys (first few of each, with counts).

    With `strict=False` unexpected keys are tolerated; missing and mis-shaped keys are always errors.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys() if strict else set()
    misshaped = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k])})"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:5]))
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + " | ".join(problems))


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None, strict: bool = True
) -> nn.Module:
    """Load `state` into `model` by assignment (works for a model on the meta device), optionally casting.

    Floating-point tensors are cast to `dtype` (None keeps the checkpoint's dtype); integer tensors are kept.
    The model's `requires_grad` flags are preserved. Returns the model.
    """
    check_keys(model, state, strict)
    names = model.state_dict(keep_vars=True).keys()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items() if k in names}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build(
    make: Callable[..., nn.Module],
    config,
    state: dict[str, torch.Tensor] | str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
) -> nn.Module:
    """`make(config)` on the meta device, then the checkpoint assigned into it, then moved to `device`.

    `state` is a state dict or a path understood by `read_state_dict`. The result is in eval mode.
    """
    if not isinstance(state, dict):
        state = read_state_dict(state)
    with torch.device("meta"):
        model = make(config)
    load_into(model, state, dtype=dtype, strict=strict)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- writing


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors to `path` atomically. `metadata` values that are not strings are stored as JSON."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as err:  # e.g. a full disk: an OSError like any other failed write
            raise OSError(f"{path}: cannot be written ({err})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file header."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """`python weights.py show FILE`: a checkpoint's tensors (name, shape, dtype) and its metadata."""
    parser = argparse.ArgumentParser(description="Checkpoints: show what a .safetensors / .index.json / .pth "
                                     "file holds, read as this project reads it (weights_only for pickles).")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="tensor names, shapes and dtypes, then the metadata")
    show.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        state = read_state_dict(args.path)
        meta = read_metadata(args.path) if args.path.suffix == ".safetensors" else {}
    except CheckpointError as err:
        sys.exit(f"weights.py: error: {err}")
    for name, tensor in state.items():
        print(f"{name}: {list(tensor.shape)} {tensor.dtype}")
    for key, value in meta.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
