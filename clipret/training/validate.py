"""Per-epoch validation: leave-one-out retrieval within the held-out images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipret import metrics
from clipret.retrieval.ranking import full_ranking


def leave_one_out(vectors: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """R@1 and MAP@R when each (N, D) unit vector queries all the others.

    Images whose class has no other validation image are not counted. When a row is not finite
    (NaN or inf) nothing can be ranked (an argsort of NaNs keeps the index order, which would
    score as chance): returns ``{"val_nonfinite": rows not finite}`` instead, a failure.
    """
    bad = int(np.count_nonzero(~np.isfinite(vectors).all(axis=1)))
    if bad:
        return {"val_nonfinite": bad}
    labels_arr = np.asarray(labels)
    ranking = full_ranking(vectors, vectors)  # (N, N), self first unless tied
    self_col = ranking == np.arange(len(vectors))[:, None]
    ranking = ranking[~self_col].reshape(len(vectors), len(vectors) - 1)
    relevance = metrics.rank_relevance(labels_arr, labels_arr, ranking)
    n_rel = metrics.count_relevant(labels_arr, labels_arr) - 1
    return {
        "val_recall@1": metrics.recall_at_k(relevance, 1, n_rel),
        "val_map@r": metrics.map_at_r(relevance, n_rel),
    }
