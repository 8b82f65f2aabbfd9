"""A gallery to search: embeddings (``g.npy``) or a FAISS index pair (``g.faiss``), behind one type.

:func:`open_gallery` reads either; :func:`prepare_search` turns a gallery and
the post-processing :class:`~clipret.retrieval.pipeline.Stages` into what
the pipeline needs: the vectors (DBA applied when asked), a searcher, and the
re-ranking neighbour graph (cached beside a ``.npy`` gallery).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.progress import StageProgress, stage_counter
from clipret.retrieval.pipeline import Stages, apply_dba, default_searcher
from clipret.retrieval.rerank import GalleryGraph
from clipret.retrieval.search import Searcher

__all__ = ["Gallery", "SearchSetup", "open_gallery", "prepare_search", "read_gallery_flags", "read_gallery_ids"]


@dataclass
class Gallery:
    """A gallery to search: ids (row order), model fingerprint, flags, and either (G, D) float32
    unit-row vectors (a ``.npy``) or an opened FAISS index (a ``.faiss`` pair).

    Open one with :meth:`open`; change it with :meth:`add` and :meth:`remove` (a ``.npy`` gallery
    in memory, written by :meth:`save`; an index on disk, in place, as ``clipret index --add``).
    """

    ids: list[str]
    fingerprint: str | None
    flags: dict[str, Any]
    path: Path | None
    vectors: np.ndarray | None = None  # (G, D) float32, maybe a memory map; None for an index until needed
    index: Any = field(default=None, repr=False)  # clipret.retrieval.index.IndexGallery
    content: str | None = None  # content_hash of the vectors, from the manifest (computed when needed otherwise)
    root: Path | None = None  # the folder the ids are relative to, when the manifest records it
    dim_: int = 0

    @property
    def dim(self) -> int:
        """D, the vectors' width."""
        return self.dim_

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, nprobe: int | None = None, ef_search: int | None = None) -> Gallery:
        """Open ``g.npy`` (with its manifest) or ``g.faiss`` (with its sidecar); see :func:`open_gallery`."""
        return open_gallery(path, nprobe=nprobe, ef_search=ef_search)

    def add(self, embeddings: Any, *, allow_mismatch: bool = False) -> Gallery:
        """Append :class:`~clipret.artifacts.Embeddings` ((N, D) float32 unit rows); returns self.

        Refused in one line: another dim, another model (unless ``allow_mismatch``), or an id already here.
        """
        from clipret.retrieval.compat import check_compatible

        check_compatible(embeddings, self, allow_mismatch=allow_mismatch)
        if self.index is not None:
            from clipret.retrieval.index import add_to_index

            add_to_index(self.path, [embeddings], allow_mismatch=allow_mismatch)
            return self._reopen()
        present = set(self.ids)
        clash = [i for i in embeddings.ids if i in present]
        if clash:
            raise ClipretError(f"{len(clash)} id(s) are already in the gallery ({', '.join(clash[:3])}); remove them first")
        assert self.vectors is not None
        self.vectors = np.concatenate([np.asarray(self.vectors), np.asarray(embeddings.vectors, dtype=np.float32)])
        self.ids = [*self.ids, *embeddings.ids]
        self.content = None  # the rows changed: hashed anew when a cache needs it
        return self

    def remove(self, ids: Any) -> Gallery:
        """Drop the rows of ``ids`` (an id not here is a one-line error); returns self."""
        ids = [str(i) for i in ids]
        missing = sorted(set(ids) - set(self.ids))
        if missing:
            raise ClipretError(f"{len(missing)} id(s) are not in the gallery ({', '.join(missing[:3])})")
        if self.index is not None:
            from clipret.retrieval.index import remove_from_index

            remove_from_index(self.path, ids)
            return self._reopen()
        gone = set(ids)
        keep = np.array([i not in gone for i in self.ids], dtype=bool)
        assert self.vectors is not None
        self.vectors = np.asarray(self.vectors)[keep]
        self.ids = [i for i, k in zip(self.ids, keep) if k]
        self.content = None
        return self

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write a ``.npy`` gallery (and its manifest) to ``path`` (default: where it came from).

        An index is changed in place by :meth:`add` and :meth:`remove`, so it has nothing to save.
        """
        from clipret.artifacts import Embeddings

        if self.index is not None:
            if path is not None and Path(path).resolve() != Path(self.path).resolve():
                raise ClipretError(f"an index is changed in place; copy {self.path} and its sidecar to keep the old one")
            return Path(self.path)
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ClipretError("this gallery came from memory: pass save(path)")
        assert self.vectors is not None
        emb = Embeddings(np.asarray(self.vectors), list(self.ids), fingerprint=self.fingerprint, flags=self.flags,
                         root=self.root)
        emb.save(target)
        self.path, self.content = target, None  # hashed anew when a cache needs it
        return target

    def _reopen(self) -> Gallery:
        fresh = open_gallery(self.path)
        self.__dict__.update(fresh.__dict__)
        return self


def open_gallery(path: str | os.PathLike[str], *, nprobe: int | None = None, ef_search: int | None = None) -> Gallery:
    """Open ``g.npy`` (with its manifest) or ``g.faiss`` (with its sidecar); ClipretError if empty or unreadable."""
    from clipret.retrieval.index import is_index_path

    path = Path(path)
    if is_index_path(path):
        from clipret.retrieval.index import open_index

        idx = open_index(path, nprobe=nprobe, ef_search=ef_search)
        root, content = idx.meta.get("root"), idx.meta.get("content_blake2b")
        gal = Gallery(list(idx.ids), idx.fingerprint, idx.flags, path, index=idx, dim_=idx.dim,
                      root=Path(root) if isinstance(root, str) else None,
                      content=content if isinstance(content, str) else None)
    else:
        if nprobe is not None or ef_search is not None:
            raise ClipretError("--nprobe and --ef-search tune an index; the gallery here is a .npy (exact search)")
        from clipret.artifacts import load_embeddings

        emb = load_embeddings(path)
        gal = Gallery(emb.ids, emb.fingerprint, emb.flags, path, vectors=emb.vectors, content=emb.content, root=emb.root,
                      dim_=emb.dim)
    if len(gal) == 0:
        raise ClipretError(f"the gallery {path} holds no embeddings; embed a folder with images first")
    return gal


def read_gallery_ids(path: str | os.PathLike[str]) -> list[str]:
    """The ids of a ``.npy`` gallery (its manifest) or an index (its sidecar), in row order; reads no vectors."""
    from clipret.retrieval.index import is_index_path

    if is_index_path(path):
        from clipret.artifacts.index import read_sidecar

        return [str(i) for i in read_sidecar(path)["ids"]]
    from clipret.artifacts import load_embeddings

    return load_embeddings(path, check_finite=False).ids


class IndexRows:
    """An index's vectors as a read-only (G, D) array-like: ``rows[idx]`` reconstructs only those rows.

    Query expansion reads just each query's N neighbours, so a 10M-vector
    IVF-PQ index never has all its vectors decoded into memory (10M x 256
    float32 would be 10 GB).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, searcher: Any, count: int) -> None:
        self._searcher = searcher
        self.shape = (int(count), int(searcher.dim))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self._searcher.vectors(rows.ravel()).reshape(*rows.shape, self.shape[1])


def read_gallery_flags(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The embedding flags (model, pretrained, tta, ...) a ``.npy`` manifest or an index sidecar records; reads no vectors."""
    from clipret.retrieval.index import is_index_path

    if is_index_path(path):
        from clipret.artifacts.index import read_sidecar

        return dict(read_sidecar(path).get("flags") or {})
    from clipret.artifacts import load_embeddings

    return dict(load_embeddings(path, check_finite=False).flags)


@dataclass
class SearchSetup:
    """What the pipeline needs: (G, D) vectors (post-DBA), a searcher over them, a re-ranking graph or None.

    ``vectors`` is an array, None (an index searched with no stage that reads
    vectors), or :class:`IndexRows` (an index under QE alone).
    """

    vectors: np.ndarray | IndexRows | None
    searcher: Searcher
    graph: GalleryGraph | None
    notes: list[str]


def prepare_search(
    gallery: Gallery,
    stages: Stages,
    *,
    cache: bool = True,
    on_progress: StageProgress | None = None,
) -> SearchSetup:
    """Resolve vectors, searcher and the re-ranking graph for ``stages`` over ``gallery``.

    DBA is refused when the gallery already had it at embed time (it would be
    applied twice), and on an index (the index holds the original vectors:
    apply DBA with ``clipret embed --dba N`` before building it). The
    re-ranking graph of a ``.npy`` gallery is cached beside it
    (``g.npy.knn.npz``), keyed by a hash of every byte of the array (the
    manifest's, else computed) and the DBA setting; ``on_progress(stage, done, total)`` reports long steps.
    ``notes`` collects one-line remarks for the user.
    """
    notes: list[str] = []
    if stages.dba and gallery.flags.get("dba"):
        raise ClipretError(f"{gallery.path} was embedded with --dba {gallery.flags['dba']} already; "
                           "drop --dba here (DBA applied twice blurs the gallery)")
    if gallery.index is not None:
        if stages.dba:
            raise ClipretError("--dba cannot be applied to an index, which holds the original vectors; embed the "
                               "gallery with `clipret embed --dba N`, then build the index from that")
        searcher = gallery.index.searcher
        vectors: Any = None
        if stages.qe or stages.rerank:
            if not searcher.vectors_exact:
                notes.append(f"the {gallery.index.meta['type']} index stores compressed vectors: query expansion and "
                             "re-ranking use their reconstructions, an approximation")
            # re-ranking reads every gallery vector; QE alone only its Q x N neighbours, reconstructed on demand
            vectors = searcher.vectors(np.arange(len(gallery))) if stages.rerank else IndexRows(searcher, len(gallery))
        return SearchSetup(vectors, searcher, _graph(gallery, vectors, stages, searcher, cache=False, notes=notes,
                                                     on_progress=on_progress), notes)
    vectors = gallery.vectors
    assert vectors is not None
    if stages.dba:
        vectors = apply_dba(vectors, stages.dba, on_progress=stage_counter(on_progress, "dba", len(gallery)))
    searcher = default_searcher(vectors)
    return SearchSetup(vectors, searcher, _graph(gallery, vectors, stages, None, cache=cache, notes=notes,
                                                 on_progress=on_progress), notes)


def gallery_hash(gallery: Gallery) -> str:
    """:func:`~clipret.artifacts.content_hash` of the gallery's vectors: the manifest's, or computed once."""
    if gallery.content is None:
        from clipret.artifacts import content_hash

        assert gallery.vectors is not None
        gallery.content = content_hash(gallery.vectors)
    return gallery.content


def _graph(gallery: Gallery, vectors: np.ndarray | None, stages: Stages, searcher: Searcher | None, *, cache: bool,
           notes: list[str], on_progress: StageProgress | None) -> GalleryGraph | None:
    """The gallery's k-nearest-gallery lists for re-ranking: from the cache when it matches, else built."""
    if not stages.rerank or vectors is None:
        return None
    from clipret.artifacts.neighbors import load_gallery_graph, neighbors_path, save_gallery_graph
    from clipret.retrieval.rerank.graph import EXACT, build_gallery_graph, graph_neighbors

    m = graph_neighbors(stages.k1, stages.k2)
    method = EXACT if searcher is None else type(searcher).__name__
    path = neighbors_path(gallery.path) if cache and gallery.path is not None else None
    key = f"{gallery_hash(gallery)}|dba={stages.dba}" if path is not None else ""
    if path is not None:
        graph = load_gallery_graph(path, key=key, count=len(vectors), dim=int(vectors.shape[1]), neighbors=m, method=method)
        if graph is not None:
            return graph
    graph = build_gallery_graph(vectors, k1=stages.k1, k2=stages.k2, searcher=searcher,
                                on_progress=stage_counter(on_progress, "gallery graph", len(vectors)))
    if graph.filled:
        notes.append(f"{graph.filled} of {len(vectors)} gallery items got fewer than {m} neighbours from the index; "
                     "their re-ranking lists came from exact search (raise --nprobe or --ef-search)")
    if path is not None:
        try:
            save_gallery_graph(path, graph, key=key)
        except ClipretError as exc:  # a read-only gallery folder: work on without the cache
            notes.append(f"could not cache the re-ranking graph ({exc})")
    return graph
