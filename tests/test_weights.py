import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weights
from weights import CheckpointError


class Tiny(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 2))


def tiny_state():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in Tiny().state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip_with_metadata(tmp_path):
    state = tiny_state()
    weights.save_safetensors(state, tmp_path / "m.safetensors", metadata={"name": "tiny", "k": [1, 2]})
    assert_same(weights.read_state_dict(tmp_path / "m.safetensors"), state)
    meta = weights.read_metadata(tmp_path / "m.safetensors")
    assert meta["name"] == "tiny" and json.loads(meta["k"]) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_sharded_round_trip(tmp_path):
    state = tiny_state()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(weights.read_state_dict(tmp_path / "model.safetensors.index.json"), state)


def test_shard_disagreeing_with_index_is_named(tmp_path):
    state = tiny_state()
    save_file(state, tmp_path / "s.safetensors")
    index = {"weight_map": {k: "s.safetensors" for k in list(state)[:-1]}}
    (tmp_path / "m.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="s.safetensors holds 6 tensors, the index lists 5 \(differences: b.2.bias\)"):
        weights.read_state_dict(tmp_path / "m.index.json")


def test_pth_round_trip(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "m.pth")
    assert_same(weights.read_state_dict(tmp_path / "m.pth"), state)


class Evil:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_pth_with_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth: cannot be loaded with weights_only=True"):
        weights.read_state_dict(tmp_path / "evil.pth")


def test_pth_with_custom_class_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": Tiny()}, tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match=r"module\.pth"):
        weights.read_state_dict(tmp_path / "module.pth")


def test_truncated_file_names_the_file(tmp_path):
    weights.save_safetensors(tiny_state(), tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        weights.read_state_dict(tmp_path / "cut.safetensors")
    torch.save(tiny_state(), tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        weights.read_state_dict(tmp_path / "cut.pth")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        weights.read_state_dict(tmp_path / "nothing.safetensors")
    (tmp_path / "m.ckpt.gz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        weights.read_state_dict(tmp_path / "m.ckpt.gz")


def test_key_errors_are_listed_by_name_with_counts():
    state = tiny_state()
    del state["a.bias"]
    state["b.2.weight"] = torch.zeros(7, 5)
    state["c.weight"] = torch.zeros(1)
    state["d.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        weights.load_into(Tiny(), state)
    message = str(err.value)
    assert "1 missing: a.bias" in message
    assert "2 unexpected: c.weight, d.weight" in message
    assert "1 mis-shaped: b.2.weight (checkpoint [7, 5], model [2, 5])" in message


def test_long_key_lists_are_cut_with_a_count():
    state = tiny_state()
    state.update({f"extra.{i}": torch.zeros(1) for i in range(8)})
    with pytest.raises(CheckpointError, match=r"8 unexpected: extra\.0, extra\.1, extra\.2, extra\.3, extra\.4, \.\.\. \(3 more\)"):
        weights.load_into(Tiny(), state)


def test_non_strict_tolerates_only_unexpected_keys():
    state = tiny_state()
    state["extra"] = torch.zeros(1)
    weights.load_into(Tiny(), state, strict=False)
    del state["a.weight"]
    with pytest.raises(CheckpointError, match="1 missing: a.weight"):
        weights.load_into(Tiny(), state, strict=False)


def test_build_on_meta_assigns_without_copy_and_casts(tmp_path):
    state = tiny_state()
    weights.save_safetensors(state, tmp_path / "m.safetensors")
    model = weights.build(Tiny, None, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    for name, p in model.state_dict().items():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16
        assert torch.equal(p, state[name].to(torch.bfloat16))
    assert not model.training
    # assignment: the model holds the very tensors it was given (no second copy)
    given = tiny_state()
    model = weights.build(Tiny, None, given)
    assert model.a.weight.data_ptr() == given["a.weight"].data_ptr()


def test_find_file_in_snapshot(tmp_path):
    (tmp_path / "ae.safetensors").write_bytes(b"")
    (tmp_path / "flux1-schnell.safetensors").write_bytes(b"")
    assert weights.find_file(tmp_path, ["flux1-dev.safetensors", "flux1-schnell.safetensors"]).name == "flux1-schnell.safetensors"
    with pytest.raises(CheckpointError, match=r"none of \['flux1-dev.safetensors'\] found"):
        weights.find_file(tmp_path / "..", ["flux1-dev.safetensors"])


def test_tensor_shape_reads_only_the_header(tmp_path):
    state = tiny_state()
    weights.save_safetensors(state, tmp_path / "one.safetensors")
    assert weights.tensor_shape(tmp_path / "one.safetensors", "b.2.weight") == (2, 5)
    save_file({"a.weight": state["a.weight"]}, tmp_path / "s1.safetensors")
    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors"}}))
    assert weights.tensor_shape(tmp_path / "m.index.json", "a.weight") == (4, 3)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        weights.tensor_shape(tmp_path / "m.index.json", "nope")
