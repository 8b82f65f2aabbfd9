"""Sharded embedding under torchrun: 2 CPU ranks (gloo) against one process.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m clipret ...``
as a subprocess with one thread per process, on the tiny dataset and the tiny ResNet config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RN

pytestmark = pytest.mark.slow

# 16 gallery images -> 4 shards of 4: rank 0 takes shards 0-1, rank 1 shards 2-3
EMBED_ARGS = ["--model", str(TINY_RN), "--pretrained", "none", "--workers", "0", "--device", "cpu",
              "--shard-size", "4", "--batch-size", "3"]


def run(*args: object, ranks: int = 1, kill_at: str | None = None, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("CLIPRET_FAULT_KILL", "CLIPRET_DEBUG", "CLIPRET_PROGRESS"):
        env.pop(name, None)
    if kill_at:
        env["CLIPRET_FAULT_KILL"] = kill_at
    if debug:
        env["CLIPRET_DEBUG"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    return subprocess.run([*launch, "-m", "clipret", *map(str, args)], capture_output=True, text=True, env=env, timeout=180)


def manifest(npy: Path) -> dict:
    return json.loads(npy.with_suffix(".json").read_text())


def assert_equal_embeddings(got: Path, want: Path) -> None:
    """Rows within 1e-6, and the manifests equal (ids, skipped, flags, fingerprint, counts)."""
    a, b = np.load(got), np.load(want)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() < 1e-6
    ma, mb = manifest(got), manifest(want)
    for key in ("content_digest", "content_blake2b"):  # digests of the bytes: equal rows to 1e-6 may differ in the last bit
        ma.pop(key), mb.pop(key)
    assert ma == mb


@pytest.fixture(scope="module")
def gallery(tiny_dataset: Path) -> Path:
    return tiny_dataset / "test" / "gallery"


@pytest.fixture(scope="module")
def reference(gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "g.npy"
    r = run("embed", gallery, "--out", out, *EMBED_ARGS)
    assert r.returncode == 0, r.stderr
    return out


def test_two_ranks_split_the_shards_and_equal_one_process(gallery, reference, tmp_path):
    out = tmp_path / "g.npy"
    r = run("embed", gallery, "--out", out, *EMBED_ARGS, ranks=2, debug=True)
    assert r.returncode == 0, r.stderr
    assert_equal_embeddings(out, reference)
    assert not (tmp_path / "g.npy.parts").exists()
    # each rank embedded half of the 16 images, and only rank 0 printed the summary
    assert "rank 0 of 2: 8 image(s) to embed" in r.stderr and "rank 1 of 2: 8 image(s) to embed" in r.stderr
    assert r.stderr.count("wrote 16 embeddings") == 1


def test_killed_two_rank_run_resumes_with_two_ranks_or_one(gallery, reference, tmp_path):
    out = tmp_path / "g.npy"
    parts = tmp_path / "g.npy.parts"
    # rank 1 dies right after writing its first shard (2); torchrun then stops rank 0
    r = run("embed", gallery, "--out", out, *EMBED_ARGS, ranks=2, kill_at="after-rename:shard-000002.json:1")
    assert r.returncode != 0
    assert not out.exists() and (parts / "shard-000002.json").is_file() and not (parts / "shard-000003.json").exists()
    other = tmp_path / "other" / "g.npy"
    shutil.copytree(parts, other.with_name("g.npy.parts"))

    # the same world size, without --shard-size: the recorded size is reused
    r = run("embed", gallery, "--out", out, *[a for a in EMBED_ARGS if a not in {"--shard-size", "4"}], "--resume", ranks=2)
    assert r.returncode == 0, r.stderr
    assert_equal_embeddings(out, reference)
    assert not parts.exists()

    # another world size (one process) reuses the finished shards: killed after it wrote the missing
    # shard 3, it has rewritten none of them; resumed once more, it equals the reference
    # (only complete shards count: rank 0 may have been stopped between a shard's .npy and its .json)
    before = {p.name: p.stat().st_mtime_ns for p in other.with_name("g.npy.parts").glob("shard-*.npy")
              if p.with_suffix(".json").is_file()}
    r = run("embed", gallery, "--out", other, *EMBED_ARGS, "--resume", kill_at="after-rename:shard-000003.json:1")
    assert r.returncode != 0
    after = {p.name: p.stat().st_mtime_ns for p in other.with_name("g.npy.parts").glob("shard-*")}
    assert "shard-000003.npy" in after and all(after[name] == t for name, t in before.items())
    r = run("embed", gallery, "--out", other, *EMBED_ARGS, "--resume")
    assert r.returncode == 0, r.stderr
    assert_equal_embeddings(other, reference)


def test_query_folder_under_torchrun_equals_one_process(tiny_dataset, reference, tmp_path):
    queries = tiny_dataset / "test" / "query"  # 8 images: 4 per rank
    common = ["--gallery", reference, "--k", "5", *EMBED_ARGS[:8]]
    r1 = run("query", queries, "--out", tmp_path / "one.json", *common)
    assert r1.returncode == 0, r1.stderr
    r2 = run("query", queries, "--out", tmp_path / "two.json", *common, ranks=2, debug=True)
    assert r2.returncode == 0, r2.stderr
    assert "rank 1 of 2: 4 image(s) to embed" in r2.stderr and r2.stderr.count("wrote top-5 results") == 1
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert [(x["filename"], x["samples"]) for x in one] == [(x["filename"], x["samples"]) for x in two]
    np.testing.assert_allclose([x["scores"] for x in two], [x["scores"] for x in one], atol=1e-6)
    meta_one, meta_two = (json.loads((tmp_path / f"{n}.json.json").read_text()) for n in ("one", "two"))
    assert meta_one == meta_two  # the same query folder, gallery, ids and stages


def test_an_error_on_one_rank_stops_every_rank_with_one_message(gallery, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(gallery, folder)
    (folder / "zz.png").write_bytes(b"not an image")  # the last id: in rank 1's last shard (17 ids, 5 shards)
    out = tmp_path / "g.npy"
    r = run("embed", folder, "--out", out, *EMBED_ARGS, "--strict", ranks=2)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "zz.png" in errors[0] and "--strict" in errors[0], r.stderr
    assert "[rank0]:" not in r.stderr and "[rank1]:" not in r.stderr  # no rank died with a traceback of its own
    assert not out.exists() and not out.with_suffix(".json").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "images"]
    assert leftovers == [], leftovers  # nor OUT.parts/ (made again by a rank still writing), nor its renamed remains
