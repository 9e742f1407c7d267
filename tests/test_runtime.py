"""runtime.py: files appear whole or not at all; run records are JSON; the default dtype follows the device."""

import json
import os
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


def test_default_threads_leave_busy_cpus_alone(monkeypatch):
    import runtime

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
        assert runtime.set_threads() == 4 and torch.get_num_threads() == 4  # a quiet machine: every CPU
        monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
        assert runtime.set_threads() == 1  # three CPUs busy elsewhere
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert runtime.set_threads() == 1  # never fewer than one
        assert runtime.set_threads(3) == 3  # --threads wins
        with pytest.raises(ValueError, match="at least 1"):
            runtime.set_threads(0)
    finally:
        torch.set_num_threads(before)
