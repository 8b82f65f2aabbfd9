"""The retrieval pipeline: DBA -> QE -> search -> k-reciprocal re-ranking -> top-k.

The order is fixed (test-time augmentation happens earlier, when images are
embedded, see :mod:`clipret.embedding.tta`):

1. **DBA** (gallery side): each gallery vector becomes the mean of itself and
   its top-N gallery neighbours (:func:`~clipret.retrieval.expansion.dba`);
2. **QE** (query side): each query becomes the mean of itself and its top-N
   gallery neighbours, uniform or α-weighted
   (:func:`~clipret.retrieval.expansion.expand_queries`);
3. **search**: exact (blocked torch matmuls on a GPU when there is one, else
   FAISS's kernel when installed, else numpy chunks; :func:`default_searcher`)
   or an index's own search;
4. **k-reciprocal re-ranking** (:mod:`clipret.retrieval.rerank`), whose
   score is ``1 - final distance``.

Every stage is optional and works on arrays; nothing here imports torch (but
the GPU searcher, on a machine with a GPU) or knows about the CLI. :func:`retrieve` gives top-k lists; :func:`score_function`
gives (chunk, G) blocks of final scores for full-ranking evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.progress import Progress
from clipret.retrieval.expansion import dba as dba_gallery
from clipret.retrieval.expansion import expand_queries
from clipret.retrieval.rerank import GalleryGraph, check_rerank_params, k_reciprocal_rerank, prepare_rerank
from clipret.retrieval.scores import ScoreFn, matmul_scores, rerank_scores
from clipret.retrieval.search import Searcher, TorchSearcher, search_device
from clipret.retrieval.selfmatch import drop_rows

__all__ = ["Stages", "retrieve", "score_function", "apply_dba", "default_searcher"]

@dataclass(frozen=True)
class Stages:
    """Which post-processing stages run, and their parameters (0 / False: off).

    dba: gallery neighbours averaged into each gallery vector.
    qe: gallery neighbours averaged into each query; ``qe_alpha`` makes it
    α-QE (weights ``max(sim, 0) ** alpha``, the query itself 1).
    rerank: k-reciprocal re-ranking with ``k1``, ``k2`` and ``lam`` (λ).
    """

    dba: int = 0
    qe: int = 0
    qe_alpha: float | None = None
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lam: float = 0.1  # measured: 0.1 beat the paper's 0.3 at every k1/k2 tried (docs/benchmarks.md)

    def __post_init__(self) -> None:
        if self.dba < 0 or self.qe < 0:
            raise ClipretError("--dba and --qe take a number of neighbours (0 turns the stage off)")
        if self.qe_alpha is not None and (self.qe_alpha < 0 or not self.qe):
            raise ClipretError("--qe-alpha needs --qe N (the neighbours to weight) and a value >= 0")
        try:
            check_rerank_params(self.k1, self.k2, self.lam)
        except ValueError as exc:
            raise ClipretError(f"re-ranking: {exc} (--k1, --k2, --lambda)") from None

    @property
    def any(self) -> bool:
        """Whether any stage (DBA, QE, re-ranking) is on: False means a plain top-k search."""
        return bool(self.dba or self.qe or self.rerank)

    def to_dict(self) -> dict[str, Any]:
        """What a results sidecar records: only the stages that ran, with their parameters."""
        out: dict[str, Any] = {}
        if self.dba:
            out["dba"] = {"n": self.dba}
        if self.qe:
            out["qe"] = {"n": self.qe, "alpha": self.qe_alpha}
        if self.rerank:
            out["rerank"] = {"k1": self.k1, "k2": self.k2, "lambda": self.lam}
        return out


def default_searcher(gallery: np.ndarray) -> Searcher:
    """Exact search over (G, D) ``gallery``, the same results wherever it runs: on a CUDA GPU as
    blocked torch matmuls (:class:`~clipret.retrieval.search.TorchSearcher`) when
    :func:`~clipret.retrieval.search.search_device` picks one (a GPU and G×D at least
    ``AUTO_MIN_WORK``, or ``CLIPRET_SEARCH_DEVICE=cuda``); else FAISS's kernel when installed,
    else numpy chunks. QE and DBA search through it too."""
    device = search_device(gallery.shape[0] * gallery.shape[1])
    if device != "cpu":
        return TorchSearcher(gallery, device=device)
    from clipret.retrieval.index import exact_searcher

    return exact_searcher(gallery)


def apply_dba(gallery: np.ndarray, n: int, *, searcher: Searcher | None = None, on_progress: Progress | None = None) -> np.ndarray:
    """(G, D) gallery -> (G, D) float32 DBA'd gallery (in memory); ``n == 0`` returns ``gallery`` itself."""
    if not n:
        return gallery
    return dba_gallery(gallery, n, searcher=searcher or default_searcher(gallery), on_progress=on_progress)


def _queries(query: np.ndarray, gallery: Any, stages: Stages, searcher: Searcher, exclude: np.ndarray | None) -> np.ndarray:
    """(Q, D) queries after QE (unchanged without it); a query's own item is never its QE neighbour."""
    query = np.ascontiguousarray(query, dtype=np.float32)
    if stages.qe:
        query = expand_queries(query, gallery, stages.qe, alpha=stages.qe_alpha, searcher=searcher, exclude=exclude)
    return query


def _excluding(exclude: np.ndarray | None) -> bool:
    return exclude is not None and bool((np.asarray(exclude) >= 0).any())


def retrieve(
    query: np.ndarray,
    gallery: np.ndarray | None,
    k: int,
    stages: Stages = Stages(),
    *,
    searcher: Searcher | None = None,
    graph: GalleryGraph | None = None,
    exclude: np.ndarray | None = None,
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows for every query, after the stages.

    query (Q, D), gallery (G, D) float32 unit rows (the gallery may be a
    memory map, or any object with ``shape``, ``ndim`` and ``gallery[rows]``
    when only QE reads it; None when ``searcher`` is an index and no stage
    needs the vectors). ``searcher`` searches the gallery (default: exact);
    pass an index's searcher to take neighbour lists from it. DBA must
    already be in ``gallery`` (see :func:`apply_dba`); ``stages.dba`` is only
    recorded. ``graph`` is a cached gallery neighbour graph for re-ranking.
    ``exclude`` (Q,) int64: each query's own gallery row, or -1
    (:func:`clipret.retrieval.selfmatch.self_matches`); it is left out of the
    query's QE neighbours and of its list.

    Returns (scores (Q, k') float32, higher is better: cosine, or
    ``1 - final distance`` after re-ranking; indices (Q, k') int64), best
    first by the shared ranking rule, k' = min(k, G). A list with fewer than
    k' items (an approximate index, or a query whose own item was left out
    of a whole-gallery list) ends in (-inf, -1) padding.
    """
    if gallery is None and (searcher is None or stages.qe or stages.rerank):
        raise ValueError("query expansion and re-ranking need the gallery vectors")
    searcher = searcher or default_searcher(gallery)
    q = _queries(query, gallery, stages, searcher, exclude) if stages.qe else np.ascontiguousarray(query, dtype=np.float32)
    depth = k + 1 if _excluding(exclude) else k
    if stages.rerank:
        graph_searcher = None if searcher.exact else searcher  # exact search: the graph uses its own exact kNN
        found = k_reciprocal_rerank(q, gallery, depth, k1=stages.k1, k2=stages.k2, lam=stages.lam, graph=graph,
                                    searcher=graph_searcher, on_progress=on_progress)
    else:
        found = searcher.search(q, depth, on_chunk=on_progress) if on_progress else searcher.search(q, depth)
    return drop_rows(*found, exclude, k) if depth > k else found


def score_function(
    query: np.ndarray,
    gallery: np.ndarray,
    stages: Stages,
    rows: int,
    *,
    searcher: Searcher | None = None,
    graph: GalleryGraph | None = None,
    exclude: np.ndarray | None = None,
    to_host: bool = True,
) -> ScoreFn:
    """``score(q0, q1) -> (q1 - q0, G)`` float32 final scores over the whole gallery, higher is better:
    numpy, or with ``to_host=False`` a torch tensor on the GPU that scored them (what
    :func:`clipret.evaluation.evaluate_scores` takes; re-ranking scores are numpy either way).

    For full-ranking evaluation (:func:`clipret.evaluation.evaluate_embeddings`):
    cosine scores of the (expanded) queries, or ``1 - final distance`` after
    re-ranking, which is prepared once for the whole query batch (the method
    is transductive). ``rows`` bounds the block height. ``exclude`` only
    keeps each query's own item out of its QE neighbours: the evaluation
    leaves it out of the ranking (:func:`clipret.evaluation.evaluate_scores`).
    """
    searcher = searcher or default_searcher(gallery)
    q = _queries(query, gallery, stages, searcher, exclude)
    if stages.rerank:
        graph_searcher = None if searcher.exact else searcher  # exact search: the graph uses its own exact kNN
        batch = prepare_rerank(q, gallery, k1=stages.k1, k2=stages.k2, lam=stages.lam, graph=graph, searcher=graph_searcher)
        return rerank_scores(batch, rows)
    return matmul_scores(q, gallery, rows, to_host=to_host)
