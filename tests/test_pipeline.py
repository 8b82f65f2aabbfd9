"""The post-processing pipeline (DBA -> QE -> search -> re-rank) against plain references, and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.cli import app
from clipret.errors import ClipretError
from clipret.retrieval.pipeline import Stages, apply_dba, retrieve, score_function
from reference import ref_k_reciprocal_rerank, ref_topk
from reference_expansion import ref_dba, ref_qe

runner = CliRunner()


def _clustered(n, d, centers, seed, spread=0.35):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ref_pipeline(q, g, dba=0, qe=0, qe_alpha=None, rerank=False, k1=5, k2=3, lam=Stages().lam):
    """The stages composed from the slow references, in the documented order: (Q, G) distances, lower is better."""
    g = np.array(ref_dba(g.tolist(), dba), dtype=np.float64) if dba else g.astype(np.float64)
    q = q.astype(np.float64)
    if qe:
        scores, idx = ref_topk(q.tolist(), g.tolist(), qe)
        q = np.array(ref_qe(q.tolist(), g.tolist(), idx, scores, qe_alpha), dtype=np.float64)
    if rerank:
        return ref_k_reciprocal_rerank(q, g, k1=k1, k2=k2, lam=lam)
    return -(q @ g.T)


def _assert_same_ranking(idx, dist, k):
    """``idx`` (Q, k) lists the k best items of ``dist`` (Q, G), best first; items whose reference
    distances tie within float32 rounding may come in either order (DBA can make two gallery
    vectors equal in exact arithmetic)."""
    for row, d in zip(idx, dist):
        np.testing.assert_allclose(d[row], np.sort(d)[:k], atol=2e-6)
        assert len(set(row.tolist())) == k


@pytest.mark.parametrize(
    "stages",
    [
        dict(),
        dict(qe=3),
        dict(qe=4, qe_alpha=3.0),
        dict(dba=2),
        dict(rerank=True),
        dict(dba=2, qe=3, rerank=True),
        dict(qe=2, qe_alpha=1.0, rerank=True, lam=0.0),
    ],
)
def test_retrieve_equals_the_references_composed_in_order(stages):
    q, g = _clustered(6, 8, 4, seed=1), _clustered(40, 8, 4, seed=2)
    opts = {"k1": 5, "k2": 3, **stages}
    st = Stages(**opts)
    gal = apply_dba(g, st.dba)
    _, idx = retrieve(q, gal, 7, st)
    _assert_same_ranking(idx, _ref_pipeline(q, g, **opts), 7)


def test_reranked_scores_are_one_minus_the_final_distance():
    q, g = _clustered(4, 8, 3, seed=3), _clustered(25, 8, 3, seed=4)
    scores, idx = retrieve(q, g, 5, Stages(rerank=True, k1=5, k2=3, lam=0.3))
    final = ref_k_reciprocal_rerank(q, g, k1=5, k2=3, lam=0.3)
    np.testing.assert_allclose(scores, 1 - np.take_along_axis(final, idx, axis=1), atol=1e-5)


def test_score_function_blocks_equal_the_top_k_path():
    q, g = _clustered(9, 8, 3, seed=5), _clustered(30, 8, 3, seed=6)
    for st in (Stages(), Stages(qe=2), Stages(rerank=True, k1=5, k2=3)):
        fn = score_function(q, g, st, rows=4)
        full = np.concatenate([fn(a, min(a + 4, 9)).copy() for a in range(0, 9, 4)])
        assert full.shape == (9, 30)
        top_s, top_i = retrieve(q, g, 6, st)
        want = [sorted(range(30), key=lambda j: (-full[i, j], j))[:6] for i in range(9)]
        assert top_i.tolist() == want
        np.testing.assert_allclose(top_s, np.take_along_axis(full, top_i, axis=1), atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(qe=-1), "number of neighbours"),
    (dict(qe_alpha=2.0), "--qe-alpha needs --qe"),
    (dict(rerank=True, lam=1.5), "lambda"),
    (dict(rerank=True, k1=0), "k1"),
])
def test_bad_stage_parameters_are_user_errors(kwargs, message):
    with pytest.raises(ClipretError, match=message):
        Stages(**kwargs)


# ----------------------------------------------------------------------------- CLI


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def embedded(tmp_path):
    """Clustered query/gallery .npy files with class-subfolder ids (labels come from the ids)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16))

    def make(n, prefix, seed):
        lab = np.random.default_rng(seed).integers(0, 4, n)
        x = centers[lab] + 0.9 * np.random.default_rng(seed + 1).standard_normal((n, 16))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        ids = [f"c{c}/{prefix}{i:03d}.jpg" for i, c in enumerate(lab)]
        order = np.argsort(ids)
        return x[order], [ids[i] for i in order]

    for name, n, seed in (("q", 12, 10), ("g", 60, 20)):
        x, ids = make(n, name, seed)
        artifacts.save_embeddings(tmp_path / f"{name}.npy", x, ids, fingerprint="m")
    return tmp_path


def test_query_with_stages_writes_the_stages_and_matches_the_api(embedded):
    t = embedded
    r = run("query", t / "q.npy", "--gallery", t / "g.npy", "--k", 5, "--rerank", "--k1", 8, "--k2", 3, "--qe", 3,
            "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    side = json.loads((t / "r.json.json").read_text())
    assert side["stages"] == {"qe": {"n": 3, "alpha": None}, "rerank": {"k1": 8, "k2": 3, "lambda": 0.1}}
    assert side["score"].startswith("1 - ")
    q, g = artifacts.load_embeddings(t / "q.npy"), artifacts.load_embeddings(t / "g.npy")
    scores, idx = retrieve(q.vectors, g.vectors, 5, Stages(qe=3, rerank=True, k1=8, k2=3))
    got = json.loads((t / "r.json").read_text())
    assert [x["samples"] for x in got] == [[g.ids[j] for j in row] for row in idx]
    np.testing.assert_allclose([x["scores"] for x in got], scores, atol=1e-5)
    assert (t / "g.npy.knn.npz").is_file()  # the gallery's neighbour graph is cached beside it


def test_rerank_cache_is_reused_and_invalidated_when_any_row_changes(tmp_path):
    """30 rows changed over a 10,000-row gallery, none of them among the 64 rows the manifest's cheap digest samples."""
    from clipret.artifacts.embeddings import DIGEST_ROWS

    g_x, q_x = _clustered(10_000, 16, 40, seed=5), _clustered(20, 16, 40, seed=6)
    ids = [f"{i:05d}.jpg" for i in range(len(g_x))]
    artifacts.save_embeddings(tmp_path / "g.npy", g_x, ids, fingerprint="m")
    artifacts.save_embeddings(tmp_path / "q.npy", q_x, [f"q{i}" for i in range(20)], fingerprint="m")
    args = ["query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--k", 10, "--rerank", "--k1", 8, "--k2", 3]
    assert run(*args, "--out", tmp_path / "a.json").exit_code == 0
    cache = tmp_path / "g.npy.knn.npz"
    stamp = cache.stat().st_mtime_ns
    assert run(*args, "--out", tmp_path / "b.json").exit_code == 0
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten

    sampled = set(np.linspace(0, len(g_x) - 1, DIGEST_ROWS).round().astype(int).tolist())
    changed = [j for j in np.linspace(7, len(g_x) - 8, 30).astype(int).tolist() if j not in sampled]
    assert len(changed) == 30
    new = g_x.copy()
    new[changed] = _clustered(30, 16, 40, seed=7)  # re-embedded images: same shape, same ids
    artifacts.save_embeddings(tmp_path / "g.npy", new, ids, fingerprint="m")
    assert artifacts.array_digest(new) == artifacts.array_digest(g_x)  # the cheap digest cannot see this change
    assert run(*args, "--out", tmp_path / "c.json").exit_code == 0
    assert cache.stat().st_mtime_ns != stamp

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("g.npy", "g.json", "q.npy", "q.json"):
        (fresh / name).write_bytes((tmp_path / name).read_bytes())
    r = run("query", fresh / "q.npy", "--gallery", fresh / "g.npy", "--k", 10, "--rerank", "--k1", 8, "--k2", 3,
            "--out", fresh / "c.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads((fresh / "c.json").read_text())
    assert json.loads((tmp_path / "a.json").read_text()) != json.loads((fresh / "c.json").read_text())


def test_a_gallery_without_a_content_hash_is_hashed_in_full(tmp_path):
    """Manifests from before the content hash (or other tools): the cache key reads every row."""
    g_x, q_x = _clustered(200, 8, 5, seed=8), _clustered(6, 8, 5, seed=9)
    ids = [f"{i:03d}" for i in range(200)]
    artifacts.save_embeddings(tmp_path / "q.npy", q_x, [f"q{i}" for i in range(6)], fingerprint="m")

    def save_old_style(x):
        artifacts.save_embeddings(tmp_path / "g.npy", x, ids, fingerprint="m")
        side = json.loads((tmp_path / "g.json").read_text())
        del side["content_blake2b"]
        (tmp_path / "g.json").write_text(json.dumps(side))

    args = ["query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--k", 5, "--rerank", "--k1", 6, "--k2", 3]
    save_old_style(g_x)
    assert run(*args, "--out", tmp_path / "a.json").exit_code == 0
    stamp = (tmp_path / "g.npy.knn.npz").stat().st_mtime_ns
    new = g_x.copy()
    new[[5, 50, 150]] = new[[6, 51, 151]]  # none of these rows is sampled by the cheap digest
    assert artifacts.array_digest(new) == artifacts.array_digest(g_x)
    save_old_style(new)
    assert run(*args, "--out", tmp_path / "b.json").exit_code == 0
    assert (tmp_path / "g.npy.knn.npz").stat().st_mtime_ns != stamp


def test_evaluate_takes_the_same_stages_and_scores_the_reranked_ranking(embedded):
    t = embedded
    base = ["evaluate", "--query", t / "q.npy", "--gallery", t / "g.npy", "--k", 1, 5, "--json"]
    plain = json.loads(run(*base).stdout)
    rr = run(*base, "--rerank", "--k1", 8, "--k2", 3)
    assert rr.exit_code == 0, rr.output
    reranked = json.loads(rr.stdout)
    # the reference: rank every gallery item by the dense final distance, then the usual metrics
    from clipret import metrics

    q, g = artifacts.load_embeddings(t / "q.npy"), artifacts.load_embeddings(t / "g.npy")
    final = ref_k_reciprocal_rerank(q.vectors, g.vectors, k1=8, k2=3, lam=0.1)  # the default --lambda
    ranked = np.array([sorted(range(len(g)), key=lambda j: (final[i, j], j)) for i in range(len(q))])
    ql, gl = [i.split("/")[0] for i in q.ids], [i.split("/")[0] for i in g.ids]
    want = metrics.evaluate_full(np.array(ql), np.array(gl), ranked, [1, 5])
    for key in ("recall@1", "map@5", "map", "map@r"):
        assert reranked[key] == pytest.approx(want[key], abs=1e-9), key
    assert reranked != plain
    for extra in (["--qe", 3], ["--qe", 3, "--qe-alpha", 2], ["--dba", 2]):
        r = run(*base, *extra)
        assert r.exit_code == 0, r.output
        assert set(json.loads(r.stdout)) == set(plain)


def test_dba_at_embed_time_is_recorded_and_not_applied_twice(embedded):
    t = embedded
    g = artifacts.load_embeddings(t / "g.npy")
    artifacts.save_embeddings(t / "gd.npy", apply_dba(np.asarray(g.vectors), 2), g.ids, fingerprint="m", flags={"dba": 2})
    r = run("query", t / "q.npy", "--gallery", t / "gd.npy", "--dba", 2)
    assert r.exit_code == 2 and "already" in r.output
    r = run("query", t / "q.npy", "--gallery", t / "gd.npy", "--out", t / "r.json")
    assert r.exit_code == 0
    r2 = run("query", t / "q.npy", "--gallery", t / "g.npy", "--dba", 2, "--out", t / "r2.json")
    assert r2.exit_code == 0, r2.output
    a, b = (json.loads((t / n).read_text()) for n in ("r.json", "r2.json"))
    assert [x["samples"] for x in a] == [x["samples"] for x in b]


def test_query_and_evaluate_with_stages_never_import_torch(embedded):
    t = embedded
    code = (
        "import sys\n"
        "from clipret.cli import app\n"
        f"args = ['query', {str(t / 'q.npy')!r}, '--gallery', {str(t / 'g.npy')!r}, '--rerank', '--k1', '8', '--qe', '2',"
        f" '--dba', '2', '--out', {str(t / 'r.json')!r}]\n"
        "try:\n    app(args)\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"args = ['evaluate', '--query', {str(t / 'q.npy')!r}, '--gallery', {str(t / 'g.npy')!r}, '--rerank', '--json']\n"
        "try:\n    app(args)\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no-torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no-torch")


# ----------------------------------------------------------------------------- index galleries

pytest.importorskip("faiss")


def test_query_and_evaluate_on_a_flat_index_equal_the_npy_gallery(embedded):
    t = embedded
    r = run("index", t / "g.npy", "--out", t / "g.faiss", "--type", "flat")
    assert r.exit_code == 0, r.output
    for extra in ([], ["--qe", 3], ["--rerank", "--k1", 8, "--k2", 3]):
        a = run("query", t / "q.npy", "--gallery", t / "g.npy", "--k", 5, "--out", t / "a.json", *extra)
        b = run("query", t / "q.npy", "--gallery", t / "g.faiss", "--k", 5, "--out", t / "b.json", *extra)
        assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
        ra, rb = (json.loads((t / n).read_text()) for n in ("a.json", "b.json"))
        assert [x["samples"] for x in ra] == [x["samples"] for x in rb], extra
        np.testing.assert_allclose([x["scores"] for x in ra], [x["scores"] for x in rb], atol=1e-5)
    side = json.loads((t / "b.json.json").read_text())
    assert side["gallery"]["path"].endswith("g.faiss")
    r = run("evaluate", t / "b.json")  # the sidecar names the index as the gallery; labels from the ids
    assert r.exit_code == 0, r.output
    r = run("evaluate", "--query", t / "q.npy", "--gallery", t / "g.faiss", "--k", 1, 5, "--json")
    assert r.exit_code == 0, r.output
    on_index = json.loads(r.stdout)
    full = json.loads(run("evaluate", "--query", t / "q.npy", "--gallery", t / "g.npy", "--k", 1, 5, "--json").stdout)
    for key in ("recall@1", "recall@5", "map@5", "map@r"):
        assert on_index[key] == pytest.approx(full[key]), key


def test_index_query_options_and_refusals(embedded):
    t = embedded
    assert run("index", t / "g.npy", "--out", t / "h.faiss", "--type", "hnsw").exit_code == 0
    r = run("query", t / "q.npy", "--gallery", t / "h.faiss", "--ef-search", 64, "--k", 3, "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    r = run("query", t / "q.npy", "--gallery", t / "h.faiss", "--dba", 2)
    assert r.exit_code == 2 and "embed --dba" in r.output
    r = run("query", t / "q.npy", "--gallery", t / "g.npy", "--nprobe", 4)
    assert r.exit_code == 2 and "tune an index" in r.output


def test_reranked_evaluation_holds_about_one_score_block(tmp_path):
    """The real peak of `evaluate --rerank` per chunk, at the default block sizing scaled down to 4 MB."""
    import tracemalloc

    from clipret.evaluation import chunk_rows, evaluate_scores, score_chunks

    g, q = _clustered(20_000, 16, 50, seed=11), _clustered(400, 16, 50, seed=12)
    block = 4 * 2**20
    rows = chunk_rows(len(g), block)
    fn = score_function(q, g, Stages(rerank=True, k1=8, k2=3), rows)  # prepares the batch (not measured)
    g_codes = np.arange(len(g)) % 50
    tracemalloc.start()
    try:
        evaluate_scores(score_chunks(fn, np.arange(len(q)) % 50, rows), g_codes, [1, 5], workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    counter = 21 * len(g)  # RankCounter's scratch
    assert peak <= 1.6 * block + counter, f"peak {peak / 2**20:.1f} MiB for a {block / 2**20:.0f} MiB block"
