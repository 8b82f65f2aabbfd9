"""``clipret index`` through the CLI: build, --add, --remove, --info, --max-memory, rejections, crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.cli import app

pytest.importorskip("faiss")

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save(path: Path, vectors: np.ndarray, prefix: str, fingerprint: str | None = "fp", flags=None) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(vectors))]
    artifacts.save_embeddings(path, vectors, ids, fingerprint=fingerprint, flags={"tta": False} if flags is None else flags)
    return ids


def info(path: Path) -> dict:
    r = run("index", "--info", path, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def search_ids(path: Path, q: np.ndarray, k: int, **kw) -> list[list[str]]:
    from clipret.retrieval.index import open_index

    gal = open_index(path, **kw)
    _, rows = gal.searcher.search(q, k)
    return [[gal.ids[j] for j in row if j >= 0] for row in rows]


def exact_ids(vectors: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[list[str]]:
    """Plain loops: each query's k best ids by (-score, row)."""
    return [[ids[j] for _, j in sorted((-float(v @ row), j) for j, v in enumerate(vectors))[:k]] for row in q]


@pytest.fixture
def data(tmp_path):
    g, more, q = unit(600, 16, 0), unit(100, 16, 1), unit(12, 16, 2)
    return {"dir": tmp_path, "g": g, "more": more, "q": q,
            "g_ids": save(tmp_path / "g.npy", g, "g/"), "more_ids": save(tmp_path / "more.npy", more, "m/")}


def test_index_help_has_examples():
    r = run("index", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "--max-memory" in r.output


def test_build_flat_from_one_file_prints_the_choice_and_searches_exactly(data):
    d = data["dir"]
    r = run("index", d / "g.npy", "--out", d / "g.faiss")
    assert r.exit_code == 0, r.output
    assert "auto: 600 vectors < 100000: flat" in r.output and "expected memory" in r.output and "expected recall@10 1.000" in r.output
    meta = info(d / "g.faiss")
    assert (meta["type"], meta["count"], meta["dim"], meta["model_fingerprint"], meta["flags"]) == ("flat", 600, 16, "fp", {"tta": False})
    assert abs(meta["file_bytes"] - 600 * 16 * 4) < 1024
    assert search_ids(d / "g.faiss", data["q"], 5) == exact_ids(data["g"], data["g_ids"], data["q"], 5)
    side = json.loads((d / "g.faiss.json").read_text())
    assert side["ids"] == data["g_ids"] and side["clipret_version"] and side["label_count"] == 600


def test_build_from_several_files_and_a_folder_keeps_their_order(data):
    d = data["dir"]
    (d / "shards").mkdir()
    a = save(d / "shards" / "shard-000000.npy", data["g"][:300], "a/")
    b = save(d / "shards" / "shard-000001.npy", data["g"][300:], "b/")
    r = run("index", d / "more.npy", d / "shards", "--out", d / "all.faiss", "--type", "flat")
    assert r.exit_code == 0, r.output
    ids = data["more_ids"] + a + b
    assert json.loads((d / "all.faiss.json").read_text())["ids"] == ids
    vectors = np.concatenate([data["more"], data["g"]])
    assert search_ids(d / "all.faiss", data["q"], 4) == exact_ids(vectors, ids, data["q"], 4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_build_each_type_records_its_parameters(data, kind):
    d = data["dir"]
    extra = {"hnsw": ["--m", 8, "--ef-construction", 40, "--ef-search", 32], "ivf": ["--nlist", 8, "--nprobe", 8],
             "ivfpq": ["--nlist", 4, "--nprobe", 4, "--m", 4, "--nbits", 4]}[kind]
    r = run("index", d / "g.npy", "--out", d / "g.faiss", "--type", kind, *extra, "--threads", 1, "--seed", 3)
    assert r.exit_code == 0, r.output
    meta = info(d / "g.faiss")
    expected = {"hnsw": {"m": 8, "ef_construction": 40, "ef_search": 32}, "ivf": {"nlist": 8, "nprobe": 8, "seed": 3},
                "ivfpq": {"nlist": 4, "nprobe": 4, "m": 4, "nbits": 4, "seed": 3}}[kind]
    assert meta["type"] == kind and meta["params"] == expected
    found = search_ids(d / "g.faiss", data["q"], 10)
    truth = exact_ids(data["g"], data["g_ids"], data["q"], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= (0.9 if kind != "ivfpq" else 0.3), recall  # ivf probes every cell; hnsw on 600 points


def test_info_prints_a_table(data):
    d = data["dir"]
    assert run("index", d / "g.npy", "--out", d / "g.faiss").exit_code == 0
    r = run("index", "--info", d / "g.faiss")
    assert r.exit_code == 0
    for word in ("type", "flat", "count", "600", "dim", "file size", "fingerprint", "fp", "params"):
        assert word in r.stdout


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_then_remove_changes_what_search_finds(data, kind):
    d = data["dir"]
    extra = {"flat": [], "ivf": ["--nlist", 4, "--nprobe", 4], "hnsw": ["--m", 16, "--ef-search", 200]}[kind]
    assert run("index", d / "g.npy", "--out", d / "g.faiss", "--type", kind, *extra).exit_code == 0
    r = run("index", "--add", d / "more.npy", "--index", d / "g.faiss")
    assert r.exit_code == 0, r.output
    assert info(d / "g.faiss")["count"] == 700
    ids = data["g_ids"] + data["more_ids"]
    vectors = np.concatenate([data["g"], data["more"]])
    q = vectors[[5, 650]] + 0.01  # queries next to a gallery row and an added row
    gone = ["g/5", "m/50", "g/599"]
    (d / "rm.txt").write_text("\n".join(gone + ["not-there"]) + "\n")
    r = run("index", "--remove", d / "rm.txt", "--index", d / "g.faiss")
    assert r.exit_code == 0, r.output
    assert "1 id(s) are not in the index" in r.output and "not-there" in r.output
    meta = info(d / "g.faiss")
    expected = {"flat": (0, 0), "ivf": (0, 3), "hnsw": (3, 0)}[kind]  # flat compacts: neither holes nor tombstones
    assert meta["count"] == 697 and (meta["tombstones"], meta["holes"]) == expected
    keep = [j for j, i in enumerate(ids) if i not in gone]
    found = search_ids(d / "g.faiss", q, 5)
    assert found == exact_ids(vectors[keep], [ids[j] for j in keep], q, 5)
    assert json.loads((d / "g.faiss.json").read_text())["ids"] == [ids[j] for j in keep]


def test_readding_a_removed_id_works(data):
    d = data["dir"]
    assert run("index", d / "more.npy", "--out", d / "m.faiss", "--type", "hnsw", "--m", 8).exit_code == 0
    (d / "rm.txt").write_text("\n".join(data["more_ids"]))
    assert run("index", "--remove", d / "rm.txt", "--index", d / "m.faiss").exit_code == 0
    assert info(d / "m.faiss")["count"] == 0
    assert run("index", "--add", d / "more.npy", "--index", d / "m.faiss").exit_code == 0
    meta = info(d / "m.faiss")
    assert meta["count"] == 100 and meta["tombstones"] == 100
    assert search_ids(d / "m.faiss", data["more"][:3], 1) == [["m/0"], ["m/1"], ["m/2"]]


def test_add_rejects_dim_fingerprint_and_duplicate_ids(data):
    d = data["dir"]
    assert run("index", d / "g.npy", "--out", d / "g.faiss").exit_code == 0
    save(d / "wide.npy", unit(5, 32, 3), "w/")
    save(d / "other.npy", unit(5, 16, 3), "o/", fingerprint="other")
    save(d / "tta.npy", unit(5, 16, 3), "t/", flags={"tta": True})
    save(d / "dup.npy", unit(5, 16, 3), "g/")
    before = (d / "g.faiss").read_bytes(), (d / "g.faiss.json").read_bytes()
    cases = [("wide.npy", "has dim 32 but the index"), ("other.npy", "another model"),
             ("tta.npy", "other flags"), ("dup.npy", "5 id(s) are already in")]
    for name, message in cases:
        r = run("index", "--add", d / name, "--index", d / "g.faiss")
        assert r.exit_code == 2 and message in one_line(r), (name, r.output)
    assert ((d / "g.faiss").read_bytes(), (d / "g.faiss.json").read_bytes()) == before
    r = run("index", "--add", d / "other.npy", "--index", d / "g.faiss", "--allow-mismatch")
    assert r.exit_code == 0 and "warning" in r.output and info(d / "g.faiss")["count"] == 605


def test_build_rejects_repeated_ids_and_mixed_models(data):
    d = data["dir"]
    save(d / "dup.npy", unit(5, 16, 3), "g/")
    save(d / "other.npy", unit(5, 16, 3), "o/", fingerprint="other")
    r = run("index", d / "g.npy", d / "dup.npy", "--out", d / "x.faiss")
    assert r.exit_code == 2 and "repeat ids" in one_line(r)
    r = run("index", d / "g.npy", d / "other.npy", "--out", d / "x.faiss")
    assert r.exit_code == 2 and "another model" in one_line(r) and not (d / "x.faiss").exists()


def test_max_memory_chooses_and_refuses(data):
    d = data["dir"]
    r = run("index", d / "g.npy", "--out", d / "g.faiss", "--max-memory", "30KB")  # flat needs 38.4 KB
    assert r.exit_code == 0, r.output
    meta = info(d / "g.faiss")
    assert meta["type"] != "flat" and "within --max-memory 30.0 KB" in r.output
    assert meta["file_bytes"] <= 30_000 * 1.05
    r = run("index", d / "g.npy", "--out", d / "h.faiss", "--max-memory", "1KB")
    assert r.exit_code == 2 and "fits --max-memory 1.0 KB" in one_line(r) and not (d / "h.faiss").exists()
    r = run("index", d / "g.npy", "--out", d / "h.faiss", "--max-memory", "lots")
    assert r.exit_code == 2 and "cannot read 'lots' as a size" in one_line(r)


def test_usage_errors_are_one_line(data):
    d = data["dir"]
    r = run("index")
    assert r.exit_code == 2 and "--add, --remove, --info" in one_line(r)
    r = run("index", d / "g.npy")
    assert r.exit_code == 2 and "needs --out" in one_line(r)
    r = run("index", "--add", d / "more.npy")
    assert r.exit_code == 2 and "needs --index" in one_line(r)
    r = run("index", d / "g.npy", "--info", d / "g.faiss")
    assert r.exit_code == 2 and "build and --info" in one_line(r)
    r = run("index", "--info", d / "missing.faiss")
    assert r.exit_code == 2 and "index not found" in one_line(r)
    r = run("index", d / "g.npy", "--out", d / "g.faiss", "--type", "lsh")
    assert r.exit_code == 2 and "unknown --type 'lsh'" in one_line(r)
    r = run("index", d / "g.npy", "--out", d / "g.npy")
    assert r.exit_code == 2 and "would overwrite embeddings" in one_line(r)
    r = run("index", d / "g.npy", "--out", d / "g.faiss", "--type", "flat", "--nlist", 8)
    assert r.exit_code == 0 and "flat does not use --nlist; ignored" in r.output


def test_without_faiss_index_fails_in_one_line_naming_the_extra(data, monkeypatch):
    d = data["dir"]
    assert run("index", d / "g.npy", "--out", d / "g.faiss").exit_code == 0
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    for args in ([d / "g.npy", "--out", d / "x.faiss"], ["--add", d / "more.npy", "--index", d / "g.faiss"]):
        r = run("index", *args)
        assert r.exit_code == 2 and "pip install 'clipret[faiss]'" in one_line(r)
    assert info(d / "g.faiss")["count"] == 600  # --info reads only the sidecar


def clipret_process(*args, kill_at: str | None = None, code: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPRET_FAULT_KILL", "CLIPRET_DEBUG")}
    if kill_at:
        env["CLIPRET_FAULT_KILL"] = kill_at
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "clipret", *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind, kill_at, survivor", [
    ("flat", "before-rename:.g.faiss.json.pending:1", "old"),  # writing the next sidecar
    ("flat", "before-rename:g.faiss:1", "old"),  # the new index file is complete, not yet renamed
    ("flat", "after-rename:g.faiss:1", "new"),  # between the index rename and the sidecar rename
    ("ivf", "after-rename:g.faiss:1", "new"),
])
def test_kill_during_add_leaves_a_consistent_pair(data, kill_at, survivor, kind):
    d = data["dir"]
    extra = ["--nlist", 4, "--nprobe", 4] if kind == "ivf" else []
    assert run("index", d / "g.npy", "--out", d / "g.faiss", "--type", kind, *extra).exit_code == 0
    r = clipret_process("index", "--add", d / "more.npy", "--index", d / "g.faiss", kill_at=kill_at)
    assert r.returncode == -9, r.stderr  # SIGKILL
    count = 600 if survivor == "old" else 700
    meta = info(d / "g.faiss")
    assert meta["count"] == count
    ids = data["g_ids"] + (data["more_ids"] if survivor == "new" else [])
    vectors = np.concatenate([data["g"], data["more"]])[: len(ids)]
    assert search_ids(d / "g.faiss", data["q"], 3) == exact_ids(vectors, ids, data["q"], 3)
    # the pair keeps working: a later add lands on whatever survived
    r = run("index", "--add", d / "more.npy", "--index", d / "g.faiss")
    assert (r.exit_code == 0) == (survivor == "old"), r.output


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, survivor", [("before-rename:g.faiss.json:1", "old"), ("after-rename:g.faiss.json:1", "new")])
def test_kill_during_hnsw_remove_leaves_a_consistent_pair(data, kill_at, survivor):
    """HNSW removal rewrites only the sidecar (tombstones), in one atomic rename."""
    d = data["dir"]
    assert run("index", d / "g.npy", "--out", d / "g.faiss", "--type", "hnsw", "--m", 8).exit_code == 0
    (d / "rm.txt").write_text("g/0\ng/1\n")
    r = clipret_process("index", "--remove", d / "rm.txt", "--index", d / "g.faiss", kill_at=kill_at)
    assert r.returncode == -9, r.stderr
    meta = info(d / "g.faiss")
    assert (meta["count"], meta["tombstones"]) == ((600, 0) if survivor == "old" else (598, 2))
    found = search_ids(d / "g.faiss", data["g"][:2], 1)  # each query is a gallery row: its own id, unless removed
    assert (found == [["g/0"], ["g/1"]]) == (survivor == "old")
    assert all(i not in ("g/0", "g/1") for row in found for i in row) == (survivor == "new")


def test_index_commands_never_import_torch(data):
    d = data["dir"]
    (d / "rm.txt").write_text("g/1\n")
    code = (
        "import sys\n"
        "from clipret.cli import app\n"
        "for args in (['--help'], ['index', '--help'], ['index', 'g.npy', '--out', 'g.faiss', '--type', 'hnsw', '--m', '8'],\n"
        "             ['index', '--add', 'more.npy', '--index', 'g.faiss'], ['index', '--remove', 'rm.txt', '--index', 'g.faiss'],\n"
        "             ['index', '--info', 'g.faiss', '--json']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "from clipret.retrieval.index import open_index\n"
        "open_index('g.faiss').searcher.search(open_index('g.faiss').searcher.vectors([0, 1]), 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    r = clipret_process(code=code, cwd=d)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch")
