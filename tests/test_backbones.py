"""The backbone table: every way a command line names a backbone resolves to one entry of backbone.BACKBONES,
and folders are told apart by what they hold (official snapshots by their files, miniatures by the kind their
miniature.json records)."""

import json
import shutil

import pytest
import torch
from snapshots import make_flux_snapshot, make_wan_snapshot, official_configs

import backbone
import defaults

MINI = backbone.BACKBONES["mini-flux"].folder


def test_table_holds_the_method_numbers():
    table = backbone.BACKBONES
    assert {spec.name for spec in table.values()} == set(table)
    names = {"flux-dev", "flux-schnell", "wan-1.3b", "wan-14b", "mini-flux", "mini-wan", "tiny-flux", "tiny-wan"}
    assert names <= set(table)
    assert table["flux-dev"].prompt_len == 512 and table["wan-1.3b"].prompt_len == defaults.WAN_CONTEXT_LEN == 226
    assert table["flux-dev"].train_size == (1024, 1024) and table["wan-14b"].train_frames == 33
    assert all(spec.kind in backbone.KINDS for spec in table.values())


@pytest.mark.parametrize("choice, preset, name", [
    ("flux", "tiny", "tiny-flux"), ("wan", "tiny", "tiny-wan"), ("tiny-wan", None, "tiny-wan"),
    ("flux", None, "mini-flux"), ("mini-flux", None, "mini-flux"),
])
def test_resolve_kinds_presets_and_names(choice, preset, name):
    spec, folder = backbone.resolve(choice, preset=preset)
    assert spec.name == name and folder == spec.folder


def test_resolve_snapshots_by_their_files(tmp_path, monkeypatch):
    official_configs(monkeypatch)
    flux = make_flux_snapshot(tmp_path / "FLUX.1-dev")
    wan = make_wan_snapshot(tmp_path / "Wan2.1-T2V-1.3B")
    assert backbone.resolve("flux", flux) == (backbone.BACKBONES["flux-dev"], flux)
    assert backbone.resolve("flux-dev", flux)[0].name == "flux-dev"
    assert backbone.resolve("wan", wan)[0].name == "wan-1.3b"
    with pytest.raises(ValueError, match="holds flux-dev, not flux-schnell"):
        backbone.resolve("flux-schnell", flux)
    bb = backbone.load("wan", wan, torch.float32, "cpu", text_cache=tmp_path / "cache")
    assert bb.name == "wan-1.3b" and bb.spec.source == "snapshot" and bb.folder == wan


def test_a_miniature_records_its_kind(tmp_path):
    assert backbone.miniature_kind(MINI) == "flux"
    with pytest.raises(ValueError, match="a FLUX-architecture image model: use the flux backbone"):
        backbone.resolve("wan", MINI)
    copy = tmp_path / "mini"
    shutil.copytree(MINI, copy, ignore=shutil.ignore_patterns("runs", "prompts", "heldout", "*.png", "*.py"))
    assert backbone.resolve("flux", copy) == (backbone.BACKBONES["mini-flux"], copy)
    spec = json.loads((copy / backbone.MINIATURE_FILE).read_text())
    del spec["backbone"]
    (copy / backbone.MINIATURE_FILE).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match='records backbone None; a miniature records "backbone"'):
        backbone.load_miniature(copy)


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'sd3'"):
        backbone.resolve("sd3")
    with pytest.raises(ValueError, match="not a folder"):
        backbone.resolve("flux", tmp_path / "missing")
    with pytest.raises(ValueError, match="reads no folder"):
        backbone.resolve("tiny-flux", tmp_path)
    with pytest.raises(ValueError, match="does not go with mini-flux"):
        backbone.resolve("mini-flux", preset="tiny")
