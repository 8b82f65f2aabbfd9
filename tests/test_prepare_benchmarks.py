"""`clipret prepare` for the metric-learning benchmarks (cub200, cars196, sop: the shared-test protocol; inshop: the
official query/gallery lists), and the archive safety rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import prepare_fakes as fakes
import pytest
from conftest import TINY_RN, invoke_cli

from clipret.data.dataset_csv import read_dataset_csv
from clipret.data.layout import read_labels_csv, scan_images, training_set
from clipret.errors import ClipretError
from clipret.prepare import PrepareOptions, prepare



def _cli(*args: object, code: int = 0) -> str:
    return invoke_cli(*args, code=code).output


def _per_class(ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[i.split("/")[0]] = out.get(i.split("/")[0], 0) + 1
    return out


def _check_shared(root: Path) -> tuple[list[str], list[str]]:
    """The shared-test layout: test/query is a relative link to gallery; labels.csv names every test image once."""
    query = root / "test" / "query"
    assert query.is_symlink() and os.readlink(query) == "gallery"
    ids, labels, _, _ = training_set(root)
    assert labels == [i.split("/")[0] for i in ids]
    test = scan_images(root / "test" / "gallery")[0]
    assert scan_images(query)[0] == test
    rows = read_labels_csv(root / "test" / "labels.csv")
    assert sorted(rows) == test and all(label == i.split("/")[0] for i, label in rows.items())
    table = read_dataset_csv(root / "dataset.csv")
    assert table.ids("query") == table.ids("gallery") == [f"test/gallery/{i}" for i in test]
    assert table.ids("train") == [f"training/{i}" for i in ids]
    return ids, test


def test_cub200_classes_1_100_train_and_the_rest_test(tmp_path: Path) -> None:
    images = fakes.cub200(tmp_path / "raw", per_class=4)
    out = _cli("prepare", "cub200", tmp_path / "cub", "--source", tmp_path / "raw", "--csv")
    assert "each a query over all the others" in out
    train, test = _check_shared(tmp_path / "cub")
    names = fakes.CUB_CLASSES
    assert _per_class(train) == {names[1]: 4, names[2]: 4}
    assert _per_class(test) == {names[101]: 4, names[102]: 4, names[150]: 4}
    for i in test:
        assert (tmp_path / "cub" / "test" / "gallery" / i).read_bytes() == images[f"CUB_200_2011/images/{i}"]
    marker = json.loads((tmp_path / "cub" / "prepare.json").read_text())
    assert marker["protocol"] == "shared" and marker["counts"] == {"training": 8, "query": 12, "gallery": 12}
    assert "nothing to do" in _cli("prepare", "cub200", tmp_path / "cub", "--source", tmp_path / "raw", "--csv")
    (tmp_path / "cub" / "test" / "query").unlink()  # a lost link is restored, nothing else rewritten
    assert "wrote 0 of 20 images" in _cli("prepare", "cub200", tmp_path / "cub", "--source", tmp_path / "raw", "--csv")
    _check_shared(tmp_path / "cub")


def test_cars196_classes_1_98_train_and_names_made_safe(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    images = fakes.cars196(tmp_path / "raw", per_class=3)
    prepare("cars196", tmp_path / "cars", source=tmp_path / "raw", csv=True)
    train, test = _check_shared(tmp_path / "cars")
    assert sorted(_per_class(train)) == ["001.Make_1_Model", "002.Make_2_Model", "098.Make_98_Model"]
    assert sorted(_per_class(test)) == ["099.Ram_C_V_Cargo_Van_Minivan_2012", "150.Make_150_Model", "196.Make_196_Model"]
    assert set(_per_class(train).values()) == set(_per_class(test).values()) == {3}
    for i in train:
        assert (tmp_path / "cars" / "training" / i).read_bytes() == images[f"car_ims/{i.split('/')[1]}"]
    small = prepare("cars196", tmp_path / "small", source=tmp_path / "raw", options=PrepareOptions(train_per_class=1))
    assert small["counts"] == {"training": 3, "query": 9, "gallery": 9}  # the test set is never cut


def test_sop_official_split(tmp_path: Path) -> None:
    images = fakes.sop(tmp_path / "raw", per_class=3)
    prepare("sop", tmp_path / "sop", source=tmp_path / "raw", csv=True)
    train, test = _check_shared(tmp_path / "sop")
    assert _per_class(train) == {f"{c:05d}": 3 for c in fakes.SOP_TRAIN}
    assert _per_class(test) == {f"{c:05d}": 3 for c in fakes.SOP_TEST}
    by_name = {k.rsplit("/", 1)[1]: v for k, v in images.items()}
    assert all((tmp_path / "sop" / "test" / "gallery" / i).read_bytes() == by_name[i.split("/")[1]] for i in test)


def test_inshop_official_query_and_gallery_lists(tmp_path: Path) -> None:
    rows = fakes.inshop(tmp_path / "raw")
    prepare("inshop", tmp_path / "shop", source=tmp_path / "raw", csv=True)
    root = tmp_path / "shop"
    assert (root / "test" / "query").is_dir() and not (root / "test" / "query").is_symlink()
    got = {"training": training_set(root)[0], "query": scan_images(root / "test" / "query")[0],
           "gallery": scan_images(root / "test" / "gallery")[0]}
    for split, status in (("training", "train"), ("query", "query"), ("gallery", "gallery")):
        want: dict[str, int] = {}
        for s, item in rows.values():
            if s == status:
                want[item] = want.get(item, 0) + 1
        assert _per_class(got[split]) == want
    assert "id_00000003/WOMEN_Dresses_01_1_front.jpg" in got["query"]
    labels = read_labels_csv(root / "test" / "labels.csv")
    assert sorted(labels) == sorted(got["query"] + got["gallery"])
    table = read_dataset_csv(root / "dataset.csv")
    assert table.ids("query") == [f"test/query/{i}" for i in got["query"]]
    assert table.ids("gallery") == [f"test/gallery/{i}" for i in got["gallery"]]


@pytest.mark.slow
def test_the_shared_test_set_leaves_each_querys_own_image_out(tmp_path: Path) -> None:
    """Embedding test/query and test/gallery separately gives the same items; each query's own image is left out,
    and R@1 is what a loop that skips the query's own row finds."""
    import clipret

    fakes.cub200(tmp_path / "raw", per_class=4)
    root = tmp_path / "cub"
    prepare("cub200", root, source=tmp_path / "raw")
    enc = clipret.Encoder.load(TINY_RN, device="cpu")
    q = enc.embed_folder(root / "test" / "query", workers=0, out=tmp_path / "q.npy")
    g = enc.embed_folder(root / "test" / "gallery", workers=0, out=tmp_path / "g.npy")
    assert q.ids == g.ids and len(q.ids) == 12
    metrics = clipret.evaluate(q, g, labels=root / "test" / "labels.csv", k=[1])
    assert metrics["self_matches_excluded"] == len(q.ids)
    labels = read_labels_csv(root / "test" / "labels.csv")
    hits = 0
    for i, qid in enumerate(q.ids):
        best, best_j = -np.inf, -1
        for j, gid in enumerate(g.ids):
            s = float(np.dot(q.vectors[i], g.vectors[j]))
            if gid != qid and s > best:
                best, best_j = s, j
        hits += labels[g.ids[best_j]] == labels[qid]
    assert metrics["recall@1"] == pytest.approx(hits / len(q.ids))
    out = _cli("evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--labels",
               root / "test" / "labels.csv", "--k", 1, "--json")
    assert json.loads(out[out.index("{"):])["self_matches_excluded"] == 12


# ------------------------------------------------------------------ archive safety


@pytest.mark.parametrize("bad", ["../evil.jpg", "/etc/evil.jpg", "CUB_200_2011/../../evil.jpg"])
def test_archive_members_that_leave_the_tree_are_refused(tmp_path: Path, bad: str) -> None:
    fakes.cub200(tmp_path / "raw")
    members = {"CUB_200_2011/images.txt": fakes.lines("1 001.A/a.jpg"), bad: b"x",
               "CUB_200_2011/image_class_labels.txt": fakes.lines("1 1")}
    fakes.write_tar(tmp_path / "raw" / "CUB_200_2011.tgz", members)
    out = _cli("prepare", "cub200", tmp_path / "cub", "--source", tmp_path / "raw", code=2)
    assert "refusing archive member" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "cub" / "training").exists()
    fakes.write_zip(tmp_path / "zip" / "Stanford_Online_Products.zip", {bad: b"x"})
    with pytest.raises(ClipretError, match="refusing archive member"):
        prepare("sop", tmp_path / "sop", source=tmp_path / "zip")


def test_list_entries_that_leave_the_tree_are_refused(tmp_path: Path) -> None:
    """A name read from a dataset's own lists is data too: an extracted folder is not read outside its tree."""
    raw = tmp_path / "raw" / "food-101"
    (raw / "meta").mkdir(parents=True)
    (raw / "images" / "ramen").mkdir(parents=True)
    (raw / "secret.jpg").write_bytes(b"secret")
    (raw / "images" / "ramen" / "1.jpg").write_bytes(fakes.jpeg(1))
    (raw / "meta" / "train.txt").write_text("ramen/1\n../secret\n")
    (raw / "meta" / "test.txt").write_text("ramen/1\n")
    with pytest.raises(ClipretError, match="refusing archive member 'food-101/images/../secret.jpg'"):
        prepare("food101", tmp_path / "f", source=tmp_path / "raw")
    assert not (tmp_path / "f").exists()


def test_an_incomplete_archive_is_one_line(tmp_path: Path) -> None:
    fakes.write_tar(tmp_path / "raw" / "food-101.tar.gz", {"food-101/meta/train.txt": fakes.lines("ramen/1", "sushi/2"),
                                                           "food-101/meta/test.txt": fakes.lines("ramen/3", "ramen/4", "sushi/5", "sushi/6")})
    out = _cli("prepare", "food101", tmp_path / "f", "--source", tmp_path / "raw", "--query-per-class", 1, code=2)
    assert "lacks 6 file(s)" in out and len(out.strip().splitlines()) == 1
    out = _cli("prepare", "food101", tmp_path / "g", "--source", tmp_path / "nowhere", code=2)
    assert "--source folder not found" in out
