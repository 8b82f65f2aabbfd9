"""The dataset CSV (issue 21): one file in place of the folder layout for train, embed, query, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import clipret
from clipret.cli import app
from clipret.data.dataset_csv import DatasetRow, read_dataset_csv, write_dataset_csv
from conftest import invoke_cli, TINY_RN

runner = CliRunner()
COMMON = ["--device", "cpu", "--workers", "0"]


def _cli(*args):
    return invoke_cli(*args)


def _one_line_error(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


@pytest.fixture(scope="module")
def dataset_csv(tiny_dataset) -> Path:
    """tiny_dataset as a dataset CSV at its root: training rows, query rows (1,0), gallery rows (0,1)."""
    rows = [DatasetRow(p.relative_to(tiny_dataset).as_posix(), p.parent.name, "train")
            for p in sorted((tiny_dataset / "training").rglob("*.png"))]
    for role in ("query", "gallery"):
        for p in sorted((tiny_dataset / "test" / role).rglob("*.png")):
            rows.append(DatasetRow(p.relative_to(tiny_dataset).as_posix(), p.parent.name, "validation",
                                   role == "query", role == "gallery"))
    path = tiny_dataset / "dataset.csv"
    write_dataset_csv(path, rows)
    return path


def test_roles_and_labels_read_back(dataset_csv, tiny_dataset):
    table = read_dataset_csv(dataset_csv)
    assert table.root == tiny_dataset
    query = sorted(p.relative_to(tiny_dataset).as_posix() for p in (tiny_dataset / "test" / "query").rglob("*.png"))
    assert table.ids("query") == query and len(table.ids("gallery")) == 16 and len(table.ids("train")) == 32
    assert set(table.ids("validation")) == set(table.ids("query")) | set(table.ids("gallery"))
    assert all(label == Path(i).parent.name for i, label in table.labels().items())


def _write(folder: Path, text: str) -> Path:
    for name in ("a/1.png", "a/2.png", "b/3.png", "b/4.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    path = folder / "d.csv"
    path.write_text(text)
    return path


GOOD = "path,label,split\na/1.png,a,validation\na/2.png,a,validation\nb/3.png,b,train\n"


@pytest.mark.parametrize("text, line, words", [
    ("path,label,split\na/1.png,a\n", 2, "expected 3 fields"),
    ("path,label,split\nnope/1.png,a,train\n", 2, "image not found"),
    ("path,label,split\n../x.png,a,train\n", 2, "escapes the CSV's folder"),
    ("path,label,split\n/etc/passwd,a,train\n", 2, "escapes the CSV's folder"),
    ("path,label,split\na/1.png,a,train\na/2.png,a,test\n", 3, "unknown split 'test'"),
    ("path,label,split\na/1.png,a,validation\nb/3.png,b,validation\nb/4.png,b,validation\n", 2, "only one of label 'a'"),
    ("path,label,split\na/1.png,a,train\na/1.png,a,train\n", 3, "listed twice"),
    ("path,label,split,is_query,is_gallery\na/1.png,a,validation,1,maybe\n", 2, "is_gallery must be 1 or 0"),
    ("path,label,split,is_query,is_gallery\na/1.png,a,validation,1,1\na/2.png,a,validation,1,0\n", 2, "only one of label"),
    ("path,split\na/1.png,train\n", 1, "missing label"),
])
def test_bad_csv_is_one_line_naming_the_row(tmp_path, text, line, words):
    path = _write(tmp_path, text)
    message = _one_line_error("embed", path, "--model", TINY_RN, "--out", tmp_path / "g.npy", *COMMON)
    assert f"d.csv:{line}:" in message and words in message, message
    assert not (tmp_path / "g.npy").exists()
    with pytest.raises(clipret.ClipretError, match=words.replace("(", r"\(")):
        read_dataset_csv(path)


def test_a_good_csv_passes_and_a_non_dataset_csv_is_refused_before_the_model_loads(tmp_path):
    assert read_dataset_csv(_write(tmp_path, GOOD)).ids("query") == ["a/1.png", "a/2.png"]
    (tmp_path / "labels.csv").write_text("filename,label\na/1.png,a\n")
    message = _one_line_error("embed", tmp_path / "labels.csv", "--model", "no-such-model", "--out", tmp_path / "g.npy")
    assert "not a dataset CSV" in message


@pytest.mark.slow
def test_embed_query_and_evaluate_take_the_csv(dataset_csv, tiny_dataset, tmp_path):
    _cli("embed", dataset_csv, "--model", TINY_RN, "--out", tmp_path / "g.npy", *COMMON)
    _cli("embed", dataset_csv, "--model", TINY_RN, "--rows", "query", "--out", tmp_path / "q.npy", *COMMON)
    g, q = clipret.Embeddings.load(tmp_path / "g.npy"), clipret.Embeddings.load(tmp_path / "q.npy")
    table = read_dataset_csv(dataset_csv)
    assert g.ids == table.ids("gallery") and q.ids == table.ids("query") and g.root == tiny_dataset.resolve()
    # the same rows as embedding the layout's folders (ids differ only by their folder prefix)
    enc = clipret.Encoder.load(TINY_RN, device="cpu")
    folder = enc.embed_folder(tiny_dataset / "test" / "gallery", workers=0)
    np.testing.assert_allclose(g.vectors, folder.vectors, atol=1e-6)
    assert [f"test/gallery/{i}" for i in folder.ids] == g.ids

    _cli("query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--k", 3, "--out", tmp_path / "r.json")
    got = json.loads(_cli("evaluate", tmp_path / "r.json", "--labels", dataset_csv, "--json").stdout)
    want = clipret.evaluate(clipret.retrieve(q, g, k=3), labels=table.labels())
    assert got == want
    # a query from the CSV itself embeds its query rows: the same results as from q.npy
    _cli("query", dataset_csv, "--model", TINY_RN, "--gallery", tmp_path / "g.npy", "--k", 3, "--out", tmp_path / "r2.json",
         *COMMON)
    assert json.loads((tmp_path / "r2.json").read_text()) == json.loads((tmp_path / "r.json").read_text())
    full = json.loads(_cli("evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--labels", dataset_csv,
                           "--json").stdout)
    assert full["self_matches_excluded"] == 0 and 0 <= full["map@r"] <= 1


@pytest.mark.slow
def test_train_on_the_csv_validates_on_its_validation_rows(dataset_csv, tmp_path):
    events: dict[str, list] = {}
    summary = clipret.train(dataset_csv, out=tmp_path / "run", model=TINY_RN, pretrained="none", image_size=32, epochs=1,
                            device="cpu", workers=0, progress=lambda kind, payload: events.setdefault(kind, []).append(payload))
    setup = events["setup"][0]
    assert setup["n_val"] == 24 and setup["n_train"] == 32 and setup["n_classes"] == 4
    assert "val_map@r" in events["epoch"][0] and summary


@pytest.mark.parametrize("command", ["train", "query", "evaluate --query", "evaluate results"])
def test_every_command_refuses_a_bad_csv_in_one_line_naming_the_row(tmp_path, command):
    from clipret.artifacts import save_embeddings

    path = _write(tmp_path, "path,label,split\na/1.png,a,train\na/2.png,a,test\n")
    ids = ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    for side in ("q", "g"):
        save_embeddings(tmp_path / f"{side}.npy", np.eye(4, 8, dtype=np.float32), ids, fingerprint="f")
    clipret.retrieve(tmp_path / "q.npy", tmp_path / "g.npy", k=2).to_json(tmp_path / "r.json")
    args = {
        "train": ["train", path, "--out", tmp_path / "run", "--model", TINY_RN, "--epochs", 1, *COMMON],
        "query": ["query", path, "--gallery", tmp_path / "g.npy", "--model", TINY_RN, "--out", tmp_path / "r2.json", *COMMON],
        "evaluate --query": ["evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--labels", path],
        "evaluate results": ["evaluate", tmp_path / "r.json", "--labels", path],
    }[command]
    message = _one_line_error(*args)
    assert "d.csv:3:" in message and "unknown split 'test'" in message, message
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2.json").exists()


@pytest.mark.slow
def test_rows_that_are_both_query_and_gallery_never_find_themselves(tmp_path, tiny_dataset):
    """is_query=1 and is_gallery=1 on the same rows: each query's own image is left out of its list
    and of R (the self-match rule), with no flag."""
    rows = [DatasetRow(p.relative_to(tiny_dataset).as_posix(), p.parent.name, "validation", True, True)
            for p in sorted((tiny_dataset / "test" / "gallery").rglob("*.png"))]
    path = tiny_dataset / "both.csv"
    write_dataset_csv(path, rows)
    _cli("embed", path, "--model", TINY_RN, "--out", tmp_path / "g.npy", *COMMON)
    _cli("query", path, "--model", TINY_RN, "--gallery", tmp_path / "g.npy", "--k", 5, "--out", tmp_path / "r.json", *COMMON)
    res = clipret.Results.load(tmp_path / "r.json")
    assert res.query_ids == [r.path for r in rows]
    assert all(q not in found for q, found in zip(res.query_ids, res.ids))
    full = json.loads(_cli("evaluate", "--query", tmp_path / "g.npy", "--gallery", tmp_path / "g.npy", "--labels", path,
                           "--json").stdout)
    assert full["self_matches_excluded"] == len(rows)
    kept = json.loads(_cli("evaluate", "--query", tmp_path / "g.npy", "--gallery", tmp_path / "g.npy", "--labels", path,
                           "--keep-self", "--json").stdout)
    assert kept["recall@1"] == 1.0 and full["recall@1"] < 1.0  # with itself kept, each query finds itself first
