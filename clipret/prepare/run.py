"""Prepare a dataset into ROOT: check ROOT, find (or download) the raw files, build the plan, write it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.progress import StageProgress
from clipret.prepare.plan import Plan
from clipret.prepare.registry import PrepareOptions, get_spec, settings_for
from clipret.prepare.writer import complete_summary, write_plan

__all__ = ["prepare", "prepare_plan"]



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
