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


# ---------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017), clipret.retrieval.rerank.
#
# Items are ordered [queries..., gallery...]. Every neighbour list sorts by
# ascending (normalised) distance, ties -> lower item index. Both functions
# return the (Q, G) final distances; rank a query's gallery ascending, ties ->
# lower gallery index.
# ---------------------------------------------------------------------------


def _ref_reciprocal(rank, i, length):
    """Items j in i's first ``length`` neighbours that also have i in their first ``length``."""
    return [j for j in rank[i][:length] if i in rank[j][:length]]


def ref_k_reciprocal_rerank(query, gallery, k1=20, k2=6, lam=0.3):
    """The paper's algorithm over all Q+G items, one item and one pair at a time (float64)."""
    import numpy as np

    x = [np.asarray(v, dtype=np.float64) for v in list(query) + list(gallery)]
    n, nq = len(x), len(query)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = x[i] - x[j]
            dist[i, j] = float(diff @ diff)  # squared Euclidean distance
    for i in range(n):  # each row divided by its largest distance to any of the Q+G items
        top = max(dist[i])
        dist[i] = dist[i] / top if top > 0 else 0.0
    rank = [sorted(range(n), key=lambda j: (dist[i, j], j)) for i in range(n)]  # self first (distance 0)

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2.0)) + 1  # numpy rounds half to even
    for i in range(n):
        recip = _ref_reciprocal(rank, i, k1 + 1)
        expanded = set(recip)
        for c in recip:
            cand = _ref_reciprocal(rank, c, half)
            overlap = len(set(cand) & set(recip))
            if overlap > 2.0 / 3.0 * len(cand):
                expanded |= set(cand)
        weights = {j: math.exp(-dist[i, j]) for j in expanded}
        total = sum(weights.values())
        for j, w in weights.items():
            v[i, j] = w / total

    if k2 != 1:  # local query expansion: mean of V over the first k2 neighbours (self included)
        v_qe = np.zeros((n, n))
        for i in range(n):
            rows = rank[i][:k2]
            for r in rows:
                v_qe[i] += v[r]
            v_qe[i] /= len(rows)
        v = v_qe

    final = np.zeros((nq, n - nq))
    for qi in range(nq):
        for gj in range(n - nq):
            j = nq + gj
            smin = sum(min(v[qi, c], v[j, c]) for c in range(n))
            smax = sum(max(v[qi, c], v[j, c]) for c in range(n))
            jaccard = 1.0 - smin / smax
            final[qi, gj] = (1.0 - lam) * jaccard + lam * dist[qi, j]
    return final


def dense_k_reciprocal_rerank(query, gallery, k1=20, k2=6, lam=0.3):
    """The same algorithm in the classic dense shape: (Q+G)^2 float32 matrices, one loop per item.

    This is the baseline bench/rerank.py measures against (memory grows as (Q+G)^2).
    """
    import numpy as np

    x = np.concatenate([np.asarray(query, np.float32), np.asarray(gallery, np.float32)])
    n, nq = x.shape[0], len(query)
    dist = x @ x.T  # squared distance of unit vectors: 2 - 2 cos
    dist *= -2.0
    dist += 2.0
    np.maximum(dist, 0.0, out=dist)
    top = dist.max(axis=1, keepdims=True)
    top[top == 0] = 1.0
    dist /= top
    rank = np.argsort(dist, axis=1, kind="stable").astype(np.int32)  # ties -> lower item index

    half = int(np.around(k1 / 2.0)) + 1
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        fwd = rank[i, : k1 + 1]
        back = rank[fwd, : k1 + 1]
        recip = fwd[np.where(back == i)[0]]
        expanded = recip
        for c in recip:
            c_fwd = rank[c, :half]
            c_back = rank[c_fwd, :half]
            c_recip = c_fwd[np.where(c_back == c)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3.0 * len(c_recip):
                expanded = np.append(expanded, c_recip)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / np.sum(w)
    dist = dist[:nq]
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    del rank
    inv = [np.where(v[:, j] != 0)[0] for j in range(n)]  # inverted index: rows using column j
    jaccard = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):
        smin = np.zeros(n, dtype=np.float32)
        cols = np.where(v[i] != 0)[0]
        for j in cols:
            smin[inv[j]] += np.minimum(v[i, j], v[inv[j], j])
        jaccard[i] = 1.0 - smin / (2.0 - smin)
    final = jaccard * (1.0 - lam) + dist * lam
    return final[:, nq:]
