"""``clipret evaluate``: Recall@K, Precision@K, mAP@K, mAP, MAP@R, R-precision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Json


@_console.handle_errors
def evaluate_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="results.json to score (omit with --query/--gallery).", show_default=False)] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="CSV of filename,label for query and gallery ids. Default: class subfolders in the ids.")] = None,
    query: Annotated[Optional[Path], typer.Option("--query", "-q", help="Query embeddings .npy (scores the full ranking).")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", "-g", help="Gallery embeddings .npy (full ranking, or the gallery ids for results.json).")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", "-k", help="Cut-offs, e.g. --k 1 5 10 (or --k 1 --k 5).")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow embeddings from different model fingerprints (warns).")] = False,
    as_json: Json = False,
) -> None:
    """Score retrieval against labels.

    Examples:

      clipret evaluate results.json --labels labels.csv --k 1 5 10

      clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --json
    """
    from clipret import artifacts, evaluation
    from clipret.data.layout import folder_labels, read_labels_csv
    from clipret.retrieval.compat import check_compatible

    # `--k 1 5 10`: click gives --k one value; the others arrive as extra positionals.
    extra = [a for a in (inputs or []) if a.isdigit()]
    files = [a for a in (inputs or []) if not a.isdigit()]
    ks = list(k or []) + [int(a) for a in extra] or [1, 5, 10]
    label_map = read_labels_csv(labels) if labels else None

    if files:
        if query is not None or len(files) > 1:
            _console.fail("give either one results.json or --query/--gallery, not both")
        results = artifacts.load_results(files[0])
        gal = artifacts.load_embeddings(gallery, check_finite=False) if gallery else None
        if label_map is None:
            ids = [r["filename"] for r in results] + [s for r in results for s in r["samples"]] + (gal.ids if gal else [])
            label_map = folder_labels(ids)
            if gal is None:
                _console.fail("without --labels, pass --gallery g.npy so every gallery item (and so R) is known")
        query_ids = {str(r["filename"]) for r in results}
        gallery_ids = gal.ids if gal else sorted(i for i in label_map if i not in query_ids)
        metrics = evaluation.evaluate_results(results, label_map, gallery_ids, ks)
        title = f"retrieval metrics: {files[0]}"
    elif query is not None and gallery is not None:
        q, g = artifacts.load_embeddings(query), artifacts.load_embeddings(gallery)
        for w in check_compatible(q, g, allow_mismatch=allow_mismatch):
            _console.warn(w)
        if label_map is None:
            label_map = folder_labels(q.ids + g.ids)
        metrics = evaluation.evaluate_embeddings(q, g, label_map, ks)
        title = f"retrieval metrics: {query.name} vs {gallery.name} (full ranking)"
    else:
        _console.fail("nothing to score: pass results.json, or --query q.npy --gallery g.npy")
        return
    _console.print_metrics(metrics, title, as_json)
