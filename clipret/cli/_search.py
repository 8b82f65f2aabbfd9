"""What ``clipret query`` and ``clipret evaluate`` both print about a search (over :mod:`clipret.api`)."""

from __future__ import annotations

from typing import Any

from clipret.cli import _console


def report_self_matches(found: Any, keep_self: bool) -> None:
    """One line when some queries are in the gallery: what happened to their own items."""
    from clipret.retrieval import selfmatch

    n = selfmatch.count(found)
    if n and keep_self:
        _console.info(f"kept {n} self-match(es): queries whose own item is in the gallery may list it (--keep-self)")
    elif n:
        _console.info(f"left out {n} self-match(es): a query's own item in the gallery is not its hit "
                      "(--keep-self keeps them)")
