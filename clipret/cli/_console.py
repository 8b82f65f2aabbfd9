"""Consoles, progress bars, tables and the one-line error exit.

Messages and progress go to stderr; results (tables, --json) go to stdout, so
``clipret evaluate ... --json | jq`` works.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from clipret.errors import ClipretError, first_line
from clipret.progress import StageProgress

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


_debug = False


def set_debug(on: bool) -> None:
    """Set by ``clipret --debug`` for this invocation (CLIPRET_DEBUG=1 in the environment also works)."""
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug or os.environ.get("CLIPRET_DEBUG", "") not in {"", "0"}


def _line(label: str, style: str, message: str) -> Text:
    """``label message`` with only the label styled: the message is data (file names, ids), never markup."""
    return Text.assemble((label, style), " ", message) if label else Text(message)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line of stderr and exit (2 = bad input)."""
    err.print(_line("error:", "bold red", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def leave_group(code: int, message: str | None = None) -> None:
    """Exit a rank whose process group lost a peer: print ``message`` (if any), then leave at once
    (:func:`clipret.parallel.groups.exit_rank`); with one process, a plain exit with ``code``."""
    if message is not None:
        err.print(_line("error:", "bold red", message), highlight=False, soft_wrap=True)
    from clipret import runtime

    if runtime.world_size() <= 1:  # no process group to leave (an in-process caller, a test)
        raise typer.Exit(code)
    from clipret.parallel.groups import exit_rank

    exit_rank(code)


def handle_errors(fn: F) -> F:
    """Turn :class:`ClipretError` into one line and exit code 2 (``--debug`` keeps the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipretError as exc:
            if debug_enabled():
                raise
            fail(str(exc))
        except OSError as exc:  # an I/O failure outside the atomic writers: still one line
            if debug_enabled():
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            fail(f"{exc.strerror or first_line(exc)}{where}")
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def info(message: str, label: str = "", style: str = "bold") -> None:
    """One line on stderr; ``message`` is printed as plain text (never parsed as markup)."""
    err.print(_line(label, style, message), highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(_line("warning:", "yellow", message), highlight=False, soft_wrap=True)


def report_unreadable(items: list[dict[str, str]], action: str = "skipped", noun: str = "image") -> None:
    """One warning line: how many files were unreadable, the first few with their reasons."""
    if not items:
        return
    shown = "; ".join(f"{s['id']}: {s['reason']}" for s in items[:5])
    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
    warn(f"{action} {len(items)} unreadable {noun}(s): {shown}{more}")


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, *fields: str) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; extra ``fields`` are shown after the bar."""
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    progress = Progress(*columns, console=err, transient=False, disable=not err.is_terminal and not os.environ.get("CLIPRET_PROGRESS"))
    with progress:
        task = progress.add_task(description, total=total, **{f: "" for f in fields})

        def advance(n: int = 1, total: int | None = None, **values: Any) -> None:
            if total is not None:
                progress.update(task, total=total)
            progress.update(task, advance=n, **{k: v for k, v in values.items() if k in fields})

        yield advance


@contextlib.contextmanager
def stage_progress() -> Iterator[StageProgress]:
    """Yield ``on_progress(stage, done, total)``: one progress bar per stage, fed absolute counts.
    A new stage closes the previous stage's bar (one live bar at a time)."""
    with contextlib.ExitStack() as stack:
        state: dict[str, Any] = {"stage": None, "done": 0, "advance": None}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage != state["stage"]:
                stack.close()
                state.update(stage=stage, done=0, advance=stack.enter_context(progress_bar(total, stage)))
            state["advance"](done - state["done"])
            state["done"] = done

        yield on_progress


def print_metrics(metrics: dict[str, Any], title: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
        return
    table = Table(title=Text(title), show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(Text(key), Text(f"{value:.4f}" if isinstance(value, float) else str(value)))
    out.print(table)
