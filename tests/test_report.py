"""``clipret report``: the self-contained HTML page, the contact sheet, the training curves, the errors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import clipret
from clipret.artifacts import save_embeddings
from clipret.cli import app
from clipret.data.layout import read_labels_csv
from conftest import TINY_RN

runner = CliRunner()
THUMB, K = 24, 5


def build_retrieval_set(dataset: Path, out: Path) -> dict[str, Path]:
    """Query and gallery of ``dataset`` embedded with the random-init tiny model, searched (k=5)
    into ``out/results.json`` (and its sidecar): the small real set the report tests look at."""
    enc = clipret.Encoder.load(TINY_RN, "none", device="cpu")
    paths = {side: out / f"{side}.npy" for side in ("query", "gallery")}
    for side, path in paths.items():
        enc.embed_folder(dataset / "test" / side, out=path, workers=0)
    clipret.retrieve(paths["query"], paths["gallery"], k=K).to_json(out / "results.json")
    return {**paths, "results": out / "results.json", "labels": dataset / "test" / "labels.csv"}


def cli(*args: object, code: int = 0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def thumbs_of(html: str) -> dict[str, str]:
    block = re.search(r'<script type="application/json" id="thumbs">(.*?)</script>', html, re.S)
    assert block is not None
    return json.loads(block.group(1))


def rows_of(html: str) -> list[dict[str, object]]:
    """Each query row: its id, label, AP and the (status, label) of its items, read from the markup."""
    out = []
    for m in re.finditer(r'<div class="row" data-id="([^"]*)" data-label="([^"]*)" data-ap="([^"]*)"(.*?)(?=<div class="row"|</div></body>|$)',
                         html, re.S):
        items = re.findall(r'<figure class="item ([a-z]*)" data-label="([^"]*)">', m.group(4))
        out.append({"id": m.group(1), "label": m.group(2), "ap": float(m.group(3)) if m.group(3) else None, "items": items})
    return out


@pytest.fixture(scope="module")
def rset(tiny_dataset, tmp_path_factory):
    return build_retrieval_set(tiny_dataset, tmp_path_factory.mktemp("report"))


def test_html_is_self_contained_thumbnails_decode_and_rows_are_the_worst(rset, tmp_path):
    out = tmp_path / "report.html"
    cli("report", rset["results"], "--labels", rset["labels"], "--out", out, "--worst", 5, "--thumb", THUMB)
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    links = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', html)
    assert all(not re.match(r"(?i)(https?:)?//", link) for link in links)
    assert "<link" not in html and "@import" not in html and "url(" not in html

    thumbs = thumbs_of(html)
    assert thumbs and len(set(re.findall(r'data-k="(i\d+)"', html))) == len(thumbs)  # each image once, each used
    for uri in thumbs.values():
        assert uri.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        img.load()
        assert img.format == "JPEG" and max(img.size) <= THUMB

    want = clipret.evaluate(clipret.Results.load(rset["results"]), labels=rset["labels"], k=[1, 5, 10], per_class=True, worst=5)
    rows = rows_of(html)
    assert [r["id"] for r in rows] == [w["id"] for w in want["worst"]]
    assert [r["ap"] for r in rows] == pytest.approx([w["ap"] for w in want["worst"]])
    labels = read_labels_csv(rset["labels"])
    for row in rows:
        assert row["label"] == labels[row["id"]] and len(row["items"]) == K
        assert all(status == ("hit" if lab == row["label"] else "miss") for status, lab in row["items"])
    assert html.count("<tr>", html.index('id="per-class"'), html.index("</table>", html.index('id="per-class"'))) == 1 + len(want["per_class"])
    summary = html[html.index('id="summary"'):html.index("</table>", html.index('id="summary"'))]
    for key in ("recall@1", "map@5", "map@r"):
        assert f"<td>{key}</td><td class=\"num\">{want[key]:.4f}</td>" in summary


def test_missing_gallery_image_is_a_labelled_placeholder(rset, tiny_dataset, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny_dataset / "test" / "gallery", gallery)
    first = clipret.Results.load(rset["results"]).ids[0][0]
    (gallery / first).unlink()
    out = tmp_path / "r.html"
    r = cli("report", rset["results"], "--out", out, "--worst", 8, "--thumb", THUMB, "--gallery-images", gallery)
    assert "could not be shown" in r.output
    html = out.read_text(encoding="utf-8")
    assert re.search(r'<div class="missing"[^>]*>' + re.escape(first) + r"<br>\(missing\)</div>", html)
    assert f'alt="{first}"' not in html  # never a broken <img>


def test_images_skipped_when_embedded_are_named_with_their_reason(tiny_dataset, tmp_path):
    """A file embed could not read is in no result; the report names it (and its side) with the reason,
    from the results sidecar, or from the gallery manifest for a sidecar that does not record it."""
    gallery, query = tmp_path / "gallery", tmp_path / "query"
    shutil.copytree(tiny_dataset / "test" / "gallery", gallery)
    shutil.copytree(tiny_dataset / "test" / "query", query)
    cls = sorted(p.name for p in gallery.iterdir())[0]
    (gallery / cls / "zz_broken.png").write_bytes(b"not an image")
    (query / cls / "zz_empty.png").write_bytes(b"")
    enc = clipret.Encoder.load(TINY_RN, "none", device="cpu")
    g = enc.embed_folder(gallery, out=tmp_path / "g.npy", workers=0)
    assert [s["id"] for s in g.skipped] == [f"{cls}/zz_broken.png"]
    results = tmp_path / "results.json"
    cli("query", query, "--gallery", tmp_path / "g.npy", "--out", results, "--model", TINY_RN, "--pretrained", "none",
        "--workers", 0, "--device", "cpu")
    sidecar = json.loads(Path(f"{results}.json").read_text())
    assert sidecar["query"]["skipped_count"] == 1 and sidecar["query"]["skipped"][0]["id"] == f"{cls}/zz_empty.png"

    def skipped_table(html: str) -> list[tuple[str, str, str]]:
        table = html[html.index('id="skipped"'):html.index("</table>", html.index('id="skipped"'))]
        return re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", table)

    out = tmp_path / "r.html"
    cli("report", results, "--labels", tiny_dataset / "test" / "labels.csv", "--out", out, "--thumb", THUMB)
    html = out.read_text(encoding="utf-8")
    assert "Skipped images (2:" in html
    got = skipped_table(html)
    assert [(side, image_id) for side, image_id, _ in got] == [("query", f"{cls}/zz_empty.png"), ("gallery", f"{cls}/zz_broken.png")]
    assert "empty" in got[0][2] and got[1][2]
    for side in ("query", "gallery"):  # a sidecar from before: the gallery's manifest still names its file
        del sidecar[side]["skipped"], sidecar[side]["skipped_count"]
    Path(f"{results}.json").write_text(json.dumps(sidecar))
    cli("report", results, "--out", out, "--thumb", THUMB)
    assert [row[:2] for row in skipped_table(out.read_text(encoding="utf-8"))] == [("gallery", f"{cls}/zz_broken.png")]


def test_size_is_bounded_by_worst_not_by_the_number_of_queries(tmp_path):
    n_q, n_g, classes = 20_000, 300, 10
    rng = np.random.default_rng(0)
    tiles = {}
    for c in range(classes):
        tiles[c] = tmp_path / f"tile{c}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tiles[c])
    sides = {}
    for side, n in (("query", n_q), ("gallery", n_g)):
        labels = rng.integers(0, classes, n)
        ids = [f"c{c}/{side[0]}{i:05d}.png" for i, c in enumerate(labels)]
        for c in range(classes):
            (tmp_path / side / f"c{c}").mkdir(parents=True)
        for image_id, c in zip(ids, labels):
            os.link(tiles[c], tmp_path / side / image_id)
        vectors = rng.normal(size=(n, 8)).astype(np.float32)
        sides[side] = tmp_path / f"{side}.npy"
        save_embeddings(sides[side], vectors / np.linalg.norm(vectors, axis=1, keepdims=True), ids, fingerprint="fp",
                        root=tmp_path / side)
    clipret.retrieve(sides["query"], sides["gallery"], k=K).to_json(tmp_path / "results.json")
    out = tmp_path / "big.html"
    r = cli("report", tmp_path / "results.json", "--out", out, "--worst", 200, "--thumb", 16)
    html = out.read_text(encoding="utf-8")
    assert len(rows_of(html)) == 200 and "200 of 20000 queries" in html
    assert out.stat().st_size < 1_500_000, out.stat().st_size
    assert len(thumbs_of(html)) <= 200 + n_g  # each image at most once
    assert "wrote 200 of 20000 queries" in r.output


def test_contact_sheet_has_one_row_per_worst_query_and_coloured_borders(rset, tmp_path):
    from clipret.report.page import HIT_COLOUR, MISS_COLOUR
    from clipret.report.sheet import BORDER, GAP, sheet_size

    png = tmp_path / "sheet.png"
    cli("report", rset["results"], "--out", tmp_path / "r.html", "--worst", 3, "--thumb", THUMB, "--png", png)
    img = Image.open(png).convert("RGB")
    assert img.size == sheet_size(3, K, THUMB) == ((1 + K) * (THUMB + 2 * BORDER) + GAP, 3 * (THUMB + 2 * BORDER))
    colours = {"hit": Image.new("RGB", (1, 1), HIT_COLOUR).getpixel((0, 0)),
               "miss": Image.new("RGB", (1, 1), MISS_COLOUR).getpixel((0, 0))}
    rows = rows_of((tmp_path / "r.html").read_text(encoding="utf-8"))
    cell = THUMB + 2 * BORDER
    for y, row in enumerate(rows):
        for x, (status, _) in enumerate(row["items"]):
            assert img.getpixel((GAP + (1 + x) * cell + 1, y * cell + 1)) == colours[status]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_curves_have_one_polyline_per_series_and_skip_missing_keys(tmp_path):
    run = tmp_path / "run"
    rows = [{"epoch": 0, "step": 0, "val_recall@1": 0.1, "val_map@r": 0.05, "best": False},  # the starting weights
            {"epoch": 1, "step": 5, "train_loss": 2.0, "lr": 1e-4, "head_lr": 1e-3, "val_recall@1": 0.3, "val_map@r": 0.2},
            {"epoch": 2, "step": 10, "train_loss": None, "lr": 5e-5, "head_lr": 5e-4, "val_nonfinite": 3},
            {"epoch": 3, "step": 15, "train_loss": 1.0, "lr": 0.0, "head_lr": 0.0, "val_recall@1": 0.5, "val_map@r": float("nan")}]
    _write_jsonl(run, rows)
    cli("report", run, "--out", tmp_path / "c.html", "--png", tmp_path / "c.png")
    html = (tmp_path / "c.html").read_text(encoding="utf-8")
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    want = {"train_loss": 2, "val_recall@1": 3, "val_map@r": 2, "lr": 3, "head_lr": 3}  # finite numbers only
    got = {name: len(points.split()) for svg in svgs
           for name, points in re.findall(r'<polyline data-series="([^"]+)" points="([^"]+)"', svg)}
    assert got == want and len(svgs) == 3
    assert [len(re.findall("<polyline", s)) for s in svgs] == [1, 2, 2]
    assert "http" not in html.replace('http-equiv="Content-Security-Policy"', "")
    assert Image.open(tmp_path / "c.png").size == (480, 3 * 240)

    _write_jsonl(tmp_path / "lossonly", [{"epoch": 1, "train_loss": 3.0}])
    cli("report", tmp_path / "lossonly", "--out", tmp_path / "l.html")
    assert len(re.findall("<polyline", (tmp_path / "l.html").read_text(encoding="utf-8"))) == 1


def test_curve_keys_are_the_ones_training_writes():
    from clipret.report.curves import CHARTS

    root = Path(clipret.__file__).parent / "training"
    source = "".join(p.read_text(encoding="utf-8") for p in root.glob("*.py"))
    for keys in CHARTS.values():
        for key in keys:
            assert f'"{key}"' in source, key


def test_rows_without_labels_keep_file_order_and_no_colours(tmp_path):
    rng = np.random.default_rng(1)
    for side, n in (("q", 6), ("g", 9)):
        v = rng.normal(size=(n, 4)).astype(np.float32)
        save_embeddings(tmp_path / f"{side}.npy", v / np.linalg.norm(v, axis=1, keepdims=True), [f"{side}{i}.png" for i in range(n)],
                        fingerprint=None)
    clipret.retrieve(tmp_path / "q.npy", tmp_path / "g.npy", k=3).to_json(tmp_path / "results.json")
    r = cli("report", tmp_path / "results.json", "--out", tmp_path / "r.html", "--worst", 4)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "--labels" in r.output and "--queries" in r.output  # no labels, no image folders: both said
    assert [row["id"] for row in rows_of(html)] == ["q0.png", "q1.png", "q2.png", "q3.png"]
    assert 'class="item hit"' not in html and 'class="item miss"' not in html and 'id="summary"' not in html
    assert html.count('<div class="missing"') == 4 * 4


@pytest.mark.parametrize("case", ["no results", "bad sidecar", "labels miss ids", "run without metrics"])
def test_errors_are_one_line(case, rset, tmp_path):
    args = [rset["results"], "--labels", rset["labels"]]
    if case == "no results":
        args = [tmp_path / "nope.json"]
    elif case == "bad sidecar":
        shutil.copy(rset["results"], tmp_path / "res.json")
        (tmp_path / "res.json.json").write_text(json.dumps({"format": "something-else"}))
        args = [tmp_path / "res.json"]
    elif case == "labels miss ids":
        lines = rset["labels"].read_text().splitlines()
        (tmp_path / "few.csv").write_text("\n".join(lines[:4]) + "\n")
        args = [rset["results"], "--labels", tmp_path / "few.csv"]
    else:
        (tmp_path / "run").mkdir()
        args = [tmp_path / "run"]
    r = cli("report", *args, "--out", tmp_path / "x.html", code=2)
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_writes_are_atomic(rset, tmp_path, monkeypatch):
    import clipret.report.page as page

    out, png = tmp_path / "r.html", tmp_path / "s.png"
    out.write_text("old page")
    png.write_bytes(b"old sheet")
    real = page.render
    monkeypatch.setattr(page, "render", lambda data, thumbs: real(data, thumbs) + "\ud800")  # not encodable: fails mid-write
    cli("report", rset["results"], "--out", out, "--png", png, code=1)
    assert out.read_text() == "old page" and png.read_bytes() == b"old sheet"
    monkeypatch.setattr(page, "render", real)

    real_save = Image.Image.save

    def broken_save(self, fh, format=None, **kwargs):  # the PNG write fails half-way; thumbnails still encode
        if format != "PNG":
            return real_save(self, fh, format=format, **kwargs)
        fh.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    r = cli("report", rset["results"], "--out", out, "--png", png, code=2)
    assert "no space left" in r.output
    assert png.read_bytes() == b"old sheet" and out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "s.png"]  # no temporary file left behind
