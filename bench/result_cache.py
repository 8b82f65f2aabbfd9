"""Finished benchmark rows in a JSON-lines file, keyed by a hash of their settings, so a killed run resumes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def settings_key(settings: Any) -> str:
    """A short, stable hash of JSON-able settings (dict keys sorted)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ResultCache:
    """Finished result rows in a JSON-lines file, keyed by ``record["key"]``; appended one line at a time.

    A line cut short by a kill is ignored on reading (that row is recomputed).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.rows[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (it must hold a ``key``) and flush it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_bytes()[-1:] if self.path.is_file() else b""
        with open(self.path, "a", encoding="utf-8") as fh:
            if text and text != b"\n":
                fh.write("\n")  # end a line left cut short
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[record["key"]] = record
        return record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows.values())
