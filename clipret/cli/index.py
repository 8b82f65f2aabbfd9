"""``clipret index``: build a FAISS index pair, add to it, remove from it, describe it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from clipret.cli import _console
from clipret.cli._options import Json

_Int = Optional[int]
_NO_CHECKSUM = "none (an older clipret wrote it: loading checks its structure, not its bytes; --add or a rebuild records one)"


@_console.handle_errors
def index_command(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Embeddings .npy files (with their .json manifests) or folders of them, in id order.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Index file to write (its sidecar is OUT.json).", show_default="INPUT.faiss, beside the first input")] = None,
    type_: Annotated[str, typer.Option("--type", help="auto, flat, hnsw, ivf or ivfpq.")] = "auto",
    nlist: Annotated[_Int, typer.Option(help="IVF cells: a power of two.", show_default="the power of two nearest 4*sqrt(N), with >= 39 vectors a cell")] = None,
    m: Annotated[_Int, typer.Option("--m", help="hnsw: graph degree. ivfpq: PQ sub-quantizers, a divisor of dim.", show_default="hnsw 32, ivfpq dim/4")] = None,
    nbits: Annotated[_Int, typer.Option(help="ivfpq: bits per PQ code.", show_default="8")] = None,
    ef_construction: Annotated[_Int, typer.Option(help="hnsw: candidate list while building.", show_default="128")] = None,
    ef_search: Annotated[_Int, typer.Option(help="hnsw: candidate list while searching (`query --ef-search` overrides).", show_default="256")] = None,
    nprobe: Annotated[_Int, typer.Option(help="ivf/ivfpq: cells visited per query (`query --nprobe` overrides).", show_default="max(32, nlist/64)")] = None,
    max_memory: Annotated[Optional[str], typer.Option(help="Memory budget for the index, e.g. 4GB or 512MiB: auto picks the best expected recall that fits.", show_default="no budget")] = None,
    threads: Annotated[_Int, typer.Option(help="FAISS OpenMP threads.", show_default="all cores")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the training sample and k-means of IVF/PQ indexes: the same seed "
                                      "gives a byte-identical index.")] = 0,
    add: Annotated[Optional[list[Path]], typer.Option("--add", help="Append these embeddings (.npy or folder; repeatable) to --index.", show_default="none")] = None,
    remove: Annotated[Optional[Path], typer.Option("--remove", help="Remove the ids listed in this text file (one per line) from --index.", show_default="none")] = None,
    index: Annotated[Optional[Path], typer.Option("--index", help="The index that --add/--remove change.", show_default="none")] = None,
    info: Annotated[Optional[Path], typer.Option("--info", help="Print an index's type, count, dim, file size, fingerprint and parameters.", show_default="none")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow embeddings from another model fingerprint or with other flags (warns).")] = False,
    as_json: Json = False,
) -> None:
    """Build a FAISS index (inner product over L2-normalised vectors), or change or describe one.

    Without faiss installed this fails with one line: pip install 'clipret[faiss]'.
    Exact search (query/evaluate on .npy) never needs it.

    Examples:

      clipret index gallery.npy --out gallery.faiss

      clipret index shards/ --out gallery.faiss --type ivf --max-memory 4GB

      clipret index --add more.npy --index gallery.faiss

      clipret index --remove gone.txt --index gallery.faiss

      clipret index --info gallery.faiss --json
    """
    modes = [name for name, given in (("build", bool(inputs)), ("--add", bool(add)), ("--remove", remove is not None),
                                      ("--info", info is not None)) if given]
    if len(modes) != 1:
        _console.fail("give embeddings to build from (with --out), or one of --add, --remove, --info"
                      + (f"; got {' and '.join(modes)}" if modes else ""))
    if info is not None:
        return _print_info(info, as_json)

    from clipret.retrieval.index import import_faiss, set_threads

    import_faiss()
    set_threads(threads)
    if inputs:
        params = {"nlist": nlist, "m": m, "nbits": nbits, "ef_construction": ef_construction, "ef_search": ef_search,
                  "nprobe": nprobe}
        path = _build(inputs, out, type_, params, max_memory=max_memory, seed=seed, allow_mismatch=allow_mismatch)
    elif index is None:
        _console.fail(f"{modes[0]} needs --index, the index to change")
    elif add:
        path = _add(index, add, allow_mismatch=allow_mismatch)
    else:
        assert remove is not None
        path = _remove(index, remove)
    if as_json:
        _print_info(path, True)


def _build(inputs: list[Path], out: Path | None, kind: str, params: dict[str, Any], *, max_memory: str | None, seed: int,
           allow_mismatch: bool) -> Path:
    """Build mode: the index pair ``out`` from ``inputs`` (:meth:`clipret.Gallery.build`); return ``out``."""
    from clipret.retrieval.gallery import Gallery

    if out is None:
        _console.fail("building an index needs --out, e.g. --out gallery.faiss")

    def on_plan(plan: Any, n: int, dim: int) -> None:
        _print_plan(plan, n, dim)
        unused = [k for k, v in params.items() if v is not None and k not in plan.params]
        if unused:
            _console.warn(f"{plan.type} does not use {', '.join('--' + k.replace('_', '-') for k in unused)}; ignored")

    notes: list[str] = []
    with _console.stage_progress() as progress:
        gallery = Gallery.build(inputs, out, type=kind, max_memory=max_memory, seed=seed, allow_mismatch=allow_mismatch,
                                progress=progress, warnings=notes, on_plan=on_plan, **params)
    _warn_all(notes)
    meta = gallery.index.meta
    _console.info(f"wrote {out} and {out}.json: {meta['type']}, {len(gallery)} vectors of dim {gallery.dim}")
    return out


def _add(index: Path, add: list[Path], *, allow_mismatch: bool) -> Path:
    """--add mode: append the embeddings ``add`` to ``index`` in place (:meth:`clipret.Gallery.add`); return ``index``."""
    from clipret.retrieval.gallery import Gallery

    notes: list[str] = []
    with _console.stage_progress() as progress:
        gallery = Gallery.open(index).add(add, allow_mismatch=allow_mismatch, progress=progress, warnings=notes)
    _warn_all(notes)
    _console.info(f"added to {index}: now {len(gallery)} vectors")
    return index


def _remove(index: Path, remove: Path) -> Path:
    """--remove mode: remove the ids listed in the file ``remove`` from ``index`` (:meth:`clipret.Gallery.remove`)."""
    from clipret.retrieval.gallery import Gallery

    ids = _read_ids(remove)
    gallery = Gallery.open(index)
    before, notes = len(gallery), []
    gallery.remove(ids, missing_ok=True, warnings=notes)
    _warn_all(notes)
    _console.info(f"removed {before - len(gallery)} id(s) from {index}: now {len(gallery)} vectors")
    return index


def _warn_all(notes: list[str]) -> None:
    for note in notes:
        _console.warn(note)


def _print_plan(plan: Any, n: int, dim: int) -> None:
    from clipret.retrieval.index import format_size

    _console.info(f"{plan.reason}: {plan.describe()} for {n} vectors of dim {dim}; "
                  f"expected memory {format_size(plan.memory)}, expected recall@10 {plan.recall:.3f} (bench/search.py)")


def _read_ids(path: Path) -> list[str]:
    from clipret.errors import ClipretError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipretError(f"ids file not found: {path}") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ClipretError(f"{path} lists no ids; write one id per line")
    return ids


def _print_info(path: Path, as_json: bool) -> None:
    from clipret.retrieval.gallery import Gallery
    from clipret.retrieval.index import format_size

    info = Gallery.info(path)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title=escape(str(path)), show_header=False)
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "-"
    rows = [("type", info["type"]), ("count", str(info["count"])), ("dim", str(info["dim"])),
            ("file size", format_size(info["file_bytes"])), ("fingerprint", str(info["model_fingerprint"])),
            ("flags", json.dumps(info["flags"])), ("params", params),
            ("removed", f"{info['tombstones']} tombstones ({info['tombstone_fraction']:.1%}), {info['holes']} holes"),
            ("checksum", f"sha256 {info['faiss_sha256'][:16]}…" if info["faiss_sha256"] else _NO_CHECKSUM),
            ("clipret", str(info["clipret_version"]))]
    for key, value in rows:
        table.add_row(key, escape(value))
    _console.out.print(table)
