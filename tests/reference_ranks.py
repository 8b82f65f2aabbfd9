"""Slow, obvious references for rank counting and full-ranking evaluation.

Plain Python, one item at a time, written from the definitions; shares no
code with ``clipret``.
"""

import math


def ref_rank_of(row, j):
    """0-based rank of item j in a score list: higher score first, ties -> lower index first."""
    n = 0
    for i, s in enumerate(row):
        if s > row[j] or (s == row[j] and i < j):
            n += 1
    return n


def ref_ranking(row):
    """Gallery indices of a score list, best first, by the same rule."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def ref_query_metrics(row, gallery_labels, label, ks):
    """Every metric of one query from its scores: a dict, or None when R == 0.

    AP-style values are sum of P@i over the relevant ranks i, each divided as
    its definition says: AP / R, AP@k / min(k, R), MAP@R over the top R / R.
    """
    ranked = [gallery_labels[i] for i in ref_ranking(row)]
    r = sum(1 for g in gallery_labels if g == label)
    if r == 0:
        return None
    hits, ap = 0, 0.0
    prec_sum_at, hits_at = {}, {}
    for i, g in enumerate(ranked, 1):
        if g == label:
            hits += 1
            ap += hits / i
        prec_sum_at[i] = ap
        hits_at[i] = hits
    out = {"map": ap / r, "map@r": prec_sum_at[r] / r, "r_precision": hits_at[r] / r}
    for k in ks:
        out[f"recall@{k}"] = 1.0 if hits_at[k] > 0 else 0.0
        out[f"precision@{k}"] = hits_at[k] / k
        out[f"map@{k}"] = prec_sum_at[k] / min(k, r)
    return out


def ref_evaluate_scores(score_rows, query_labels, gallery_labels, ks, own=None):
    """Means over the queries with R > 0 of :func:`ref_query_metrics`, plus the two counts.

    ``own[q]``: a gallery item (-1: none) that query q is scored without, as if
    that item were deleted from the gallery (out of its ranking and its R).
    """
    per = []
    for q, (row, label) in enumerate(zip(score_rows, query_labels)):
        keep = [i for i in range(len(row)) if own is None or i != own[q]]
        per.append(ref_query_metrics([row[i] for i in keep], [gallery_labels[i] for i in keep], label, ks))
    kept = [p for p in per if p is not None]
    keys = [f"{m}@{k}" for k in ks for m in ("recall", "precision", "map")] + ["map", "map@r", "r_precision"]
    out = {}
    for key in keys:
        out[key] = sum(p[key] for p in kept) / len(kept) if kept else math.nan
    out["n_queries"] = len(per)
    out["n_queries_without_relevant"] = len(per) - len(kept)
    return out

