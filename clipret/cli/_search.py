"""Search with progress bars, shared by ``clipret query`` and ``clipret evaluate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipret.cli import _console

if TYPE_CHECKING:
    import numpy as np


def prepare(gal: Any, stages: Any) -> Any:
    """:func:`~clipret.retrieval.gallery.prepare_search` with a progress bar per long gallery-side
    step (DBA, the re-ranking graph); its notes are printed as warnings."""
    from clipret.retrieval.gallery import prepare_search

    with _console.stage_progress() as on_progress:
        setup = prepare_search(gal, stages, on_progress=on_progress)
    for note in setup.notes:
        _console.warn(note)
    return setup


def search(queries: np.ndarray, gal: Any, k: int, stages: Any, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the pipeline over an opened gallery with progress bars: (scores (Q, k), rows (Q, k)).

    ``exclude`` (Q,): each query's own gallery row or -1, left out of its list."""
    from clipret.retrieval.pipeline import retrieve
    from clipret.retrieval.rerank import rerank_progress_total

    setup = prepare(gal, stages)
    total = rerank_progress_total(len(queries), len(gal), builds_graph=False) if stages.rerank else len(queries)
    with _console.progress_bar(total, "re-rank" if stages.rerank else "search") as advance:
        return retrieve(queries, setup.vectors, k, stages, searcher=setup.searcher, graph=setup.graph, exclude=exclude,
                        on_progress=advance)


def report_self_matches(found: Any, keep_self: bool) -> None:
    """One line when some queries are in the gallery: what happened to their own items."""
    from clipret.retrieval import selfmatch

    n = selfmatch.count(found)
    if n and keep_self:
        _console.info(f"kept {n} self-match(es): queries whose own item is in the gallery may list it (--keep-self)")
    elif n:
        _console.info(f"left out {n} self-match(es): a query's own item in the gallery is not its hit "
                      "(--keep-self keeps them)")
