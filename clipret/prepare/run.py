"""Prepare a dataset into ROOT: check ROOT, find (or download) the raw files, build the plan, write it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.progress import StageProgress
from clipret.prepare import idx
from clipret.prepare.plan import Plan
from clipret.prepare.registry import PrepareOptions, get_spec, settings_for
from clipret.prepare.writer import complete_summary, write_plan

__all__ = ["prepare", "prepare_plan", "export_fashion_mnist"]



def prepare_plan(root: Path, dataset: str, settings: dict[str, Any], build: Callable[[], Plan], policy: str, *,
                 csv: bool = False, progress: StageProgress | None = None) -> dict[str, Any]:
    """Write ``build()``'s plan into ``root`` unless ``root`` is already complete with these settings.

    ``build`` runs only when there is work to do (it reads the raw files). Returns the
    ``prepare.json`` contents plus ``written`` (image files written by this call) and
    ``nothing_to_do``.
    """
    root = Path(root)
    done = complete_summary(root, dataset, settings, csv)
    if done is not None:
        return {**done, "written": 0, "nothing_to_do": True}
    out = write_plan(root, build(), settings, policy=policy, csv=csv, progress=progress)
    return {**out, "nothing_to_do": False}


def _source_folder(name: str, source: Path | None, download: bool, default: Callable[[], Path | None] | None,
                   raw: str) -> Path:
    if download:
        from clipret.prepare.download import download as fetch

        return fetch(name, source)
    if source is not None:
        source = Path(source).expanduser()
        if source.is_file():  # the archive itself: its folder holds the raw files
            return source.parent
        if not source.is_dir():
            raise ClipretError(f"--source folder not found: {source}")
        return source
    found = default() if default is not None else None
    if found is None:
        from clipret.prepare.download import TORCHVISION

        other = ", or --download" if name in TORCHVISION else ""
        raise ClipretError(f"{name} needs its raw files: pass --source DIR holding {raw}{other}")
    return found


def prepare(name: str, root: str | Path, *, source: str | Path | None = None, download: bool = False,
            options: PrepareOptions | None = None, csv: bool = False, progress: StageProgress | None = None) -> dict[str, Any]:
    """Prepare dataset ``name`` into ``root`` (see :mod:`clipret.prepare`); for ``folder``, ``source`` is SRC.

    Returns ``prepare.json``'s contents (dataset, settings, policy, protocol, counts, classes) plus
    ``written`` and ``nothing_to_do``.
    """
    spec = get_spec(name)
    opts = options or PrepareOptions()
    src = Path(source) if source is not None else None
    if name == "folder" and download:
        from clipret.prepare.download import MANUAL

        raise ClipretError(f"--download: {MANUAL['folder']}")
    cfg = settings_for(spec, opts, src)
    if name != "folder" and download and src is not None and src.is_file():
        raise ClipretError(f"--download with --source needs a folder to download into, got the file {src}")

    def build() -> Plan:
        folder = src if name == "folder" else _source_folder(name, src, download, spec.default_source, spec.raw)
        return spec.build(folder, cfg)  # type: ignore[arg-type]

    return prepare_plan(Path(root), name, cfg, build, spec.policy, csv=csv, progress=progress)


def export_fashion_mnist(
    src: Path,
    root: Path,
    *,
    train_per_class: int | None,
    query_per_class: int,
    gallery_per_class: int | None,
    seed: int = 0,
    size: int | None = 64,
    train_classes: Sequence[int] | None = None,
    test_classes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write Fashion-MNIST from ``src`` into ``root`` as ``size``-px grayscale PNGs (None: 28 px, as stored).

    ``train_per_class=None`` exports the whole train split, ``gallery_per_class=None`` every test image of
    a class that is not a query. ``train_classes`` / ``test_classes`` (class indices, default all)
    choose the classes written to ``training/`` and to ``test/``. This is ``clipret prepare
    fashion-mnist``: resumable, and a rerun over a complete ``root`` does nothing.
    Returns {"root", "classes", "n_train", "n_query", "n_gallery"}.
    """
    cfg = idx.settings(train_per_class=train_per_class, query_per_class=query_per_class, gallery_per_class=gallery_per_class,
                   seed=seed, size=size, train_classes=train_classes, test_classes=test_classes)
    done = prepare_plan(Path(root), "fashion-mnist", cfg, lambda: idx.plan_fashion_mnist(Path(src), cfg), idx.POLICY)
    counts = done["counts"]
    return {"root": str(root), "classes": list(idx.CLASS_NAMES), "n_train": counts["training"], "n_query": counts["query"],
            "n_gallery": counts["gallery"]}
