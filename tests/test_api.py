"""The public Python API (issue 20): light to import, typed and documented, equal to the CLI's files."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import clipret
from conftest import invoke_cli, ROOT, TINY_RN

COMMON = ["--device", "cpu", "--workers", "0"]


def _cli(*args):
    return invoke_cli(*args)


def test_import_is_light_and_loads_nothing_heavy():
    code = "import sys, time; t = time.perf_counter(); import clipret; dt = time.perf_counter() - t; " \
           "print(dt, sorted(m for m in ('torch', 'open_clip', 'faiss', 'typer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert float(out[0]) < 0.3 and out[1].strip() == "[]"


@pytest.mark.parametrize("name", [n for n in clipret.__all__ if n not in ("__version__",)])
def test_every_public_name_is_documented_and_typed(name):
    obj = getattr(clipret, name)
    assert inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 20, f"{name} has no docstring"
    members = [obj] if not inspect.isclass(obj) else [
        m for n, m in vars(obj).items()
        if not n.startswith("_") and (inspect.isfunction(m) or isinstance(m, (classmethod, staticmethod, property)))]
    for member in members:
        fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        sig = inspect.signature(fn)
        untyped = [p for p in sig.parameters.values() if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
                   and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        assert not untyped and sig.return_annotation is not inspect.Signature.empty, f"{name}.{fn.__name__} is not typed"
        assert inspect.getdoc(fn), f"{name}.{fn.__name__} has no docstring"


@pytest.mark.parametrize("name", ["Embeddings", "Gallery", "Results", "Encoder", "TextEncoder", "retrieve"])
def test_array_holders_state_their_shapes_and_dtypes(name):
    """What holds or takes arrays says their shape, as (N, D), and their dtype, in its docstring."""
    doc = inspect.getdoc(getattr(clipret, name))
    assert re.search(r"\([NQGk], [DkN]\)", doc), f"{name}: no (rows, width) shape in its docstring"
    assert re.search(r"float32|int64", doc), f"{name}: no dtype in its docstring"


def test_the_api_prints_nothing(tiny_dataset, tmp_path, capfd):
    """Nothing on stdout or stderr from the API, errors included: the CLI alone talks to the terminal."""
    enc = clipret.Encoder.load(TINY_RN, "none", device="cpu")
    g = enc.embed_folder(tiny_dataset / "test" / "gallery", out=tmp_path / "g.npy", workers=0)
    q = enc.embed_folder(tiny_dataset / "test" / "query", workers=0)
    res = clipret.retrieve(q, g, k=3, qe=1)
    clipret.evaluate(res, labels=tiny_dataset / "test" / "labels.csv")
    clipret.evaluate(q, g, labels=tiny_dataset / "test" / "labels.csv")
    with pytest.raises(clipret.ClipretError):
        clipret.Embeddings.load(tmp_path / "none.npy")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    _cli("train", tiny_dataset, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32, "--epochs", 1,
         "--out", out, *COMMON)
    return out


def test_cli_files_equal_what_the_api_returns(run, tiny_dataset, tmp_path):
    gal_dir, q_dir, labels = tiny_dataset / "test" / "gallery", tiny_dataset / "test" / "query", tiny_dataset / "test" / "labels.csv"
    _cli("embed", gal_dir, "--model", run, "--out", tmp_path / "g.npy", *COMMON)
    _cli("embed", q_dir, "--model", run, "--out", tmp_path / "q.npy", "--tta", "flip", *COMMON)
    enc = clipret.Encoder.load(run, device="cpu")
    g = enc.embed_folder(gal_dir, workers=0)
    q = enc.embed_folder(q_dir, tta="flip", workers=0)
    cli_g = clipret.Embeddings.load(tmp_path / "g.npy")
    np.testing.assert_array_equal(cli_g.vectors, g.vectors)
    assert cli_g.ids == g.ids and cli_g.meta["flags"] == g.meta["flags"] and cli_g.fingerprint == g.fingerprint

    _cli("query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--k", 5, "--qe", 2, "--rerank", "--k1", 6,
         "--k2", 3, "--out", tmp_path / "cli.json")
    res = clipret.retrieve(clipret.Embeddings.load(tmp_path / "q.npy"), tmp_path / "g.npy", k=5, qe=2, rerank=True, k1=6, k2=3)
    res.to_json(tmp_path / "api.json")
    assert json.loads((tmp_path / "cli.json").read_text()) == json.loads((tmp_path / "api.json").read_text())
    side = [json.loads((tmp_path / f"{n}.json.json").read_text()) for n in ("cli", "api")]
    assert side[0] == {**side[1], "results_sha256": side[0]["results_sha256"]} and side[0]["results_sha256"] == side[1]["results_sha256"]

    cli_m = json.loads(_cli("evaluate", tmp_path / "cli.json", "--labels", labels, "--k", 1, 5, "--json").stdout)
    assert cli_m == clipret.evaluate(res, labels=labels, k=(1, 5))
    full = json.loads(_cli("evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--labels", labels,
                           "--qe", 2, "--json").stdout)
    assert full == clipret.evaluate(tmp_path / "q.npy", tmp_path / "g.npy", labels=labels, qe=2)
    cli_q = clipret.Embeddings.load(tmp_path / "q.npy")
    np.testing.assert_array_equal(cli_q.vectors, q.vectors)  # flip TTA too: the same rows, bit for bit
    assert cli_q.ids == q.ids and cli_q.meta["flags"] == q.meta["flags"] and cli_q.meta["flags"]["tta"] == "flip"


def test_embed_takes_paths_pil_images_and_arrays_and_equals_the_folder_rows(run, tiny_dataset):
    from PIL import Image

    folder = tiny_dataset / "test" / "gallery"
    enc = clipret.Encoder.load(run, device="cpu")
    want = enc.embed_folder(folder, workers=0)
    paths = [folder / i for i in want.ids[:5]]
    images = [Image.open(p).convert("RGB") for p in paths]
    got = [enc.embed(paths), enc.embed(images), enc.embed([np.asarray(im) for im in images])]
    for e in got:
        assert e.vectors.shape == (5, enc.dim) and e.vectors.dtype == np.float32
        np.testing.assert_allclose(e.vectors, want.vectors[:5], atol=1e-5)
    assert got[0].ids == [str(p) for p in paths] and got[1].ids == ["0", "1", "2", "3", "4"]
    with pytest.raises(clipret.ClipretError, match="uint8"):
        enc.embed([np.zeros((4, 4), np.float32)])


def test_gallery_add_remove_save(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = clipret.Embeddings(x[:6], [f"a{i}" for i in range(6)], fingerprint="m")
    b = clipret.Embeddings(x[6:], [f"b{i}" for i in range(4)], fingerprint="m")
    a.save(tmp_path / "g.npy")
    gal = clipret.Gallery.open(tmp_path / "g.npy")
    gal.add(b)
    gal.remove(["a0", "b3"])
    gal.save(tmp_path / "h.npy")
    h = clipret.Embeddings.load(tmp_path / "h.npy")
    assert h.ids == ["a1", "a2", "a3", "a4", "a5", "b0", "b1", "b2"]
    np.testing.assert_array_equal(h.vectors, np.concatenate([x[1:6], x[6:9]]))
    res = clipret.retrieve(x[:2], gal, k=3)
    assert res.ids[1][0] == "a1" and "a0" not in res.ids[0] and len(res.ids[0]) == 3
    with pytest.raises(clipret.ClipretError, match="already"):
        gal.add(b)


def test_train_takes_the_clis_long_names_and_refuses_unknown_settings(tmp_path):
    with pytest.raises(clipret.ClipretError, match="did you mean epochs"):
        clipret.train(tmp_path, out=tmp_path / "r", epochz=3)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_api_docs_example_runs(tmp_path):
    from clipret.data.synthetic import make_synthetic_dataset

    doc = (ROOT / "docs" / "api.md").read_text()
    make_synthetic_dataset(tmp_path / "data", n_classes=4, train_per_class=8, query_per_class=2, gallery_per_class=4,
                           image_size=32, seed=3)
    env = {**os.environ, "CLIPRET_DEVICE": "cpu"}
    (shell,) = _blocks(doc, "bash")[:1]
    for line in shell.strip().splitlines():
        command = line.split("#")[0].split()
        subprocess.run([sys.executable, "-m", "clipret", *command[1:], "--workers", "0"], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=600)
    (code,) = _blocks(doc, "python")
    assert len(code.strip().splitlines()) <= 15
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"R@1 \d\.\d{3}  MAP@R \d\.\d{3}", done.stdout)
    assert json.loads((tmp_path / "results.json").read_text()) and (tmp_path / "runs" / "exp2" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_reference_builds_with_pdoc(tmp_path):
    subprocess.run([sys.executable, "-m", "pdoc", "clipret", "-o", str(tmp_path)], check=True, capture_output=True, timeout=300)
    page = (tmp_path / "clipret.html").read_text()
    for name in clipret.__all__:
        if name != "__version__":
            assert f'id="{name}"' in page, name  # an anchored entry of its own, not a word somewhere


def test_index_cli_equals_gallery_build_add_remove(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clipret.Embeddings(x[:200], [f"a{i:03d}" for i in range(200)], fingerprint="m").save(tmp_path / "a.npy")
    clipret.Embeddings(x[200:], [f"b{i:03d}" for i in range(100)], fingerprint="m").save(tmp_path / "b.npy")
    (tmp_path / "gone.txt").write_text("a000\nb099\nnot-here\n")
    _cli("index", tmp_path / "a.npy", "--out", tmp_path / "cli.faiss", "--type", "ivf", "--nlist", 4)
    _cli("index", "--add", tmp_path / "b.npy", "--index", tmp_path / "cli.faiss")
    r = _cli("index", "--remove", tmp_path / "gone.txt", "--index", tmp_path / "cli.faiss")
    assert "1 id(s) are not in the index and were ignored: not-here" in r.output

    notes: list[str] = []
    gal = clipret.Gallery.build(tmp_path / "a.npy", tmp_path / "api.faiss", type="ivf", nlist=4)
    gal.add([tmp_path / "b.npy"]).remove(["a000", "b099", "not-here"], missing_ok=True, warnings=notes)
    assert len(gal) == 298 and gal.ids == [i for i in [f"a{i:03d}" for i in range(200)] + [f"b{i:03d}" for i in range(100)]
                                         if i not in ("a000", "b099")]
    assert notes == ["1 id(s) are not in the index and were ignored: not-here"]
    info = [clipret.Gallery.info(tmp_path / f"{n}.faiss") for n in ("cli", "api")]
    differ = {k for k in info[0] if info[0][k] != info[1][k]}
    assert info[0]["count"] == 298 and differ <= {"path", "generation"}, differ  # same index bytes (faiss_sha256)
    cli_res = clipret.retrieve(x[:20], tmp_path / "cli.faiss", k=5)
    api_res = clipret.retrieve(x[:20], gal, k=5)
    assert cli_res.ids == api_res.ids and np.array_equal(cli_res.scores, api_res.scores)
    res = clipret.retrieve(x[:3], gal, k=2)  # the changed index opens when searched
    assert res.ids[1][0] == "a001" and "a000" not in res.ids[0]
    with pytest.raises(clipret.ClipretError, match="not in the gallery"):
        gal.remove(["nope"])
