"""What a loaded FAISS index must be to match its sidecar (class, metric, dim, count, labels).

:func:`check_index` runs on every load (:func:`clipret.artifacts.index.read_index_pair`), after
the bytes' hash: an index whose structure disagrees with the sidecar is refused in one line, so
a search never returns a row the sidecar does not have.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from clipret.errors import ClipretError

__all__ = ["INDEX_CLASSES", "check_index", "faiss_class", "metric_name"]

INDEX_CLASSES = {"flat": "IndexFlatIP", "hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ"}


def faiss_class(index: Any) -> str:
    """The class ``faiss.read_index`` gives ``index`` back as (a flat index reads back as IndexFlatIP or IndexFlatL2)."""
    import faiss

    name = type(faiss.downcast_index(index)).__name__
    if name == "IndexFlat":
        return {faiss.METRIC_INNER_PRODUCT: "IndexFlatIP", faiss.METRIC_L2: "IndexFlatL2"}.get(index.metric_type, name)
    return name


def metric_name(metric_type: int) -> str:
    import faiss

    return {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(metric_type, f"faiss metric {metric_type}")


def check_index(index: Any, meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse, in one line, a loaded ``index`` that does not match its sidecar ``meta``.

    Checks the class for the sidecar's ``type``, the inner-product metric, dim, the vector count
    (live ids + HNSW tombstones = ``label_count`` - IVF holes = ``ntotal``) and the labels: every
    IVF list entry a live label below ``label_count``, each once. Flat and HNSW labels are positions
    below ``ntotal`` (FAISS's reader checks HNSW links).
    """
    import faiss
    import numpy as np

    def refuse(what: str) -> NoReturn:
        raise ClipretError(f"{path} {what}; rebuild the index")

    kind, cls, metric = meta.get("type"), type(index).__name__, metric_name(index.metric_type)
    if cls != INDEX_CLASSES.get(kind) or meta.get("faiss_class", cls) != cls:
        said = meta["faiss_class"] if cls == INDEX_CLASSES.get(kind) else f"a {kind} index ({INDEX_CLASSES.get(kind)})"
        refuse(f"is a FAISS {cls} but its sidecar describes {said}")
    if metric != "inner_product" or meta.get("metric", metric) != metric:
        refuse(f"uses the {metric} metric (its sidecar says {meta.get('metric')}), not the inner product")
    if index.d != meta.get("dim"):
        refuse(f"has dim {index.d} but its sidecar says {meta.get('dim')}")
    label_count = meta.get("label_count")
    try:
        gone = [np.asarray(meta.get(k, []), dtype=np.int64).reshape(-1) for k in ("holes", "tombstones")]
    except (TypeError, ValueError):
        refuse("has a sidecar whose holes or tombstones are not lists of labels")
    live = len(meta["ids"])
    stored = live + gone[1].size  # tombstoned vectors stay in an HNSW graph
    if (not isinstance(label_count, int) or meta.get("count") != live or label_count - gone[0].size != stored
            or index.ntotal != stored or meta.get("ntotal", stored) != stored
            or any(g.size and (g.min() < 0 or g.max() >= label_count or np.unique(g).size != g.size) for g in gone)):
        refuse(f"holds {index.ntotal} vectors but its sidecar accounts for {stored} ({live} ids, {gone[1].size} tombstones)")
    if kind in ("ivf", "ivfpq"):
        lists, seen, total = faiss.extract_index_ivf(index).invlists, np.zeros(label_count, dtype=bool), 0
        for i in range(lists.nlist):
            n = lists.list_size(i)
            labels = faiss.rev_swig_ptr(lists.get_ids(i), n) if n else np.zeros(0, dtype=np.int64)
            bad = labels[(labels < 0) | (labels >= label_count)]
            if bad.size:
                refuse(f"stores label {bad[0]}, which is no row of its sidecar (0 to {label_count - 1})")
            seen[labels] = True
            total += n
        if total != index.ntotal or int(seen.sum()) != total or seen[gone[0]].any():
            refuse("stores a label twice, or one its sidecar lists as removed")
