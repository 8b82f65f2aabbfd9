"""Progress callbacks: the two shapes clipret uses, and the one adapter between them.

* :data:`Progress`: ``advance(n)``, called with the number of items just finished; the core
  loops (embedding, search, re-ranking, DBA) report this way.
* :data:`StageProgress`: ``on_progress(stage, done, total)``, absolute counts of a named stage;
  a caller that draws one progress bar per stage (``clipret index``, the gallery side of
  ``query``) takes this.

:func:`stage_counter` turns the second into the first for one stage. Torch-free and tiny, so
every layer may import it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "StageProgress", "stage_counter"]

Progress = Callable[[int], None]
StageProgress = Callable[[str, int, int], None]


def stage_counter(on_progress: StageProgress | None, stage: str, total: int) -> Progress | None:
    """``advance(n)`` that adds ``n`` to a running count and reports ``on_progress(stage, count,
    total)``; None when ``on_progress`` is None (nothing to report)."""
    if on_progress is None:
        return None
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        on_progress(stage, done, total)

    return advance
