"""``clipret embed DIR``: write (N, D) embeddings and their manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipret.cli import _console
from clipret.cli._options import Amp, BatchSize, Dba, Device, ExactDecode, Pretrained, Tta, Workers, warn_ignored_pretrained


@_console.handle_errors
def embed_command(
    folder: Annotated[Path, typer.Argument(help="Folder of images (flat or with class subfolders).")],
    model: Annotated[str, typer.Option("--model", "-m", help="A run folder from `clipret train`, or an open_clip model name/config for zero-shot CLIP.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npy; a .json manifest is written beside it.")] = Path("embeddings.npy"),
    pretrained: Pretrained = None,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    strict: Annotated[bool, typer.Option(help="Fail (exit 2, nothing written) if any image cannot be read.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run: re-embed only the shards not yet written.")] = False,
    shard_size: Annotated[int, typer.Option(help="Images per progress shard (OUT.parts/), the unit --resume skips.")] = 8192,
    tta: Tta = None,
    exact_decode: ExactDecode = False,
    dba: Dba = 0,
) -> None:
    """Embed every image under FOLDER into OUT (.npy, float32, L2-normalised, rows in id order).

    Examples:

    \b
      clipret embed ./data/test/gallery --model runs/exp1 --out gallery.npy
      clipret embed ./data/test/gallery --model runs/exp1 --tta flip --out gallery-flip.npy

    Zero-shot baseline (CLIP's own embedding, no head):

    \b
      clipret embed ./data/test/gallery --model ViT-B-32 --pretrained openai --out g0.npy
    """
    from clipret.inference import embed_folder

    if out.suffix != ".npy":
        _console.fail(f"--out must end in .npy, got {out}")
    if shard_size <= 0:
        _console.fail(f"--shard-size must be positive, got {shard_size}")
    if dba < 0:
        _console.fail(f"--dba takes a number of neighbours (0 turns it off), got {dba}")
    warn_ignored_pretrained(model, pretrained)
    with _console.progress_bar(None, "embed") as advance:
        emb = embed_folder(folder, model, pretrained, out=out, shard_size=shard_size, resume=resume, batch_size=batch_size,
                           workers=workers, device=device, amp=amp, strict=strict, tta=tta, exact_decode=exact_decode, dba=dba,
                           on_start=lambda n: advance(0, total=n), on_batch=advance)
    _console.info(f"wrote {len(emb)} embeddings (dim {emb.dim}) to {out}")
    _console.report_unreadable(emb.skipped)

