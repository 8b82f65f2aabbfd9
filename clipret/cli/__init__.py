"""The ``clipret`` command line: a thin Typer layer over the core modules.

Each subcommand lives in its own module and imports torch (or anything
heavy) only inside the command body, so ``clipret --help`` is instant.
"""

from __future__ import annotations

import os
import re
import sys

import typer
from typer.core import TyperGroup

from clipret import __version__
from clipret.cli import _console, demo, embed, evaluate, index, prepare, query, report, serve, train
from clipret.errors import ClipretError

def _tta_words(word: str) -> bool:
    return {p.strip().lower() for p in word.split(",")} <= {"flip", "scales", "none", "off"}


def _looks_like_tta(word: str) -> bool:
    """A misspelt --tta value (``flips``, ``flip,scale``): letters and commas, no path characters."""
    return bool(re.fullmatch(r"[A-Za-z]+(,[A-Za-z]*)*", word))


def _looks_like_count(word: str) -> bool:
    """A misspelt --qe value (``3x``, ``2.5``): it starts with a digit."""
    return word[:1].isdigit()


# Options whose value is optional, as the design card writes them (`query --tta --rerank --qe`): given
# bare, they take the default below; the next word is their value only when it looks like one.
# (default, is a value, looks like a misspelt value, the message for one)
BARE_VALUES = {
    "--tta": ("flip", _tta_words, _looks_like_tta, "unknown --tta {!r}; use flip or flip,scales"),
    "--qe": ("5", str.isdigit, _looks_like_count, "--qe takes a whole number of neighbours (a bare --qe means 5), got {!r}"),
}


def expand_bare_options(args: list[str]) -> list[str]:
    """``[..., "--tta", "--rerank", "--qe"]`` -> ``[..., "--tta", "flip", "--rerank", "--qe", "5"]``; given values stay.

    A next word that is not a value, nor a path that exists, but looks like a misspelt value
    (``--tta flips``, ``--qe 3x``) is a :class:`ClipretError` that says what the values are.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in BARE_VALUES:
            default, is_value, looks_like, message = BARE_VALUES[arg]
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not is_value(nxt) and looks_like(nxt) and not os.path.exists(nxt):
                raise ClipretError(message.format(nxt))
            if nxt is None or not is_value(nxt):
                out.append(default)
    return out


class _Group(TyperGroup):
    """The command group; lets ``--tta`` and ``--qe`` be given bare, as the design card writes them."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        try:
            expanded = expand_bare_options(list(args))
        except ClipretError as exc:
            _console.fail(str(exc))
        return super().parse_args(ctx, expanded)


app = typer.Typer(
    name="clipret",
    cls=_Group,
    help=(
        "Train and serve CLIP-based image retrieval.\n\n"
        "Typical run:\n\n"
        "  clipret train ./data --out runs/exp1\n\n"
        "  clipret embed ./data/test/gallery --model runs/exp1 --out gallery.npy\n\n"
        "  clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --out results.json\n\n"
        "  clipret evaluate results.json --labels labels.csv\n\n"
        "Try it offline in a minute: clipret demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipret {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    max_image_pixels: int = typer.Option(
        None, "--max-image-pixels", help="Refuse images with more pixels than this (decompression-bomb guard). Default 178956970."
    ),
) -> None:
    _console.set_debug(debug)
    if max_image_pixels is not None:
        if max_image_pixels <= 0:
            raise typer.BadParameter("must be positive", param_hint="--max-image-pixels")
        os.environ["CLIPRET_MAX_IMAGE_PIXELS"] = str(max_image_pixels)
        if "clipret.data.decode" in sys.modules:
            sys.modules["clipret.data.decode"].set_max_pixels(max_image_pixels)


app.command("train")(train.train_command)
app.command("embed")(embed.embed_command)
app.command("index")(index.index_command)
app.command("query")(query.query_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("demo")(demo.demo_command)
app.command("prepare")(prepare.prepare_command)
app.command("serve")(serve.serve_command)
app.command("report")(report.report_command)


def main() -> None:
    app()
