"""The public :class:`Results`: top-k lists with their scores, and what the results sidecar records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Results"]

PathLike = str | os.PathLike[str]




@dataclass
class Results:
    """Top-k lists: ``ids`` (Q lists of gallery ids, best first), ``scores`` (Q, k) float32.

    Higher scores are better (cosine, or ``1 - final distance`` after re-ranking); a list shorter
    than k (an approximate index; a query whose own item was left out of a whole-gallery list)
    has ``-inf`` scores in the padding. ``meta`` is what the results sidecar records.
    ``gallery_ids`` is the whole gallery searched (R is counted over it); ``self_rows`` (Q,)
    int64 the gallery row of each query's own item, or -1.
    """

    query_ids: list[str]
    ids: list[list[str]]
    scores: np.ndarray
    gallery_ids: list[str]
    self_rows: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.query_ids)

    def records(self) -> list[dict[str, Any]]:
        """``results.json``'s records: ``{"filename", "samples", "scores"}`` per query."""
        return [{"filename": q, "samples": list(s), "scores": [float(x) for x in row[: len(s)]]}
                for q, s, row in zip(self.query_ids, self.ids, self.scores)]

    def to_json(self, path: PathLike) -> Path:
        """Write ``path`` (results.json) and its sidecar ``path + ".json"``, atomically; return ``path``."""
        from clipret import artifacts

        path = Path(path)
        meta = {key: (dict(value) if isinstance(value, dict) else value) for key, value in self.meta.items()}
        for side in ("query", "gallery"):
            where = (meta.get(side) or {}).get("path")
            if where:
                meta[side]["relpath"] = os.path.relpath(where, path.resolve().parent)
        artifacts.save_results(path, self.query_ids, self.ids, [row[: len(s)] for row, s in zip(self.scores, self.ids)],
                               meta=meta)
        return path



    @classmethod
    def load(cls, path: PathLike, gallery: PathLike | None = None, *, labelled: Any = None,
             gallery_from_labels: bool = False) -> Results:
        """Read ``results.json`` with the gallery it was searched in: from ``gallery``, else its
        sidecar (moved together with the results, or at its recorded path), else, with
        ``gallery_from_labels``, every id of ``labelled`` (a {id: label} mapping) that is not a
        query. Never a silent guess: R depends on the whole gallery.
        """
        from clipret import artifacts
        from clipret.retrieval import selfmatch

        records = artifacts.load_results(path)
        meta = artifacts.load_results_meta(path) or {}
        query_ids = [str(r["filename"]) for r in records]
        gallery_ids, g_side = _gallery_of(Path(path), meta, gallery, query_ids, labelled if gallery_from_labels else None)
        found = selfmatch.self_matches(selfmatch.Recorded.from_sidecar(query_ids, meta.get("query")),
                                       selfmatch.Recorded.from_sidecar(gallery_ids, g_side))
        width = max((len(r["samples"]) for r in records), default=0)
        scores = np.full((len(records), width), -np.inf, dtype=np.float32)
        for row, r in zip(scores, records):
            row[: len(r.get("scores") or [])] = r.get("scores") or []
        return cls(query_ids, [[str(s) for s in r["samples"]] for r in records], scores, gallery_ids, found, meta)


def _gallery_of(path: Path, meta: dict[str, Any], gallery: PathLike | None, query_ids: list[str],
                labelled: Any) -> tuple[list[str], dict[str, Any] | None]:
    """(the whole gallery's ids in order, what describes it for the self-match rule)."""
    from clipret import artifacts
    from clipret.errors import ClipretError
    from clipret.retrieval.compat import describe, recorded_path
    from clipret.retrieval.gallery import open_gallery, read_gallery_ids

    recorded = meta.get("gallery") or {}

    def checked(where: Path) -> list[str]:
        ids = read_gallery_ids(where)
        if recorded.get("ids_sha256") and recorded["ids_sha256"] != artifacts.ids_digest(ids):
            raise ClipretError(f"{where} is not the gallery {path} was searched in (its sidecar records "
                               f"{recorded.get('count')} ids from {recorded.get('path')}); pass the same gallery")
        return ids

    if gallery is not None:
        return checked(Path(gallery)), describe(open_gallery(gallery), gallery)
    if recorded.get("path"):
        where = recorded_path(path, recorded)
        assert where is not None
        if not where.is_file():
            raise ClipretError(f"{path} was searched in {where}, which no longer exists; pass --gallery")
        return checked(where), recorded
    if labelled is not None:
        queries = set(query_ids)
        return sorted(i for i in labelled if i not in queries), None
    raise ClipretError(
        f"{path} does not say which gallery it was searched in (no results.json.json sidecar), and R, "
        "the number of relevant items per query, depends on the whole gallery; pass --gallery g.npy, or "
        "--gallery-from-labels (with --labels) to take every labelled id that is not a query"
    )
