"""Query expansion over an index reads only the neighbours' rows (issue 17, item 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.cli import app

pytest.importorskip("faiss")
runner = CliRunner()


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_qe_on_an_index_reconstructs_only_the_neighbour_rows_and_equals_the_npy_pipeline(tmp_path, monkeypatch, kind):
    from clipret.retrieval.index import IndexSearcher

    g = _unit(3000, 16, 1)
    artifacts.save_embeddings(tmp_path / "g.npy", g, [f"g{i}" for i in range(3000)], fingerprint="m")
    artifacts.save_embeddings(tmp_path / "q.npy", _unit(7, 16, 2), [f"q{i}" for i in range(7)], fingerprint="m")
    extra = ["--nlist", "16"] if kind == "ivf" else []
    r = runner.invoke(app, ["index", str(tmp_path / "g.npy"), "--out", str(tmp_path / "g.faiss"), "--type", kind, *extra])
    assert r.exit_code == 0, r.output
    read: list[int] = []
    original = IndexSearcher.vectors

    def counting(self, rows):
        read.append(int(np.asarray(rows).size))
        return original(self, rows)

    monkeypatch.setattr(IndexSearcher, "vectors", counting)
    nprobe = ["--nprobe", "16"] if kind == "ivf" else []  # every cell: the same neighbours as exact search
    r = runner.invoke(app, ["query", str(tmp_path / "q.npy"), "--gallery", str(tmp_path / "g.faiss"), "--qe", "3",
                            "--k", "5", "--out", str(tmp_path / "a.json"), *nprobe])
    assert r.exit_code == 0, r.output
    assert 0 < sum(read) <= 7 * 3  # Q x N rows, not the 3000 of the whole gallery
    r = runner.invoke(app, ["query", str(tmp_path / "q.npy"), "--gallery", str(tmp_path / "g.npy"), "--qe", "3",
                            "--k", "5", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert [x["samples"] for x in a] == [x["samples"] for x in b]
    np.testing.assert_allclose([x["scores"] for x in a], [x["scores"] for x in b], atol=1e-5)
