"""``clipret evaluate``: Recall@K, Precision@K, mAP@K, mAP, MAP@R, R-precision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Json
from clipret.errors import ClipretError


@_console.handle_errors
def evaluate_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="results.json to score (omit with --query/--gallery).", show_default=False)] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="CSV of filename,label for query and gallery ids. Default: class subfolders in the ids.")] = None,
    query: Annotated[Optional[Path], typer.Option("--query", "-q", help="Query embeddings .npy (scores the full ranking).")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", "-g", help="Gallery embeddings .npy: the full ranking's gallery, or the gallery results.json was searched in (default: the one its sidecar names).")] = None,
    gallery_from_labels: Annotated[bool, typer.Option(help="For a results.json without a sidecar: take every labelled id that is not a query as the gallery.")] = False,
    k: Annotated[Optional[list[int]], typer.Option("--k", "-k", help="Cut-offs for Recall@K etc. (top-k positions), e.g. --k 1 5 10 (or --k 1 --k 5).")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow embeddings from different model fingerprints (warns).")] = False,
    as_json: Json = False,
) -> None:
    """Score retrieval against labels.

    R (the relevant items per query) is counted over the whole gallery, so
    scoring a results.json needs its gallery: from --gallery, or from the
    results.json.json sidecar that `clipret query` writes.

    Examples:

    \b
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
        query_ids = [str(r["filename"]) for r in results]
        if label_map is None:
            gallery_ids = _results_gallery(files[0], gallery, gallery_from_labels, None, query_ids)
            label_map = folder_labels(query_ids + gallery_ids)
        else:
            gallery_ids = _results_gallery(files[0], gallery, gallery_from_labels, label_map, query_ids)
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


def _results_gallery(results_path: str, gallery: Path | None, from_labels: bool, label_map: Any, query_ids: list[str]) -> list[str]:
    """The whole gallery a results file was searched in, in order; never a silent guess."""
    from clipret import artifacts

    meta = artifacts.load_results_meta(results_path)
    recorded = (meta or {}).get("gallery") or {}
    if gallery is not None:
        ids = artifacts.load_embeddings(gallery, check_finite=False).ids
        if recorded.get("ids_sha256") and recorded["ids_sha256"] != artifacts.ids_digest(ids):
            raise _mismatch(results_path, gallery, recorded)
        return ids
    if recorded.get("path"):
        path = Path(recorded["path"])
        if not path.is_file():
            raise ClipretError(f"{results_path} was searched in {path}, which no longer exists; pass --gallery")
        ids = artifacts.load_embeddings(path, check_finite=False).ids
        if recorded.get("ids_sha256") != artifacts.ids_digest(ids):
            raise _mismatch(results_path, path, recorded)
        return ids
    if from_labels:
        if label_map is None:
            raise ClipretError("--gallery-from-labels needs --labels")
        queries = set(query_ids)
        return sorted(i for i in label_map if i not in queries)
    raise ClipretError(
        f"{results_path} does not say which gallery it was searched in (no results.json.json sidecar), and R, "
        "the number of relevant items per query, depends on the whole gallery; pass --gallery g.npy, or "
        "--gallery-from-labels to take every labelled id that is not a query"
    )


def _mismatch(results_path: str, gallery: Path, recorded: dict[str, Any]) -> ClipretError:
    return ClipretError(
        f"{gallery} is not the gallery {results_path} was searched in (its sidecar records {recorded.get('count')} "
        f"ids from {recorded.get('path')}); pass the same gallery"
    )
