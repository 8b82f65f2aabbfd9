"""Rank counting on the score block's own device (clipret/evaluation/device_ranks.py), run here on
the CPU device: against the slow definition (tests/reference_ranks.py), ties and left-out own items
included, and through evaluate_scores against the numpy path (RankCounter) and the slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipret.evaluation import evaluate_scores, score_chunks
from clipret.evaluation import device_ranks
from clipret.evaluation.device_ranks import DeviceMembers, block_ranks
from clipret.retrieval import scores as scores_mod
from reference_ranks import ref_evaluate_scores, ref_rank_of


def slow_ranks(scores, q_codes, g_codes, own):
    """Sorted 1-based ranks of each query's relevant items, its own item deleted first; and R."""
    ranks, n_rel = [], []
    for q, row in enumerate(scores.tolist()):
        keep = [i for i in range(len(row)) if i != own[q]]
        kept = [row[i] for i in keep]
        found = sorted(ref_rank_of(kept, n) + 1 for n, i in enumerate(keep) if g_codes[i] == q_codes[q])
        ranks += found
        n_rel.append(len(found))
    return ranks, n_rel


@pytest.mark.parametrize("spread", [0, 1, 7])  # items below every relevant one: row bin 0, or spare bins
@pytest.mark.parametrize("seed", range(6))
def test_block_ranks_equal_the_definition_with_heavy_ties(seed, spread, monkeypatch):
    monkeypatch.setattr(device_ranks, "HOT_BIN_SPREAD", spread)
    rng = np.random.default_rng(seed)
    n, g = int(rng.integers(1, 14)), int(rng.integers(1, 80))
    scores = np.round(rng.standard_normal((n, g)), 1).astype(np.float32)  # ~30 distinct values: ties everywhere
    g_codes = rng.integers(0, 4, g)
    q_codes = rng.integers(0, 6, n)  # codes 4 and 5: no gallery item, R = 0
    own = np.where(rng.random(n) < 0.5, rng.integers(0, g, n), -1)
    got, n_rel = block_ranks(torch.tensor(scores), q_codes, DeviceMembers(g_codes, "cpu"), own)
    want, want_rel = slow_ranks(scores, q_codes, g_codes, own)
    assert n_rel.tolist() == want_rel
    assert got.tolist() == want


@pytest.mark.parametrize("spread", [0, 3])
def test_block_ranks_for_large_classes_and_exact_duplicates(spread, monkeypatch):
    monkeypatch.setattr(device_ranks, "HOT_BIN_SPREAD", spread)
    rng = np.random.default_rng(11)
    g_codes = rng.integers(0, 3, 400)  # R ~ 130 per query: beyond RankCounter's direct path too
    scores = rng.standard_normal((9, 400)).astype(np.float32)
    scores[:, 200:260] = scores[:, 100:160]  # exact ties between relevant and other items
    q_codes = rng.integers(0, 3, 9)
    own = np.array([5, -1, 399, 0, -1, 17, 200, 100, -1])
    got, n_rel = block_ranks(torch.tensor(scores), q_codes, DeviceMembers(g_codes, "cpu"), own)
    want, want_rel = slow_ranks(scores, q_codes, g_codes, own)
    assert n_rel.tolist() == want_rel and got.tolist() == want


def test_block_ranks_refuse_scores_that_cannot_rank():
    members = DeviceMembers(np.array([0, 0, 1]), "cpu")
    for bad in (np.nan, np.inf):
        block = torch.tensor([[0.1, bad, 0.3]])
        with pytest.raises(ValueError, match="finite"):
            block_ranks(block, np.array([1]), members)
        # a row with nothing to rank (its label is not in the gallery) is not checked, as in RankCounter
        assert [a.tolist() for a in block_ranks(torch.tensor([[0.1, bad, 0.3]]), np.array([7]), members)] == [[], [0]]
    # a left-out own item may be the only relevant one: no rank, R = 0
    ranks, n_rel = block_ranks(torch.tensor([[0.1, 0.2, 0.3]]), np.array([1]), members, np.array([2]))
    assert ranks.size == 0 and n_rel.tolist() == [0]


def test_evaluation_counts_ranks_on_the_device_when_the_blocks_stay_there():
    rng = np.random.default_rng(5)
    q, g = rng.standard_normal((37, 8)).astype(np.float32), rng.standard_normal((120, 8)).astype(np.float32)
    g[60:70] = g[10:20]  # duplicate gallery rows: tied scores
    q[:5] = g[:5]
    q_codes, g_codes = rng.integers(0, 5, 37), rng.integers(0, 4, 120)  # code 4: R = 0
    own = np.where(np.arange(37) < 5, np.arange(37), -1)
    device_fn = scores_mod.device_matmul_scores(q, g, 10, "cpu", to_host=False)
    assert isinstance(device_fn(0, 3), torch.Tensor)
    numpy_fn = scores_mod.matmul_scores(q, g, 10, device="cpu")
    ks = [1, 5, 10]
    got, got_per = evaluate_scores(score_chunks(device_fn, q_codes, 10), g_codes, ks, exclude=own, return_per_query=True)
    want, want_per = evaluate_scores(score_chunks(numpy_fn, q_codes, 10), g_codes, ks, exclude=own, return_per_query=True)
    assert got == pytest.approx(want)
    assert got_per.keys() == want_per.keys()
    for name in want_per:
        np.testing.assert_allclose(got_per[name], want_per[name], err_msg=name)
    slow = ref_evaluate_scores((q @ g.T).tolist(), q_codes.tolist(), g_codes.tolist(), ks, own=own.tolist())
    assert got == pytest.approx(slow)
    assert got["n_queries_without_relevant"] == int(np.isin(q_codes, g_codes, invert=True).sum()) > 0


def test_the_evaluation_and_the_api_keep_device_blocks_on_the_device(tmp_path, monkeypatch):
    """Where the score blocks come from a torch device (here "cpu:0", standing in for a GPU), the
    full-ranking evaluation gets them as tensors (no copy to numpy) and counts ranks there, through
    evaluate_embeddings and through clipret.evaluate with QE; the metrics equal the numpy path's."""
    import clipret
    from clipret import artifacts
    from clipret.evaluation import device_ranks, evaluate_embeddings

    rng = np.random.default_rng(8)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"c{i % 5}/{i}.png" for i in range(60)]
    path = tmp_path / "x.npy"
    artifacts.save_embeddings(path, x, ids, fingerprint="fp")
    emb, labels = clipret.Embeddings.load(path), {i: i.split("/")[0] for i in ids}
    want = evaluate_embeddings(emb, emb, labels, [1, 5], exclude=np.arange(60))
    want_qe = clipret.evaluate(path, path, labels=labels, k=(1, 5), qe=3)

    counted = []
    real = device_ranks.block_rank_parts
    monkeypatch.setattr(device_ranks, "block_rank_parts", lambda block, *a: counted.append(type(block)) or real(block, *a))
    monkeypatch.setattr(scores_mod, "search_device", lambda work, min_work: "cpu:0")
    got = evaluate_embeddings(emb, emb, labels, [1, 5], exclude=np.arange(60))
    assert counted and set(counted) == {torch.Tensor}
    assert got == pytest.approx(want)
    counted.clear()
    assert clipret.evaluate(path, path, labels=labels, k=(1, 5), qe=3) == pytest.approx(want_qe)
    assert counted and set(counted) == {torch.Tensor}


def test_slices_of_a_block_and_of_its_ranks_give_the_same_answers(monkeypatch):
    """A block is counted in row slices (bounded device memory), and its ranks reach the metrics in
    runs of whole queries (bounded host memory); neither changes a number."""
    from clipret.evaluation import device_ranks, stream

    rng = np.random.default_rng(12)
    q, g = rng.standard_normal((41, 8)).astype(np.float32), rng.standard_normal((150, 8)).astype(np.float32)
    q_codes, g_codes = rng.integers(0, 4, 41), rng.integers(0, 3, 150)
    own = np.where(rng.random(41) < 0.3, rng.integers(0, 150, 41), -1)
    members = DeviceMembers(g_codes, "cpu")
    whole = block_ranks(torch.tensor(q @ g.T), q_codes, members, own)
    monkeypatch.setattr(device_ranks, "SLICE_ITEMS", 150 * 4)  # 4 rows a slice
    parts = list(device_ranks.block_rank_parts(torch.tensor(q @ g.T), q_codes, members, own))
    assert len(parts) == 11 and [p[1].size for p in parts] == [4] * 10 + [1]
    assert np.concatenate([p[0] for p in parts]).tolist() == whole[0].tolist()
    assert np.concatenate([p[1] for p in parts]).tolist() == whole[1].tolist()
    fn = scores_mod.device_matmul_scores(q, g, 20, "cpu", to_host=False)
    want = evaluate_scores(score_chunks(fn, q_codes, 20), g_codes, [1, 5], exclude=own, return_per_query=True)
    monkeypatch.setattr(stream, "_HITS_PER_BATCH", 60)  # ~1 query of R ~ 50 per run
    got = evaluate_scores(score_chunks(fn, q_codes, 20), g_codes, [1, 5], exclude=own, return_per_query=True)
    assert got[0] == pytest.approx(want[0])
    for name in want[1]:
        np.testing.assert_allclose(got[1][name], want[1][name], err_msg=name)
    sliced = stream._sliced(*whole, [1, 5])
    assert len(sliced) > 5 and sum(r.size for _, r in sliced) == 41
