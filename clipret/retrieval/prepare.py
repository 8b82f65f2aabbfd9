"""What a search over a :class:`~clipret.retrieval.gallery.Gallery` needs, for a set of stages.

:func:`prepare_search` turns a gallery and the post-processing
:class:`~clipret.retrieval.pipeline.Stages` into the vectors (DBA applied when asked), a
searcher, and the re-ranking neighbour graph (cached beside a ``.npy`` gallery).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.progress import StageProgress, stage_counter
from clipret.retrieval.gallery import Gallery
from clipret.retrieval.pipeline import Stages, apply_dba, default_searcher
from clipret.retrieval.rerank import GalleryGraph
from clipret.retrieval.search import Searcher

__all__ = ["IndexRows", "SearchSetup", "gallery_hash", "prepare_search"]


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
    if len(gallery) == 0:
        raise ClipretError(f"the gallery {gallery.path} holds no embeddings; embed a folder with images first")
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
    from clipret.artifacts.neighbors import neighbors_path
    from clipret.retrieval.rerank.cache import cached_gallery_graph
    from clipret.retrieval.rerank.graph import graph_neighbors

    path = neighbors_path(gallery.path) if cache and gallery.path is not None else None
    graph, reused = cached_gallery_graph(
        vectors, path, key=f"{gallery_hash(gallery)}|dba={stages.dba}" if path is not None else "", k1=stages.k1,
        k2=stages.k2, searcher=searcher, on_progress=stage_counter(on_progress, "gallery graph", len(vectors)),
        on_save_error=lambda exc: notes.append(f"could not cache the re-ranking graph ({exc})"))
    if graph.filled and not reused:
        notes.append(f"{graph.filled} of {len(vectors)} gallery items got fewer than {graph_neighbors(stages.k1, stages.k2)} "
                     "neighbours from the index; their re-ranking lists came from exact search (raise --nprobe or --ef-search)")
    return graph
