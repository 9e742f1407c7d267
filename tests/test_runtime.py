"""runtime.py: files appear whole or not at all; run records are JSON; the default dtype follows the device."""

import json
from pathlib import Path

import pytest
import torch

import runtime


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    with pytest.raises(ValueError):
        with runtime.atomic_file(tmp_path / "out.png") as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_record_is_json_with_paths_as_strings():
    settings = {"out": Path("runs/x"), "prompt": [Path("a.safetensors"), Path("b.safetensors")], "size": (32, 48),
                "lr": 1e-3, "preset": None}
    recorded = runtime.record(settings)
    assert recorded == {"out": "runs/x", "prompt": ["a.safetensors", "b.safetensors"], "size": (32, 48), "lr": 1e-3,
                        "preset": None}
    assert json.loads(json.dumps(recorded))["prompt"] == ["a.safetensors", "b.safetensors"]


def test_default_dtype():
    assert runtime.default_dtype(torch.device("cpu")) == torch.float32
    assert runtime.default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert runtime.default_dtype(torch.device("cuda", 0), "float32") == torch.float32


def test_single_process_set_up_and_gather():
    rank, world, device = runtime.setup_distributed()
    assert (rank, world) == (0, 1) and device.type in ("cpu", "cuda")
    assert runtime.gather({3: "x"}, world) == {3: "x"}
