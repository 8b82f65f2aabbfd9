"""An index pair: ``gallery.faiss`` (a FAISS index) and its sidecar ``gallery.faiss.json``.

The sidecar holds the ids in index order, the index type and parameters, dim,
count, the embeddings' model fingerprint and flags (TTA, DBA), the clipret
version, the removal bookkeeping and a **generation**: a random token made
anew by every write.

How the pair stays consistent (a crash leaves the old pair or the new pair)
---------------------------------------------------------------------------
Each file is written atomically (temporary file, fsync, rename), and the
generation ties the two together:

1. the new sidecar is written to ``.gallery.faiss.json.pending``;
2. the new index is written to ``gallery.faiss``, with a 64-byte trailer
   after FAISS's own bytes: a magic string, the generation and the length of
   the FAISS part (FAISS's reader stops where its data ends and never sees it);
3. the pending sidecar is renamed over ``gallery.faiss.json``.

:func:`read_index_pair` compares the index trailer's generation with the
sidecar's. If they differ, a crash happened between steps 2 and 3: the
pending sidecar, which carries the index's generation, is renamed into
place (rolled forward) and the new pair is read. A crash before step 2
leaves the old pair plus a stale pending file, which is ignored and later
overwritten. The check reads 64 bytes, so opening a large index costs no
hashing. One writer at a time: concurrent writers to one pair are not
supported.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from pathlib import Path
from typing import Any

from clipret.artifacts.atomic import _fsync_dir, atomic_path, read_json, write_json
from clipret.errors import ClipretError

INDEX_FORMAT = "clipret.index/1"
_MAGIC = b"CLIPRET-INDEX-GENERATION"  # 24 bytes
_TRAILER = struct.Struct("<24s32sQ")  # magic, generation (32 hex digits), length of the faiss bytes
TRAILER_SIZE = _TRAILER.size  # 64


def sidecar_path(index_path: str | os.PathLike[str]) -> Path:
    """``gallery.faiss`` -> ``gallery.faiss.json``."""
    p = Path(index_path)
    return p.with_name(p.name + ".json")


def pending_path(index_path: str | os.PathLike[str]) -> Path:
    """Where step 1 puts the next sidecar: ``.gallery.faiss.json.pending``."""
    p = Path(index_path)
    return p.with_name(f".{p.name}.json.pending")


def new_generation() -> str:
    """32 random hex digits."""
    return uuid.uuid4().hex


def write_index_pair(index_path: str | os.PathLike[str], index: Any, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write ``index`` (a faiss.Index) and ``sidecar`` as a consistent pair; return the sidecar as written.

    Sets ``format``, ``generation`` and ``faiss_bytes`` in the sidecar (any old values are replaced).
    """
    import faiss

    index_path = Path(index_path)
    body = {k: v for k, v in sidecar.items() if k not in ("format", "generation", "faiss_bytes")}
    meta = {"format": INDEX_FORMAT, "generation": new_generation(), "faiss_bytes": 0, **body}
    pending = pending_path(index_path)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
        size = tmp.stat().st_size
        meta["faiss_bytes"] = size
        write_json(pending, meta)  # step 1 (the index is not yet in place)
        with open(tmp, "ab") as fh:  # the trailer that ties this file to `meta`
            fh.write(_TRAILER.pack(_MAGIC, meta["generation"].encode("ascii"), size))
    # step 2 happened when atomic_path renamed the index into place
    os.replace(pending, sidecar_path(index_path))  # step 3
    _fsync_dir(index_path.parent)
    return meta


def read_trailer(index_path: Path) -> tuple[str, int] | None:
    """(generation, faiss byte count) from the index file's trailer, or None if it has none."""
    try:
        with open(index_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            total = fh.tell()
            if total < TRAILER_SIZE:
                return None
            fh.seek(total - TRAILER_SIZE)
            magic, gen, size = _TRAILER.unpack(fh.read(TRAILER_SIZE))
    except FileNotFoundError:
        raise ClipretError(f"index not found: {index_path}; build it with `clipret index EMBEDDINGS.npy --out {index_path}`") from None
    if magic != _MAGIC or size != total - TRAILER_SIZE:
        return None
    return gen.decode("ascii", errors="replace"), size


def read_sidecar(index_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of a consistent pair (rolling an interrupted write forward first); the index is not loaded."""
    index_path = Path(index_path)
    trailer = read_trailer(index_path)
    if trailer is None:
        raise ClipretError(f"{index_path} is not an index written by `clipret index` (no generation trailer); rebuild it")
    generation, _ = trailer
    side, pending = sidecar_path(index_path), pending_path(index_path)
    meta = read_json(side, "index sidecar") if side.is_file() else None
    if meta is None or meta.get("generation") != generation:
        nxt = read_json(pending, "pending index sidecar") if pending.is_file() else None
        if nxt is None or nxt.get("generation") != generation:
            raise ClipretError(f"{index_path} and {side.name} do not belong to the same write; rebuild the index")
        with contextlib.suppress(OSError):  # roll forward; read-only folders just use the pending copy
            os.replace(pending, side)
            _fsync_dir(index_path.parent)
        meta = nxt
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or not isinstance(meta.get("ids"), list):
        raise ClipretError(f"{side} is not a clipret index sidecar ({INDEX_FORMAT}); rebuild the index")
    return meta


def read_index_pair(index_path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(faiss.Index, sidecar dict) of a consistent pair; see the module docstring."""
    import faiss

    meta = read_sidecar(index_path)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise ClipretError(f"cannot read {index_path} as a FAISS index ({str(exc).splitlines()[0][:120]}); rebuild it") from None
    if index.d != meta.get("dim"):
        raise ClipretError(f"{index_path} has dim {index.d} but its sidecar says {meta.get('dim')}; rebuild the index")
    return index, meta
