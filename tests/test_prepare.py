"""`clipret prepare` for the classification sets (fashion-mnist, cifar100, food101, oxford-pets) and `prepare folder`,
and the writer's rules: atomic and resumable, a complete ROOT left alone, a foreign ROOT refused."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import prepare_fakes as fakes
import pytest
from conftest import invoke_cli
from folder_utils import _files
from PIL import Image
from test_fashion_mnist import _write_idx

from clipret.data.dataset_csv import read_dataset_csv
from clipret.data.layout import read_labels_csv, scan_images, training_set
from clipret.errors import ClipretError
from clipret.prepare import PrepareOptions, prepare
from clipret.prepare.idx import CLASS_NAMES, find_fashion_mnist
from clipret.prepare.unpickle import load_arrays



def _cli(*args: object, code: int = 0) -> str:
    return invoke_cli(*args, code=code).output


def _test_ids(root: Path) -> tuple[list[str], list[str]]:
    return scan_images(root / "test" / "query")[0], scan_images(root / "test" / "gallery")[0]


def _check_layout(root: Path) -> dict[str, list[str]]:
    """Read the layout back as `train` and `embed` do; labels.csv names exactly the test files, by their class folder."""
    ids, labels, _, unusable = training_set(root)
    assert not unusable and labels == [i.split("/")[0] for i in ids]
    query, gallery = _test_ids(root)
    rows = read_labels_csv(root / "test" / "labels.csv")
    assert sorted(rows) == sorted(set(query) | set(gallery))
    assert all(label == i.split("/")[0] for i, label in rows.items())
    return {"training": ids, "query": query, "gallery": gallery}


def _per_class(ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[i.split("/")[0]] = out.get(i.split("/")[0], 0) + 1
    return out


# ------------------------------------------------------------------ Fashion-MNIST


def _fake_idx(folder: Path, train_per_class: int = 3, test_per_class: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n, stem in (("train", train_per_class, "train"), ("test", test_per_class, "t10k")):
        y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), n))
        x = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte", y)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def test_fashion_mnist_open_set_through_the_cli(tmp_path: Path) -> None:
    src, root = tmp_path / "idx", tmp_path / "fm"
    fake = _fake_idx(src)
    out = _cli("prepare", "fashion-mnist", root, "--source", src, "--query-per-class", 1, "--test-classes", 3)
    assert "3 queries, 9 gallery images, 3 classes" in out
    got = _check_layout(root)
    held = list(CLASS_NAMES[-3:])  # a count N holds out the last N classes, in label order
    assert _per_class(got["training"]) == {c: 3 for c in CLASS_NAMES[:-3]}
    assert _per_class(got["query"]) == {c: 1 for c in held} and _per_class(got["gallery"]) == {c: 3 for c in held}
    for split, ids in got.items():  # every PNG holds the array row its name says, as stored (28 px)
        x, y = (fake["train_x"], fake["train_y"]) if split == "training" else (fake["test_x"], fake["test_y"])
        folder = root / ("training" if split == "training" else f"test/{split}")
        for i in ids:
            row = int(i.split("_")[-1].split(".")[0])
            assert CLASS_NAMES[y[row]] == i.split("/")[0]
            np.testing.assert_array_equal(np.asarray(Image.open(folder / i)), x[row])


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPRET_FASHION_MNIST", raising=False)
    root = tmp_path / "fm"
    _cli("prepare", "fashion-mnist", root, "--train-per-class", 2, "--query-per-class", 1, "--gallery-per-class", 3)
    got = _check_layout(root)
    assert _per_class(got["training"]) == {c: 2 for c in CLASS_NAMES}
    assert _per_class(got["query"]) == {c: 1 for c in CLASS_NAMES} and _per_class(got["gallery"]) == {c: 3 for c in CLASS_NAMES}
    with Image.open(root / "test" / "query" / got["query"][0]) as im:
        assert (im.size, im.mode) == ((28, 28), "L") and np.asarray(im).max() > 100  # a garment, not a blank
    assert "nothing to do" in _cli("prepare", "fashion-mnist", root, "--train-per-class", 2, "--query-per-class", 1,
                                   "--gallery-per-class", 3)


# ------------------------------------------------------------------ CIFAR-100


@pytest.fixture
def cifar_src(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path / "raw", fakes.cifar100(tmp_path / "raw")


def test_cifar100_layout_pixels_split_and_csv(tmp_path: Path, cifar_src) -> None:
    src, fake = cifar_src
    root = tmp_path / "c"
    summary = prepare("cifar100", root, source=src, options=PrepareOptions(query_per_class=2, seed=4), csv=True)
    assert summary["counts"] == {"training": 12, "query": 8, "gallery": 12} and summary["written"] == 32
    got = _check_layout(root)
    names = [str(n) for n in fake["names"]]
    classes = sorted(names[c] for c in fakes.CIFAR_CLASSES)
    assert sorted(_per_class(got["training"])) == classes and "maple_tree" in classes
    assert _per_class(got["query"]) == {c: 2 for c in classes} and _per_class(got["gallery"]) == {c: 3 for c in classes}
    assert not set(got["query"]) & set(got["gallery"])
    for split, ids in got.items():
        x, y = (fake["train_x"], fake["train_y"]) if split == "training" else (fake["test_x"], fake["test_y"])
        folder = root / ("training" if split == "training" else f"test/{split}")
        for i in ids:
            row = int(i.split("_")[-1].split(".")[0])
            assert names[y[row]] == i.split("/")[0]
            np.testing.assert_array_equal(np.asarray(Image.open(folder / i).convert("RGB")), x[row])
    table = read_dataset_csv(root / "dataset.csv")
    assert table.ids("train") == sorted(f"training/{i}" for i in got["training"])
    assert table.ids("query") == sorted(f"test/query/{i}" for i in got["query"])
    assert table.ids("gallery") == sorted(f"test/gallery/{i}" for i in got["gallery"])
    assert all(r.label == r.path.split("/")[-2] for r in table.rows)


def test_cifar100_same_seed_same_split_and_gallery_cap(tmp_path: Path, cifar_src) -> None:
    src, _ = cifar_src
    opts = PrepareOptions(query_per_class=2, seed=4)
    prepare("cifar100", tmp_path / "a", source=src, options=opts)
    prepare("cifar100", tmp_path / "b", source=src, options=opts)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    prepare("cifar100", tmp_path / "c", source=src, options=PrepareOptions(query_per_class=2, seed=5))
    assert _test_ids(tmp_path / "c")[0] != _test_ids(tmp_path / "a")[0]
    capped = prepare("cifar100", tmp_path / "d", source=src, options=PrepareOptions(query_per_class=2, gallery_per_class=1,
                                                                                 train_per_class=2, size=16))
    assert capped["counts"] == {"training": 8, "query": 8, "gallery": 4}
    assert Image.open(next((tmp_path / "d" / "training").rglob("*.png"))).size == (16, 16)
    with pytest.raises(ClipretError, match="fewer than the 6 needed"):
        prepare("cifar100", tmp_path / "e", source=src, options=PrepareOptions(query_per_class=5))


def test_resume_restores_only_what_is_missing_and_a_complete_root_is_left_alone(tmp_path: Path, cifar_src) -> None:
    src, _ = cifar_src
    root = tmp_path / "c"
    _cli("prepare", "cifar100", root, "--source", src, "--query-per-class", 2)
    before = _files(root)
    victim = sorted((root / "test" / "gallery").rglob("*.png"))[0]
    keeper = sorted((root / "training").rglob("*.png"))[0]
    os.utime(keeper, (1_000_000, 1_000_000))
    victim.unlink()
    stale = victim.parent / f".{victim.name}.clipret-999999-abc.tmp"  # what a killed writer leaves
    stale.write_bytes(b"half")
    out = _cli("prepare", "cifar100", root, "--source", src, "--query-per-class", 2)
    assert "wrote 1 of 32 images" in out
    assert _files(root) == before and not stale.exists() and keeper.stat().st_mtime == 1_000_000
    # complete: nothing to do, and the raw files are not even needed
    shutil.rmtree(src)
    assert "is complete (32 images); nothing to do" in _cli("prepare", "cifar100", root, "--source", src, "--query-per-class", 2)
    # a run killed mid-way (marker still "complete": false) resumes
    marker = (root / "prepare.json").read_text().replace('"complete": true', '"complete": false')
    (root / "prepare.json").write_text(marker)
    fakes.cifar100(src)
    assert prepare("cifar100", root, source=src, options=PrepareOptions(query_per_class=2))["written"] == 0


def test_a_root_holding_something_else_is_refused(tmp_path: Path, cifar_src) -> None:
    src, _ = cifar_src
    root = tmp_path / "c"
    prepare("cifar100", root, source=src, options=PrepareOptions(query_per_class=2))
    out = _cli("prepare", "cifar100", root, "--source", src, "--query-per-class", 3, code=2)
    assert "other settings (query_per_class: 2 there, 3 now)" in out and len(out.strip().splitlines()) == 1
    assert "holds cifar100, not food101" in _cli("prepare", "food101", root, "--source", src, code=2)
    mine = tmp_path / "mine"
    (mine / "training" / "cat").mkdir(parents=True)
    (mine / "training" / "cat" / "1.png").write_bytes(b"x")
    assert "not empty" in _cli("prepare", "cifar100", mine, "--source", src, code=2)


def test_the_restricted_unpickler_refuses_code(tmp_path: Path, cifar_src) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(ClipretError, match=r"refusing to read x: it asks to call (posix|os|nt)\.system"):
        load_arrays(pickle.dumps({b"data": Evil()}, protocol=4), "x")
    src, _ = cifar_src
    fakes.write_tar(src / "cifar-100-python.tar.gz", {"cifar-100-python/train": pickle.dumps(Evil()),
                                                      "cifar-100-python/test": pickle.dumps(Evil()),
                                                      "cifar-100-python/meta": pickle.dumps(Evil())})
    out = _cli("prepare", "cifar100", tmp_path / "c", "--source", src, code=2)
    assert "refusing to read" in out and not (tmp_path / "pwned").exists() and not (tmp_path / "c" / "training").exists()
    np.testing.assert_array_equal(load_arrays(pickle.dumps(np.arange(6, dtype=np.uint8), protocol=4), "ok"), np.arange(6))
    with pytest.raises(ClipretError, match="not a readable pickle"):
        load_arrays(b"\x80\x02garbage", "broken")


# ------------------------------------------------------------------ Food-101 and Oxford-IIIT Pet


def test_food101_copies_the_jpeg_bytes_and_reads_an_extracted_folder(tmp_path: Path) -> None:
    images = fakes.food101(tmp_path / "raw")
    summary = prepare("food101", tmp_path / "f", source=tmp_path / "raw", options=PrepareOptions(query_per_class=1), csv=True)
    assert summary["counts"] == {"training": 6, "query": 3, "gallery": 9}
    got = _check_layout(tmp_path / "f")
    assert _per_class(got["query"]) == {c: 1 for c in fakes.FOOD_CLASSES}
    for split, ids in got.items():
        folder = tmp_path / "f" / ("training" if split == "training" else f"test/{split}")
        for i in ids:
            assert (folder / i).read_bytes() == images[f"food-101/images/{i}"]  # copied, not re-encoded
    extracted = tmp_path / "extracted"
    with tarfile.open(tmp_path / "raw" / "food-101.tar.gz") as tf:
        tf.extractall(extracted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    prepare("food101", tmp_path / "g", source=extracted, options=PrepareOptions(query_per_class=1), csv=True)
    assert _files(tmp_path / "g") == _files(tmp_path / "f")


def test_oxford_pets_classes_are_breeds(tmp_path: Path) -> None:
    images = fakes.pets(tmp_path / "raw")
    _cli("prepare", "oxford-pets", tmp_path / "p", "--source", tmp_path / "raw", "--query-per-class", 2, "--seed", 1)
    got = _check_layout(tmp_path / "p")
    assert _per_class(got["training"]) == {b: 2 for b in fakes.PET_BREEDS}
    assert _per_class(got["query"]) == {b: 2 for b in fakes.PET_BREEDS} == _per_class(got["gallery"])
    for i in got["query"]:
        breed, name = i.split("/")
        assert name.rpartition("_")[0] == breed
        assert (tmp_path / "p" / "test" / "query" / i).read_bytes() == images[f"images/{name}"]


# ------------------------------------------------------------------ prepare folder


def _image_folder(src: Path, classes: dict[str, int]) -> None:
    n = 0
    for c, count in classes.items():
        for k in range(count):
            n += 1
            sub = src / c / ("nested" if k == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{c}_{k}.jpg").write_bytes(fakes.jpeg(n))


def _expected_folder_counts(sizes: dict[str, int], held: set[str], f: float | None, q: float) -> dict[str, dict[str, int]]:
    """The documented rule, spelled out: n_test per class, then queries = floor(q * n_test) kept within 1..n_test-1."""
    out: dict[str, dict[str, int]] = {"training": {}, "query": {}, "gallery": {}}
    for c, n in sizes.items():
        n_test = (n if c in held else 0) if f is None else min(int(f * n + 0.5), n - 1)
        n_query = 0
        if n_test >= 2:
            n_query = max(1, int(q * n_test))
            n_query = min(n_query, n_test - 1)
        for split, k in (("training", n - n_test), ("query", n_query), ("gallery", n_test - n_query)):
            if k:
                out[split][c] = k
    return out


def test_folder_closed_and_open_set_splits(tmp_path: Path) -> None:
    sizes = {"ant": 6, "bee": 5, "cat": 2, "dog": 7, "eel": 1}
    _image_folder(tmp_path / "src", sizes)
    _cli("prepare", "folder", tmp_path / "src", tmp_path / "closed", "--test-fraction", 0.5, "--query-fraction", 0.34)
    got = _check_layout(tmp_path / "closed")
    want = _expected_folder_counts(sizes, set(), 0.5, 0.34)
    assert {s: _per_class(ids) for s, ids in got.items()} == want
    everything = sorted(got["training"] + got["query"] + got["gallery"])
    assert everything == scan_images(tmp_path / "src")[0]  # each image once, its path below the class kept
    for split, ids in got.items():
        folder = tmp_path / "closed" / ("training" if split == "training" else f"test/{split}")
        assert all((folder / i).read_bytes() == (tmp_path / "src" / i).read_bytes() for i in ids)

    _cli("prepare", "folder", tmp_path / "src", tmp_path / "open", "--test-classes", 2, "--seed", 3)
    got = _check_layout(tmp_path / "open")
    assert {s: _per_class(ids) for s, ids in got.items()} == _expected_folder_counts(sizes, {"dog", "eel"}, None, 0.5)
    _cli("prepare", "folder", tmp_path / "src", tmp_path / "named", "--test-classes", "bee,ant", "--seed", 3)
    assert sorted(_per_class(_test_ids(tmp_path / "named")[1])) == ["ant", "bee"]
    # deterministic per seed; another seed draws other queries
    _cli("prepare", "folder", tmp_path / "src", tmp_path / "again", "--test-classes", 2, "--seed", 3)
    assert _files(tmp_path / "again") == _files(tmp_path / "open")
    _cli("prepare", "folder", tmp_path / "src", tmp_path / "other", "--test-classes", 2, "--seed", 4)
    assert _test_ids(tmp_path / "other")[0] != _test_ids(tmp_path / "open")[0]


def test_folder_and_argument_errors_are_one_line(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src", {"a": 3, "b": 3})
    cases = [
        (["folder", tmp_path / "src"], "takes 2 path(s)"),
        (["cifar100", tmp_path / "x", tmp_path / "y"], "takes 1 path(s)"),
        (["cifar100"], "clipret prepare cifar100 ROOT takes 1 path(s) after the name, got 0"),
        (["folder", tmp_path / "src", tmp_path / "r"], "exactly one of --test-classes"),
        (["folder", tmp_path / "src", tmp_path / "r", "--test-classes", 1, "--test-fraction", 0.2], "exactly one of"),
        (["folder", tmp_path / "src", tmp_path / "r", "--test-classes", "zebra"], "no class 'zebra'"),
        (["folder", tmp_path / "src", tmp_path / "r", "--test-fraction", 1.5], "strictly between 0 and 1"),
        (["folder", tmp_path / "src", tmp_path / "r", "--test-fraction", 0.5, "--query-per-class", 2], "does not apply to folder"),
        (["imagenet", tmp_path / "r"], "unknown dataset 'imagenet'"),
        (["cub200", tmp_path / "r", "--query-per-class", 3], "--query-per-class does not apply to cub200"),
    ]
    for args, message in cases:
        out = _cli("prepare", *args, code=2)
        assert message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ --download


def test_download_offline_fails_at_once_naming_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from clipret.prepare import download

    asked: list[tuple[str, int]] = []

    def unreachable(address, timeout=None):
        asked.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t0 = time.perf_counter()
    out = _cli("prepare", "cifar100", tmp_path / "c", "--download", code=2)
    assert time.perf_counter() - t0 < 5 and asked == [("www.cs.toronto.edu", 443)]
    assert "cannot reach www.cs.toronto.edu (Network is unreachable)" in out and "--source" in out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    for name in ("cub200", "sop", "inshop", "cars196"):
        out = _cli("prepare", name, tmp_path / name, "--download", code=2)
        assert "not downloadable by clipret" in out and "--source" in out
    assert "dead" in _cli("prepare", "cars196", tmp_path / "x", "--download", code=2)
    assert len(asked) == 1  # none of those touched the network
    assert download.probe("example.invalid") == "Network is unreachable"
    out = _cli("prepare", "fashion-mnist", tmp_path / "f", "--download", code=2)  # served over plain http
    assert asked[-1] == ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)


def test_download_probes_the_host_and_port_torchvision_fetches_from() -> None:
    import torchvision.datasets as tvd

    from clipret.prepare.download import TORCHVISION, host_and_port

    urls = {"FashionMNIST": tvd.FashionMNIST.mirrors[0], "CIFAR100": tvd.CIFAR100.url, "Food101": tvd.Food101._URL,
            "OxfordIIITPet": tvd.OxfordIIITPet._RESOURCES[0][0]}  # torchvision's own, private for some
    for cls_name, url, _ in TORCHVISION.values():
        assert host_and_port(url) == host_and_port(urls[cls_name]), cls_name
    assert host_and_port("http://a.example/x") == ("a.example", 80) and host_and_port("https://b.example:8443/") == ("b.example", 8443)
