"""Read the raw files of a dataset from its archive (.tar, .tar.gz, .tgz, .zip) or its extracted folder.

Member names are data: one that is absolute or holds ``..`` is refused with a one-line
:class:`ClipretError` (it would point outside the archive's own tree), and only regular files
are read (a symlink or device member is never followed). Nothing is extracted to disk here:
callers get bytes and write them where the plan says.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

from clipret.errors import ClipretError
from clipret.prepare.plan import Entry

__all__ = ["Raw", "TarRaw", "ZipRaw", "FolderRaw", "member_name", "open_raw", "read_all", "member_fill", "read_texts"]


def member_name(name: str, where: str | Path) -> str:
    """``name`` as a clean relative POSIX path (a leading ``./`` dropped); absolute or ``..`` names are refused."""
    text = name.replace("\\", "/")
    p = PurePosixPath(text)
    if text.startswith("/") or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ClipretError(f"{where}: refusing archive member {name!r}: an absolute path or '..' would point outside "
                           "the dataset; the archive is damaged or hostile, download it again from the official page")
    parts = [part for part in p.parts if part != "."]
    return "/".join(parts)


class Raw(Protocol):
    """A dataset's raw files, by their path inside the archive (``CUB_200_2011/images.txt``)."""

    where: Path

    def stream(self, names: Collection[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (name, bytes) of each of ``names``, in the source's own order; a missing one is an error."""
        ...


def read_all(raw: Raw, names: Sequence[str]) -> dict[str, bytes]:
    """{name: bytes} of a few small files (lists, metadata) of ``raw``."""
    return dict(raw.stream(names))


def _missing(where: Path, wanted: Collection[str]) -> ClipretError:
    first = sorted(wanted)[0]
    return ClipretError(f"{where} lacks {len(wanted)} file(s) the dataset's lists name (e.g. {first}); "
                        "the download is incomplete or not this dataset: fetch it again")


class TarRaw:
    """A tar archive, read once front to back (gzip, bzip2 and xz are detected)."""

    def __init__(self, path: Path) -> None:
        self.where = path

    def stream(self, names: Collection[str]) -> Iterator[tuple[str, bytes]]:
        wanted = {member_name(n, self.where) for n in names}
        if not wanted:
            return
        try:
            with tarfile.open(self.where, "r|*") as tf:
                for m in tf:
                    name = member_name(m.name, self.where)
                    if name in wanted and m.isfile():
                        fh = tf.extractfile(m)
                        if fh is None:
                            continue
                        yield name, fh.read()
                        wanted.discard(name)
                        if not wanted:
                            return
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ClipretError(f"{self.where}: cannot read the archive ({exc}); it is damaged or incomplete, fetch it again") from None
        if wanted:
            raise _missing(self.where, wanted)


class ZipRaw:
    """A zip archive; every member name is checked when it is opened."""

    def __init__(self, path: Path) -> None:
        self.where = path

    def stream(self, names: Collection[str]) -> Iterator[tuple[str, bytes]]:
        wanted = {member_name(n, self.where) for n in names}
        try:
            with zipfile.ZipFile(self.where) as zf:
                infos = {member_name(i.filename, self.where): i for i in zf.infolist() if not i.is_dir()}
                lost = wanted - infos.keys()
                if lost:
                    raise _missing(self.where, lost)
                for name, info in infos.items():
                    if name in wanted:
                        yield name, zf.read(info)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ClipretError(f"{self.where}: cannot read the archive ({exc}); it is damaged or incomplete, fetch it again") from None


class FolderRaw:
    """An extracted archive: ``name`` is a path under ``where`` (names with ``..`` are refused)."""

    def __init__(self, path: Path) -> None:
        self.where = path

    def stream(self, names: Collection[str]) -> Iterator[tuple[str, bytes]]:
        for n in sorted({member_name(n, self.where) for n in names}):
            p = self.where / n
            if not p.is_file():
                raise _missing(self.where, [n])
            yield n, p.read_bytes()


def open_raw(folder: Path, archives: Sequence[str], top: str, what: str) -> Raw:
    """The first of ``archives`` found in ``folder``, else the extracted ``top/`` folder (in ``folder``, or
    ``folder`` itself when it is named ``top``). ``what`` names the dataset in the error."""
    for name in archives:
        p = folder / name
        if p.is_file():
            return ZipRaw(p) if name.lower().endswith(".zip") else TarRaw(p)
    if (folder / top).is_dir():
        return FolderRaw(folder)
    if folder.name == top and folder.is_dir():
        return FolderRaw(folder.parent)
    raise ClipretError(f"{folder} holds neither {' nor '.join(archives)} nor an extracted {top}/ folder: "
                       f"pass --source DIR holding the raw files of {what} (see docs/prepare.md)")


def member_fill(raw: Raw) -> Callable[[Sequence[Entry]], Iterator[tuple[Entry, bytes]]]:
    """A plan's ``fill`` for entries keyed by member name: the original bytes, copied (no re-encoding)."""

    def fill(todo: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        by_key: dict[str, list[Entry]] = {}
        for e in todo:
            by_key.setdefault(e.key, []).append(e)
        for name, data in raw.stream(list(by_key)):
            for e in by_key[name]:
                yield e, data

    return fill


def read_texts(raw: Raw, names: Sequence[str]) -> dict[str, list[str]]:
    """{name: its non-empty, stripped lines} of a few small UTF-8 text files of ``raw``, read in one pass."""
    data = read_all(raw, names)
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            text = data[member_name(name, raw.where)].decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ClipretError(f"{raw.where}: {name} is not UTF-8 text; the raw files are damaged, fetch them again") from None
        out[name] = [line.strip() for line in text.splitlines() if line.strip()]
    return out
