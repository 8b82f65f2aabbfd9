"""An index pair: ``gallery.faiss`` (a FAISS index) and its sidecar ``gallery.faiss.json``.

The sidecar holds the ids in index order, the index type and parameters, the
embeddings' model fingerprint and flags (TTA, DBA), the clipret version, the
removal bookkeeping, what the index is (``faiss_class``, ``metric``, ``dim``,
``ntotal``), the sha256 of its FAISS bytes (``faiss_sha256``) and a
**generation**: a random token made anew by every write.

How the pair stays consistent (a crash leaves the old pair or the new pair)
---------------------------------------------------------------------------
Each file is written atomically (temporary file, fsync, rename), and the
generation ties the two together:

1. the new sidecar is written to ``.gallery.faiss.json.pending``;
2. the new index is written to ``gallery.faiss``, with a 64-byte trailer
   after FAISS's own bytes: a magic string, the generation and the length of
   the FAISS part (FAISS's reader stops where its data ends and never sees it);
3. the pending sidecar is renamed over ``gallery.faiss.json``.

:func:`read_sidecar` compares the index trailer's generation with the
sidecar's. If they differ, a crash happened between steps 2 and 3: the
pending sidecar, which carries the index's generation, is renamed into
place (rolled forward) and the new pair is read. A crash before step 2
leaves the old pair plus a stale pending file, which is ignored and later
overwritten. Writers hold an exclusive lock (:func:`index_lock`), so a second
writer waits for the first; a reader rolls forward only when it can take the
lock at once, and step 3 accepts a sidecar a reader already put in place.

What a load trusts (:func:`read_index_pair`)
--------------------------------------------
Nothing in the index file. Before FAISS parses a byte, the FAISS part must
have the length and sha256 the sidecar recorded (an older sidecar without
``faiss_sha256`` skips this). After, :func:`check_index` compares the index
with its sidecar: class and metric for its type, dim, vector count and every
label (each live row of the sidecar, exactly once). Either mismatch is a
one-line :class:`ClipretError`. The hash costs one read of the file (about a
second a GB); ``--info`` reads only the sidecar.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import uuid
from pathlib import Path
from typing import IO, Any

from clipret.artifacts.atomic import _fsync_dir, atomic_path, kept_mode, read_json, write_json
from clipret.artifacts.index_check import INDEX_CLASSES, check_index, faiss_class, metric_name
from clipret.artifacts.index_lock import LOCK_TIMEOUT, LOCK_TIMEOUT_ENV, index_lock, index_not_found, lock_path, lock_timeout
from clipret.errors import ClipretError

__all__ = [
    "INDEX_CLASSES", "INDEX_FORMAT", "LOCK_TIMEOUT", "LOCK_TIMEOUT_ENV", "TRAILER_SIZE", "check_index", "faiss_class",
    "index_lock", "lock_path", "lock_timeout", "metric_name", "new_generation", "pending_path", "read_index_pair",
    "read_sidecar", "sidecar_path", "write_index_pair",
]

INDEX_FORMAT = "clipret.index/1"
_MAGIC = b"CLIPRET-INDEX-GENERATION"  # 24 bytes
_TRAILER = struct.Struct("<24s32sQ")  # magic, generation (32 hex digits), length of the faiss bytes
TRAILER_SIZE = _TRAILER.size  # 64
_WRITTEN = ("format", "generation", "faiss_bytes", "faiss_sha256", "faiss_class", "metric", "dim", "ntotal")


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
    """Write ``index`` (a faiss.Index) and ``sidecar`` as a consistent pair, under the lock; return the sidecar as written.

    Sets ``format``, ``generation``, ``faiss_bytes``, ``faiss_sha256`` and, from ``index``,
    ``faiss_class``, ``metric``, ``dim`` and ``ntotal`` (any old values are replaced).
    """
    import faiss

    index_path = Path(index_path)
    body = {k: v for k, v in sidecar.items() if k not in _WRITTEN}
    meta = {"format": INDEX_FORMAT, "generation": new_generation(), "faiss_bytes": 0, "faiss_sha256": "",
            "faiss_class": faiss_class(index), "metric": metric_name(index.metric_type), "dim": int(index.d),
            "ntotal": int(index.ntotal), **body}
    with index_lock(index_path, create=True):
        with atomic_path(index_path) as tmp:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as fh:
                meta["faiss_bytes"], meta["faiss_sha256"] = _digest(fh)
            write_json(pending_path(index_path), meta)  # step 1 (the index is not yet in place)
            os.chmod(pending_path(index_path), kept_mode(sidecar_path(index_path)))  # keep the sidecar's mode
            with open(tmp, "ab") as fh:  # the trailer that ties this file to `meta`
                fh.write(_TRAILER.pack(_MAGIC, meta["generation"].encode("ascii"), meta["faiss_bytes"]))
        # step 2 happened when atomic_path renamed the index into place
        _commit(index_path, meta)  # step 3
    return meta


def _commit(index_path: Path, meta: dict[str, Any]) -> None:
    """Step 3: rename the pending sidecar into place; fine if a reader rolled this write forward already."""
    side = sidecar_path(index_path)
    try:
        os.replace(pending_path(index_path), side)
    except FileNotFoundError:
        done = _json_or_none(side, "index sidecar")
        if not isinstance(done, dict) or done.get("generation") != meta["generation"]:
            raise ClipretError(f"another process replaced {side} while {index_path} was written; "
                               "rebuild the index, and let one process change it at a time") from None
    _fsync_dir(index_path.parent)


def _digest(fh: IO[bytes], size: int | None = None) -> tuple[int, str]:
    """(bytes read, sha256 hex digest) of ``fh`` from where it stands: ``size`` bytes, or to the end."""
    h, done = hashlib.sha256(), 0
    while size is None or done < size:
        block = fh.read(1 << 20 if size is None else min(1 << 20, size - done))
        if not block:
            break
        h.update(block)
        done += len(block)
    return done, h.hexdigest()


def _trailer(fh: IO[bytes]) -> tuple[str, int] | None:
    """(generation, faiss byte count) from an open index file's trailer, or None if it has none."""
    total = fh.seek(0, os.SEEK_END)
    if total < TRAILER_SIZE:
        return None
    fh.seek(total - TRAILER_SIZE)
    magic, gen, size = _TRAILER.unpack(fh.read(TRAILER_SIZE))
    if magic != _MAGIC or size != total - TRAILER_SIZE:
        return None
    return gen.decode("ascii", errors="replace"), size


def _open_index_file(index_path: Path) -> tuple[IO[bytes], tuple[str, int]]:
    """The index file, open for reading, and its trailer; a missing file or trailer is a one-line error."""
    try:
        fh = open(index_path, "rb")
    except FileNotFoundError:
        raise index_not_found(index_path) from None
    trailer = _trailer(fh)
    if trailer is None:
        fh.close()
        raise ClipretError(f"{index_path} is not an index written by `clipret index` (no generation trailer); rebuild it")
    return fh, trailer


def _generation(index_path: Path) -> str:
    """The generation in the index file's trailer."""
    fh, (generation, _) = _open_index_file(index_path)
    fh.close()
    return generation


def _json_or_none(path: Path, what: str) -> Any:
    """The JSON in ``path``, or None when there is no such file (invalid JSON is a one-line error)."""
    try:
        return read_json(path, what)
    except ClipretError:
        if path.exists():
            raise
        return None


def read_sidecar(index_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of a consistent pair (rolling an interrupted write forward first); the index is not loaded."""
    index_path = Path(index_path)
    side, pending = sidecar_path(index_path), pending_path(index_path)
    for _ in range(3):  # a writer may finish step 3 between the reads below: then look again
        generation = _generation(index_path)
        meta = _json_or_none(side, "index sidecar")
        if isinstance(meta, dict) and meta.get("generation") == generation:
            break
        nxt = _json_or_none(pending, "pending index sidecar")
        if isinstance(nxt, dict) and nxt.get("generation") == generation:
            meta = nxt
            _roll_forward(index_path, generation)
            break
    else:
        raise ClipretError(f"{index_path} and {side.name} do not belong to the same write; rebuild the index")
    if meta.get("format") != INDEX_FORMAT or not isinstance(meta.get("ids"), list):
        raise ClipretError(f"{side} is not a clipret index sidecar ({INDEX_FORMAT}); rebuild the index")
    return meta


def _roll_forward(index_path: Path, generation: str) -> None:
    """Rename the pending sidecar of ``generation`` into place, unless a writer holds the lock (it will) or
    the folder is read-only (readers then keep using the pending copy)."""
    with contextlib.suppress(ClipretError, OSError), index_lock(index_path, timeout=0):
        pending = pending_path(index_path)
        nxt = _json_or_none(pending, "pending index sidecar")
        if isinstance(nxt, dict) and nxt.get("generation") == generation == _generation(index_path):
            os.replace(pending, sidecar_path(index_path))
            _fsync_dir(index_path.parent)


def read_index_pair(index_path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(faiss.Index, sidecar dict) of a consistent pair whose index matches its sidecar; see the module docstring."""
    import faiss

    index_path = Path(index_path)
    for _ in range(3):  # a writer may replace the index between reading the sidecar and opening the file
        meta = read_sidecar(index_path)
        fh, (generation, size) = _open_index_file(index_path)
        if generation == meta["generation"]:
            break
        fh.close()
    else:
        raise ClipretError(f"{index_path} kept changing while it was read; rerun when no other process is writing it")
    with fh:
        if size != meta.get("faiss_bytes"):
            raise ClipretError(f"{index_path} holds {size} bytes of FAISS data but its sidecar says "
                               f"{meta.get('faiss_bytes')}; rebuild the index")
        fh.seek(0)
        if meta.get("faiss_sha256") and _digest(fh, size)[1] != meta["faiss_sha256"]:
            raise ClipretError(f"{index_path} does not match the sha256 in its sidecar (corrupt, or changed by "
                               "another program); rebuild the index")
        fh.seek(0)
        left = [size]

        def read(n: int) -> bytes:  # FAISS reads this handle (the bytes just hashed), never past its own part
            block = fh.read(min(n, left[0]))
            left[0] -= len(block)
            return block

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as exc:
            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", " ".join(str(exc).split()))[:120]
            raise ClipretError(f"cannot read {index_path} as a FAISS index ({reason}); rebuild it") from None
    check_index(index, meta, index_path)
    return index, meta
