"""``clipret evaluate``: Recall@K, Precision@K, mAP@K, mAP, MAP@R, R-precision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Json, SearchOptions, search_options
from clipret.cli._search import report_self_matches


@_console.handle_errors
@search_options
def evaluate_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="results.json to score (omit with --query/--gallery).", show_default=False)] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="CSV of filename,label for query and gallery ids.", show_default="the class subfolder in each id")] = None,
    query: Annotated[Optional[Path], typer.Option("--query", "-q", help="Query embeddings .npy (scores the full ranking).", show_default="none: score results.json")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", "-g", help="Gallery embeddings .npy: the full ranking's gallery, or the gallery results.json was searched in.", show_default="the one the results' sidecar names")] = None,
    gallery_from_labels: Annotated[bool, typer.Option(help="For a results.json without a sidecar: take every labelled id that is not a query as the gallery.")] = False,
    k: Annotated[Optional[list[int]], typer.Option("--k", "-k", help="Cut-offs for Recall@K etc. (top-k positions), e.g. --k 1 5 10 (or --k 1 --k 5).", show_default="1 5 10")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow embeddings from different model fingerprints (warns).")] = False,
    per_class: Annotated[bool, typer.Option("--per-class", help="Also print R@1, MAP@R and the query count per class, worst first.", show_default="off")] = False,
    worst: Annotated[int, typer.Option("--worst", help="Also list the N queries with the lowest AP (id, label, AP, rank of first hit).", show_default="none")] = 0,
    options: SearchOptions = SearchOptions(),  # --dba ... --keep-self (see search_options)
    as_json: Json = False,
) -> None:
    """Score retrieval against labels.

    R (the relevant items per query) is counted over the whole gallery, so
    scoring a results.json needs its gallery: from --gallery, or from the
    results.json.json sidecar that `clipret query` writes.

    --query/--gallery scores the full ranking of a .npy gallery (exact, in
    bounded memory) after the same post-processing stages as `clipret query`
    (--dba, --qe, --qe-alpha, --rerank); on an index it scores the index's
    own top lists (deep enough for MAP@R where R allows).

    A query that is also in the gallery (the same source file, or the same
    row when --query and --gallery are one file) is not its own hit: its own
    item is left out of its ranking and of R, as the metric-learning
    benchmarks (CUB-200, Cars-196, SOP) require; --keep-self keeps it.

    --per-class and --worst N add a table each (and the keys per_class and
    worst to --json); AP is over the full ranking, or AP@k at the deepest
    --k for a results.json.

    Examples:

    \b
      clipret evaluate results.json --labels labels.csv --k 1 5 10
      clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --json
      clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --rerank --qe 3
      clipret evaluate results.json --labels labels.csv --per-class --worst 20
    """
    import dataclasses

    from clipret.api import evaluate
    from clipret.data.layout import read_labels_csv
    from clipret.retrieval.gallery import open_gallery
    from clipret.retrieval.results import Results

    # `--k 1 5 10`: click gives --k one value; the others arrive as extra positionals.
    extra = [a for a in (inputs or []) if a.isdigit()]
    files = [a for a in (inputs or []) if not a.isdigit()]
    ks = list(k or []) + [int(a) for a in extra] or [1, 5, 10]
    label_map = read_labels_csv(labels) if labels else None

    if files:
        if query is not None or len(files) > 1:
            _console.fail("give either one results.json or --query/--gallery, not both")
        if gallery_from_labels and label_map is None:
            _console.fail("--gallery-from-labels needs --labels")
        res = Results.load(files[0], gallery, labelled=label_map, gallery_from_labels=gallery_from_labels)
        metrics = evaluate(res, labels=label_map, k=ks, keep_self=options.keep_self, per_class=per_class, worst=worst)
        _explain_missing(files[0], res.records(), ks, metrics, labels)
        found, title = res.self_rows, f"retrieval metrics: {files[0]}"
    elif query is not None and gallery is not None:
        from clipret.artifacts import load_embeddings
        from clipret.retrieval.compat import check_compatible
        from clipret.retrieval.selfmatch import self_matches

        stages = options.stages()
        q, g = load_embeddings(query), open_gallery(gallery, nprobe=options.nprobe, ef_search=options.ef_search)
        for w in check_compatible(q, g, allow_mismatch=allow_mismatch):
            _console.warn(w)
        settings = {key: v for key, v in dataclasses.asdict(options).items() if key not in ("keep_self", "nprobe", "ef_search")}
        with _console.stage_progress() as on_progress:
            metrics = evaluate(q, g, labels=label_map, k=ks, keep_self=options.keep_self, progress=on_progress,
                               allow_mismatch=True, per_class=per_class, worst=worst, **settings)
        found = self_matches(q, g)
        how = "full ranking" if g.index is None else "the index's own top lists"
        title = f"retrieval metrics: {query.name} vs {gallery.name} ({how}, {' + '.join(stages.to_dict()) or 'plain'})"
    else:
        _console.fail("nothing to score: pass results.json, or --query q.npy --gallery g.npy")
        return
    report_self_matches(found, options.keep_self)
    if as_json:
        _console.print_metrics(metrics, title, as_json)
        return
    tables = {key: metrics.pop(key) for key in ("per_class", "worst") if key in metrics}
    _console.print_metrics(metrics, title, as_json)
    if "per_class" in tables:
        _print_rows("per class, worst first", tables["per_class"], ["class", "n_queries", "recall@1", "map@r"])
    if "worst" in tables:
        depth = max((int(key[4:]) for key in metrics if key.startswith("map@") and key[4:].isdigit()), default=0)
        kind = "over the full ranking" if "map" in metrics else f"AP@{depth}"
        _print_rows(f"the {len(tables['worst'])} queries with the lowest AP ({kind})", tables["worst"],
                    ["id", "label", "ap", "first_hit_rank"])


def _print_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A rich table of ``rows``; every cell is plain text (ids and labels are data, never markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), header_style="bold")
    for c in columns:
        table.add_column(c, justify="left" if c in ("class", "id", "label") else "right")
    for row in rows:
        table.add_row(*(Text("-" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]))
                        for c in columns))
    _console.out.print(table)


def _explain_missing(results_path: str, results: Any, ks: list[int], metrics: dict[str, Any], labels: Path | None) -> None:
    """Say which --k are beyond the lists' depth, and how to get MAP@R and mAP when top-k lists cannot give them."""
    from clipret import artifacts
    from clipret.retrieval.compat import recorded_path

    depth = min(len(r["samples"]) for r in results)
    dropped = sorted({k for k in ks if f"recall@{k}" not in metrics})
    if dropped:
        _console.warn(f"--k {' '.join(map(str, dropped))} left out: {results_path} holds {depth} results per query, "
                      f"and a cut-off beyond that cannot be scored (run `clipret query` with --k {max(dropped)} or more)")
    if "map@r" in metrics and "map" in metrics:
        return
    meta = artifacts.load_results_meta(results_path) or {}
    q_path = str(recorded_path(results_path, meta.get("query")) or "QUERY.npy")
    g_path = str(recorded_path(results_path, meta.get("gallery")) or "GALLERY.npy")
    label_arg = f" --labels {labels}" if labels is not None else ""
    embed = ""
    if not q_path.endswith(".npy"):  # the queries were a folder: embed them first
        model = ((meta.get("query") or {}).get("flags") or {}).get("model", "MODEL")
        embed = f"`clipret embed {q_path} --model {model} --out query.npy`, then "
        q_path = "query.npy"
    _console.info(f"MAP@R and mAP need the full ranking (R relevant items per query, more than the {depth} listed): "
                  f"{embed}`clipret evaluate --query {q_path} --gallery {g_path}{label_arg}`")
