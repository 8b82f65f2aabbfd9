"""Per-class metrics and the worst queries, from the per-query values an evaluation already has.

Pure numpy over the ``per_query`` dict that :func:`clipret.metrics.evaluate_topk` and
:func:`clipret.evaluation.stream.evaluate_scores` return with ``return_per_query=True``: (Q,)
arrays ``map@r`` (when known), ``map`` or ``map@k``, ``n_relevant`` and ``first_hit_rank``
(1-based, 0 for no relevant item in the list). Nothing is recomputed from the rankings.

A query with no relevant gallery item (R == 0) is left out here as it is from every mean of
the summary, so the query-weighted mean of a class column equals the summary's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ap_name", "per_class", "worst_queries"]


def ap_name(per_query: Mapping[str, np.ndarray]) -> str:
    """The per-query AP used to rank queries: ``"map"`` (AP over the full ranking) when known,
    else ``"map@k"`` (AP@k) at the deepest cut-off k that was scored."""
    if "map" in per_query:
        return "map"
    depths = [int(name.split("@")[1]) for name in per_query if name.startswith("map@") and name != "map@r"]
    if not depths:
        raise ValueError("per_query holds no AP: neither 'map' nor any 'map@k'")
    return f"map@{max(depths)}"


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def per_class(labels: Sequence[str], per_query: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per query class, worst first: ``{"class", "n_queries", "recall@1", "map@r"}``.

    labels: (Q,) the label of each query, in the per-query order. ``n_queries`` counts the
    class's queries with R > 0 (the ones its means are over); a class with none is left out.
    ``map@r`` is None when the lists were too short to give it. Sorted by MAP@R, then R@1
    (both ascending), then class name.
    """
    names = np.asarray(labels, dtype=object)
    n_rel = np.asarray(per_query["n_relevant"])
    if names.shape != n_rel.shape:
        raise ValueError(f"need one label per query: {names.shape} labels for {n_rel.shape} queries")
    counted = n_rel > 0
    classes, group = np.unique(names[counted].astype(str), return_inverse=True)
    group = group.reshape(-1)
    count = np.bincount(group, minlength=classes.size)
    hit1 = (np.asarray(per_query["first_hit_rank"])[counted] == 1).astype(np.float64)
    r1 = np.bincount(group, weights=hit1, minlength=classes.size) / np.maximum(count, 1)
    has_map_r = "map@r" in per_query
    map_r = (np.bincount(group, weights=np.asarray(per_query["map@r"], dtype=np.float64)[counted], minlength=classes.size)
             / np.maximum(count, 1)) if has_map_r else np.full(classes.size, np.nan)
    order = np.lexsort((classes, r1, np.nan_to_num(map_r, nan=0.0)))
    return [{"class": str(classes[i]), "n_queries": int(count[i]), "recall@1": float(r1[i]),
             "map@r": _none_if_nan(float(map_r[i])) if has_map_r else None} for i in order]


def worst_queries(ids: Sequence[str], labels: Sequence[str], per_query: Mapping[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """The ``n`` queries with the lowest AP (:func:`ap_name`), ties by query id:
    ``{"id", "label", "ap", "first_hit_rank"}`` (rank 1-based; None when the list holds no hit).

    ids, labels: (Q,) in the per-query order. Queries with R == 0 have no AP and are left out.
    """
    if n <= 0:
        return []
    ap = np.asarray(per_query[ap_name(per_query)], dtype=np.float64)
    first = np.asarray(per_query["first_hit_rank"])
    keep = np.flatnonzero(np.asarray(per_query["n_relevant"]) > 0)
    id_arr = np.asarray(ids, dtype=object)
    if id_arr.shape != ap.shape or len(labels) != ap.size:
        raise ValueError(f"need one id and one label per query: {id_arr.shape}, {len(labels)} for {ap.shape}")
    order = keep[np.lexsort((id_arr[keep].astype(str), ap[keep]))][:n]
    return [{"id": str(ids[i]), "label": str(labels[i]), "ap": float(ap[i]),
             "first_hit_rank": int(first[i]) if first[i] > 0 else None} for i in order]
