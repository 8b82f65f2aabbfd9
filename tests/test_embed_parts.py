"""``OUT.parts/`` of ``clipret embed --out OUT``: what --resume may reuse, and what a new run may discard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipret.embedding.parts import ROW_SETTINGS, parts_dir, prepare_parts
from clipret.errors import ClipretError

IDS = [f"{i:02d}.png" for i in range(10)]
SETTINGS = {"shard_size": 4, "batch_size": 3, "tta": None, "exact_decode": False, "amp": "none", "device": "cpu",
            "decode": "pil"}
AUTOMATIC = {"shard_size": 256, "batch_size": 64}


def prepare(out: Path, *, resume: bool, overwrite: bool = False, fingerprint: str = "f1", **changed):
    return prepare_parts(out, IDS, fingerprint, {**SETTINGS, **changed}, AUTOMATIC, resume=resume, overwrite=overwrite)


def interrupted(tmp_path: Path) -> Path:
    """An interrupted run's OUT: its OUT.parts/ holds run.json and one finished shard."""
    out = tmp_path / "g.npy"
    parts, _ = prepare(out, resume=False)
    for suffix in (".npy", ".json"):
        (parts / f"shard-000000{suffix}").write_text("finished")
    return out


def test_every_row_setting_is_recorded(tmp_path):
    assert set(ROW_SETTINGS) == set(SETTINGS)
    parts, chosen = prepare(tmp_path / "g.npy", resume=False)
    assert chosen == SETTINGS
    assert {k: v for k, v in json.loads((parts / "run.json").read_text()).items() if k in SETTINGS} == SETTINGS


def test_a_new_run_refuses_to_discard_finished_shards(tmp_path):
    out = interrupted(tmp_path)
    with pytest.raises(ClipretError) as err:
        prepare(out, resume=False)
    message = str(err.value)
    assert "1 finished shard(s)" in message and "--resume" in message and "--overwrite" in message
    assert "\n" not in message
    assert (parts_dir(out) / "shard-000000.json").read_text() == "finished"  # nothing thrown away

    parts, _ = prepare(out, resume=False, overwrite=True)
    assert sorted(p.name for p in parts.iterdir()) == ["run.json"]


def test_a_new_run_replaces_a_parts_folder_without_finished_shards(tmp_path):
    out = tmp_path / "g.npy"
    prepare(out, resume=False)  # killed before its first shard: nothing to lose
    parts, _ = prepare(out, resume=False, exact_decode=True)
    assert sorted(p.name for p in parts.iterdir()) == ["run.json"]


@pytest.mark.parametrize("name, value, said", [
    ("exact_decode", True, "made with no --exact-decode (now --exact-decode)"),
    ("batch_size", 4, "made with --batch-size 3 (now --batch-size 4)"),
    ("amp", "bf16", "made with --amp none (now --amp bf16)"),
    ("device", "cuda", "made with --device cpu (now --device cuda)"),
    ("tta", "flip", "made with no --tta (now --tta flip)"),
    ("shard_size", 5, "made with --shard-size 4 (now --shard-size 5)"),
    ("decode", "gpu", "made with --decode pil (now --decode gpu)"),
])
def test_resume_refuses_a_changed_row_setting_by_name(tmp_path, name, value, said):
    out = interrupted(tmp_path)
    with pytest.raises(ClipretError) as err:
        prepare(out, resume=True, **{name: value})
    message = str(err.value)
    assert said in message and "--overwrite" in message and "\n" not in message, message
    assert (parts_dir(out) / "shard-000000.json").read_text() == "finished"


def test_resume_refuses_another_model(tmp_path):
    out = interrupted(tmp_path)
    with pytest.raises(ClipretError, match="of another model"):
        prepare(out, resume=True, fingerprint="f2")


def test_resume_takes_the_recorded_sizes_when_left_automatic(tmp_path):
    out = interrupted(tmp_path)
    _, chosen = prepare(out, resume=True, shard_size=None, batch_size=None)
    assert chosen == SETTINGS  # not AUTOMATIC's
    assert (parts_dir(out) / "shard-000000.json").read_text() == "finished"


def test_resume_refuses_parts_of_an_older_clipret_that_did_not_record_a_setting(tmp_path):
    out = interrupted(tmp_path)
    run_json = parts_dir(out) / "run.json"
    run_json.write_text(json.dumps({k: v for k, v in json.loads(run_json.read_text()).items() if k != "exact_decode"}))
    with pytest.raises(ClipretError, match="an unrecorded --exact-decode"):
        prepare(out, resume=True)


def test_parts_from_before_decode_was_recorded_resume_as_pil_only(tmp_path):
    """Every run before --decode existed decoded with PIL: its parts resume under pil, not under gpu."""
    out = interrupted(tmp_path)
    run_json = parts_dir(out) / "run.json"
    run_json.write_text(json.dumps({k: v for k, v in json.loads(run_json.read_text()).items() if k != "decode"}))
    _, chosen = prepare(out, resume=True)
    assert chosen["decode"] == "pil"
    assert (parts_dir(out) / "shard-000000.json").read_text() == "finished"

    run_json.write_text(json.dumps({k: v for k, v in json.loads(run_json.read_text()).items() if k != "decode"}))
    with pytest.raises(ClipretError, match=r"made with --decode pil \(now --decode gpu\)"):
        prepare(out, resume=True, decode="gpu")
