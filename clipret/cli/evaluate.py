"""``clipret evaluate``: Recall@K, Precision@K, mAP@K, mAP, MAP@R, R-precision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Json, SearchOptions, search_options
from clipret.cli._search import prepare, report_self_matches, search
from clipret.errors import ClipretError


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

    Examples:

    \b
      clipret evaluate results.json --labels labels.csv --k 1 5 10
      clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --json
      clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --rerank --qe 3
    """
    from clipret import artifacts, evaluation
    from clipret.data.layout import folder_labels, read_labels_csv
    from clipret.retrieval import selfmatch
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
        found = _results_self_matches(files[0], gallery, query_ids, gallery_ids)
        metrics = evaluation.evaluate_results(results, label_map, gallery_ids, ks, exclude=None if options.keep_self else found)
        _explain_missing(files[0], results, ks, metrics, labels)
        title = f"retrieval metrics: {files[0]}"
    elif query is not None and gallery is not None:
        from clipret.retrieval.gallery import open_gallery

        stages = options.stages()
        q, g = artifacts.load_embeddings(query), open_gallery(gallery, nprobe=options.nprobe, ef_search=options.ef_search)
        for w in check_compatible(q, g, allow_mismatch=allow_mismatch):
            _console.warn(w)
        if label_map is None:
            label_map = folder_labels(q.ids + g.ids)
        found = selfmatch.self_matches(q, g)
        metrics, how = _score_embeddings(q, g, label_map, ks, stages, None if options.keep_self else found)
        title = f"retrieval metrics: {query.name} vs {gallery.name} ({how})"
    else:
        _console.fail("nothing to score: pass results.json, or --query q.npy --gallery g.npy")
        return
    metrics["self_matches_excluded"] = 0 if options.keep_self else selfmatch.count(found)
    report_self_matches(found, options.keep_self)
    _console.print_metrics(metrics, title, as_json)


def _score_embeddings(q: Any, g: Any, label_map: Any, ks: list[int], stages: Any, exclude: Any) -> tuple[dict[str, Any], str]:
    """Full ranking of a .npy gallery (after the stages), or an index's own top lists.

    ``exclude``: (Q,) each query's own gallery row or -1, left out of its ranking and R (None: none)."""
    from clipret import evaluation, metrics
    from clipret.evaluation import chunk_rows
    from clipret.retrieval.pipeline import score_function

    named = " + ".join(stages.to_dict()) or "plain"
    if g.index is None:
        setup = prepare(g, stages)
        rows = chunk_rows(len(g))
        score_fn = score_function(q.vectors, setup.vectors, stages, rows, searcher=setup.searcher, graph=setup.graph,
                                  exclude=exclude)
        with _console.progress_bar(len(q), "evaluate") as advance:
            result = evaluation.evaluate_embeddings(q, g, label_map, ks, score_fn=score_fn if stages.any else None,
                                                    exclude=exclude, on_progress=advance)
        return result, f"full ranking, {named}"
    q_codes, g_codes = evaluation.label_codes(q.ids, g.ids, label_map)
    r_max = int(metrics.count_relevant(q_codes, g_codes).max(initial=0))
    depth = min(len(g), max(max(ks), min(r_max, 1000)))
    _, rows = search(q.vectors, g, depth, stages, exclude=exclude)
    if exclude is not None and (exclude >= 0).any() and depth == len(g):
        depth, rows = depth - 1, rows[:, : depth - 1]  # a query's own item is out: G - 1 items are left to rank
    if (rows < 0).any() or depth == 0:
        raise ClipretError(f"the index returned fewer than {depth} neighbours for some queries; raise --nprobe or --ef-search")
    return (metrics.evaluate_topk(q_codes, g_codes, rows, [k_ for k_ in ks if k_ <= depth], exclude=exclude),
            f"index top-{depth}, {named}")


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


def _results_self_matches(results_path: str, gallery: Path | None, query_ids: list[str], gallery_ids: list[str]) -> Any:
    """(Q,) each query's own gallery row or -1, from what the sidecar (or --gallery's manifest) records."""
    from clipret import artifacts
    from clipret.retrieval import selfmatch

    meta = artifacts.load_results_meta(results_path) or {}
    g_side = meta.get("gallery")
    if gallery is not None:
        g_side = _gallery_side(gallery)
    return selfmatch.self_matches(selfmatch.Recorded.from_sidecar(query_ids, meta.get("query")),
                                  selfmatch.Recorded.from_sidecar(gallery_ids, g_side))


def _gallery_side(gallery: Path) -> dict[str, Any]:
    """What describe() records, read from a gallery file's own manifest or sidecar."""
    from clipret.retrieval.compat import describe
    from clipret.retrieval.gallery import open_gallery

    return describe(open_gallery(gallery), gallery)


def _results_gallery(results_path: str, gallery: Path | None, from_labels: bool, label_map: Any, query_ids: list[str]) -> list[str]:
    """The whole gallery a results file was searched in, in order; never a silent guess."""
    from clipret import artifacts
    from clipret.retrieval.compat import recorded_path
    from clipret.retrieval.gallery import read_gallery_ids

    meta = artifacts.load_results_meta(results_path)
    recorded = (meta or {}).get("gallery") or {}
    if gallery is not None:
        ids = read_gallery_ids(gallery)
        if recorded.get("ids_sha256") and recorded["ids_sha256"] != artifacts.ids_digest(ids):
            raise _mismatch(results_path, gallery, recorded)
        return ids
    if recorded.get("path"):
        path = recorded_path(results_path, recorded)
        assert path is not None
        if not path.is_file():
            raise ClipretError(f"{results_path} was searched in {path}, which no longer exists; pass --gallery")
        ids = read_gallery_ids(path)
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
