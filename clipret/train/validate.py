"""Per-epoch validation: leave-one-out retrieval within the held-out images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipret import metrics
from clipret.retrieval.ranking import full_ranking


def leave_one_out(vectors: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """R@1 and MAP@R when each (N, D) unit vector queries all the others.

    Images whose class has no other validation image are not counted.
    """
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
