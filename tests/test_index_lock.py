"""Concurrent writers and readers of one index pair (issue 17, item 7): the writers' lock and the commit step."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.artifacts.index import lock_path, pending_path, read_sidecar, sidecar_path, write_index_pair
from clipret.cli import app
from clipret.errors import ClipretError
from clipret.retrieval.index import build as index_build
from clipret.retrieval.index import open_index

faiss = pytest.importorskip("faiss")


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save(path: Path, n: int, prefix: str, seed: int) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    artifacts.save_embeddings(path, unit(n, 8, seed), ids, fingerprint="fp")
    return ids


@pytest.fixture
def pair(tmp_path) -> Path:
    """A flat index of 300 vectors (ids g0 ...) at tmp_path/g.faiss, and a.npy, b.npy (50 vectors each) to add."""
    save(tmp_path / "g.npy", 300, "g", 0)
    save(tmp_path / "a.npy", 50, "a", 1)
    save(tmp_path / "b.npy", 50, "b", 2)
    index_build.build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind="flat")
    return tmp_path / "g.faiss"


@contextlib.contextmanager
def held_by_another_process(index: Path):
    """Hold the writers' lock through a file description of our own, as another process would."""
    fd = os.open(lock_path(index), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_the_commit_accepts_a_reader_that_rolled_the_write_forward(pair, monkeypatch):
    """Before: a reader renamed the pending sidecar between steps 2 and 3, and the writer's rename then
    raised FileNotFoundError after the pair was committed (a retry said the ids were already there)."""
    real_replace, raced = os.replace, []

    def racing_replace(src, dst, *args, **kwargs):
        if Path(src) == pending_path(pair) and not raced:
            raced.append(True)
            assert read_sidecar(pair)["count"] == 350  # the reader sees the new index and rolls its sidecar forward
            assert not pending_path(pair).exists()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", racing_replace)
    meta = index_build.add_to_index(pair, [pair.parent / "a.npy"])
    assert raced and meta["count"] == 350
    assert read_sidecar(pair)["generation"] == meta["generation"] and len(open_index(pair)) == 350


def test_two_writers_at_once_both_land(pair, monkeypatch):
    """Both writers read the sidecar before either writes, unless the lock makes the second wait. Before: one
    addition was lost, or a writer failed with `No such file or directory (.g.faiss.json.pending)`."""
    both_read = threading.Barrier(2)
    real_read = index_build.read_index_pair

    def read_then_meet(path):
        out = real_read(path)
        with contextlib.suppress(threading.BrokenBarrierError):  # with the lock the other writer never arrives
            both_read.wait(timeout=1.0)
        return out

    monkeypatch.setattr(index_build, "read_index_pair", read_then_meet)
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            index_build.add_to_index(pair, [pair.parent / name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(name,)) for name in ("a.npy", "b.npy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    ids = open_index(pair).ids
    assert len(ids) == 400 and {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(50)} <= set(ids)


@pytest.mark.slow
def test_two_add_processes_started_together_both_land(tmp_path):
    """The issue's case: two `clipret index --add` of 5,000 vectors each on a 20,000-vector flat index."""
    save(tmp_path / "g.npy", 20_000, "g", 0)
    save(tmp_path / "a.npy", 5_000, "a", 1)
    save(tmp_path / "b.npy", 5_000, "b", 2)
    index_build.build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind="flat")
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPRET_FAULT_KILL", "CLIPRET_DEBUG")}
    procs = [subprocess.Popen([sys.executable, "-m", "clipret", "index", "--add", name, "--index", "g.faiss"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a.npy", "b.npy")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    meta = json.loads(sidecar_path(tmp_path / "g.faiss").read_text())
    assert meta["count"] == 30_000 and len(set(meta["ids"])) == 30_000 and len(open_index(tmp_path / "g.faiss")) == 30_000


def test_a_writer_gives_up_after_the_lock_timeout_in_one_line(pair, monkeypatch):
    monkeypatch.setenv("CLIPRET_INDEX_LOCK_TIMEOUT", "0.3")
    (pair.parent / "rm.txt").write_text("g0\n")
    before = pair.read_bytes(), sidecar_path(pair).read_bytes()
    with held_by_another_process(pair):
        for args in (["--add", str(pair.parent / "a.npy")], ["--remove", str(pair.parent / "rm.txt")]):
            r = CliRunner().invoke(app, ["index", *args, "--index", str(pair)])
            lines = [line for line in r.output.splitlines() if line.strip()]
            assert r.exit_code == 2 and len(lines) == 1, r.output
            assert "another process is changing" in lines[0] and "CLIPRET_INDEX_LOCK_TIMEOUT" in lines[0]
        assert len(open_index(pair)) == 300  # readers never wait for the lock
    assert (pair.read_bytes(), sidecar_path(pair).read_bytes()) == before
    assert index_build.add_to_index(pair, [pair.parent / "a.npy"])["count"] == 350  # released: the next writer goes


def test_a_bad_lock_timeout_is_a_one_line_error(pair, monkeypatch):
    monkeypatch.setenv("CLIPRET_INDEX_LOCK_TIMEOUT", "soon")
    with pytest.raises(ClipretError, match="CLIPRET_INDEX_LOCK_TIMEOUT must be a number of seconds, got 'soon'"):
        index_build.add_to_index(pair, [pair.parent / "a.npy"])


def test_a_reader_leaves_the_roll_forward_to_a_writer_at_work(pair):
    """Between a writer's steps 2 and 3 a reader uses the pending sidecar but does not rename it: that is the
    writer's step. Once no writer holds the lock, a reader finishes an interrupted write itself."""
    old_sidecar = sidecar_path(pair).read_bytes()
    index = faiss.read_index(str(pair))
    index.add(unit(1, 8, 3))
    new = write_index_pair(pair, index, {**json.loads(old_sidecar), "ids": [f"g{i}" for i in range(301)], "count": 301,
                                         "label_count": 301})
    pending_path(pair).write_bytes(sidecar_path(pair).read_bytes())  # as if the writer were between steps 2 and 3
    sidecar_path(pair).write_bytes(old_sidecar)
    with held_by_another_process(pair):
        assert read_sidecar(pair)["generation"] == new["generation"]
        assert pending_path(pair).exists() and sidecar_path(pair).read_bytes() == old_sidecar
    assert read_sidecar(pair)["generation"] == new["generation"] and not pending_path(pair).exists()
    assert json.loads(sidecar_path(pair).read_text())["generation"] == new["generation"]


def test_a_reader_looks_again_when_the_writer_commits_between_its_reads(pair, monkeypatch):
    """The reader reads the old sidecar, then the writer renames the pending one into place, so the pending
    file is gone when the reader looks for it: the reader must read the sidecar again, not call the pair broken."""
    from clipret.artifacts import index as pair_format

    old_sidecar = sidecar_path(pair).read_bytes()
    index = faiss.read_index(str(pair))
    index.add(unit(1, 8, 3))
    new = write_index_pair(pair, index, {**json.loads(old_sidecar), "ids": [f"g{i}" for i in range(301)], "count": 301,
                                         "label_count": 301})
    pending_path(pair).write_bytes(sidecar_path(pair).read_bytes())  # the writer between steps 2 and 3
    sidecar_path(pair).write_bytes(old_sidecar)
    real, committed = pair_format._json_or_none, []

    def commit_first(path, what):
        if path == pending_path(pair) and not committed:
            committed.append(True)
            os.replace(pending_path(pair), sidecar_path(pair))  # the writer's step 3 lands now
        return real(path, what)

    monkeypatch.setattr(pair_format, "_json_or_none", commit_first)
    assert read_sidecar(pair)["generation"] == new["generation"] and committed


def test_changing_a_missing_index_leaves_no_lock_file(tmp_path):
    save(tmp_path / "a.npy", 5, "a", 1)
    with pytest.raises(ClipretError, match="index not found"):
        index_build.add_to_index(tmp_path / "missing.faiss", [tmp_path / "a.npy"])
    assert not lock_path(tmp_path / "missing.faiss").exists()


def test_rewriting_the_pair_keeps_the_sidecars_mode(tmp_path):
    """The sidecar arrives by renaming its pending file: it must keep the mode a user gave it."""
    import os
    import stat

    from clipret.retrieval.index.build import add_to_index, build_index

    rng = np.random.default_rng(3)
    for name, n in (("a", 40), ("b", 10)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        artifacts.save_embeddings(tmp_path / f"{name}.npy", x / np.linalg.norm(x, axis=1, keepdims=True),
                                  [f"{name}{i}" for i in range(n)], fingerprint="m")
    build_index([tmp_path / "a.npy"], tmp_path / "g.faiss", kind="flat")
    side = tmp_path / "g.faiss.json"
    os.chmod(side, 0o600)
    add_to_index(tmp_path / "g.faiss", [tmp_path / "b.npy"])
    assert stat.S_IMODE(side.stat().st_mode) == 0o600
