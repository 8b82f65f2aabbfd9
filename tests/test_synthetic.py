"""The synthetic dataset generator and the Fashion-MNIST exporter."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipret.data.fashion_mnist import (
    CLASS_NAMES,
    FILES,
    export_fashion_mnist,
    find_fashion_mnist,
    read_idx,
)
from clipret.data.synthetic import SHAPES, TEXTURES, class_names, make_synthetic_dataset
from clipret.errors import ClipretError


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ids(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def _read_labels(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _per_class(ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[i.split("/")[0]] = out.get(i.split("/")[0], 0) + 1
    return out


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return root, make_synthetic_dataset(root)


# --------------------------------------------------------------------- synthetic


def test_class_names_are_distinct_shape_texture_pairs() -> None:
    names = class_names(len(SHAPES) * len(TEXTURES))
    assert len(set(names)) == len(SHAPES) * len(TEXTURES)
    assert {n.split("_", 1)[0] for n in names} == set(SHAPES)
    assert {n.split("_", 1)[1] for n in names} == set(TEXTURES)
    # The default 12 use every shape and at least 4 textures.
    twelve = class_names(12)
    assert twelve == names[:12]
    assert {n.split("_", 1)[0] for n in twelve} == set(SHAPES)
    assert len({n.split("_", 1)[1] for n in twelve}) >= 4
    with pytest.raises(ClipretError):
        class_names(len(names) + 1)
    with pytest.raises(ClipretError):
        class_names(1)


def test_default_layout_counts_and_images(default_set: tuple[Path, dict]) -> None:
    root, summary = default_set
    classes = summary["classes"]
    assert summary == {"root": str(root), "classes": class_names(12), "n_train": 288, "n_query": 48, "n_gallery": 144}
    assert sorted(p.name for p in (root / "training").iterdir()) == sorted(classes)
    for split, n in (("training", 24), ("test/query", 4), ("test/gallery", 12)):
        assert _per_class(_ids(root / split)) == {c: n for c in classes}
    assert sorted(p.name for p in (root / "test").iterdir()) == ["gallery", "labels.csv", "query"]
    with Image.open(root / "test" / "query" / classes[3] / "q_0002.png") as im:
        assert (im.size, im.mode, im.format) == ((64, 64), "RGB", "PNG")


def test_small_layout_sizes_and_modes(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(
        tmp_path, n_classes=5, train_per_class=3, query_per_class=2, gallery_per_class=4, image_size=40, seed=3
    )
    assert (summary["n_train"], summary["n_query"], summary["n_gallery"]) == (15, 10, 20)
    train, query, gallery = _ids(tmp_path / "training"), _ids(tmp_path / "test/query"), _ids(tmp_path / "test/gallery")
    assert (len(train), len(query), len(gallery)) == (15, 10, 20)
    assert _per_class(query) == {c: 2 for c in summary["classes"]}
    assert all(i.split("/")[1].startswith("q_") for i in query)
    assert all(i.split("/")[1].startswith("g_") for i in gallery)
    for i in train + query[:3] + gallery[:3]:
        folder = "training" if i in train else ("test/query" if i in query else "test/gallery")
        with Image.open(tmp_path / folder / i) as im:
            assert (im.size, im.mode) == ((40, 40), "RGB")
            pixels = np.asarray(im)
        assert pixels.std() > 10  # a drawn shape, not a blank image


def test_labels_csv_covers_query_and_gallery_exactly(default_set: tuple[Path, dict]) -> None:
    root, _ = default_set
    rows = _read_labels(root / "test" / "labels.csv")
    assert rows[0] == ["filename", "label"]
    body = rows[1:]
    assert all(len(r) == 2 for r in body)
    labels = dict((r[0], r[1]) for r in body)
    assert len(labels) == len(body)  # no duplicate ids
    expected = _ids(root / "test" / "query") + _ids(root / "test" / "gallery")
    assert len(set(expected)) == len(expected) == 192  # query and gallery names never collide
    assert sorted(labels) == sorted(expected)
    assert all(label == fid.split("/")[0] for fid, label in labels.items())
    assert "circle_solid/q_0003.png" in labels


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(n_classes=4, train_per_class=2, query_per_class=1, gallery_per_class=2, image_size=32)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic_dataset(a, seed=7, **kw)
    make_synthetic_dataset(b, seed=7, **kw)
    make_synthetic_dataset(c, seed=8, **kw)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 4 * 5 + 1
    assert fa == fb
    assert sorted(fa) == sorted(fc)
    images = [k for k in fa if k.endswith(".png")]
    assert all(fa[k] != fc[k] for k in images)
    assert fa["test/labels.csv"] == fc["test/labels.csv"]


def test_images_within_a_class_vary(default_set: tuple[Path, dict]) -> None:
    root, summary = default_set
    folder = root / "training" / summary["classes"][0]
    arrays = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(folder.glob("*.png"))]
    corners = {tuple(np.rint(a[:3, :3].reshape(-1, 3).mean(0) / 32).astype(int)) for a in arrays}
    assert len(corners) >= 10  # background colours differ from image to image
    assert min(np.abs(x - y).mean() for x, y in zip(arrays, arrays[1:])) > 5


def test_mean_colour_does_not_identify_the_class(default_set: tuple[Path, dict]) -> None:
    root, summary = default_set

    def mean_rgb(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        paths = sorted(folder.glob("*/*.png"))
        x = np.stack([np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3).mean(0) for p in paths])
        return x, np.array([p.parent.name for p in paths])

    x_train, y_train = mean_rgb(root / "training")
    xq, yq = mean_rgb(root / "test" / "query")
    xg, yg = mean_rgb(root / "test" / "gallery")
    x_test, y_test = np.concatenate([xq, xg]), np.concatenate([yq, yg])
    classes = np.array(summary["classes"])
    means = np.stack([x_train[y_train == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)]
    accuracy = float((pred == y_test).mean())
    chance = 1 / len(classes)
    assert len(y_test) == 192
    assert accuracy < 2 * chance, f"mean colour predicts the class ({accuracy:.2f} vs chance {chance:.2f})"
    # Class mean colours vary far less than single images do: no class owns a colour.
    assert means.std(0).max() < 0.3 * x_train.std(0).min()


def test_refuses_to_write_into_a_non_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "training" / "old").mkdir(parents=True)
    (tmp_path / "training" / "old" / "x.png").write_bytes(b"old")
    with pytest.raises(ClipretError, match="not empty"):
        make_synthetic_dataset(tmp_path, n_classes=2, train_per_class=1, query_per_class=1, gallery_per_class=1)
    assert (tmp_path / "training" / "old" / "x.png").read_bytes() == b"old"
    assert not (tmp_path / "test").exists()


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
