import json
import os

import numpy as np
import pytest

from clipret import artifacts
from clipret.errors import ClipretError


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_embeddings_roundtrip_with_manifest(tmp_path):
    v = _unit(5, 8)
    ids = [f"c/{i}.jpg" for i in range(5)]
    artifacts.save_embeddings(tmp_path / "g.npy", v, ids, fingerprint="abc", flags={"k": 1},
                              skipped=[{"id": "x.jpg", "reason": "empty file (0 bytes)"}])
    meta = json.loads((tmp_path / "g.json").read_text())
    assert meta["ids"] == ids and meta["dim"] == 8 and meta["model_fingerprint"] == "abc"
    assert meta["skipped"] == [{"id": "x.jpg", "reason": "empty file (0 bytes)"}]
    assert meta["clipret_version"] and meta["flags"] == {"k": 1}
    e = artifacts.load_embeddings(tmp_path / "g.npy")
    np.testing.assert_array_equal(np.asarray(e.vectors), v)
    assert e.ids == ids and e.fingerprint == "abc" and e.dim == 8 and len(e) == 5


def test_npy_without_sidecar_gets_row_numbers_and_ids_only_sidecar_works(tmp_path):
    v = _unit(3, 4)
    np.save(tmp_path / "a.npy", v)
    e = artifacts.load_embeddings(tmp_path / "a.npy")
    assert e.ids == ["0", "1", "2"] and e.fingerprint is None
    (tmp_path / "a.json").write_text(json.dumps({"ids": ["x", "y", "z"]}))
    e = artifacts.load_embeddings(tmp_path / "a.npy")
    assert e.ids == ["x", "y", "z"] and e.fingerprint is None and e.skipped == []


def test_row_count_mismatch_and_non_finite_are_errors(tmp_path):
    v = _unit(3, 4)
    np.save(tmp_path / "a.npy", v)
    (tmp_path / "a.json").write_text(json.dumps({"ids": ["x", "y"]}))
    with pytest.raises(ClipretError, match="3 rows but its manifest"):
        artifacts.load_embeddings(tmp_path / "a.npy")
    v[1, 2] = np.nan
    np.save(tmp_path / "b.npy", v)
    with pytest.raises(ClipretError, match="non-finite value \\(row 1\\)"):
        artifacts.load_embeddings(tmp_path / "b.npy")
    with pytest.raises(ClipretError, match="not found"):
        artifacts.load_embeddings(tmp_path / "missing.npy")


def test_results_json_seed_format(tmp_path):
    artifacts.save_results(tmp_path / "r.json", ["q1.jpg", "q2.jpg"], [["g1", "g2"], ["g2", "g1"]],
                           np.array([[0.9, 0.5], [0.8, 0.1]], dtype=np.float32))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == [
        {"filename": "q1.jpg", "samples": ["g1", "g2"], "scores": [0.9, 0.5]},
        {"filename": "q2.jpg", "samples": ["g2", "g1"], "scores": [0.8, 0.1]},
    ]
    # the seed's own format (no scores) is read back too
    (tmp_path / "seed.json").write_text(json.dumps([{"filename": "q", "samples": ["a", "b"]}]))
    assert artifacts.load_results(tmp_path / "seed.json")[0]["samples"] == ["a", "b"]
    (tmp_path / "bad.json").write_text(json.dumps({"filename": "q"}))
    with pytest.raises(ClipretError):
        artifacts.load_results(tmp_path / "bad.json")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    artifacts.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_open(target, "w") as fh:
            fh.write('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_atomic_write_uses_rename_in_same_folder(tmp_path, monkeypatch):
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((os.path.dirname(src), os.path.dirname(dst)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    artifacts.save_embeddings(tmp_path / "e.npy", _unit(2, 3), ["a", "b"], fingerprint=None)
    assert len(calls) == 2 and all(s == d == str(tmp_path) for s, d in calls)
