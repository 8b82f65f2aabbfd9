"""A model folder's two files are one pair: a kill at any point of an export leaves the old pair or
the new one, and weights that belong to neither config are refused (clipret/artifacts/model.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipret import _fault, artifacts
from clipret.artifacts import model as model_folder
from clipret.errors import ClipretError

OLD, NEW = torch.zeros(3), torch.ones(3)

# every fault point of an export over an existing folder, in the order they are passed, and which pair survives
KILL_POINTS = [
    ("before-rename:.config.json.pending:1", "old"),  # the pending config is written, not yet renamed
    ("after-rename:.config.json.pending:1", "old"),  # the pending config is in place
    ("before-rename:model.safetensors:1", "old"),  # the new weights are complete, not yet renamed
    ("after-rename:model.safetensors:1", "new"),  # between the two renames: new weights, old config.json
    ("before-rename:config.json:1", "new"),  # the same point, seen from the second rename
    ("after-rename:config.json:1", "new"),
]


def _export(folder: Path, w: torch.Tensor, tag: str) -> str:
    return artifacts.save_model_folder(folder, {"w": w}, {"model": {"name": tag}})


def _assert_one_pair(folder: Path, fingerprints: dict[str, str], survivor: str) -> None:
    """The folder loads as exactly the ``survivor`` export: its weights under its own fingerprint."""
    config, state = model_folder.load_model_folder(folder)
    assert config["fingerprint"] == fingerprints[survivor]
    assert config["model"]["name"] == survivor
    assert torch.equal(state["w"], NEW if survivor == "new" else OLD)
    assert artifacts.read_model_config(folder)["fingerprint"] == fingerprints[survivor]


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the fault point runs (only atomic_path's temp cleanup)."""


@pytest.fixture
def fingerprints(tmp_path: Path) -> dict[str, str]:
    """The fingerprint each of the two exports gets (computed in a scratch folder)."""
    return {"old": _export(tmp_path / "scratch-old", OLD, "old"), "new": _export(tmp_path / "scratch-new", NEW, "new")}


@pytest.mark.parametrize("kill_at, survivor", KILL_POINTS)
def test_an_export_stopped_at_any_point_leaves_one_consistent_pair(tmp_path, monkeypatch, fingerprints, kill_at, survivor):
    folder = tmp_path / "run"
    _export(folder, OLD, "old")
    when, name, _ = kill_at.split(":")

    def die(w: str, filename: str) -> None:
        if (w, filename) == (when, name):
            raise _Killed

    monkeypatch.setattr(_fault, "maybe_kill", die)
    with pytest.raises(_Killed):
        _export(folder, NEW, "new")
    monkeypatch.undo()
    _assert_one_pair(folder, fingerprints, survivor)
    # rolled forward: config.json itself now belongs to the weights, and the next export works
    assert json.loads((folder / "config.json").read_text())["fingerprint"] == fingerprints[survivor]
    assert _export(folder, OLD, "old") == fingerprints["old"]
    _assert_one_pair(folder, fingerprints, "old")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, survivor", KILL_POINTS)
def test_sigkill_at_any_point_of_an_export_leaves_one_consistent_pair(tmp_path, fingerprints, kill_at, survivor):
    folder = tmp_path / "run"
    _export(folder, OLD, "old")
    code = (f"import torch; from clipret import artifacts; "
            f"artifacts.save_model_folder({str(folder)!r}, {{'w': torch.ones(3)}}, {{'model': {{'name': 'new'}}}})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPRET_FAULT")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "CLIPRET_FAULT_KILL": kill_at}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    _assert_one_pair(folder, fingerprints, survivor)


def test_weights_from_another_export_are_refused_in_one_line(tmp_path):
    _export(tmp_path / "a", OLD, "a")
    _export(tmp_path / "b", NEW, "b")
    shutil.copyfile(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    for read in (artifacts.read_model_config, model_folder.load_model_folder):
        with pytest.raises(ClipretError) as info:
            read(tmp_path / "a")
        msg = str(info.value)
        assert msg.startswith(f"{tmp_path / 'a' / 'model.safetensors'} does not match {tmp_path / 'a' / 'config.json'}")
        assert "\n" not in msg and "retrain" in msg


def test_a_pending_config_of_weights_that_never_landed_is_ignored(tmp_path):
    """A kill before the weights rename leaves a pending config of other weights: the old pair stays."""
    _export(tmp_path / "run", OLD, "old")
    _export(tmp_path / "other", NEW, "new")
    shutil.copyfile(tmp_path / "other" / "config.json", tmp_path / "run" / ".config.json.pending")
    assert model_folder.load_model_folder(tmp_path / "run")[0]["model"]["name"] == "old"
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"name": "edited"}, "fingerprint": "0" * 16}))
    with pytest.raises(ClipretError, match="does not match"):  # neither config belongs to the weights
        artifacts.read_model_config(tmp_path / "run")


def test_a_folder_written_before_weights_sha256_existed_is_checked_by_its_fingerprint(tmp_path):
    fp = _export(tmp_path / "run", OLD, "old")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert artifacts.read_model_config(tmp_path / "run")["fingerprint"] == fp  # same fingerprint as ever
    _export(tmp_path / "other", NEW, "old")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", tmp_path / "run" / "model.safetensors")
    with pytest.raises(ClipretError, match="does not match"):
        artifacts.read_model_config(tmp_path / "run")


def test_weights_are_hashed_once_per_file_and_again_once_replaced(tmp_path, monkeypatch):
    _export(tmp_path / "run", OLD, "old")
    model_folder._digests.clear()
    reads = []
    real = model_folder.hashlib.sha256
    monkeypatch.setattr(model_folder.hashlib, "sha256", lambda *a: (reads.append(a) if not a else None) or real(*a))
    for _ in range(3):
        artifacts.read_model_config(tmp_path / "run")
    assert len(reads) == 1
    monkeypatch.undo()
    _export(tmp_path / "run", NEW, "new")
    assert artifacts.read_model_config(tmp_path / "run")["model"]["name"] == "new"


def test_a_trained_model_loads_as_one_pair_after_a_kill_between_the_renames(tmp_path, monkeypatch):
    """What embed and query load: never the new weights under the old fingerprint."""
    from clipret.model.build import build_encoder, load_model, make_spec, save_model
    from conftest import TINY_VIT

    spec = make_spec(str(TINY_VIT), "none", embed_dim=16)
    torch.manual_seed(0)
    net = build_encoder(spec)
    old_fp = save_model(tmp_path / "m", net, spec)
    with torch.no_grad():
        net.head.fc.weight.add_(0.5)
    new_fp = save_model(tmp_path / "scratch", net, spec)

    def die(when: str, filename: str) -> None:
        if (when, filename) == ("after-rename", "model.safetensors"):
            raise _Killed

    monkeypatch.setattr(_fault, "maybe_kill", die)
    with pytest.raises(_Killed):
        save_model(tmp_path / "m", net, spec)
    monkeypatch.undo()
    loaded, _, fp = load_model(tmp_path / "m")
    assert fp == new_fp != old_fp
    assert torch.equal(loaded.head.fc.weight, net.head.fc.weight)


def test_an_export_during_a_load_never_mixes_the_two(tmp_path, monkeypatch):
    """A training run exports a new best while embed loads the folder: the load starts over."""
    _export(tmp_path / "run", OLD, "old")
    real = model_folder.load_weights_file
    calls = []

    def export_meanwhile(path):
        calls.append(path)
        if len(calls) == 1:  # after the old pair was hashed, before its weights are read
            _export(tmp_path / "run", NEW, "new")
        return real(path)

    monkeypatch.setattr(model_folder, "load_weights_file", export_meanwhile)
    config, state = model_folder.load_model_folder(tmp_path / "run")
    assert len(calls) == 2 and config["model"]["name"] == "new" and torch.equal(state["w"], NEW)
