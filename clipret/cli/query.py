"""``clipret query QUERY --gallery g.npy``: top-k retrieval into results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Amp, BatchSize, Device, Pretrained, TopK, Tta, Workers, warn_ignored_pretrained


@_console.handle_errors
def query_command(
    query: Annotated[Path, typer.Argument(help="Query embeddings (.npy with its .json manifest) or a folder of images.")],
    gallery: Annotated[Path, typer.Option("--gallery", "-g", help="Gallery embeddings .npy from `clipret embed`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="results.json to write (and its sidecar results.json.json).")] = Path("results.json"),
    k: TopK = 10,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to embed a query folder with (as for `clipret embed`); not used for .npy queries.")] = None,
    pretrained: Pretrained = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow query and gallery from different model fingerprints (warns).")] = False,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    strict: Annotated[bool, typer.Option(help="Fail if any query image cannot be read.")] = False,
    tta: Tta = None,
) -> None:
    """Retrieve the top-k gallery items for each query by exact cosine similarity.

    Writes a list of {"filename": query_id, "samples": [gallery ids, best first],
    "scores": [cosine, ...]}, and beside it results.json.json recording the query,
    the gallery and the settings (so `clipret evaluate results.json` knows the gallery).

    Example:

    \b
      clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --k 10 --out results.json
    """
    from clipret import artifacts
    from clipret.retrieval.compat import check_compatible, describe
    from clipret.retrieval.search import ExactSearcher

    if k <= 0:
        _console.fail(f"--k must be positive, got {k}")
    gal = artifacts.load_embeddings(gallery)
    if len(gal) == 0:
        _console.fail(f"the gallery {gallery} holds no embeddings; embed a folder with images first")
    if query.is_dir():
        if model is None:
            _console.fail("a query folder needs --model (the model the gallery was embedded with)")
        warn_ignored_pretrained(model, pretrained)
        from clipret.inference import embed_folder

        with _console.progress_bar(None, "embed queries") as advance:
            q = embed_folder(query, model, pretrained, batch_size=batch_size, workers=workers, device=device, amp=amp,
                             strict=strict, tta=tta, on_start=lambda n: advance(0, total=n), on_batch=advance)
        _console.report_unreadable(q.skipped)
    else:
        if tta is not None:
            _console.fail(f"--tta applies when images are embedded, and {query} holds embeddings already; "
                          "pass --tta to the `clipret embed` that makes the query .npy (and the gallery's)")
        for name, value in (("--model", model), ("--pretrained", pretrained)):
            if value is not None:
                _console.warn(f"{name} is ignored: the queries in {query} are embeddings already")
        q = artifacts.load_embeddings(query)
    for w in check_compatible(q, gal, allow_mismatch=allow_mismatch):
        _console.warn(w)
    with _console.progress_bar(len(q), "search") as advance:
        scores, idx = ExactSearcher(gal.vectors).search(q.vectors, k, on_chunk=advance)
    samples = [[gal.ids[j] for j in row] for row in idx]
    meta = {"k": k, "score": "cosine similarity", "query": describe(q, query), "gallery": describe(gal, gallery),
            "stages": {}}
    artifacts.save_results(out, q.ids, samples, scores, meta=meta)
    _console.info(f"wrote top-{min(k, len(gal))} results for {len(q)} queries to {out}")
