"""Searching a FAISS index pair, and exact search through FAISS.

* :func:`open_index` reads ``gallery.faiss`` + ``gallery.faiss.json`` and gives
  an :class:`IndexGallery`: a :class:`IndexSearcher` (the ``Searcher``
  protocol), the live ids and the sidecar. Search results are rows into those
  ids, ranked by :func:`~clipret.retrieval.ranking.sort_neighbors`.
* :class:`FaissExactSearcher` is exact inner-product search with FAISS's
  blocked BLAS kernel over an (G, D) array (a memory map is read in place),
  and :func:`exact_searcher` picks it when faiss is installed, else the numpy
  :class:`~clipret.retrieval.search.ExactSearcher`, the reference.

Both return fewer than ``k`` real neighbours only when the index does (an IVF
query whose probed cells hold fewer than ``k`` vectors, say): the missing
places are padded with score ``-inf`` and row ``-1`` at the end of the row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret.artifacts.index import read_index_pair
from clipret.errors import ClipretError
from clipret.retrieval.index._faiss import (
    GPU_MAX_K,
    gpu_count,
    gpu_resources,
    have_faiss,
    import_faiss,
    numpy_method,
    set_threads,
    to_gpu,
)
from clipret.retrieval.index.build import live_labels
from clipret.retrieval.ranking import sort_neighbors
from clipret.retrieval.search import ExactSearcher, Searcher

QUERY_CHUNK = 4096  # queries per FAISS call (the progress callback's unit)


class IndexSearcher:
    """Search one loaded FAISS index; results are rows into the sidecar's live ids.

    ``nprobe`` (IVF types) and ``ef_search`` (HNSW) override the values stored
    at build time. ``gpu=None`` moves flat and IVF-flat indexes to GPU 0 when
    faiss-gpu sees one; the CPU copy stays for :meth:`vectors`.
    """

    exact = False  # an index's lists (approximate but for flat): re-ranking builds its graph through the index

    def __init__(self, index: Any, meta: dict[str, Any], *, nprobe: int | None = None, ef_search: int | None = None,
                 gpu: bool | None = None) -> None:
        faiss = import_faiss()
        self.index, self.meta, self.kind = index, meta, meta["type"]
        self.labels = live_labels(meta)  # (count,) FAISS label of each live row
        self._row_of: np.ndarray | None = None
        if self.labels.size != meta["label_count"]:  # holes or tombstones: labels are not rows
            self._row_of = np.full(meta["label_count"], -1, dtype=np.int64)
            self._row_of[self.labels] = np.arange(self.labels.size)
        params = meta.get("params", {})
        self._params: Any = None
        self._keep: list[Any] = []  # selectors the search parameters point to
        if self.kind in ("ivf", "ivfpq"):
            for name, value in (("nprobe", nprobe),):
                if value is not None and value < 1:
                    raise ClipretError(f"--{name} must be at least 1, got {value}")
            faiss.extract_index_ivf(index).nprobe = min(nprobe or params.get("nprobe", 1), params.get("nlist", 1 << 30))
        elif self.kind == "hnsw":
            if ef_search is not None and ef_search < 1:
                raise ClipretError(f"--ef-search must be at least 1, got {ef_search}")
            index.hnsw.efSearch = ef_search or params.get("ef_search", 64)
            if meta.get("tombstones"):
                batch = faiss.IDSelectorBatch(np.asarray(meta["tombstones"], dtype=np.int64))
                sel = faiss.IDSelectorNot(batch)
                self._params = faiss.SearchParametersHNSW()
                self._params.efSearch = index.hnsw.efSearch
                self._params.sel = sel
                self._keep = [batch, sel]
        self._gpu = to_gpu(index) if gpu is not False and self.kind in ("flat", "ivf") else None
        if gpu and self._gpu is None:
            raise ClipretError("no GPU index available (faiss-gpu not installed, or no GPU); drop the GPU request")
        self._direct_map = False

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def vectors_exact(self) -> bool:
        """True when :meth:`vectors` returns the stored vectors; False for ivfpq (PQ decodes approximations)."""
        return self.kind != "ivfpq"

    def search(self, queries: np.ndarray, k: int, on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 -> (scores (Q, k') float32, rows (Q, k') int64), k' = min(k, count), by the ranking rule.

        Rows index the sidecar's live ids; missing neighbours are (-inf, -1) at the end.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries {queries.shape} do not match index dim {self.dim}")
        k = min(int(k), len(self))
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        if k <= 0:
            return out_s, out_i
        for q0 in range(0, len(queries), QUERY_CHUNK):
            q = queries[q0 : q0 + QUERY_CHUNK]
            out_s[q0 : q0 + len(q)], out_i[q0 : q0 + len(q)] = search_with_ties(self._search, q, k, len(self))
            if on_chunk is not None:
                on_chunk(len(q))
        return out_s, out_i

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search mapped to rows; missing neighbours as (-inf, -1)."""
        index = self._gpu if self._gpu is not None and k <= GPU_MAX_K else self.index
        if self._params is not None:
            scores, labels = numpy_method(index, "search")(np.asarray(q), k, params=self._params)
        else:
            scores, labels = numpy_method(index, "search")(np.asarray(q), k)
        rows = labels if self._row_of is None else np.where(labels >= 0, self._row_of[np.maximum(labels, 0)], -1)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows.astype(np.int64)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 gallery vectors for post-processing (re-ranking, QE, DBA).

        flat and hnsw return the stored vectors exactly; ivf builds a label
        lookup on first use (about 40 bytes a vector); ivfpq returns the PQ
        *reconstructions*, approximations (see :attr:`vectors_exact`).
        """
        faiss = import_faiss()
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)})")
        labels = self.labels[rows]
        if self.kind in ("ivf", "ivfpq") and not self._direct_map:
            faiss.extract_index_ivf(self.index).set_direct_map_type(faiss.DirectMap.Hashtable)
            self._direct_map = True
        if labels.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(labels), dtype=np.float32)


@dataclass
class IndexGallery:
    """An opened index pair: its searcher, live ids (index order) and sidecar.

    ``dim``, ``fingerprint``, ``flags`` and ``len()`` match :class:`~clipret.artifacts.Embeddings`,
    so :func:`~clipret.retrieval.compat.check_compatible` accepts it as a gallery.
    """

    searcher: IndexSearcher
    ids: list[str]
    meta: dict[str, Any] = field(repr=False)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("model_fingerprint")

    @property
    def flags(self) -> dict[str, Any]:
        return dict(self.meta.get("flags") or {})

    def __len__(self) -> int:
        return len(self.ids)


def is_index_path(path: str | os.PathLike[str]) -> bool:
    """True for a ``.faiss`` file (or any file with a clipret index sidecar beside it)."""
    p = Path(path)
    return p.suffix == ".faiss" or (p.suffix != ".npy" and p.with_name(p.name + ".json").is_file())


def open_index(path: str | os.PathLike[str], *, nprobe: int | None = None, ef_search: int | None = None,
               threads: int | None = None, gpu: bool | None = None) -> IndexGallery:
    """Load an index pair for searching (raises :class:`ClipretError` with one line on any problem).

    The index is checked against its sidecar first (bytes, class, metric, counts, labels: see
    :func:`~clipret.artifacts.index.read_index_pair`), so every row a search returns is a valid id.
    """
    import_faiss()
    set_threads(threads)
    index, meta = read_index_pair(path)
    searcher = IndexSearcher(index, meta, nprobe=nprobe, ef_search=ef_search, gpu=gpu)
    return IndexGallery(searcher, meta["ids"], meta, Path(path))


class FaissExactSearcher:
    """Exact inner-product top-k with ``faiss.knn`` over an (G, D) float32 gallery (a memory map is read in place).

    Same results as :class:`~clipret.retrieval.search.ExactSearcher`, the
    reference: ties are resolved by :func:`search_with_ties`. ``gpu=None`` uses
    ``faiss.knn_gpu`` (the gallery streams to GPU 0) when faiss-gpu sees a GPU. Residual
    difference: FAISS and numpy may round a dot product differently in the
    last bit, so two gallery items whose scores differ by ~1e-7 may swap
    places, and scores may differ by ~1e-7.
    """

    exact = True

    def __init__(self, gallery: np.ndarray, *, query_chunk: int = QUERY_CHUNK, gpu: bool | None = None) -> None:
        if gallery.ndim != 2 or gallery.shape[0] == 0:
            raise ValueError(f"gallery must be a non-empty (G, D) array, got {gallery.shape}")
        self.gallery = gallery if gallery.dtype == np.float32 and gallery.flags["C_CONTIGUOUS"] else np.ascontiguousarray(gallery, dtype=np.float32)
        self.query_chunk = query_chunk
        self._faiss = import_faiss()
        self._gpu = gpu is not False and gpu_count() > 0 and hasattr(self._faiss, "knn_gpu")
        if gpu and not self._gpu:
            raise ClipretError("no GPU for exact search (faiss-gpu not installed, or no GPU); drop the GPU request")

    def search(self, queries: np.ndarray, k: int, on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 -> (scores (Q, k') float32, indices (Q, k') int64), k' = min(k, G), by the ranking rule."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"queries {queries.shape} do not match gallery dim {self.gallery.shape[1]}")
        g = self.gallery.shape[0]
        k = max(0, min(int(k), g))
        out_s = np.empty((len(queries), k), dtype=np.float32)
        out_i = np.empty((len(queries), k), dtype=np.int64)
        if k == 0:
            return out_s, out_i
        for q0 in range(0, len(queries), self.query_chunk):
            q = queries[q0 : q0 + self.query_chunk]
            out_s[q0 : q0 + len(q)], out_i[q0 : q0 + len(q)] = search_with_ties(self._knn, q, k, g)
            if on_chunk is not None:
                on_chunk(len(q))
        return out_s, out_i

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = self._faiss
        # plain ndarrays, not memmaps: faiss.contrib.torch_utils (imported by pytorch-metric-learning, say)
        # replaces faiss.knn and sends anything whose type is not exactly np.ndarray down its torch path
        q, gallery = np.asarray(q), np.asarray(self.gallery)
        if self._gpu and k <= GPU_MAX_K:
            scores, idx = numpy_method(faiss, "knn_gpu")(gpu_resources(), q, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores, idx = numpy_method(faiss, "knn")(q, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores.astype(np.float32), idx.astype(np.int64)


def search_with_ties(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
                     count: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each query by the ranking rule, from a FAISS-style ``search(queries, k)``.

    FAISS breaks ties at the k boundary either way. This asks for k+1
    neighbours and re-sorts each row with :func:`sort_neighbors`; a row whose
    k-th and last scores are equal may have more tied items beyond, so it is
    searched again with twice the window until the last score falls below the
    k-th (or the window holds the whole gallery). The tied items kept are then
    the lowest-indexed ones, as the ranking rule says. (-inf, -1) padding is
    never a tie.
    """
    ask = min(k + 1, count)
    scores, rows = sort_neighbors(*search(queries, ask))
    todo = np.flatnonzero(np.isfinite(scores[:, k - 1]) & (scores[:, k - 1] == scores[:, ask - 1])) if ask > k else []
    while len(todo):
        ask = min(2 * ask, count)
        s2, r2 = sort_neighbors(*search(queries[todo], ask))
        scores[todo, :k], rows[todo, :k] = s2[:, :k], r2[:, :k]
        still = np.isfinite(s2[:, k - 1]) & (s2[:, k - 1] == s2[:, ask - 1]) & (ask < count)
        todo = todo[still]
    return scores[:, :k], rows[:, :k]


def exact_searcher(gallery: np.ndarray, *, use_faiss: bool | None = None) -> Searcher:
    """Exact search over (G, D) ``gallery``: FAISS when installed (faster), else numpy chunks.

    ``use_faiss=False`` forces the numpy reference; ``True`` requires faiss.
    """
    if use_faiss or (use_faiss is None and have_faiss()):
        return FaissExactSearcher(gallery)
    return ExactSearcher(gallery)


__all__ = ["FaissExactSearcher", "IndexGallery", "IndexSearcher", "exact_searcher", "is_index_path", "open_index", "search_with_ties"]
