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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_mode_like_open_not_mkstemps_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        artifacts.save_embeddings(tmp_path / "e.npy", _unit(2, 3), ["a", "b"], fingerprint=None)
        artifacts.save_results(tmp_path / "r.json", ["q"], [["a"]], np.ones((1, 1), np.float32))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (os.stat(tmp_path / "plain").st_mode & 0o777) == want  # what a normal open() gives
    for name in ("e.npy", "e.json", "r.json"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == want, name


def test_model_folder_files_are_readable_by_the_group_and_others(tmp_path):
    torch = pytest.importorskip("torch")
    old = os.umask(0o022)
    try:
        artifacts.save_model_folder(tmp_path / "m", {"w": torch.ones(2)}, {"model": {}})
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (os.stat(tmp_path / "m" / name).st_mode & 0o777) == 0o644, name


def test_manifest_records_a_digest_and_a_swapped_array_is_refused(tmp_path):
    artifacts.save_embeddings(tmp_path / "g.npy", _unit(10, 4, seed=1), [str(i) for i in range(10)], fingerprint="A")
    meta = json.loads((tmp_path / "g.json").read_text())
    assert meta["content_digest"] == artifacts.array_digest(_unit(10, 4, seed=1))
    assert artifacts.load_embeddings(tmp_path / "g.npy").digest == meta["content_digest"]
    np.save(tmp_path / "g.npy", _unit(10, 4, seed=2))  # same shape, other vectors, old manifest
    with pytest.raises(ClipretError, match="does not match its manifest"):
        artifacts.load_embeddings(tmp_path / "g.npy")


def test_array_digest_changes_when_any_sampled_row_or_the_shape_changes():
    v = _unit(1000, 8)
    base = artifacts.array_digest(v)
    assert artifacts.array_digest(v.copy()) == base
    w = v.copy()
    w[999, 0] += 1e-3  # the last row is always sampled
    assert artifacts.array_digest(w) != base
    assert artifacts.array_digest(v[:999]) != base
    assert artifacts.array_digest(np.zeros((0, 8), np.float32)) != artifacts.array_digest(np.zeros((0, 4), np.float32))


def test_kill_between_the_two_renames_leaves_a_pair_that_is_refused(tmp_path):
    """Re-embedding the same ids with another model, killed after the .npy rename, before the manifest's."""
    import subprocess
    import sys

    artifacts.save_embeddings(tmp_path / "g.npy", _unit(6, 4, seed=1), list("abcdef"), fingerprint="old-model")
    code = (
        "import numpy as np; from clipret import artifacts; "
        "v = np.random.default_rng(9).standard_normal((6, 4)).astype(np.float32); "
        "v /= np.linalg.norm(v, axis=1, keepdims=True); "
        f"artifacts.save_embeddings({str(tmp_path / 'g.npy')!r}, v, list('abcdef'), fingerprint='new-model')"
    )
    env = {**os.environ, "CLIPRET_FAULT_KILL": "after-rename:g.npy:1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9  # SIGKILL, between the renames
    assert json.loads((tmp_path / "g.json").read_text())["model_fingerprint"] == "old-model"
    with pytest.raises(ClipretError, match="does not match its manifest"):
        artifacts.load_embeddings(tmp_path / "g.npy")


def test_disk_full_during_a_write_is_one_line_naming_the_file_and_size(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "e.npy"
    artifacts.save_embeddings(target, _unit(3, 4), ["a", "b", "c"], fingerprint=None)
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ClipretError) as info:
        artifacts.save_embeddings(target, _unit(1000, 64), [str(i) for i in range(1000)], fingerprint=None)
    msg = str(info.value)
    assert "no space left on device writing" in msg and str(target) in msg and "256.0 kB" in msg
    assert "\n" not in msg
    assert target.read_bytes() == before  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.npy"]  # no temp file left


def test_torch_style_disk_full_errors_are_recognised(tmp_path):
    with pytest.raises(ClipretError, match="no space left on device writing .*ckpt.pt"):
        with artifacts.atomic_path(tmp_path / "ckpt.pt", size_hint=10**9):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")


def test_output_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ClipretError, match="a parent of it is a file") as info:
        artifacts.write_json(tmp_path / "afile" / "sub" / "r.json", [])
    assert str(tmp_path / "afile") in str(info.value)


def test_free_space_check_refuses_before_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(ClipretError, match=r"needs ~2.0 MB, 5.0 kB free"):
        artifacts.ensure_free_space(tmp_path / "new" / "deeper" / "x.npy", 2_000_000, "the embeddings")
    artifacts.ensure_free_space(tmp_path / "x.npy", 4000, "the embeddings")  # fits: no error


def test_unreadable_checkpoint_with_an_empty_message_is_one_line(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    (tmp_path / "checkpoint.pt").write_bytes(b"junk")

    def boom(*a, **k):
        raise RuntimeError("")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(ClipretError, match=r"unreadable \(RuntimeError\)"):
        artifacts.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_rewriting_a_file_keeps_its_mode(tmp_path, mode):
    """A model the user made private stays private when the next epoch exports over it."""
    torch = pytest.importorskip("torch")
    artifacts.save_model_folder(tmp_path / "m", {"w": torch.ones(2)}, {"model": {}})
    artifacts.save_embeddings(tmp_path / "e.npy", _unit(2, 3), ["a", "b"], fingerprint=None)
    names = ("m/model.safetensors", "m/config.json", "e.npy", "e.json")
    for name in names:
        os.chmod(tmp_path / name, mode)
    old = os.umask(0o022)
    try:
        artifacts.save_model_folder(tmp_path / "m", {"w": torch.zeros(2)}, {"model": {}})
        artifacts.save_embeddings(tmp_path / "e.npy", _unit(2, 3, seed=1), ["a", "b"], fingerprint=None)
    finally:
        os.umask(old)
    for name in names:
        assert (os.stat(tmp_path / name).st_mode & 0o7777) == mode, name
    assert artifacts.read_model_config(tmp_path / "m")["fingerprint"]  # the new pair, under the kept mode


def test_remove_stale_temps_removes_only_clipret_temps_of_dead_writers(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a killed writer: its pid no longer runs
    theirs = {".notes.tmp", ".model.safetensors.1234.tmp", ".x.clipret.tmp", "a.clipret-1-abc.tmp", "report.tmp"}
    dead = f".model.safetensors.clipret-{gone.pid}-k2j4h_x9.tmp"
    mine = f".config.json.clipret-{os.getpid()}-abcd1234.tmp"  # our own pid again (pid 1 in a new container)
    live = f".checkpoint.pt.clipret-{os.getppid()}-abcd1234.tmp"  # another process, still writing it
    for name in (*theirs, dead, mine, live):
        (tmp_path / name).write_text("x")
    assert artifacts.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*theirs, live})


def test_atomic_writes_name_their_temp_files_so_they_can_be_told_apart(tmp_path):
    seen = []
    with artifacts.atomic_path(tmp_path / "model.safetensors") as tmp:
        seen.append(tmp.name)
        tmp.write_text("x")
    assert seen[0].startswith(f".model.safetensors.clipret-{os.getpid()}-") and seen[0].endswith(".tmp")
    (tmp_path / seen[0]).write_text("as a killed writer leaves it")
    assert artifacts.remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_ids_digest_of_is_remembered_only_while_the_ids_list_is_the_same() -> None:
    from clipret.artifacts.embeddings import Embeddings, ids_digest, ids_digest_of

    emb = Embeddings(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    assert ids_digest_of(emb) == ids_digest(["a", "b", "c"])
    emb.ids = ["a", "b", "d"]  # replaced: hashed again
    assert ids_digest_of(emb) == ids_digest(["a", "b", "d"])
    emb.ids.append("e")  # grown in place: the length differs, hashed again
    assert ids_digest_of(emb) == ids_digest(["a", "b", "d", "e"])
