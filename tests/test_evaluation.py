import numpy as np
import pytest

from clipret import metrics
from clipret.artifacts import Embeddings
from clipret.errors import ClipretError
from clipret.evaluation import evaluate_embeddings, evaluate_results
from clipret.retrieval.ranking import full_ranking


def _unit(n, d, seed):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _data(seed=0, q=37, g=90, classes=6):
    rng = np.random.default_rng(seed)
    qids = [f"q{i}" for i in range(q)]
    gids = [f"g{i}" for i in range(g)]
    labels = {i: str(rng.integers(classes)) for i in qids + gids}
    return Embeddings(_unit(q, 8, seed + 1), qids), Embeddings(_unit(g, 8, seed + 2), gids), labels


def test_chunked_full_ranking_equals_one_chunk():
    q, g, labels = _data()
    whole = evaluate_embeddings(q, g, labels, [1, 5], max_scores=10**9)
    chunked = evaluate_embeddings(q, g, labels, [1, 5], max_scores=90 * 4)  # 4 queries per chunk
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], abs=1e-12), k
    direct = metrics.evaluate_full(np.array([labels[i] for i in q.ids]), np.array([labels[i] for i in g.ids]),
                                   full_ranking(q.vectors, g.vectors), [1, 5])
    assert whole["map"] == pytest.approx(direct["map"]) and whole["recall@5"] == pytest.approx(direct["recall@5"])


def test_results_mode_equals_full_ranking_on_shared_metrics():
    q, g, labels = _data(seed=3)
    ranked = full_ranking(q.vectors, g.vectors)
    results = [{"filename": qid, "samples": [g.ids[j] for j in row[:10]]} for qid, row in zip(q.ids, ranked)]
    top = evaluate_results(results, labels, g.ids, [1, 5, 10])
    full = evaluate_embeddings(q, g, labels, [1, 5, 10])
    for key in ("recall@1", "precision@5", "map@10", "recall@10"):
        assert top[key] == pytest.approx(full[key]), key


def test_results_with_unknown_ids_or_bad_k_are_user_errors():
    q, g, labels = _data()
    results = [{"filename": "q0", "samples": ["nope"]}]
    with pytest.raises(ClipretError, match="not in the gallery"):
        evaluate_results(results, labels, g.ids, [1])
    with pytest.raises(ClipretError, match="positive"):
        evaluate_results([{"filename": "q0", "samples": ["g1"]}], labels, g.ids, [0])
    with pytest.raises(ClipretError, match="have no label"):
        evaluate_results([{"filename": "zz", "samples": ["g1"]}], labels, g.ids, [1])
