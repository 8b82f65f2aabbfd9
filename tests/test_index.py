"""FAISS index core: choice and memory estimates, the index pair format, searchers, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clipret import artifacts
from clipret.artifacts.index import (
    TRAILER_SIZE,
    pending_path,
    read_sidecar,
    sidecar_path,
    write_index_pair,
)
from clipret.errors import ClipretError
from clipret.retrieval.index import choice as ic
from clipret.retrieval.index import FaissExactSearcher, exact_searcher, open_index
from clipret.retrieval.index.build import build_index
from clipret.retrieval.index.source import GallerySource, sample_rows, unit_rows
from clipret.retrieval.search import ExactSearcher

faiss = pytest.importorskip("faiss")


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save(path, vectors, prefix="g", fingerprint="fp", flags=None, start=0):
    ids = [f"{prefix}{i}" for i in range(start, start + len(vectors))]
    artifacts.save_embeddings(path, vectors, ids, fingerprint=fingerprint, flags=flags or {"tta": False})
    return ids


def reference_topk(q: np.ndarray, g: np.ndarray, k: int) -> list[list[int]]:
    """Plain loops: sort each row by (-score, index)."""
    out = []
    for row in q:
        scores = [(-float(np.dot(row, v)), j) for j, v in enumerate(g)]
        out.append([j for _, j in sorted(scores)[:k]])
    return out


# ---- choice, memory, sizes (pure) ----

@pytest.mark.parametrize("text, expected", [("4GB", 4 * 10**9), ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30),
                                            ("1.5G", 1_500_000_000), ("100", 100), ("64 KiB", 65536)])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert ic.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4XB", "GB", "-1GB"])
def test_parse_size_rejects_garbage_in_one_line(text):
    with pytest.raises(ClipretError, match="4GB"):
        ic.parse_size(text)


@pytest.mark.parametrize("n", [40, 78, 100, 1_000, 2_000, 3_000, 5_000, 100_000, 1_000_000, 50_000_000])
def test_default_nlist_is_a_power_of_two_with_enough_training_points(n):
    """Small n too, where the cap n // 39 (1000 -> 25, 2000 -> 51, 3000 -> 76) is not a power of two."""
    nlist = ic.default_nlist(n)
    assert nlist >= 1 and nlist & (nlist - 1) == 0
    assert nlist == 1 or n // nlist >= 39
    assert ic.default_nprobe(nlist) <= nlist


@pytest.mark.parametrize("n, nlist", [(40, 1), (100, 2), (1_000, 16), (2_000, 32), (3_000, 64), (100_000, 1024),
                                      (1_000_000, 4096)])
def test_default_nlist_is_the_power_of_two_nearest_4_sqrt_n_halved_to_fit(n, nlist):
    assert ic.default_nlist(n) == nlist


def test_auto_without_budget_is_flat_below_the_threshold_then_the_best_expected_recall():
    assert ic.plan_index("auto", ic.AUTO_FLAT_BELOW - 1, 256, {}).type == "flat"
    best = max(["hnsw", "ivf"], key=lambda t: ic.EXPECTED_RECALL[t])
    assert ic.plan_index("auto", ic.AUTO_FLAT_BELOW, 256, {}).type == best
    assert ic.plan_index("auto", 50_000_000, 256, {}).type == best


@pytest.mark.parametrize("n, dim", [(200_000, 256), (5_000_000, 128), (1_000, 64)])
def test_max_memory_picks_the_best_recall_that_fits(n, dim):
    """For budgets around each candidate's size, the plan fits and no candidate with better expected recall would."""
    kinds = ["flat", "hnsw", "ivf"] if n < ic.AUTO_FLAT_BELOW else ["hnsw", "ivf"]
    sizes = {t: ic.estimate_memory(t, n, dim, ic.complete_params(t, n, dim, {})) for t in kinds}
    for budget in [s + d for s in sizes.values() for d in (-1, 1)] + [min(sizes.values()) // 8]:
        plan = ic.plan_index("auto", n, dim, {}, max_memory=budget)
        assert plan.memory <= budget
        better = [t for t in kinds if ic.EXPECTED_RECALL[t] > plan.recall]
        assert all(sizes[t] > budget for t in better), (budget, plan)
        if plan.type == "ivfpq":  # nothing else fits, and the next larger code (twice the sub-quantizers) would not
            assert all(sizes[t] > budget for t in kinds)
            bigger = 2 * plan.params["m"]
            if bigger <= dim // 2 and dim % bigger == 0:
                assert ic.estimate_memory("ivfpq", n, dim, {**plan.params, "m": bigger}) > budget


def test_max_memory_refuses_a_budget_nothing_fits():
    with pytest.raises(ClipretError, match="no index of 1000000 vectors .* fits --max-memory") as e:
        ic.plan_index("auto", 1_000_000, 256, {}, max_memory=1_000_000)
    assert "\n" not in str(e.value)


def test_explicit_type_must_fit_the_budget_and_ivfpq_is_sized_to_it():
    n, dim = 1_000_000, 256
    with pytest.raises(ClipretError, match="more than --max-memory"):
        ic.plan_index("hnsw", n, dim, {}, max_memory=10**9)
    plan = ic.plan_index("ivfpq", n, dim, {}, max_memory=40 * 10**6)
    assert plan.type == "ivfpq" and plan.memory <= 40 * 10**6 and dim % plan.params["m"] == 0


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(ClipretError, match="must divide the dim"):
        ic.plan_index("ivfpq", 10_000, 100, {"m": 7})
    with pytest.raises(ClipretError, match="more than the 50 vectors"):
        ic.plan_index("ivf", 50, 8, {"nlist": 64})
    with pytest.raises(ClipretError, match="positive integer"):
        ic.plan_index("hnsw", 50, 8, {"m": 0})


@pytest.mark.parametrize("kind, params", [("flat", {}), ("hnsw", {"m": 8}), ("ivf", {"nlist": 16}),
                                          ("ivfpq", {"nlist": 16, "m": 8, "nbits": 4})])
def test_memory_estimate_matches_the_written_index(tmp_path, kind, params):
    save(tmp_path / "g.npy", unit(3000, 32, 0))
    meta = build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind=kind, params=params)
    est = ic.estimate_memory(kind, 3000, 32, meta["params"])
    assert abs(est - meta["faiss_bytes"]) <= 0.05 * meta["faiss_bytes"], (est, meta["faiss_bytes"])


# ---- inputs ----

def test_unit_rows_keeps_unit_rows_bit_exact_and_normalises_the_rest():
    x = unit(5, 8, 1)
    x[1] *= 3.0
    x[2] = 0.0
    y = unit_rows(x)
    np.testing.assert_array_equal(y[[0, 3, 4]], x[[0, 3, 4]])
    np.testing.assert_allclose(np.linalg.norm(y[1]), 1.0, rtol=1e-6)
    assert not y[2].any()


def test_source_reads_files_and_folders_in_order(tmp_path):
    (tmp_path / "shards").mkdir()
    a, b, c = unit(5, 4, 1), unit(3, 4, 2), unit(4, 4, 3)
    ids = save(tmp_path / "shards" / "shard-000001.npy", b, "b") + save(tmp_path / "shards" / "shard-000002.npy", c, "c")
    ids = save(tmp_path / "a.npy", a, "a") + ids
    src = GallerySource.open([tmp_path / "a.npy", tmp_path / "shards"])
    assert src.ids == ids and len(src) == 12
    np.testing.assert_array_equal(np.concatenate(list(src.chunks(2))), np.concatenate([a, b, c]))
    rows = sample_rows(12, 5, seed=3)
    np.testing.assert_array_equal(src.rows(rows), np.concatenate([a, b, c])[rows])


# ---- the pair format ----

def test_faiss_ignores_the_generation_trailer(tmp_path):
    """The pair check appends 64 bytes after FAISS's data; FAISS must read the index as if they were not there."""
    x = unit(200, 16, 0)
    index = faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    plain = tmp_path / "plain.faiss"
    faiss.write_index(index, str(plain))
    meta = write_index_pair(tmp_path / "g.faiss", index, {"type": "hnsw", "dim": 16, "ids": []})
    assert (tmp_path / "g.faiss").stat().st_size == plain.stat().st_size + TRAILER_SIZE == meta["faiss_bytes"] + TRAILER_SIZE
    a, b = faiss.read_index(str(plain)), faiss.read_index(str(tmp_path / "g.faiss"))
    np.testing.assert_array_equal(a.search(x[:5], 5)[1], b.search(x[:5], 5)[1])


def test_pair_rolls_forward_a_write_interrupted_between_the_renames(tmp_path):
    index = faiss.IndexFlatIP(4)
    index.add(unit(3, 4, 0))
    old = write_index_pair(tmp_path / "g.faiss", index, {"type": "flat", "dim": 4, "ids": ["a", "b", "c"]})
    old_sidecar = sidecar_path(tmp_path / "g.faiss").read_bytes()
    index.add(unit(1, 4, 1))
    new = write_index_pair(tmp_path / "g.faiss", index, {"type": "flat", "dim": 4, "ids": ["a", "b", "c", "d"]})
    # make it look as if the process died after the index rename, before the sidecar rename
    pending_path(tmp_path / "g.faiss").write_bytes(sidecar_path(tmp_path / "g.faiss").read_bytes())
    sidecar_path(tmp_path / "g.faiss").write_bytes(old_sidecar)
    meta = read_sidecar(tmp_path / "g.faiss")
    assert meta["generation"] == new["generation"] != old["generation"] and meta["ids"] == ["a", "b", "c", "d"]
    assert not pending_path(tmp_path / "g.faiss").exists()
    assert read_sidecar(tmp_path / "g.faiss")["generation"] == new["generation"]


def test_pair_from_two_different_writes_is_refused(tmp_path):
    index = faiss.IndexFlatIP(4)
    index.add(unit(3, 4, 0))
    write_index_pair(tmp_path / "a.faiss", index, {"type": "flat", "dim": 4, "ids": ["a", "b", "c"]})
    write_index_pair(tmp_path / "b.faiss", index, {"type": "flat", "dim": 4, "ids": ["a", "b", "c"]})
    sidecar_path(tmp_path / "a.faiss").write_bytes(sidecar_path(tmp_path / "b.faiss").read_bytes())
    with pytest.raises(ClipretError, match="do not belong to the same write"):
        read_sidecar(tmp_path / "a.faiss")
    faiss.write_index(index, str(tmp_path / "plain.faiss"))
    with pytest.raises(ClipretError, match="not an index written by `clipret index`"):
        read_sidecar(tmp_path / "plain.faiss")


# ---- searchers ----

def test_faiss_exact_matches_numpy_exact_and_the_loop_reference_on_untied_data():
    g, q = unit(3000, 32, 0), unit(40, 32, 1)
    fs, fi = FaissExactSearcher(g).search(q, 7)
    es, ei = ExactSearcher(g, gallery_chunk=1000).search(q, 7)
    np.testing.assert_array_equal(fi, ei)
    np.testing.assert_allclose(fs, es, atol=1e-6)
    assert fi.tolist() == reference_topk(q, g, 7)


def test_faiss_exact_keeps_the_lowest_tied_indices_at_the_k_boundary():
    base = unit(50, 8, 3)
    g = np.concatenate([base, base, base])  # every score appears three times: rows j, j+50, j+100
    q = unit(30, 8, 4)
    for k in (1, 2, 4, 5):  # boundaries inside and between tie groups
        _, fi = FaissExactSearcher(g).search(q, k)
        _, ei = ExactSearcher(g).search(q, k)
        np.testing.assert_array_equal(fi, ei)
        assert fi.tolist() == reference_topk(q, g, k)


def test_asking_for_a_gpu_without_one_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("CLIPRET_FAISS_GPU", "0")  # as on a machine without faiss-gpu
    with pytest.raises(ClipretError, match="no GPU"):
        FaissExactSearcher(unit(10, 4, 0), gpu=True)


def test_exact_searcher_falls_back_to_numpy_without_faiss(monkeypatch):
    import sys

    g = unit(10, 4, 0)
    assert isinstance(exact_searcher(g), FaissExactSearcher)
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert isinstance(exact_searcher(g), ExactSearcher)


def test_flat_index_search_equals_exact_search_with_ties(tmp_path):
    base = unit(40, 8, 5)
    g = np.concatenate([base, base])
    save(tmp_path / "g.npy", g)
    build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind="flat")
    gal = open_index(tmp_path / "g.faiss")
    q = unit(20, 8, 6)
    _, i = gal.searcher.search(q, 5)
    assert i.tolist() == reference_topk(q, g, 5)
    assert gal.ids == [f"g{j}" for j in range(80)] and len(gal) == 80 and gal.fingerprint == "fp"


def test_ivf_returns_fewer_than_k_as_padding_at_the_end(tmp_path):
    save(tmp_path / "g.npy", unit(400, 8, 7))
    build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind="ivf", params={"nlist": 10, "nprobe": 1})
    s, i = open_index(tmp_path / "g.faiss").searcher.search(unit(10, 8, 8), 100)  # one cell holds ~40 vectors
    assert s.shape == (10, 100) and (i == -1).any()
    for srow, irow in zip(s, i):
        real = irow >= 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()  # padding only at the end
        assert np.isneginf(srow[n_real:]).all() and np.all(np.diff(srow[:n_real]) <= 0)


@pytest.mark.parametrize("kind, params, exact", [("flat", {}, True), ("hnsw", {"m": 8}, True), ("ivf", {"nlist": 8}, True),
                                                 ("ivfpq", {"nlist": 4, "m": 4, "nbits": 4}, False)])
def test_vectors_gives_back_the_gallery_rows(tmp_path, kind, params, exact):
    g = unit(600, 16, 9)
    save(tmp_path / "g.npy", g)
    build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind=kind, params=params)
    searcher = open_index(tmp_path / "g.faiss").searcher
    rows = np.array([5, 0, 599, 5])
    v = searcher.vectors(rows)
    assert v.shape == (4, 16) and searcher.vectors_exact == exact
    if exact:
        np.testing.assert_array_equal(v, g[rows])
    else:  # PQ reconstructions: near the originals, not equal
        assert not np.array_equal(v, g[rows]) and np.linalg.norm(v - g[rows], axis=1).max() < 1.0


@pytest.mark.parametrize("kind, params, threads", [("flat", {}, 2), ("ivf", {"nlist": 16}, 2),
                                                   ("ivfpq", {"nlist": 8, "m": 8, "nbits": 4}, 2), ("hnsw", {"m": 8}, 1)])
def test_build_is_byte_identical_for_a_fixed_seed(tmp_path, kind, params, threads):
    from clipret.retrieval.index._faiss import set_threads

    save(tmp_path / "g.npy", unit(2000, 16, 10))
    set_threads(threads)
    try:
        for name in ("a", "b"):
            build_index([tmp_path / "g.npy"], tmp_path / f"{name}.faiss", kind=kind, params=params, seed=4)
    finally:
        set_threads(None)
    size = read_sidecar(tmp_path / "a.faiss")["faiss_bytes"]
    assert (tmp_path / "a.faiss").read_bytes()[:size] == (tmp_path / "b.faiss").read_bytes()[:size]
    if kind in ("ivf", "ivfpq"):  # the seed matters: another one trains other centroids
        build_index([tmp_path / "g.npy"], tmp_path / "c.faiss", kind=kind, params=params, seed=5)
        assert (tmp_path / "a.faiss").read_bytes()[:size] != (tmp_path / "c.faiss").read_bytes()[:size]


TORCH_UTILS_SCRIPT = """
import numpy as np, torch, faiss.contrib.torch_utils  # replaces faiss's numpy wrappers, as pytorch-metric-learning does
from clipret import artifacts
from clipret.retrieval.index import FaissExactSearcher, open_index
from clipret.retrieval.index.build import build_index, remove_from_index
from clipret.retrieval.search import ExactSearcher
rng = np.random.default_rng(0)
g = rng.standard_normal((300, 8)).astype(np.float32)
g /= np.linalg.norm(g, axis=1, keepdims=True)
artifacts.save_embeddings("g.npy", g, [str(i) for i in range(300)], fingerprint="f")
mm = artifacts.load_embeddings("g.npy").vectors  # a memory map
want = ExactSearcher(g).search(g[:5], 4)[1]
assert (FaissExactSearcher(mm).search(mm[:5], 4)[1] == want).all()
for kind, params in (("flat", {}), ("hnsw", {"m": 8, "ef_search": 300}), ("ivf", {"nlist": 4, "nprobe": 4})):
    build_index(["g.npy"], kind + ".faiss", kind=kind, params=params)
    remove_from_index(kind + ".faiss", ["0", "1"])  # IDSelector removal, or tombstones searched with params
    gal = open_index(kind + ".faiss")
    found = [[gal.ids[j] for j in row] for row in gal.searcher.search(mm[:5], 4)[1]]
    keep = np.arange(2, 300)
    ref = [[str(keep[j]) for j in row] for row in ExactSearcher(g[keep]).search(g[:5], 4)[1]]
    assert found == ref, (kind, found, ref)
    assert (gal.searcher.vectors(np.arange(3)) == g[2:5]).all()
print("ok")
"""


@pytest.mark.slow
def test_index_paths_survive_faiss_torch_utils(tmp_path):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces faiss.knn, Index.search,
    Index.remove_ids ... with versions that take no search parameters or IDSelector and send anything
    that is not exactly an np.ndarray (a np.memmap, say) down a torch-only path. Run in a subprocess: the
    patch is global and would leak into every later test."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", TORCH_UTILS_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                       check=False, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
