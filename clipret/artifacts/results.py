"""Results: ``results.json``, a list of ``{"filename", "samples", "scores"}`` (the seed's format).

``clipret query`` also writes a sidecar, ``results.json.json`` (the results
file's name plus ``.json``), recording how the results were made: the query
and gallery (path, count, a digest of their ids, model fingerprint, flags),
the post-processing stages and their parameters, what the scores mean, and
the clipret version. It carries the sha256 of the results file, so a results
file rewritten by another tool is never paired with a stale sidecar.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipret import __version__
from clipret.artifacts.atomic import atomic_open, read_json, sha256_file, sha256_text, write_json
from clipret.errors import ClipretError

RESULTS_FORMAT = "clipret.results/1"


def results_meta_path(path: str | os.PathLike[str]) -> Path:
    """``results.json`` -> ``results.json.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_results(
    path: str | os.PathLike[str],
    query_ids: Sequence[str],
    samples: Sequence[Sequence[str]],
    scores: np.ndarray,
    *,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write results.json: ``[{"filename": qid, "samples": [gid, ...], "scores": [...]}, ...]``.

    ``scores`` is (Q, k) float, higher is better; ``samples`` holds Q lists of
    gallery ids, best first. With ``meta``, the sidecar is written after the
    results, carrying their sha256.
    """
    records = [
        {"filename": qid, "samples": list(row_ids), "scores": [round(float(s), 6) for s in row_scores]}
        for qid, row_ids, row_scores in zip(query_ids, samples, scores)
    ]
    text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    with atomic_open(path, "w") as fh:
        fh.write(text)
    if meta is not None:
        side = {"format": RESULTS_FORMAT, "clipret_version": __version__, **meta,
                "results_sha256": sha256_text(text)}
        write_json(results_meta_path(path), side)


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read results.json (ours, or the seed's format without scores).

    Refuses a file that is not a list of ``{"filename", "samples"}`` records,
    a query that appears twice, or a list that names a gallery item twice.
    """
    data = read_json(path, "results file")
    ok = isinstance(data, list) and all(isinstance(r, dict) and "filename" in r and isinstance(r.get("samples"), list) for r in data)
    if not ok:
        raise ClipretError(f"{path} is not a results file: expected a list of {{'filename', 'samples'}} objects")
    seen: set[str] = set()
    for r in data:
        name = str(r["filename"])
        if name in seen:
            raise ClipretError(f"{path}: query {name!r} appears twice; each query must have one record")
        seen.add(name)
        samples = [str(s) for s in r["samples"]]
        if len(set(samples)) != len(samples):
            dup = next(s for i, s in enumerate(samples) if s in samples[:i])
            raise ClipretError(f"{path}: the list of query {name!r} names gallery item {dup!r} twice; "
                               "a ranked list holds each gallery item at most once")
    return data


def load_results_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``path`` if there is one; ClipretError if it belongs to another version of the file."""
    side = results_meta_path(path)
    if not side.is_file():
        return None
    meta = read_json(side, "results sidecar")
    if not isinstance(meta, dict) or meta.get("format") != RESULTS_FORMAT:
        raise ClipretError(f"{side} is not a clipret results sidecar; delete it or regenerate the results")
    if meta.get("results_sha256") != sha256_file(path):
        raise ClipretError(f"{side} describes another version of {path} (it was rewritten since); "
                           "pass --gallery to say which gallery the results were searched in")
    return meta
