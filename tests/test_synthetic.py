"""The synthetic dataset generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from folder_utils import _files, _ids, _per_class, _read_labels
from PIL import Image

from clipret.data.synthetic import SHAPES, TEXTURES, class_names, make_synthetic_dataset
from clipret.errors import ClipretError


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
