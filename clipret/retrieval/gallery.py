"""A gallery to search: embeddings (``g.npy``) or a FAISS index pair (``g.faiss``), behind one type.

:func:`open_gallery` reads either; :meth:`Gallery.build` writes an index pair from embeddings;
:func:`clipret.retrieval.prepare.prepare_search` readies one for a search with given stages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.progress import StageProgress

__all__ = ["Gallery", "open_gallery", "read_gallery_flags", "read_gallery_ids"]


@dataclass
class Gallery:
    """A gallery to search: ids (row order), model fingerprint, flags, and either (G, D) float32
    unit-row vectors (a ``.npy``) or an opened FAISS index (a ``.faiss`` pair).

    Open one with :meth:`open`; change it with :meth:`add` and :meth:`remove` (a ``.npy`` gallery
    in memory, written by :meth:`save`; an index on disk, in place, as ``clipret index --add``).
    """

    ids: list[str]
    fingerprint: str | None
    flags: dict[str, Any]
    path: Path | None
    vectors: np.ndarray | None = None  # (G, D) float32, maybe a memory map; None for an index until needed
    index: Any = field(default=None, repr=False)  # clipret.retrieval.index.IndexGallery
    content: str | None = None  # content_hash of the vectors, from the manifest (computed when needed otherwise)
    root: Path | None = None  # the folder the ids are relative to, when the manifest records it
    dim_: int = 0
    search_params: dict[str, int | None] = field(default_factory=dict, repr=False)  # an index's nprobe, ef_search
    skipped: list[dict[str, str]] = field(default_factory=list, repr=False)  # files embed could not read (a .npy's manifest)

    @property
    def dim(self) -> int:
        """D, the vectors' width."""
        return self.dim_

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, nprobe: int | None = None, ef_search: int | None = None) -> Gallery:
        """Open ``g.npy`` (with its manifest) or ``g.faiss`` (with its sidecar); see :func:`open_gallery`."""
        return open_gallery(path, nprobe=nprobe, ef_search=ef_search)

    @classmethod
    def build(cls, inputs: Any, out: str | os.PathLike[str], *, type: str = "auto", max_memory: int | str | None = None,
              seed: int = 0, allow_mismatch: bool = False, progress: StageProgress | None = None,
              warnings: list[str] | None = None, on_plan: Any = None, **params: int | None) -> Gallery:
        """Build a FAISS index pair at ``out`` (``.faiss`` and its ``.json`` sidecar) and open it.

        ``inputs``: ``.npy`` files or folders of them, or :class:`~clipret.artifacts.Embeddings`, in
        id order. ``type``: auto, flat, hnsw, ivf or ivfpq; auto picks the best expected recall
        within ``max_memory`` (bytes, or "4GB"). ``params``: nlist, m, nbits, ef_construction,
        ef_search, nprobe (None = default). The same ``seed`` gives a byte-identical index.
        ``warnings`` (a list) collects one-line notes; ``on_plan(plan, n, dim)`` is told the
        choice before the work starts. Needs faiss (``pip install 'clipret[faiss]'``).
        """
        from clipret.retrieval.index import build_index, parse_size

        unknown = sorted(set(params) - {"nlist", "m", "nbits", "ef_construction", "ef_search", "nprobe"})
        if unknown:
            raise ClipretError(f"unknown index parameter {unknown[0]!r}; use nlist, m, nbits, ef_construction, ef_search or nprobe")
        if Path(out).suffix == ".npy" or any(isinstance(p, (str, os.PathLike)) and Path(out).resolve() == Path(p).resolve()
                                             for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])):
            raise ClipretError(f"--out {out} would overwrite embeddings; write the index to a .faiss file")
        budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
        build_index(inputs if isinstance(inputs, (list, tuple)) else [inputs], out, kind=type, params=params,
                    max_memory=budget, seed=seed, allow_mismatch=allow_mismatch, on_plan=on_plan,
                    on_progress=progress or (lambda stage, done, total: None),
                    on_warning=warnings.append if warnings is not None else None)
        return open_gallery(out)

    @staticmethod
    def info(path: str | os.PathLike[str]) -> dict[str, Any]:
        """An index pair's type, count, dim, file size, fingerprint, flags, parameters, removed rows
        and checksum, from its sidecar (the vectors are not read)."""
        from clipret.retrieval.index import index_info

        return index_info(path)

    def add(self, embeddings: Any, *, allow_mismatch: bool = False, progress: StageProgress | None = None,
            warnings: list[str] | None = None) -> Gallery:
        """Append :class:`~clipret.artifacts.Embeddings` ((N, D) float32 unit rows); returns self.

        Refused in one line: another dim, another model (unless ``allow_mismatch``), or an id already here.
        On an index, ``embeddings`` may also be ``.npy`` paths or folders (a list), added in place.
        """
        if self.index is not None:
            from clipret.retrieval.index import add_to_index

            batch = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
            meta = add_to_index(self.path, batch, allow_mismatch=allow_mismatch,
                                on_progress=progress or (lambda stage, done, total: None),
                                on_warning=warnings.append if warnings is not None else None)
            return self._changed_index(meta)
        from clipret.retrieval.compat import check_compatible

        check_compatible(embeddings, self, allow_mismatch=allow_mismatch)
        present = set(self.ids)
        clash = [i for i in embeddings.ids if i in present]
        if clash:
            raise ClipretError(f"{len(clash)} id(s) are already in the gallery ({', '.join(clash[:3])}); remove them first")
        assert self.vectors is not None
        self.vectors = np.concatenate([np.asarray(self.vectors), np.asarray(embeddings.vectors, dtype=np.float32)])
        self.ids = [*self.ids, *embeddings.ids]
        self.content = None  # the rows changed: hashed anew when a cache needs it
        return self

    def remove(self, ids: Any, *, missing_ok: bool = False, warnings: list[str] | None = None) -> Gallery:
        """Drop the rows of ``ids``; returns self. An id not here is a one-line error, or with
        ``missing_ok`` a note in ``warnings`` (a list)."""
        ids = [str(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in set(self.ids)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            if not missing_ok:
                raise ClipretError(f"{len(missing)} id(s) are not in the gallery ({shown})")
            if warnings is not None:
                warnings.append(f"{len(missing)} id(s) are not in the {'index' if self.index is not None else 'gallery'} "
                                f"and were ignored: {shown}")
        if self.index is not None:
            from clipret.retrieval.index import remove_from_index

            meta, _ = remove_from_index(self.path, ids)
            return self._changed_index(meta)
        gone = set(ids)
        keep = np.array([i not in gone for i in self.ids], dtype=bool)
        assert self.vectors is not None
        self.vectors = np.asarray(self.vectors)[keep]
        self.ids = [i for i, k in zip(self.ids, keep) if k]
        self.content = None
        return self

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write a ``.npy`` gallery (and its manifest) to ``path`` (default: where it came from).

        An index is changed in place by :meth:`add` and :meth:`remove`, so it has nothing to save.
        """
        from clipret.artifacts import Embeddings

        if self.index is not None:
            if path is not None and Path(path).resolve() != Path(self.path).resolve():
                raise ClipretError(f"an index is changed in place; copy {self.path} and its sidecar to keep the old one")
            return Path(self.path)
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ClipretError("this gallery came from memory: pass save(path)")
        assert self.vectors is not None
        emb = Embeddings(np.asarray(self.vectors), list(self.ids), fingerprint=self.fingerprint, flags=self.flags,
                         root=self.root)
        emb.save(target)
        self.path, self.content = target, None  # hashed anew when a cache needs it
        return target

    def _changed_index(self, meta: dict[str, Any]) -> Gallery:
        """After an in-place add/remove: the new sidecar's ids and identity; the index itself is
        opened again only when a search needs it (a large one takes a while to read)."""
        self.ids, self.fingerprint, self.flags = list(meta["ids"]), meta.get("model_fingerprint"), meta.get("flags") or {}
        root, content = meta.get("root"), meta.get("content_blake2b")
        self.root = Path(root) if isinstance(root, str) else None
        self.content = content if isinstance(content, str) else None
        self.index = _DeferredIndex(Path(self.path), meta, self.search_params)
        return self


class _DeferredIndex:
    """An index pair opened on first use; ``meta`` (the sidecar) is at hand before that."""

    def __init__(self, path: Path, meta: dict[str, Any], search_params: dict[str, int | None]) -> None:
        self.path, self.meta, self._params, self._opened = path, meta, search_params, None

    def __getattr__(self, name: str) -> Any:  # searcher, ids, dim, ...: open it now
        if name.startswith("__") or name == "_opened":
            raise AttributeError(name)
        if self._opened is None:
            from clipret.retrieval.index import open_index

            self._opened = open_index(self.path, **self._params)
        return getattr(self._opened, name)


def open_gallery(path: str | os.PathLike[str], *, nprobe: int | None = None, ef_search: int | None = None) -> Gallery:
    """Open ``g.npy`` (with its manifest) or ``g.faiss`` (with its sidecar); ClipretError if unreadable.
    (An empty one opens, so that it can be added to; searching it is refused.)"""
    from clipret.retrieval.index import is_index_path

    path = Path(path)
    if is_index_path(path):
        from clipret.retrieval.index import open_index

        idx = open_index(path, nprobe=nprobe, ef_search=ef_search)
        root, content = idx.meta.get("root"), idx.meta.get("content_blake2b")
        gal = Gallery(list(idx.ids), idx.fingerprint, idx.flags, path, index=idx, dim_=idx.dim,
                      root=Path(root) if isinstance(root, str) else None,
                      content=content if isinstance(content, str) else None,
                      search_params={"nprobe": nprobe, "ef_search": ef_search})
    else:
        if nprobe is not None or ef_search is not None:
            raise ClipretError("--nprobe and --ef-search tune an index; the gallery here is a .npy (exact search)")
        from clipret.artifacts import load_embeddings

        emb = load_embeddings(path)
        gal = Gallery(emb.ids, emb.fingerprint, emb.flags, path, vectors=emb.vectors, content=emb.content, root=emb.root,
                      skipped=list(emb.skipped), dim_=emb.dim)
    return gal


def read_gallery_ids(path: str | os.PathLike[str]) -> list[str]:
    """The ids of a ``.npy`` gallery (its manifest) or an index (its sidecar), in row order; reads no vectors."""
    from clipret.retrieval.index import is_index_path

    if is_index_path(path):
        from clipret.artifacts.index import read_sidecar

        return [str(i) for i in read_sidecar(path)["ids"]]
    from clipret.artifacts import load_embeddings

    return load_embeddings(path, check_finite=False).ids


def read_gallery_flags(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The embedding flags (model, pretrained, tta, ...) a ``.npy`` manifest or an index sidecar records; reads no vectors."""
    from clipret.retrieval.index import is_index_path

    if is_index_path(path):
        from clipret.artifacts.index import read_sidecar

        return dict(read_sidecar(path).get("flags") or {})
    from clipret.artifacts import load_embeddings

    return dict(load_embeddings(path, check_finite=False).flags)
