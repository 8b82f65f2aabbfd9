"""``clipret report``: an HTML page (and PNG) of the worst queries of a results.json, or of a run's training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipret.cli import _console


@_console.handle_errors
def report_command(
    source: Annotated[Path, typer.Argument(help="results.json (from `clipret query`), or a run folder (from `clipret train`) for its training curves.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write (one self-contained file).")] = Path("report.html"),
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="CSV of filename,label: hits, misses and metrics in the report.", show_default="the class subfolder in each id")] = None,
    worst: Annotated[int, typer.Option("--worst", help="Keep only the N queries with the lowest AP as rows (the summary covers all).")] = 200,
    k: Annotated[int, typer.Option("--k", "-k", help="Results shown per query row (the first k of each list).")] = 10,
    thumb: Annotated[int, typer.Option("--thumb", help="Longest side of each embedded thumbnail, in pixels.")] = 128,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write a PNG: the contact sheet of the rows, or the training curves.", show_default="none")] = None,
    queries: Annotated[Optional[Path], typer.Option("--queries", help="Folder the query ids are relative to.", show_default="the folder the query manifest records")] = None,
    gallery_images: Annotated[Optional[Path], typer.Option("--gallery-images", help="Folder the gallery ids are relative to.", show_default="the folder the gallery manifest records")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", "-g", help="Gallery embeddings .npy the results were searched in, for a results.json without a sidecar.", show_default="the one the results' sidecar names")] = None,
) -> None:
    """Write a report you can open in any browser, offline.

    For a results.json: the metrics `clipret evaluate` prints (with the
    chance level), the settings from the results sidecar (model, stages,
    self-matches left out), R@1 and MAP@R per class, then one row per query,
    the lowest AP first: its thumbnail, then its top-k with scores, hits in
    green and misses in red. The rows can be re-sorted and filtered by
    class. Thumbnails are embedded, so the file stands alone; --worst bounds
    its size. --png writes the same rows as a contact sheet.

    For a run folder: its metrics.jsonl (loss, held-out R@1 and MAP@R, base
    and head learning rates per epoch) as line charts.

    Examples:

    \b
      clipret report results.json --labels labels.csv --out report.html
      clipret report results.json --worst 50 --png sheet.png --thumb 96
      clipret report runs/exp1 --out curves.html --png curves.png
    """
    from clipret.report import curves_report, results_report

    if source.is_dir():
        given = [flag for flag, value in (("--labels", labels), ("--queries", queries), ("--gallery-images", gallery_images),
                                          ("--gallery", gallery)) if value is not None]
        if given:
            _console.warn(f"{', '.join(given)} ignored: {source} is a run folder (training curves)")
        done = curves_report(source, out, png=png)
        _console.info(f"wrote the training curves of {done['epochs']} epochs to {out}" + (f" and {png}" if png else ""))
        return
    done = results_report(source, out, labels=labels, gallery=gallery, worst=worst, k=k, thumb=thumb, png=png,
                          queries=queries, gallery_images=gallery_images)
    for note in done["notes"]:
        _console.warn(note)
    if done["missing_images"]:
        _console.warn(f"{done['missing_images']} images could not be shown (missing or unreadable): placeholders in the report")
    _console.info(f"wrote {done['rows']} of {done['n_queries']} queries to {out} ({done['bytes'] / 1e6:.1f} MB)"
                  + (f" and the contact sheet to {png}" if png else ""))
