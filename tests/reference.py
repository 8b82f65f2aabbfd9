"""Slow, obvious reference implementations used by the tests.

Everything here is plain Python written straight from the textbook definition,
one query and one rank at a time, and shares no code with the package, so that
the fast vectorised versions in ``clipret`` can be checked against it.
"""

import math

# ---------------------------------------------------------------------------
# Retrieval metrics (clipret.metrics).
#
# ranked_labels: list (one per query) of lists of gallery labels, best first.
# query_labels:  list of each query's label.
# n_relevant:    list of R, the number of gallery items with the query's label
#                in the WHOLE gallery. Queries with R == 0 are skipped.
# A mean over no query is nan.
# ---------------------------------------------------------------------------


def ref_count_relevant(query_labels, gallery_labels):
    counts = []
    for q in query_labels:
        n = 0
        for g in gallery_labels:
            if g == q:
                n += 1
        counts.append(n)
    return counts


def _mean(values):
    if not values:
        return math.nan
    return sum(values) / len(values)


def _precision_at(ranked, label, i):
    """Precision of the first i items (i >= 1)."""
    hits = 0
    for j in range(i):
        if ranked[j] == label:
            hits += 1
    return hits / i


def ref_recall_at_k(ranked_labels, query_labels, n_relevant, k):
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        found = 0.0
        for j in range(k):
            if ranked[j] == label:
                found = 1.0
        scores.append(found)
    return _mean(scores)


def ref_precision_at_k(ranked_labels, query_labels, n_relevant, k):
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        scores.append(_precision_at(ranked, label, k))
    return _mean(scores)


def _sum_precision(ranked, label, depth):
    """sum over ranks i = 1..depth of P@i * rel_i."""
    total = 0.0
    for i in range(1, depth + 1):
        if ranked[i - 1] == label:
            total += _precision_at(ranked, label, i)
    return total


def ref_map_at_k(ranked_labels, query_labels, n_relevant, k):
    """AP@k = sum_{i<=k} P@i * rel_i / min(k, R)."""
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        scores.append(_sum_precision(ranked, label, k) / min(k, r))
    return _mean(scores)


def ref_map(ranked_labels, query_labels, n_relevant):
    """Full-ranking AP = sum over the whole list of P@i * rel_i / R."""
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        scores.append(_sum_precision(ranked, label, len(ranked)) / r)
    return _mean(scores)


def ref_map_at_r(ranked_labels, query_labels, n_relevant):
    """MAP@R = sum_{i<=R} P@i * rel_i / R."""
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        scores.append(_sum_precision(ranked, label, r) / r)
    return _mean(scores)


def ref_r_precision(ranked_labels, query_labels, n_relevant):
    """(#relevant in the top R) / R."""
    scores = []
    for ranked, label, r in zip(ranked_labels, query_labels, n_relevant):
        if r == 0:
            continue
        scores.append(_precision_at(ranked, label, r))
    return _mean(scores)


# ---------------------------------------------------------------------------
# Pooling, schedule, search, sampler checks.
# ---------------------------------------------------------------------------


def ref_gem(x, p, eps=1e-6):
    """GeM over tokens of a nested list x[b][n][c] -> out[b][c], one number at a time."""
    out = []
    for tokens in x:
        row = []
        for c in range(len(tokens[0])):
            total = 0.0
            for tok in tokens:
                total += max(tok[c], eps) ** p
            row.append((total / len(tokens)) ** (1.0 / p))
        out.append(row)
    return out


def ref_warmup_cosine(step, total, warmup):
    """The LR multiplier of optimiser step ``step`` (0-based), from the schedule's definition.

    Warmup: a straight ramp that is 1/warmup at step 0 (the first step
    already moves) and reaches 1 at the last warmup step, ``warmup - 1``.
    Then half a cosine, from 1 down to 0, spread over the ``total - warmup``
    remaining steps (at least one), written here as cos² of half the angle
    turned so far: (1 + cos a) / 2 = cos²(a / 2).
    Past the end it stays at 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = total - warmup if total > warmup else 1
    into = step - warmup
    if into >= span:
        return 0.0
    angle = math.pi * into / span
    return math.cos(angle / 2) ** 2


def ref_topk(queries, gallery, k):
    """Top-k by dot product; ties go to the lower gallery index. Lists of lists in, lists out."""
    out_idx, out_scores = [], []
    for q in queries:
        scored = []
        for j, g in enumerate(gallery):
            scored.append((-sum(a * b for a, b in zip(q, g)), j))
        scored.sort()
        out_idx.append([j for _, j in scored[:k]])
        out_scores.append([-s for s, _ in scored[:k]])
    return out_scores, out_idx
