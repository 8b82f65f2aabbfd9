"""Slow, obvious references for query expansion and DBA (plain Python lists, one row at a time)."""

import math


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _normalised_sum(base, vectors, weights):
    total = list(base)
    for v, w in zip(vectors, weights):
        total = [t + w * x for t, x in zip(total, v)]
    norm = math.sqrt(sum(t * t for t in total))
    if norm == 0:
        return list(base)
    return [t / norm for t in total]


def ref_qe(queries, gallery, neighbors, scores=None, alpha=None):
    """Average QE (scores/alpha None) or alpha-QE; neighbour index -1 means none."""
    out = []
    for n, q in enumerate(queries):
        vectors, weights = [], []
        for m, j in enumerate(neighbors[n]):
            if j < 0:
                continue
            vectors.append(gallery[j])
            weights.append(1.0 if alpha is None else max(scores[n][m], 0.0) ** alpha)
        out.append(_normalised_sum(q, vectors, weights))
    return out


def ref_dba(gallery, n, alpha=None):
    """Each row + its top-n OTHER rows (higher dot product first, ties -> lower index)."""
    out = []
    for i, x in enumerate(gallery):
        others = [(-_dot(x, y), j) for j, y in enumerate(gallery) if j != i]
        others.sort()
        top = others[:n]
        vectors = [gallery[j] for _, j in top]
        weights = [1.0 if alpha is None else max(-s, 0.0) ** alpha for s, _ in top]
        out.append(_normalised_sum(x, vectors, weights))
    return out
