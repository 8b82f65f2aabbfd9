"""Build, extend and shrink an index pair: the work behind ``clipret index``.

Labels: FAISS stores a 64-bit label per vector. clipret gives labels 0, 1, 2, ...
in the order vectors are added and never reuses one; the sidecar keeps
``label_count`` (the next label) and the ids of the live vectors in label
order, so a search result maps back to an id without any table in FAISS.

Removal (``--remove``) and its cost, by type:

* ``flat``: ``remove_ids`` deletes the rows and shifts the later ones down, so
  labels stay 0..N-1. Cost: one O(N·D) copy, then the whole index is rewritten.
* ``ivf``/``ivfpq``: ``remove_ids`` deletes the entries from their inverted
  lists (an O(N) scan of the lists); the removed labels become *holes* that
  are never reused. Memory is reclaimed; the index is rewritten.
* ``hnsw``: FAISS cannot remove from an HNSW graph, so removed labels become
  *tombstones*: the vectors stay in the graph (memory is not reclaimed, and
  they still route searches) and search filters them out with an
  ``IDSelector``. Cost: only the sidecar is rewritten (O(1) in the index
  size); each search pays a hash lookup per candidate, and recall falls as
  tombstones accumulate. Rebuild the index once they pass about 20% (``--info``
  shows the fraction).

Determinism: the training sample is drawn from ``--seed`` and FAISS's k-means
and PQ training are seeded with it, so flat, IVF and IVF-PQ builds give
byte-identical files for a fixed seed at any thread count. FAISS inserts into
an HNSW graph from several threads at once, so an HNSW build is byte-identical
only with ``--threads 1`` (its recall does not depend on the thread count).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipret import __version__
from clipret.artifacts.atomic import write_json
from clipret.artifacts.embeddings import Embeddings
from clipret.artifacts.index import (
    index_lock,
    read_index_pair,
    read_sidecar,
    sidecar_path,
    write_index_pair,
)
from clipret.errors import ClipretError
from clipret.progress import StageProgress
from clipret.retrieval.index import choice
from clipret.retrieval.index._faiss import import_faiss, numpy_method, to_gpu
from clipret.retrieval.index.source import (
    GallerySource,
    check_same_model,
    sample_rows,
)

ADD_CHUNK = 16384  # rows read, normalised and added at a time


def _noop(stage: str, done: int, total: int) -> None:
    pass


def new_index(plan: choice.IndexPlan, dim: int, seed: int) -> Any:
    """An empty (untrained) FAISS index for ``plan``, inner-product metric."""
    faiss = import_faiss()
    p = plan.params
    key = {"flat": "Flat", "hnsw": f"HNSW{p.get('m')}", "ivf": f"IVF{p.get('nlist')},Flat",
           "ivfpq": f"IVF{p.get('nlist')},PQ{p.get('m')}x{p.get('nbits')}"}[plan.type]
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if plan.type == "hnsw":
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
    elif plan.type in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.spherical = True  # centroids on the unit sphere, as the data
        ivf.cp.min_points_per_centroid = 1  # build_index warns about small samples itself, once
        ivf.nprobe = p["nprobe"]
        gpu_flat = to_gpu(faiss.IndexFlatIP(dim))  # k-means assignment on the GPU when faiss-gpu has one
        if gpu_flat is not None:
            ivf.clustering_index = gpu_flat
            index.referenced_objects = [gpu_flat]  # keep the Python object alive as long as the index
        if plan.type == "ivfpq":
            ivfpq = faiss.downcast_index(ivf)
            ivfpq.do_polysemous_training = False  # only helps Hamming-filtered search, which clipret does not use; slow
            ivfpq.pq.cp.seed = seed
            ivfpq.pq.cp.min_points_per_centroid = 1
            ivfpq.pq.cp.max_points_per_centroid = 64  # 16k rows train 256 codes well; more only costs time
    return index


def train_size(plan: choice.IndexPlan, n: int) -> int:
    """Rows in the k-means sample: 64 a cell, and at least 64·2^nbits for PQ (capped at ``n``)."""
    p = plan.params
    size = choice.TRAIN_POINTS_PER_LIST * p.get("nlist", 1)
    if plan.type == "ivfpq":
        size = max(size, 64 * 2 ** p["nbits"])
    return min(n, size)


def add_source(index: Any, kind: str, source: GallerySource, first_label: int, on_progress: StageProgress = _noop) -> int:
    """Add every row of ``source`` with labels ``first_label``, ...; return the next label."""
    label, total = first_label, len(source)
    on_progress("add", 0, total)
    for block in source.chunks(ADD_CHUNK):
        if kind in ("ivf", "ivfpq"):
            index.add_with_ids(np.asarray(block), np.arange(label, label + len(block), dtype=np.int64))
        else:  # flat and HNSW number rows sequentially; labels stay equal to their positions
            if index.ntotal != label:
                raise ClipretError("index labels are out of step with its sidecar; rebuild the index")
            index.add(np.asarray(block))
        label += len(block)
        on_progress("add", label - first_label, total)
    return label


def build_index(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    max_memory: int | None = None,
    seed: int = 0,
    allow_mismatch: bool = False,
    on_plan: Callable[[choice.IndexPlan, int, int], None] | None = None,
    on_progress: StageProgress = _noop,
    on_warning: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build an index pair at ``out`` from embeddings files/folders; return the sidecar.

    ``params`` holds the user's ``nlist, m, nbits, ef_construction, ef_search,
    nprobe`` (None = default). ``on_plan(plan, n, dim)`` is told the choice before
    any work starts.
    """
    source = GallerySource.open(inputs)
    for w in source.check(allow_mismatch=allow_mismatch):
        (on_warning or (lambda _: None))(w)
    n, dim = len(source), source.dim
    plan = choice.plan_index(kind, n, dim, dict(params or {}), max_memory)
    if on_plan is not None:
        on_plan(plan, n, dim)
    index = new_index(plan, dim, seed)
    if not index.is_trained:
        sample = source.rows(sample_rows(n, train_size(plan, n), seed))
        centroids = max(plan.params["nlist"], 2 ** plan.params.get("nbits", 0))
        if len(sample) < 39 * centroids and on_warning is not None:
            on_warning(f"only {len(sample)} vectors to train {centroids} centroids (FAISS advises {39 * centroids}); "
                       "recall may suffer: lower --nlist/--nbits or use --type flat")
        on_progress("train", 0, 1)
        index.train(np.asarray(sample))
        on_progress("train", 1, 1)
        del sample
    label_count = add_source(index, plan.type, source, 0, on_progress)
    sidecar = {
        "clipret_version": __version__, "type": plan.type,
        "params": {**plan.params, **({"seed": seed} if plan.type in ("ivf", "ivfpq") else {})},
        "metric": "inner_product", "dim": dim, "count": n,
        "model_fingerprint": source.fingerprint, "flags": source.flags,
        "root": _common_root(source.parts, None),
        # the rows equal one embeddings file's: a query set from that file is recognised as the same items
        "content_blake2b": source.parts[0].full_hash() if len(source.parts) == 1 else None,
        "label_count": label_count, "tombstones": [], "holes": [],
        "sources": [{"file": str(p.path), "count": len(p)} for p in source.parts],
        "ids": source.ids,
    }
    on_progress("write", 0, 1)
    meta = write_index_pair(out, index, sidecar)
    on_progress("write", 1, 1)
    return meta


def _common_root(parts: Sequence[Embeddings], root: str | None) -> str | None:
    """The folder every part's ids are relative to (and ``root``, the index's, if any), else None."""
    roots = {str(p.root) if p.root is not None else None for p in parts} | ({root} if root is not None else set())
    return roots.pop() if len(roots) == 1 else None


def add_to_index(
    index_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    allow_mismatch: bool = False,
    on_progress: StageProgress = _noop,
    on_warning: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Append the vectors and ids of ``inputs`` to an index pair; return the new sidecar.

    Raises :class:`ClipretError` for a dim that does not match, a different model
    fingerprint or flags (unless ``allow_mismatch``), or ids already in the index.
    """
    source = GallerySource.open(inputs)
    warnings = source.check(allow_mismatch=allow_mismatch)
    with index_lock(index_path):  # a second writer waits: it must read the sidecar this one writes
        meta = read_sidecar(index_path)
        if source.dim != meta["dim"]:
            raise ClipretError(f"{source.parts[0].path} has dim {source.dim} but the index {index_path} has dim {meta['dim']}; "
                               "add embeddings made with the index's model")
        for part in source.parts:
            warnings += check_same_model(part, meta.get("model_fingerprint"), meta.get("flags") or {}, str(index_path),
                                         allow_mismatch=allow_mismatch)
        present = set(meta["ids"])
        clash = [i for i in source.ids if i in present]
        if clash:
            raise ClipretError(f"{len(clash)} id(s) are already in {index_path} ({', '.join(clash[:3])}); "
                               "remove them first with --remove, or leave them out")
        for w in warnings:
            (on_warning or (lambda _: None))(w)
        index, meta = read_index_pair(index_path)
        label_count = add_source(index, meta["type"], source, meta["label_count"], on_progress)
        meta.update(clipret_version=__version__, count=meta["count"] + len(source), label_count=label_count,
                    ids=meta["ids"] + source.ids, root=_common_root(source.parts, meta.get("root")), content_blake2b=None,
                    sources=meta.get("sources", []) + [{"file": str(p.path), "count": len(p)} for p in source.parts])
        on_progress("write", 0, 1)
        meta = write_index_pair(index_path, index, meta)
    on_progress("write", 1, 1)
    return meta


def remove_from_index(index_path: str | os.PathLike[str], ids: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Remove ``ids`` from an index pair; return (new sidecar, the ids that were not in it).

    See the module docstring for what removal does and costs for each type.
    """
    with index_lock(index_path):  # a second writer waits: it must read the sidecar this one writes
        return _remove(index_path, ids)


def _remove(index_path: str | os.PathLike[str], ids: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    meta = read_sidecar(index_path)
    row_of = {i: r for r, i in enumerate(meta["ids"])}
    missing = [i for i in dict.fromkeys(ids) if i not in row_of]
    rows = np.array(sorted({row_of[i] for i in ids if i in row_of}), dtype=np.int64)
    if rows.size == 0:
        return meta, missing
    labels = live_labels(meta)[rows]
    keep = np.ones(len(meta["ids"]), dtype=bool)
    keep[rows] = False
    new_ids = [i for i, k in zip(meta["ids"], keep) if k]
    meta.update(clipret_version=__version__, count=len(new_ids), ids=new_ids, content_blake2b=None)
    if meta["type"] == "hnsw":  # tombstones: the index file does not change, only its sidecar
        meta["tombstones"] = sorted(set(meta["tombstones"]) | set(labels.tolist()))
        write_json(sidecar_path(index_path), meta)
        return meta, missing
    faiss = import_faiss()
    index, _ = read_index_pair(index_path)
    removed = numpy_method(index, "remove_ids")(faiss.IDSelectorBatch(labels))
    if removed != len(labels):
        raise ClipretError(f"{index_path} lost track of {len(labels) - removed} vector(s); rebuild the index")
    if meta["type"] == "flat":
        meta["label_count"] = int(index.ntotal)  # later rows shifted down: labels are positions again
    else:
        meta["holes"] = sorted(set(meta["holes"]) | set(labels.tolist()))
    return write_index_pair(index_path, index, meta), missing


def live_labels(meta: dict[str, Any]) -> np.ndarray:
    """(count,) int64: the FAISS label of each live id, in the sidecar's id order."""
    gone = np.array(sorted(set(meta.get("tombstones", [])) | set(meta.get("holes", []))), dtype=np.int64)
    labels = np.arange(meta["label_count"], dtype=np.int64)
    if gone.size:
        labels = np.delete(labels, gone)
    if labels.size != len(meta["ids"]):
        raise ClipretError(f"index sidecar lists {len(meta['ids'])} ids for {labels.size} live vectors; rebuild the index")
    return labels


def index_info(index_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``--info`` prints: everything in the sidecar but the ids, plus the index file's size in bytes
    (``file_bytes``; no faiss needed)."""
    meta = read_sidecar(index_path)
    gone = len(meta.get("tombstones", []))
    return {
        "path": str(Path(index_path)), "type": meta["type"], "count": meta["count"], "dim": meta["dim"],
        "file_bytes": int(meta["faiss_bytes"]), "model_fingerprint": meta.get("model_fingerprint"),
        "flags": meta.get("flags", {}), "params": meta.get("params", {}), "metric": meta.get("metric"),
        "tombstones": gone, "tombstone_fraction": round(gone / max(1, gone + meta["count"]), 4),
        "holes": len(meta.get("holes", [])), "clipret_version": meta.get("clipret_version"),
        "generation": meta.get("generation"), "sources": meta.get("sources", []),
        "faiss_class": meta.get("faiss_class"), "faiss_sha256": meta.get("faiss_sha256") or None,
    }

