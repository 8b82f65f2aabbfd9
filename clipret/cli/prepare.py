"""``clipret prepare NAME ROOT`` / ``clipret prepare folder SRC ROOT``: raw dataset files -> clipret's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console

NAMES = "fashion-mnist, cifar100, food101, oxford-pets, cub200, cars196, sop, inshop, folder"


@_console.handle_errors
def prepare_command(
    name: Annotated[str, typer.Argument(help=f"Dataset: {NAMES}.", metavar="NAME", show_default=False)],
    paths: Annotated[Optional[list[str]], typer.Argument(help="ROOT to write into; for folder: SRC ROOT (the class-folder tree, then ROOT).", metavar="ROOT", show_default=False)] = None,
    source: Annotated[Optional[Path], typer.Option("--source", "-s", help="Folder holding the raw files you already have (archives or extracted folders; see docs/prepare.md).", show_default="fashion-mnist: $CLIPRET_FASHION_MNIST or /usr/share/datasets/fashion-mnist; others: required")] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch the raw files through torchvision (fashion-mnist, cifar100, food101, oxford-pets) into --source or the cache; fails at once offline.", show_default="off")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the per-class draws (query/gallery split, subsets): the same seed gives the same split.")] = 0,
    query_per_class: Annotated[Optional[int], typer.Option("--query-per-class", help="Queries drawn from each class's test images (fashion-mnist, cifar100, food101, oxford-pets).", show_default="10")] = None,
    gallery_per_class: Annotated[Optional[int], typer.Option("--gallery-per-class", help="Gallery images per class (fashion-mnist, cifar100, food101, oxford-pets).", show_default="every test image that is not a query")] = None,
    train_per_class: Annotated[Optional[int], typer.Option("--train-per-class", help="Keep at most this many training images per class, drawn with --seed (a quick try; not for comparable numbers).", show_default="all")] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Resize the images to SIZE×SIZE px (fashion-mnist, cifar100).", show_default="as stored: 28 and 32 px")] = None,
    test_classes: Annotated[Optional[str], typer.Option("--test-classes", help="Open set: hold these classes out for testing, train on the rest; a comma list of names, or N = the last N classes (folder: in sorted order; fashion-mnist: in label order).", show_default="none")] = None,
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help="Closed set (folder): this fraction of every class's images goes to testing.", show_default="none")] = None,
    query_fraction: Annotated[Optional[float], typer.Option("--query-fraction", help="Folder: the fraction of each class's test images that become queries; the rest are gallery.", show_default="0.5")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Also write ROOT/dataset.csv (path,label,split,is_query,is_gallery).", show_default="off")] = False,
) -> None:
    """Turn a dataset's raw files into the layout `clipret train` reads.

    Writes ROOT/training/<class>/, ROOT/test/query/, ROOT/test/gallery/,
    ROOT/test/labels.csv and ROOT/prepare.json (dataset, settings, split policy,
    counts). cub200, cars196 and sop use their test set as both queries and
    gallery, as the metric-learning papers do: test/query is a link to
    test/gallery, and `clipret evaluate` leaves each query's own image out of its
    ranking, so the numbers compare with the papers'. Every file is written
    atomically: an interrupted run resumes where it stopped, and a second run
    over a complete ROOT does nothing. The split policy of each dataset is in
    docs/prepare.md.

    Examples:

    \b
      clipret prepare fashion-mnist data/fmnist
      clipret prepare cifar100 data/cifar100 --source ~/Downloads --query-per-class 10 --csv
      clipret prepare cub200 data/cub --source ~/datasets/cub
      clipret prepare cifar100 data/cifar100 --download
      clipret prepare folder ./photos data/photos --test-fraction 0.2 --query-fraction 0.3
      clipret prepare folder ./photos data/photos-open --test-classes 5 --seed 1
    """
    from clipret.errors import ClipretError
    from clipret.prepare import PrepareOptions, prepare
    from clipret.prepare.registry import get_spec

    spec = get_spec(name)
    paths = list(paths or [])
    want = 2 if name == "folder" else 1
    if len(paths) != want:
        usage = "clipret prepare folder SRC ROOT" if name == "folder" else f"clipret prepare {name} ROOT"
        given = f" ({' '.join(paths)})" if paths else ""
        raise ClipretError(f"{usage} takes {want} path(s) after the name, got {len(paths)}{given}")
    src: Path | None = Path(paths[0]) if name == "folder" else source
    if name == "folder" and source is not None:
        raise ClipretError("prepare folder reads SRC; --source is for the named datasets")
    root = Path(paths[-1])
    options = PrepareOptions(seed=seed, query_per_class=query_per_class, gallery_per_class=gallery_per_class,
                             train_per_class=train_per_class, size=size, test_classes=test_classes,
                             test_fraction=test_fraction, query_fraction=query_fraction)
    with _console.stage_progress() as on_progress:
        summary = prepare(name, root, source=src, download=download, options=options, csv=csv, progress=on_progress)
    _report(root, spec.title, summary)


def _report(root: Path, title: str, summary: dict[str, Any]) -> None:
    counts, classes = summary["counts"], summary["classes"]
    shared = summary["protocol"] == "shared"
    total = counts["training"] + counts["gallery"] + (0 if shared else counts["query"])
    if summary["nothing_to_do"]:
        _console.info(f"{root} is complete ({total} images); nothing to do")
        return
    _console.info(f"prepared {title} in {root}: wrote {summary['written']} of {total} images")
    _console.info(f"training: {counts['training']} images, {classes['training']} classes", label="  ")
    if shared:
        _console.info(f"test: {counts['gallery']} images of {classes['test']} classes, each a query over all the others "
                      "(test/query links to test/gallery; a query's own image is left out)", label="  ")
    else:
        _console.info(f"test: {counts['query']} queries, {counts['gallery']} gallery images, {classes['test']} classes",
                      label="  ")
    _console.info(f"split: {summary['policy']}", label="  ")
