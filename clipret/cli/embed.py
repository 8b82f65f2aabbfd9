"""``clipret embed DIR``: write (N, D) embeddings and their manifest (on one process, or sharded across torchrun ranks)."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import (
    Amp,
    Dba,
    Device,
    Decode,
    ExactDecode,
    Pretrained,
    Tta,
    Workers,
    warn_ignored_pretrained,
    warn_random_weights,
)

class RowChoice(str, enum.Enum):
    gallery = "gallery"
    query = "query"
    validation = "validation"
    train = "train"
    all = "all"


Rows = Annotated[
    Optional[RowChoice],
    typer.Option("--rows", help="With a dataset CSV: which rows to embed (validation rows marked is_gallery or "
                 "is_query, every validation row, the train rows, or all).", show_default="gallery"),
]

EmbedBatchSize = Annotated[
    Optional[int],
    typer.Option("--batch-size", help="Images per forward pass.", show_default="256 on CUDA, 64 on the CPU"),
]


def _fail(message: str) -> None:
    """:func:`_console.fail` on rank 0; the other torchrun ranks exit with the same code, silently."""
    from clipret import runtime

    if not runtime.is_main():
        raise typer.Exit(2)
    _console.fail(message)


@contextlib.contextmanager
def rank_stage_progress(description: str) -> Iterator[Any]:
    """A ``progress(stage, done, total)`` for :meth:`clipret.Encoder.embed_folder`: a bar on rank 0
    (named ``description``); with --debug under torchrun every rank also says how many images it embeds."""
    from clipret import runtime

    def say_count(done: int, total: int) -> None:
        if done == 0 and runtime.world_size() > 1 and _console.debug_enabled():
            _console.info(f"rank {runtime.rank()} of {runtime.world_size()}: {total} image(s) to embed", label="debug:")

    if not runtime.is_main():
        yield lambda stage, done, total: say_count(done, total) if stage == "embed" else None
        return
    name = description if runtime.world_size() == 1 else f"{description} (rank 0's share)"
    with _console.stage_progress() as bar:
        def progress(stage: str, done: int, total: int) -> None:
            if stage != "embed":  # the --strict check before it
                bar(f"check images ({description})", done, total)
                return
            say_count(done, total)
            bar(name, done, total)

        yield progress


@_console.handle_errors
def embed_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Folder of images (flat or with class subfolders), or a dataset CSV "
                                           "(path,label,split[,is_query,is_gallery]: its gallery rows, see --rows).")],
    model: Annotated[str, typer.Option("--model", "-m", help="A run folder from `clipret train`, or an open_clip model name/config for zero-shot CLIP.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npy; a .json manifest is written beside it.")] = Path("embeddings.npy"),
    pretrained: Pretrained = None,
    batch_size: EmbedBatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    strict: Annotated[bool, typer.Option(
        help="Check every image first; if any cannot be read, name them and fail (exit 2) with nothing written.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run: re-embed only the shards not yet written (OUT.parts/). The model, images "
             "and every setting that changes a row (--tta, --exact-decode, --decode, --batch-size, --amp, --device) must match; "
             "--batch-size and --shard-size left out take the interrupted run's.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Discard the finished shards of an interrupted run (OUT.parts/) and start again.")] = False,
    shard_size: Annotated[
        Optional[int],
        typer.Option(help="Images per progress shard (OUT.parts/): the unit --resume skips and torchrun ranks share. "
                     "Default: about 1/256 of the images, 256 to 8192 (on --resume: the interrupted run's).", show_default="auto"),
    ] = None,
    tta: Tta = None,
    exact_decode: ExactDecode = False,
    decode: Decode = "auto",
    dba: Dba = 0,
    rows: Rows = None,
) -> None:
    """Embed every image under FOLDER into OUT (.npy, float32, L2-normalised, rows in id order).

    Examples:

    \b
      clipret embed ./data/test/gallery --model runs/exp1 --out gallery.npy
      clipret embed ./data/test/gallery --model runs/exp1 --tta flip --out gallery-flip.npy
      clipret embed ./data/dataset.csv --model runs/exp1 --out gallery.npy

    Zero-shot baseline (CLIP's own embedding, no head):

    \b
      clipret embed ./data/test/gallery --model ViT-B-32 --pretrained openai --out g0.npy

    On several GPUs or nodes, the same command under torchrun: each rank embeds its own
    shards, rank 0 merges them (OUT must be on a file system every node shares):

    \b
      torchrun --nproc_per_node 8 -m clipret embed ./gallery --model runs/exp1 --out gallery.npy

    Ctrl-C (or SIGTERM) keeps the finished shards, prints the command that continues with
    --resume, and exits (130; 143 on SIGTERM). Run again without --resume, embed refuses to
    discard them unless given --overwrite.
    """
    from clipret import runtime
    from clipret.data.sources import check_source
    from clipret.embedding.encoder import Encoder
    from clipret.embedding.gpu_decode import decode_choice
    from clipret.parallel.groups import PeerError

    if out.suffix != ".npy":
        _fail(f"--out must end in .npy, got {out}")
    if shard_size is not None and shard_size <= 0:
        _fail(f"--shard-size must be positive, got {shard_size}")
    if batch_size is not None and batch_size <= 0:
        _fail(f"--batch-size must be positive, got {batch_size}")
    if dba < 0:
        _fail(f"--dba takes a number of neighbours (0 turns it off), got {dba}")
    decode_choice(decode)  # an unknown --decode fails here, in one line
    if resume and overwrite:
        _fail("--resume continues an interrupted run and --overwrite discards it; pass one of them")
    check_source(folder)  # before the model loads
    if runtime.is_main():
        warn_ignored_pretrained(model, pretrained)
        warn_random_weights(model, pretrained)
    try:
        with runtime.catch_stop_signals(defer=False), rank_stage_progress("embed") as progress:
            encoder = Encoder.load(model, pretrained, device=device, amp=amp)
            emb = encoder.embed_folder(folder, tta=tta, out=out, progress=progress, shard_size=shard_size, resume=resume,
                                       overwrite=overwrite, batch_size=batch_size, workers=workers, strict=strict,
                                       exact_decode=exact_decode, decode=decode, dba=dba, rows=rows.value if rows is not None else None)
    except PeerError:  # another rank failed and printed why
        _console.leave_group(2)
    except KeyboardInterrupt as stop:  # runtime.Interrupted: SIGINT or SIGTERM
        _interrupted(ctx, out, stop)
    if not runtime.is_main():
        return
    _console.info(f"wrote {len(emb)} embeddings (dim {emb.dim}) to {out}")
    _console.report_unreadable(emb.skipped)


def _interrupted(ctx: typer.Context, out: Path, stop: KeyboardInterrupt) -> NoReturn:
    """Say what a stop signal left (the finished shards stay) and how to go on; exit 130 or 143."""
    from clipret import runtime
    from clipret.embedding.parts import finished_shards, parts_dir

    code = stop.exit_code if isinstance(stop, runtime.Interrupted) else 130
    if runtime.is_main():
        name = stop.name if isinstance(stop, runtime.Interrupted) else "SIGINT"
        kept = finished_shards(parts_dir(out))
        _console.info(f"stopped by {name}; {kept} finished shard(s) kept in {parts_dir(out)}; continue with: "
                      f"{runtime.command_line(_resume_arguments(ctx))}")
    raise typer.Exit(code)


def _resume_arguments(ctx: typer.Context) -> list[str]:
    """This command's arguments as given (defaults left out), with ``--resume`` instead of ``--overwrite``."""
    args = [ctx.command.name or "embed"]
    for param in ctx.command.params:  # typer's own click: told apart by attributes, not classes
        value = ctx.params.get(param.name or "")
        source = ctx.get_parameter_source(param.name or "")
        if param.name in {"resume", "overwrite"} or value is None or source is None or source.name == "DEFAULT":
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif getattr(param, "is_flag", False):
            args += [param.opts[0]] if value else param.secondary_opts[:1]
        else:
            args += [param.opts[0], str(value)]
    return [*args, "--resume"]
