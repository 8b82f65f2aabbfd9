"""Score retrieval: top-k lists from results.json, or full rankings from embeddings.

Numpy; torch only for score blocks a GPU made (their ranks are counted there,
:mod:`clipret.evaluation.device_ranks`). Metric definitions live in
:mod:`clipret.metrics`; this package maps ids to labels and streams the full
ranking over query chunks (:mod:`clipret.evaluation.stream`) so that memory
stays bounded at any gallery size.

Where post-processing plugs in: :func:`evaluate_embeddings` takes a
``score_fn(q0, q1) -> (q1 - q0, G)`` block of final scores (higher is
better); re-ranking or query expansion supply their own, and everything
downstream (ranks, metrics) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clipret import metrics
from clipret.artifacts import Embeddings
from clipret.data.layout import labels_for
from clipret.errors import ClipretError
from clipret.evaluation.ranks import RankCounter, relevant_ranks
from clipret.evaluation.stream import DEFAULT_BLOCK_BYTES, chunk_rows, evaluate_scores, score_chunks
from clipret.retrieval.scores import ScoreFn, matmul_scores

__all__ = [
    "evaluate_results",
    "evaluate_embeddings",
    "evaluate_scores",
    "label_codes",
    "score_chunks",
    "chunk_rows",
    "RankCounter",
    "relevant_ranks",
]


def evaluate_results(
    results: Sequence[Mapping[str, Any]],
    labels: Mapping[str, str],
    gallery_ids: Sequence[str],
    ks: Sequence[int],
    *,
    exclude: np.ndarray | None = None,
    return_per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score top-k lists. ``gallery_ids`` is the whole gallery (R is counted over it).

    ``exclude`` (Q,) int64, in the results' query order: the gallery row of
    each query's own item, or -1 (:mod:`clipret.retrieval.selfmatch`). It is
    taken out of the query's list (if it is there) and out of its R.
    ``return_per_query``: also return the (Q,) per-query values
    (:func:`clipret.metrics.evaluate_topk`), in the results' query order.
    """
    query_ids = [str(r["filename"]) for r in results]
    position = {g: i for i, g in enumerate(gallery_ids)}
    unknown = sorted({s for r in results for s in r["samples"] if s not in position})
    if unknown:
        raise ClipretError(f"{len(unknown)} result ids are not in the gallery (e.g. {unknown[0]}); check --labels/--gallery")
    own = np.full(len(results), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    lists = [[position[s] for s in r["samples"] if position[s] != o] for r, o in zip(results, own.tolist())]
    width = min((len(row) for row in lists), default=0)
    if width == 0:
        raise ClipretError("the results hold no retrieved samples")
    ks = _check_ks(ks, width)
    ranked = np.array([row[:width] for row in lists], dtype=np.int64)
    q_codes, g_codes = label_codes(query_ids, gallery_ids, labels)
    return metrics.evaluate_topk(q_codes, g_codes, ranked, ks, exclude=own, return_per_query=return_per_query)


def label_codes(query_ids: Sequence[str], gallery_ids: Sequence[str], labels: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Int64 label codes of the query (Q,) and gallery (G,) ids; equal labels get equal codes.

    A missing label is a :class:`ClipretError` (see :func:`labels_for`).
    Codes are assigned in first-seen order; only equality matters.
    """
    index: dict[str, int] = {}
    out = []
    for ids, what in ((query_ids, "query"), (gallery_ids, "gallery")):
        names = labels_for(ids, labels, what)
        out.append(np.fromiter((index.setdefault(n, len(index)) for n in names), dtype=np.int64, count=len(names)))
    return out[0], out[1]


def evaluate_embeddings(
    query: Embeddings,
    gallery: Embeddings,
    labels: Mapping[str, str],
    ks: Sequence[int],
    *,
    score_fn: ScoreFn | None = None,
    exclude: np.ndarray | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    return_per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score the full ranking of every query over the whole gallery.

    The default ranking is by cosine similarity (``query @ gallery.T``, the
    gallery read once per chunk of queries, from its memory map if it has
    one). ``score_fn(q0, q1)`` replaces it: it must return the (q1 - q0, G)
    final scores, higher is better, of queries q0..q1-1 against the whole
    gallery, for chunks of at most :func:`chunk_rows` (G, ``max_block_bytes``)
    rows. ``on_progress(n)`` is called after each chunk of n queries.

    Ties rank the lower gallery index first, as in ``clipret query``. Returns
    recall@k, precision@k, map@k per k (ks above G are dropped), n_queries,
    n_queries_without_relevant (R == 0, excluded from the means), map, map@r
    and r_precision; with ``return_per_query``, also the (Q,) per-query values
    (:func:`clipret.evaluation.stream.evaluate_scores`).
    """
    ks = _check_ks(ks, len(gallery))
    q_codes, g_codes = label_codes(query.ids, gallery.ids, labels)
    rows = chunk_rows(len(gallery), max_block_bytes)
    if score_fn is None:
        score_fn = matmul_scores(query.vectors, gallery.vectors, rows, to_host=False)  # GPU blocks stay there
    return evaluate_scores(score_chunks(score_fn, q_codes, rows), g_codes, ks, exclude=exclude, workers=workers,
                           on_progress=on_progress, return_per_query=return_per_query)


def _check_ks(ks: Sequence[int], width: int) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] <= 0:
        raise ClipretError(f"--k values must be positive, got {ks}")
    kept = [k for k in ks if k <= width]
    if not kept:
        raise ClipretError(f"every --k ({ks}) exceeds the {width} retrieved items per query")
    return kept
