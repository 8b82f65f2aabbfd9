"""Score retrieval: top-k lists from results.json, or full rankings from embeddings.

Pure numpy; never imports torch. Metric definitions live in
:mod:`clipret.metrics`; this module maps ids to labels and streams large
query sets in chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clipret import metrics
from clipret.artifacts import Embeddings
from clipret.data.layout import labels_for
from clipret.errors import ClipretError
from clipret.retrieval.ranking import full_ranking


def evaluate_results(
    results: Sequence[Mapping[str, Any]],
    labels: Mapping[str, str],
    gallery_ids: Sequence[str],
    ks: Sequence[int],
) -> dict[str, float]:
    """Score top-k lists. ``gallery_ids`` is the whole gallery (R is counted over it)."""
    query_ids = [str(r["filename"]) for r in results]
    position = {g: i for i, g in enumerate(gallery_ids)}
    unknown = sorted({s for r in results for s in r["samples"] if s not in position})
    if unknown:
        raise ClipretError(f"{len(unknown)} result ids are not in the gallery (e.g. {unknown[0]}); check --labels/--gallery")
    width = min((len(r["samples"]) for r in results), default=0)
    if width == 0:
        raise ClipretError("the results hold no retrieved samples")
    ks = _check_ks(ks, width)
    ranked = np.array([[position[s] for s in r["samples"][:width]] for r in results], dtype=np.int64)
    q_labels = labels_for(query_ids, labels, "query")
    g_labels = labels_for(gallery_ids, labels, "gallery")
    return metrics.evaluate_topk(np.array(q_labels), np.array(g_labels), ranked, ks)


def evaluate_embeddings(
    query: Embeddings,
    gallery: Embeddings,
    labels: Mapping[str, str],
    ks: Sequence[int],
    *,
    max_scores: int = 32_000_000,
) -> dict[str, float]:
    """Score the full cosine ranking of every query over the whole gallery.

    Queries are processed in chunks of at most ``max_scores // G`` rows; the
    per-chunk means are combined weighted by the queries each counted.
    """
    ks = _check_ks(ks, len(gallery))
    q_labels = np.array(labels_for(query.ids, labels, "query"))
    g_labels = np.array(labels_for(gallery.ids, labels, "gallery"))
    gal = np.asarray(gallery.vectors, dtype=np.float32)
    chunk = max(1, max_scores // max(1, len(gallery)))
    parts: list[tuple[int, dict[str, float]]] = []
    for start in range(0, len(query), chunk):
        q = np.asarray(query.vectors[start : start + chunk], dtype=np.float32)
        ranked = full_ranking(q, gal)
        part = metrics.evaluate_full(q_labels[start : start + chunk], g_labels, ranked, ks)
        parts.append((int(part["n_queries"] - part["n_queries_without_relevant"]), part))
    return _combine(parts)


def _combine(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    counted = sum(w for w, _ in parts)
    out: dict[str, float] = {}
    for key in parts[0][1]:
        if key in {"n_queries", "n_queries_without_relevant"}:
            out[key] = int(sum(p[key] for _, p in parts))
        elif counted:
            out[key] = float(sum(w * p[key] for w, p in parts if w) / counted)
        else:
            out[key] = float("nan")
    return out


def _check_ks(ks: Sequence[int], width: int) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] <= 0:
        raise ClipretError(f"--k values must be positive, got {ks}")
    kept = [k for k in ks if k <= width]
    if not kept:
        raise ClipretError(f"every --k ({ks}) exceeds the {width} retrieved items per query")
    return kept
