"""Retrieval metrics as pure numpy functions (no torch).

Conventions shared by every function here:

* ``relevance``: ``(Q, K)`` bool array. ``relevance[q, j]`` is True when the
  j-th ranked gallery item for query ``q`` (best first, ``j = 0`` is rank 1)
  has the query's label.
* ``n_relevant``: ``(Q,)`` int array. ``R``, the number of gallery items with
  the query's label in the WHOLE gallery, not only in the top K.
* Queries with ``R == 0`` are excluded from every mean; the ``evaluate_*``
  functions report how many were excluded as ``n_queries_without_relevant``.
  ``recall_at_k``/``precision_at_k`` exclude them only when given ``n_relevant``.
  A mean over no query at all is ``nan``.
* ``P@i`` is the precision of the top ``i`` items; ``rel_i`` is 1 when the item
  at rank ``i`` is relevant. Ranks start at 1 in the formulas.

The definitions match pytorch-metric-learning's ``AccuracyCalculator`` for
``precision_at_1`` (= recall@1 = precision@1), ``r_precision``,
``mean_average_precision_at_r`` and full-ranking ``mean_average_precision``;
``map@k`` divides by ``min(k, R)``.

The formulas live once, in :mod:`clipret.metrics.from_ranks`, over the ranks
of the relevant items; :mod:`clipret.metrics.relevance` adapts relevance
matrices to them, and :mod:`clipret.evaluation` feeds them ranks counted
straight from score rows (no sorting of a whole gallery).
"""

from clipret.metrics.from_ranks import check_hit_ranks, first_hit_rank, per_query_metrics, summarize
from clipret.metrics.relevance import (
    count_relevant,
    encode_labels,
    evaluate_full,
    evaluate_topk,
    hit_ranks,
    map_at_k,
    map_at_r,
    mean_average_precision,
    precision_at_k,
    r_precision,
    rank_relevance,
    recall_at_k,
)

__all__ = [
    "recall_at_k",
    "precision_at_k",
    "map_at_k",
    "mean_average_precision",
    "map_at_r",
    "r_precision",
    "rank_relevance",
    "count_relevant",
    "encode_labels",
    "hit_ranks",
    "evaluate_topk",
    "evaluate_full",
    "check_hit_ranks",
    "first_hit_rank",
    "per_query_metrics",
    "summarize",
]
