"""The Fashion-MNIST exporter that the benchmarks use (bench/fashion_mnist.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from fashion_mnist import CLASS_NAMES, FILES, export_fashion_mnist, find_fashion_mnist, read_idx
from folder_utils import _files, _ids, _per_class, _read_labels
from PIL import Image

from clipret.errors import ClipretError

# ------------------------------------------------------------------------- idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
             np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, arr: np.ndarray) -> Path:
    data = _idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_uint8_raw_and_gz(tmp_path: Path, name: str) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(_write_idx(tmp_path / name, arr))
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("name", ["values.idx", "values.idx.gz"])
def test_read_idx_big_endian_int32(tmp_path: Path, name: str) -> None:
    arr = np.array([[1, -2, 70000], [2**31 - 1, 0, 5]], dtype=np.int32)
    out = read_idx(_write_idx(tmp_path / name, arr))
    assert out.dtype == np.dtype(np.int32) and out.dtype.isnative
    assert out.tolist() == [[1, -2, 70000], [2**31 - 1, 0, 5]]


def test_read_idx_rejects_bad_headers(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x00" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    bad_gz = tmp_path / "bad_magic.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x42\x02" + good[4:]))
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_gz)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(truncated)
    short = tmp_path / "short"
    short.write_bytes(good[:6])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        read_idx(empty)


# ----------------------------------------------------------------- Fashion-MNIST


def _fake_fashion(folder: Path, train_per_class: int = 4, test_per_class: int = 6) -> dict[str, np.ndarray]:
    """Constant 28x28 images whose grey value encodes their index in the split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    train_y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), train_per_class))
    test_y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), test_per_class))
    train_x = np.broadcast_to(np.arange(len(train_y), dtype=np.uint8)[:, None, None], (len(train_y), 28, 28)).copy()
    test_x = np.broadcast_to(100 + np.arange(len(test_y), dtype=np.uint8)[:, None, None], (len(test_y), 28, 28)).copy()
    # Mix raw and gzipped files, as real downloads do.
    _write_idx(folder / (FILES["train_images"] + ".gz"), train_x)
    _write_idx(folder / FILES["train_labels"], train_y)
    _write_idx(folder / FILES["test_images"], test_x)
    _write_idx(folder / (FILES["test_labels"] + ".gz"), test_y)
    return {"train_y": train_y, "test_y": test_y}


def test_find_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good, partial = tmp_path / "good", tmp_path / "partial"
    _fake_fashion(good)
    partial.mkdir()
    (partial / (FILES["train_images"] + ".gz")).write_bytes(b"")
    assert find_fashion_mnist([partial, tmp_path / "missing", good]) == good
    assert find_fashion_mnist([partial]) is None
    monkeypatch.setenv("CLIPRET_FASHION_MNIST", str(good))
    assert find_fashion_mnist() == good


def test_export_fake_fashion_mnist(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "out"
    fake = _fake_fashion(src)
    summary = export_fashion_mnist(src, root, train_per_class=3, query_per_class=2, gallery_per_class=3, seed=5, size=32)
    assert summary == {"root": str(root), "classes": list(CLASS_NAMES), "n_train": 30, "n_query": 20, "n_gallery": 30}
    assert CLASS_NAMES == ("t-shirt_top", "trouser", "pullover", "dress", "coat",
                           "sandal", "shirt", "sneaker", "bag", "ankle_boot")
    train, query, gallery = _ids(root / "training"), _ids(root / "test/query"), _ids(root / "test/gallery")
    assert _per_class(train) == {c: 3 for c in CLASS_NAMES}
    assert _per_class(query) == {c: 2 for c in CLASS_NAMES}
    assert _per_class(gallery) == {c: 3 for c in CLASS_NAMES}

    def index(image_id: str) -> int:
        return int(image_id.split("/")[1].split("_")[1].split(".")[0])

    # Query and gallery are disjoint images of the test split.
    assert not {index(i) for i in query} & {index(i) for i in gallery}
    # Every file holds the image its name says, under the class its label says.
    for folder, ids, labels, offset in (("training", train, fake["train_y"], 0), ("test/query", query, fake["test_y"], 100),
                                        ("test/gallery", gallery, fake["test_y"], 100)):
        for i in ids:
            with Image.open(root / folder / i) as im:
                assert (im.size, im.mode) == ((32, 32), "L")
                values = np.unique(np.asarray(im))
            assert values.tolist() == [offset + index(i)]
            assert CLASS_NAMES[labels[index(i)]] == i.split("/")[0]

    rows = _read_labels(root / "test" / "labels.csv")
    assert rows[0] == ["filename", "label"]
    assert sorted(r[0] for r in rows[1:]) == sorted(query + gallery)
    assert all(r[1] == r[0].split("/")[0] for r in rows[1:])

    # Same seed, same subset; another seed picks other images.
    again = tmp_path / "again"
    export_fashion_mnist(src, again, train_per_class=3, query_per_class=2, gallery_per_class=3, seed=5, size=32)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    export_fashion_mnist(src, other, train_per_class=3, query_per_class=2, gallery_per_class=3, seed=6, size=32)
    assert _ids(other / "test/query") != query


def test_export_whole_train_split_and_too_many(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _fake_fashion(src, train_per_class=4, test_per_class=6)
    summary = export_fashion_mnist(src, tmp_path / "all", train_per_class=None, query_per_class=1, gallery_per_class=5, size=28)
    assert (summary["n_train"], summary["n_query"], summary["n_gallery"]) == (40, 10, 50)
    assert len(_ids(tmp_path / "all" / "training")) == 40
    with Image.open(next((tmp_path / "all" / "training" / "bag").glob("*.png"))) as im:
        assert (im.size, im.mode) == ((28, 28), "L")
    with pytest.raises(ClipretError, match="only 6"):
        export_fashion_mnist(src, tmp_path / "bad", train_per_class=1, query_per_class=2, gallery_per_class=5)


@pytest.mark.slow
def test_export_real_fashion_mnist_subset(tmp_path: Path) -> None:
    src = find_fashion_mnist()
    if src is None:
        pytest.skip("Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
    summary = export_fashion_mnist(src, tmp_path, train_per_class=2, query_per_class=1, gallery_per_class=3, seed=0)
    assert (summary["n_train"], summary["n_query"], summary["n_gallery"]) == (20, 10, 30)
    assert _per_class(_ids(tmp_path / "training")) == {c: 2 for c in CLASS_NAMES}
    assert _per_class(_ids(tmp_path / "test" / "gallery")) == {c: 3 for c in CLASS_NAMES}
    assert len(_read_labels(tmp_path / "test" / "labels.csv")) == 1 + 10 + 30
    with Image.open(next((tmp_path / "test" / "query" / "trouser").glob("q_*.png"))) as im:
        assert (im.size, im.mode) == ((64, 64), "L")
        assert np.asarray(im).max() > 100  # a real garment, not a blank image
