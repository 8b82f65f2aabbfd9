"""Results: ``results.json``, a list of ``{"filename", "samples", "scores"}`` (the seed's format)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipret.artifacts.atomic import read_json, write_json
from clipret.errors import ClipretError


def save_results(path: str | os.PathLike[str], query_ids: Sequence[str], samples: Sequence[Sequence[str]], scores: np.ndarray) -> None:
    """Write results.json: ``[{"filename": qid, "samples": [gid, ...], "scores": [...]}, ...]``.

    ``scores`` is (Q, k) float; ``samples`` holds Q lists of gallery ids, best first.
    """
    records = [
        {"filename": qid, "samples": list(row_ids), "scores": [round(float(s), 6) for s in row_scores]}
        for qid, row_ids, row_scores in zip(query_ids, samples, scores)
    ]
    write_json(path, records)


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read results.json (ours, or the seed's format without scores)."""
    data = read_json(path, "results file")
    ok = isinstance(data, list) and all(isinstance(r, dict) and "filename" in r and isinstance(r.get("samples"), list) for r in data)
    if not ok:
        raise ClipretError(f"{path} is not a results file: expected a list of {{'filename', 'samples'}} objects")
    return data
