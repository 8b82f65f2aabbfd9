"""The public Python API's functions: what ``import clipret`` gives, and what every CLI command calls.

>>> import clipret
>>> enc = clipret.Encoder.load("runs/exp1")                  # doctest: +SKIP
>>> g = enc.embed_folder("data/test/gallery")                # doctest: +SKIP
>>> res = clipret.retrieve(enc.embed(["a.jpg"]), g, k=10)    # doctest: +SKIP
>>> clipret.evaluate(res, labels="data/test/labels.csv")["map@r"]  # doctest: +SKIP

Nothing here prints: progress goes to an optional ``progress(stage, done, total)``
callback, and every error is a :class:`~clipret.errors.ClipretError` with a one-line message.
torch, open_clip and faiss are imported only by the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clipret.artifacts.embeddings import Embeddings
from clipret.progress import StageProgress as Progress
from clipret.progress import stage_counter
from clipret.errors import ClipretError
from clipret.retrieval.results import Results

__all__ = ["retrieve", "evaluate", "train", "load_labels"]

PathLike = str | os.PathLike[str]




def _embeddings(x: Embeddings | PathLike | np.ndarray, what: str) -> Embeddings:
    if isinstance(x, Embeddings):
        return x
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise ClipretError(f"{what} vectors must be an (N, D) array, got shape {x.shape}")
        return Embeddings(np.ascontiguousarray(x, dtype=np.float32), [str(i) for i in range(len(x))])
    from clipret.artifacts import load_embeddings

    return load_embeddings(x)


def _gallery(x: Any, nprobe: int | None, ef_search: int | None) -> Any:
    from clipret.retrieval.gallery import Gallery, open_gallery

    if isinstance(x, Gallery):
        return x
    if isinstance(x, (Embeddings, np.ndarray)):
        e = _embeddings(x, "gallery")
        if len(e) == 0:
            raise ClipretError("the gallery holds no embeddings")
        return Gallery(e.ids, e.fingerprint, e.flags, e.path, vectors=e.vectors, content=e.content, root=e.root, dim_=e.dim)
    return open_gallery(x, nprobe=nprobe, ef_search=ef_search)


def retrieve(
    query: Embeddings | PathLike | np.ndarray,
    gallery: Any,
    k: int = 10,
    *,
    dba: int = 0,
    qe: int = 0,
    qe_alpha: float | None = None,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.1,
    keep_self: bool = False,
    allow_mismatch: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
    search_device: str | None = None,
    progress: Progress | None = None,
    warnings: list[str] | None = None,
) -> Results:
    """The top-``k`` gallery items of every query, after the post-processing stages.

    query: :class:`Embeddings`, a ``.npy`` path, or a (Q, D) float32 array of unit rows.
    gallery: a :class:`~clipret.retrieval.gallery.Gallery`, a ``.npy`` or ``.faiss`` path,
    :class:`Embeddings` or a (G, D) array. Stages run in the fixed order DBA -> QE -> search ->
    k-reciprocal re-ranking (``rerank``, with ``k1``, ``k2``, ``lam``). A query that is also in the
    gallery never lists itself unless ``keep_self``. ``warnings`` (a list) collects one-line notes
    (a TTA asymmetry, an approximate index); they are not printed. ``search_device``: where exact
    search runs (auto, cpu, cuda or cuda:N; default: ``CLIPRET_SEARCH_DEVICE``, else auto: a GPU
    when torch sees one and the gallery is large enough).
    """
    from clipret.retrieval import selfmatch
    from clipret.retrieval.compat import check_compatible, describe
    from clipret.retrieval.prepare import prepare_search
    from clipret.retrieval.pipeline import Stages
    from clipret.retrieval.pipeline import retrieve as run_pipeline
    from clipret.retrieval.search import searching_on

    if k <= 0:
        raise ClipretError(f"--k must be positive, got {k}")
    stages = Stages(dba=dba, qe=qe, qe_alpha=qe_alpha, rerank=rerank, k1=k1, k2=k2, lam=lam)
    q, gal = _embeddings(query, "query"), _gallery(gallery, nprobe, ef_search)
    notes = check_compatible(q, gal, allow_mismatch=allow_mismatch)
    found = selfmatch.self_matches(q, gal)
    with searching_on(search_device):
        setup = prepare_search(gal, stages, on_progress=progress)
        notes += setup.notes
        if warnings is not None:
            warnings.extend(notes)
        scores, rows = run_pipeline(q.vectors, setup.vectors, k, stages, searcher=setup.searcher, graph=setup.graph,
                                    exclude=None if keep_self else found,
                                    on_progress=stage_counter(progress, "re-rank" if rerank else "search", _search_total(q, gal, stages)))
    n = selfmatch.count(found)
    meta = {"k": k, "score": "1 - k-reciprocal final distance" if rerank else "cosine similarity",
            "query": describe(q, q.path if q.path is not None else q.root), "gallery": describe(gal), "stages": stages.to_dict(),
            "self_matches": {"rule": selfmatch.RULE, "excluded": 0 if keep_self else n, "kept": n if keep_self else 0}}
    return Results(list(q.ids), [[gal.ids[j] for j in row if j >= 0] for row in rows], scores, list(gal.ids), found, meta)


def _search_total(q: Embeddings, gal: Any, stages: Any) -> int:
    if not stages.rerank:
        return len(q)
    from clipret.retrieval.rerank import rerank_progress_total

    return rerank_progress_total(len(q), len(gal), builds_graph=False)


def load_labels(labels: PathLike | Mapping[str, str] | None, ids: Sequence[str]) -> dict[str, str]:
    """{id: label}: from a ``filename,label`` CSV, a mapping, or (None) the class subfolder of each id."""
    from clipret.data.layout import folder_labels, read_labels_csv

    if labels is None:
        return folder_labels(ids)
    if isinstance(labels, Mapping):
        return {str(key): str(value) for key, value in labels.items()}
    return read_labels_csv(labels)


def evaluate(
    results: Results | Embeddings | PathLike | np.ndarray,
    gallery: Any = None,
    *,
    labels: PathLike | Mapping[str, str] | None = None,
    k: Sequence[int] = (1, 5, 10),
    keep_self: bool = False,
    progress: Progress | None = None,
    per_class: bool = False,
    worst: int = 0,
    search_device: str | None = None,
    **stages: Any,
) -> dict[str, Any]:
    """Recall@K, precision@K, mAP@K, and (from a full ranking) mAP, MAP@R and R-precision.

    ``evaluate(results)`` scores :class:`Results` (top-k lists; R is counted over the whole gallery
    they were searched in). ``evaluate(query, gallery)`` scores the exact full ranking of every
    query over a ``.npy`` gallery (in bounded memory) after the same ``stages`` as
    :func:`retrieve` (dba, qe, qe_alpha, rerank, k1, k2, lam), or an index's own top lists.
    A query's own item is left out of its ranking and its R unless ``keep_self``. Returns
    the metrics plus ``self_matches_excluded``. ``per_class`` adds ``per_class``: a list of
    ``{"class", "n_queries", "recall@1", "map@r"}``, worst first; ``worst=N`` adds ``worst``: the
    N queries with the lowest AP, ``{"id", "label", "ap", "first_hit_rank"}`` (AP over the full
    ranking, or AP@k at the deepest k for top-k lists; see :mod:`clipret.evaluation.per_class`).
    ``search_device``: where the full ranking's scores and ranks are computed, as in :func:`retrieve`
    (scoring :class:`Results` computes no scores, so it does not use it).
    """
    from clipret import evaluation
    from clipret.retrieval import selfmatch
    from clipret.retrieval.search import searching_on

    ks = [int(x) for x in k]
    if worst < 0:
        raise ClipretError(f"--worst must be 0 or more, got {worst}")
    detail = per_class or worst > 0
    if isinstance(results, Results):
        if gallery is not None or stages:
            raise ClipretError("scoring Results takes no gallery or stages: they were applied when they were made")
        label_map = load_labels(labels, results.query_ids + results.gallery_ids)
        exclude = None if keep_self else results.self_rows
        metrics = evaluation.evaluate_results(results.records(), label_map, results.gallery_ids, ks, exclude=exclude,
                                              return_per_query=detail)
        found, query_ids = results.self_rows, results.query_ids
    else:
        if gallery is None:
            raise ClipretError("evaluate(query, gallery): the full ranking needs the gallery too")
        from clipret.retrieval.compat import check_compatible

        q, gal = _embeddings(results, "query"), _gallery(gallery, stages.pop("nprobe", None), stages.pop("ef_search", None))
        check_compatible(q, gal, allow_mismatch=bool(stages.pop("allow_mismatch", False)))
        label_map = load_labels(labels, list(q.ids) + list(gal.ids))
        found, query_ids = selfmatch.self_matches(q, gal), list(q.ids)
        with searching_on(search_device):
            metrics = _full_ranking(q, gal, label_map, ks, None if keep_self else found, stages, progress, detail)
    if detail:
        metrics, per_query = metrics
    metrics["self_matches_excluded"] = 0 if keep_self else selfmatch.count(found)
    if detail:
        from clipret.data.layout import labels_for
        from clipret.evaluation import per_class as details

        names = labels_for(query_ids, label_map, "query")
        if per_class:
            metrics["per_class"] = details.per_class(names, per_query)
        if worst > 0:
            metrics["worst"] = details.worst_queries(query_ids, names, per_query, worst)
    return metrics


def _full_ranking(q: Embeddings, gal: Any, label_map: dict[str, str], ks: list[int], exclude: Any, stage_args: dict[str, Any],
                  progress: Progress | None, detail: bool = False) -> Any:
    """The exact full ranking of a ``.npy`` gallery, or an index's own top lists, after the stages."""
    from clipret import evaluation, metrics
    from clipret.retrieval.prepare import prepare_search
    from clipret.retrieval.pipeline import Stages, score_function
    from clipret.retrieval.pipeline import retrieve as run_pipeline

    stages = Stages(**stage_args)
    setup = prepare_search(gal, stages, on_progress=progress)
    if gal.index is None:
        rows = evaluation.chunk_rows(len(gal))
        score_fn = score_function(q.vectors, setup.vectors, stages, rows, searcher=setup.searcher, graph=setup.graph,
                                  exclude=exclude, to_host=False)
        return evaluation.evaluate_embeddings(q, gal, label_map, ks, score_fn=score_fn if stages.any else None,
                                              exclude=exclude, on_progress=stage_counter(progress, "evaluate", len(q)),
                                              return_per_query=detail)
    q_codes, g_codes = evaluation.label_codes(q.ids, gal.ids, label_map)
    r_max = int(metrics.count_relevant(q_codes, g_codes).max(initial=0))
    depth = min(len(gal), max(max(ks), min(r_max, 1000)))
    _, rows_found = run_pipeline(q.vectors, setup.vectors, depth, stages, searcher=setup.searcher, graph=setup.graph,
                                 exclude=exclude)
    if exclude is not None and (exclude >= 0).any() and depth == len(gal):
        depth, rows_found = depth - 1, rows_found[:, : depth - 1]  # a query's own item is out: G - 1 items to rank
    if (rows_found < 0).any() or depth == 0:
        raise ClipretError(f"the index returned fewer than {depth} neighbours for some queries; raise --nprobe or --ef-search")
    return metrics.evaluate_topk(q_codes, g_codes, rows_found, [x for x in ks if x <= depth], exclude=exclude,
                                 return_per_query=detail)


def train(root: PathLike | None = None, *, out: PathLike = "runs/clipret", overwrite: bool = False, resume: bool = False,
          progress: Callable[[str, dict[str, Any]], None] | None = None, **settings: Any) -> dict[str, Any]:
    """Fine-tune a retrieval model on ``root`` into the run folder ``out``.

    ``root``: the dataset folder (``ROOT/training/<class>/*``) or a dataset CSV
    (``path,label,split[,is_query,is_gallery]``: trains on its train rows, validates on its
    validation rows). ``settings`` are :class:`~clipret.config.TrainConfig` fields or the CLI's
    long option names with underscores (``model="ViT-B-16"``, ``epochs=10``,
    ``classes_per_batch=32``): the same settings ``clipret train`` builds. ``overwrite`` moves an
    existing run in ``out`` aside first. ``resume=True`` continues the interrupted run in ``out``
    from its checkpoint with its own settings (``root`` and ``settings``, if given, are checked
    against them; only a few may change, e.g. ``epochs``). ``progress(event, payload)`` receives the
    training events ("setup", "step", "epoch", ...). Returns the run's summary (best epoch, its
    metrics, paths).
    """
    import difflib
    from dataclasses import fields

    from clipret.config import LONG_NAMES, TrainConfig
    from clipret.training import loop

    known = {f.name for f in fields(TrainConfig)} - {"root", "out"}
    aliases = {long.replace("-", "_"): name for name, long in LONG_NAMES.items()}
    values = {aliases.get(key, key): str(value) if isinstance(value, os.PathLike) else value for key, value in settings.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known | set(aliases)), n=1)
        raise ClipretError(f"unknown training setting {unknown[0]!r}" + (f" (did you mean {near[0]}?)" if near else ""))
    on_event = progress or (lambda kind, payload: None)
    if resume:
        if overwrite:
            raise ClipretError("--resume continues a run and --overwrite replaces it; pass one of them")
        overrides = {**values, **({"root": str(root)} if root is not None else {})}
        return loop.resume(out, overrides=overrides, on_event=on_event)
    if root is None:
        raise ClipretError("missing ROOT, the dataset folder or CSV (or pass resume=True to continue the run in out)")
    cfg = TrainConfig.from_dict({**values, "root": str(root), "out": str(out)})
    return loop.train(cfg, overwrite=overwrite, on_event=on_event)
