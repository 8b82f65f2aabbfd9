"""Loading an index pair trusts no byte of the .faiss file: checksum, class, metric, counts and labels (issue 17, item 3)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.artifacts.index import TRAILER_SIZE, sidecar_path, write_index_pair
from clipret.cli import app
from clipret.errors import ClipretError
from clipret.retrieval.index import open_index
from clipret.retrieval.index.build import build_index

faiss = pytest.importorskip("faiss")


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def built(tmp_path: Path, kind: str = "ivf", n: int = 400) -> Path:
    """An index of ``n`` unit vectors of dim 8 (ids g0, g1, ...) at tmp_path/g.faiss, plus q.npy (5 queries)."""
    artifacts.save_embeddings(tmp_path / "g.npy", unit(n, 8, 0), [f"g{i}" for i in range(n)], fingerprint="fp")
    artifacts.save_embeddings(tmp_path / "q.npy", unit(5, 8, 1), [f"q{i}" for i in range(5)], fingerprint="fp")
    params = {"ivf": {"nlist": 4, "nprobe": 4}, "hnsw": {"m": 8}, "flat": {}}[kind]
    build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind=kind, params=params)
    return tmp_path / "g.faiss"


def refused(path: Path, match: str) -> str:
    with pytest.raises(ClipretError, match=match) as e:
        open_index(path)
    message = str(e.value)
    assert "\n" not in message and message.endswith(("rebuild the index", "rebuild it")), message
    return message


def cli_refuses(tmp_path: Path, path: Path, match: str) -> None:
    """`clipret query` on the index: exit 2 and one line (no IndexError traceback, no results)."""
    r = CliRunner().invoke(app, ["query", str(tmp_path / "q.npy"), "--gallery", str(path), "--k", "5",
                                 "--out", str(tmp_path / "res.json")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and match in lines[0], r.output
    assert not (tmp_path / "res.json").exists()


def list0_ids(path: Path) -> tuple[int, np.ndarray]:
    """(offset in the file, values) of the labels FAISS stores for IVF list 0, found by their bytes."""
    index = faiss.read_index(str(path))  # kept alive while its lists are read
    lists = faiss.extract_index_ivf(index).invlists
    ids = faiss.rev_swig_ptr(lists.get_ids(0), lists.list_size(0)).copy()
    data = path.read_bytes()
    at = data.find(ids.astype("<i8").tobytes())
    assert at > 0 and data.find(ids.astype("<i8").tobytes(), at + 1) == -1
    return at, ids


def patch(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + len(value)] = value
    path.write_bytes(bytes(data))


def edit_sidecar(path: Path, **changes) -> None:
    """Change sidecar fields; a value of None deletes the field (an older clipret's sidecar has no checksum)."""
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    side.write_text(json.dumps(meta))


@pytest.mark.parametrize("wrong", ["out of range", "in range"])
def test_a_patched_ivf_label_is_refused_by_the_checksum(tmp_path, wrong):
    """Before: a label patched to 2**63-1 loaded and `gal.ids[j]` raised IndexError; an in-range one gave wrong ids."""
    path = built(tmp_path)
    at, ids = list0_ids(path)
    label = 2**63 - 1 if wrong == "out of range" else int(ids[1])  # the second: another vector's label
    patch(path, at, struct.pack("<q", label))
    refused(path, "does not match the sha256 in its sidecar")
    cli_refuses(tmp_path, path, "does not match the sha256")


@pytest.mark.parametrize("wrong, match", [("out of range", "stores label 9223372036854775807, which is no row"),
                                          ("in range", "stores a label twice")])
def test_without_a_checksum_the_labels_are_still_checked(tmp_path, wrong, match):
    """A sidecar from before checksums (no faiss_sha256): the structure is checked, so no search can return a bad row."""
    path = built(tmp_path)
    at, ids = list0_ids(path)
    patch(path, at, struct.pack("<q", 2**63 - 1 if wrong == "out of range" else int(ids[1])))
    edit_sidecar(path, faiss_sha256=None, faiss_class=None, ntotal=None)
    refused(path, match)
    cli_refuses(tmp_path, path, match.split(",")[0])


def test_an_unchanged_pair_without_a_checksum_still_loads(tmp_path):
    path = built(tmp_path)
    edit_sidecar(path, faiss_sha256=None, faiss_class=None, ntotal=None)
    assert len(open_index(path)) == 400


def test_labels_written_with_a_valid_checksum_are_checked_too(tmp_path):
    """A pair whose checksum matches bad bytes (written by another program): each label must be a live row."""
    path = built(tmp_path)
    index = faiss.read_index(str(path))
    lists = faiss.extract_index_ivf(index).invlists
    faiss.rev_swig_ptr(lists.get_ids(0), lists.list_size(0))[0] = 400  # one past the last row
    write_index_pair(path, index, json.loads(sidecar_path(path).read_text()))
    refused(path, "stores label 400, which is no row of its sidecar")


def test_hnsw_links_outside_the_index_are_refused(tmp_path):
    """FAISS's reader checks these itself (faiss-cpu 1.15.1); the error must still be one line."""
    path = built(tmp_path, "hnsw")
    index = faiss.read_index(str(path))
    links = index.hnsw.neighbors
    faiss.rev_swig_ptr(links.data(), links.size())[0] = 10**6
    write_index_pair(path, index, json.loads(sidecar_path(path).read_text()))
    refused(path, r"cannot read .* as a FAISS index .*neighbors\[0\] = 1000000 out of range")


def flat_sidecar(n: int, kind: str) -> dict:
    return {"type": kind, "params": {}, "metric": "inner_product", "dim": 8, "count": n, "label_count": n,
            "tombstones": [], "holes": [], "ids": [f"g{i}" for i in range(n)]}


@pytest.mark.parametrize("make, kind, match", [
    (lambda: faiss.IndexFlatL2(8), "flat", "is a FAISS IndexFlatL2 but its sidecar describes a flat index"),
    (lambda: faiss.IndexHNSWFlat(8, 8, faiss.METRIC_L2), "hnsw", "uses the l2 metric"),
    (lambda: faiss.IndexFlatIP(8), "hnsw", "is a FAISS IndexFlatIP but its sidecar describes a hnsw index"),
])
def test_an_index_of_another_class_or_metric_is_refused(tmp_path, make, kind, match):
    """Before: an IndexFlatL2 written as a valid pair loaded, and the neighbour sort returned the farthest items."""
    index = make()
    index.add(unit(50, 8, 0))
    path = tmp_path / "g.faiss"
    write_index_pair(path, index, flat_sidecar(50, kind))
    refused(path, match)
    edit_sidecar(path, faiss_class={"flat": "IndexFlatIP", "hnsw": "IndexHNSWFlat"}[kind], metric="inner_product")
    refused(path, match)  # a sidecar edited to look right changes nothing: the loaded index is what counts


def test_a_sidecar_that_records_another_class_is_refused(tmp_path):
    index = faiss.IndexFlatIP(8)
    index.add(unit(50, 8, 0))
    write_index_pair(tmp_path / "g.faiss", index, flat_sidecar(50, "flat"))
    edit_sidecar(tmp_path / "g.faiss", faiss_class="IndexHNSWFlat")
    refused(tmp_path / "g.faiss", "is a FAISS IndexFlatIP but its sidecar describes IndexHNSWFlat")


@pytest.mark.parametrize("change, match", [({"ntotal": 51}, "holds 50 vectors but its sidecar accounts for 50"),
                                           ({"label_count": 49}, "holds 50 vectors"),
                                           ({"count": 49}, "holds 50 vectors"),
                                           ({"dim": 16}, "has dim 8 but its sidecar says 16")])
def test_counts_and_dim_must_match_the_sidecar(tmp_path, change, match):
    index = faiss.IndexFlatIP(8)
    index.add(unit(50, 8, 0))
    write_index_pair(tmp_path / "g.faiss", index, flat_sidecar(50, "flat"))
    edit_sidecar(tmp_path / "g.faiss", **change)
    refused(tmp_path / "g.faiss", match)


def test_a_truncated_index_is_a_one_line_error(tmp_path):
    path = built(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, "no generation trailer")
    cli_refuses(tmp_path, path, "no generation trailer")
    body = data[: -TRAILER_SIZE]  # cut the FAISS part, keep a trailer that matches the new length
    gen = json.loads(sidecar_path(path).read_text())["generation"].encode()
    cut = body[: len(body) - 100]
    path.write_bytes(cut + struct.pack("<24s32sQ", b"CLIPRET-INDEX-GENERATION", gen, len(cut)))
    refused(path, f"holds {len(cut)} bytes of FAISS data but its sidecar says {len(body)}")
    edit_sidecar(path, faiss_bytes=len(cut), faiss_sha256=None)  # as an older sidecar would let through
    refused(path, "cannot read .* as a FAISS index .*read error")


def test_a_corrupt_body_is_a_one_line_error(tmp_path):
    path = built(tmp_path)
    patch(path, 0, b"XXXX")  # FAISS's class tag
    refused(path, "does not match the sha256")
    edit_sidecar(path, faiss_sha256=None)
    refused(path, "cannot read .* as a FAISS index .*not recognized")


def test_the_sidecar_records_what_the_index_is(tmp_path):
    path = built(tmp_path)
    meta = json.loads(sidecar_path(path).read_text())
    import hashlib

    body = path.read_bytes()[: meta["faiss_bytes"]]
    assert (meta["faiss_class"], meta["metric"], meta["dim"], meta["ntotal"]) == ("IndexIVFFlat", "inner_product", 8, 400)
    assert meta["faiss_sha256"] == hashlib.sha256(body).hexdigest()
    r = CliRunner().invoke(app, ["index", "--info", str(path)])
    assert r.exit_code == 0 and "sha256 " + meta["faiss_sha256"][:16] in r.stdout
