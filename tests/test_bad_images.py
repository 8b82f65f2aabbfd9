"""Broken and unusual image files: decoding, embed/query/train skipping, the check cache, the bomb limit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from badimages import (
    BLUE,
    BOMB_SIDE,
    RED,
    UNREADABLE,
    bomb_png_bytes,
    expected_outcomes,
    expected_size,
    running_as_root,
    write_bad_images,
    write_normal_images,
)
from clipret.cli import app
from clipret.data import decode
from clipret.data.decode import load_rgb, set_max_pixels
from conftest import TINY_RN

runner = CliRunner()
EMBED_FLAGS = ("--model", TINY_RN, "--pretrained", "none", "--workers", 0, "--device", "cpu")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def embed(folder: Path, out: Path, *extra):
    """`clipret embed` with the zero-shot tiny model; the seed fixes its random weights."""
    import torch

    torch.manual_seed(0)
    return run("embed", folder, *EMBED_FLAGS, "--out", out, *extra)


def invalid_names(expected: dict[str, str | None]) -> list[str]:
    return sorted(n for n, e in expected.items() if e is not None)


def valid_names(expected: dict[str, str | None]) -> list[str]:
    return sorted(n for n, e in expected.items() if e is None)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model is far faster on one thread when the cores are shared (no OpenMP oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_images(folder)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Every case plus three ordinary images, in one flat folder."""
    folder = tmp_path_factory.mktemp("mixed")
    expected = write_bad_images(folder)
    expected.update({n: None for n in write_normal_images(folder, 3)})
    return folder, expected


@pytest.fixture
def restore_max_pixels():
    old, old_pil = decode.MAX_PIXELS, Image.MAX_IMAGE_PIXELS
    yield
    set_max_pixels(old)
    Image.MAX_IMAGE_PIXELS = old_pil
    assert decode.MAX_PIXELS == old


# --------------------------------------------------------------------------- load_rgb, case by case
def test_factory_writes_every_case(cases):
    folder, expected = cases
    assert expected == expected_outcomes()
    assert set(expected) == {p.name for p in folder.iterdir()}
    assert len(valid_names(expected)) >= 8 and len(invalid_names(expected)) >= 5


@pytest.mark.parametrize("name", sorted(expected_outcomes()))
def test_load_rgb_outcome(cases, name):
    folder, expected = cases
    img, reason = load_rgb(folder / name)  # must never raise
    if expected[name] is None:
        assert reason is None, reason
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert img.size == expected_size(name)
        np.asarray(img)  # fully decoded, usable
    else:
        assert img is None
        assert isinstance(reason, str) and expected[name] in reason, reason


def _px(folder: Path, name: str) -> np.ndarray:
    img, reason = load_rgb(folder / name)
    assert img is not None, reason
    return np.asarray(img).astype(int)


def test_16bit_png_keeps_mid_grey(cases):
    folder, _ = cases
    assert Image.open(folder / "gray16.png").mode == "I;16"
    px = _px(folder, "gray16.png")
    assert np.all(np.abs(px - 128) <= 1), np.unique(px)  # not saturated to white, not crushed to black


def test_palette_transparency_composited_on_white(cases):
    folder, _ = cases
    src = Image.open(folder / "palette_transparent.png")
    assert src.mode == "P" and "transparency" in src.info
    px = _px(folder, "palette_transparent.png")
    assert np.all(px[:, :8] == RED) and np.all(px[:, 8:] == (255, 255, 255))


def test_exif_rotation_applied(cases):
    folder, _ = cases
    src = Image.open(folder / "exif_rotated.jpg")
    assert src.size == (40, 20) and src.getexif().get(0x0112) == 6
    img, _ = load_rgb(folder / "exif_rotated.jpg")
    assert img.size == (20, 40)


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animation_gives_first_frame(cases, name):
    folder, _ = cases
    with Image.open(folder / name) as src:
        assert getattr(src, "n_frames", 1) == 2
        src.seek(1)
        assert np.all(np.abs(np.asarray(src.convert("RGB")).astype(int) - BLUE) <= 2)  # frame 1 really is blue
    px = _px(folder, name)
    assert np.all(np.abs(px - RED) <= 2), px[0, 0]


def test_cmyk_grayscale_and_lying_extension(cases):
    folder, _ = cases
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert np.all(np.abs(_px(folder, "cmyk.jpg") - RED) <= 8)
    gray = _px(folder, "grayscale.png")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    assert np.array_equal(gray[0, :, 0], np.arange(24) * 10)
    src = Image.open(folder / "png_named_jpg.jpg")
    assert src.format == "PNG"
    assert np.array_equal(_px(folder, "png_named_jpg.jpg"), np.asarray(src.convert("RGB")).astype(int))


def test_bomb_is_small_and_genuine(cases, restore_max_pixels):
    folder, _ = cases
    path = folder / "bomb.png"
    assert path.stat().st_size < 2_000_000
    Image.MAX_IMAGE_PIXELS = None  # only to read the header: nothing is decoded
    with Image.open(path) as img:
        assert img.size == (BOMB_SIDE, BOMB_SIDE) and img.format == "PNG"
    assert bomb_png_bytes() == path.read_bytes()


def test_truncated_and_broken_link_are_what_they_claim(cases):
    folder, _ = cases
    assert (folder / "broken_link.jpg").is_symlink() and not (folder / "broken_link.jpg").exists()
    data = (folder / "truncated.jpg").read_bytes()
    assert data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-2:]


@pytest.mark.skipif(running_as_root(), reason="root reads chmod-000 files; see the monkeypatched variant")
def test_chmod_000_is_permission_denied(cases):
    folder, _ = cases
    img, reason = load_rgb(folder / UNREADABLE)
    assert img is None and reason == "permission denied"


def test_permission_error_reason(tmp_path, monkeypatch):
    """Covers the permission path even as root: open() itself refuses the file."""
    import builtins

    path = tmp_path / "locked.jpg"
    Image.new("RGB", (8, 8), RED).save(path)
    assert load_rgb(path)[0] is not None
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if Path(os.fsdecode(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    img, reason = load_rgb(path)
    monkeypatch.undo()
    assert img is None and reason == "permission denied"


# --------------------------------------------------------------------------- the bomb limit
def test_low_limit_refuses_normal_image(tmp_path, restore_max_pixels):
    small, mid, big = tmp_path / "s.png", tmp_path / "m.png", tmp_path / "b.png"
    Image.new("RGB", (8, 8)).save(small)   # 64 px
    Image.new("RGB", (12, 12)).save(mid)   # 144 px: PIL alone would only warn (between 1x and 2x)
    Image.new("RGB", (20, 20)).save(big)   # 400 px: PIL raises
    assert load_rgb(big)[0] is not None
    set_max_pixels(100)
    assert decode.MAX_PIXELS == 100 and Image.MAX_IMAGE_PIXELS == 100
    for p in (mid, big):
        img, reason = load_rgb(p)
        assert img is None and "decompression bomb" in reason and "100" in reason, (p, reason)
    assert load_rgb(small)[0] is not None


def test_bomb_refused_without_relying_on_warning_filters(tmp_path, restore_max_pixels, monkeypatch):
    """catch_warnings() is process-global: another thread may restore the filters mid-decode."""
    path = tmp_path / "m.png"
    Image.new("RGB", (12, 12)).save(path)
    set_max_pixels(100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monkeypatch.context() as m:
            m.setattr(decode.warnings, "simplefilter", lambda *a, **k: None)  # as if another thread reset it
            img, reason = load_rgb(path)
    assert img is None and "decompression bomb" in reason


def test_limit_from_environment(tmp_path):
    path = tmp_path / "n.png"
    Image.new("RGB", (20, 20)).save(path)
    code = ("import sys; from PIL import Image; from clipret.data import decode as d; "
            "img, r = d.load_rgb(sys.argv[1]); print(d.MAX_PIXELS, Image.MAX_IMAGE_PIXELS, r)")
    env = {**os.environ, "CLIPRET_MAX_IMAGE_PIXELS": "100"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.startswith("100 100 decompression bomb"), out.stdout


# --------------------------------------------------------------------------- check_images and its cache
def test_check_images_cache(tmp_path, monkeypatch):
    from clipret.data import validate
    from clipret.data.layout import list_images

    monkeypatch.setenv("CLIPRET_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    expected = write_bad_images(folder)
    write_normal_images(folder, 2)
    # A broken symlink has no (size, mtime) to cache by, so it is re-checked each time; leave it out here.
    ids = [i for i in list_images(folder) if i != "broken_link.jpg"]
    bad_expected = {n: e for n, e in expected.items() if e is not None and n in ids}

    calls: list[str] = []
    real = validate.load_rgb

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(validate, "load_rgb", counting)

    first = validate.check_images(folder, ids, workers=2)
    assert sorted(calls) == sorted(ids)
    assert set(first) == set(bad_expected)
    assert all(bad_expected[i] in r for i, r in first.items()), first
    assert list(validate.cache_dir().glob("image-check/*.json"))

    calls.clear()
    progress: list[int] = []
    second = validate.check_images(folder, ids, workers=2, on_progress=progress.append)
    assert calls == [] and second == first and sum(progress) == len(ids)

    (folder / "normal_1.png").write_text("no longer an image")  # new content, different size
    calls.clear()
    third = validate.check_images(folder, ids, workers=2)
    assert calls == ["normal_1.png"]
    assert "not an image" in third.pop("normal_1.png") and third == first

    calls.clear()
    assert validate.check_images(folder, ids, workers=2, use_cache=False).keys() == {*first, "normal_1.png"}
    assert sorted(calls) == sorted(ids)


# --------------------------------------------------------------------------- embed / query / train
def test_embed_skips_bad_files_and_keeps_rows_aligned(mixed, tmp_path):
    folder, expected = mixed
    valid, invalid = valid_names(expected), invalid_names(expected)
    out = tmp_path / "x.npy"
    r = embed(folder, out)
    assert r.exit_code == 0, r.output
    vectors = np.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["ids"] == valid and vectors.shape[0] == len(valid)
    assert sorted(s["id"] for s in meta["skipped"]) == invalid
    for s in meta["skipped"]:
        assert expected[s["id"]] in s["reason"], s
    assert f"skipped {len(invalid)} unreadable image(s)" in r.stderr

    # rows and ids aligned: each file embedded on its own, or with only the valid files, gives the same rows
    only_valid = tmp_path / "valid"
    only_valid.mkdir()
    for name in valid:
        shutil.copy(folder / name, only_valid / name)
    r = embed(only_valid, tmp_path / "v.npy")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "v.json").read_text())["ids"] == valid
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), vectors, atol=1e-5)

    one = tmp_path / "one"
    one.mkdir()
    pick = "exif_rotated.jpg"
    shutil.copy(folder / pick, one / pick)
    r = embed(one, tmp_path / "one.npy")
    assert r.exit_code == 0, r.output
    single = np.load(tmp_path / "one.npy")[0]
    dists = np.linalg.norm(vectors - single, axis=1)
    assert int(np.argmin(dists)) == valid.index(pick) and dists.min() < 1e-5


def test_embed_strict_writes_nothing(mixed, tmp_path):
    folder, expected = mixed
    out = tmp_path / "x.npy"
    r = embed(folder, out, "--strict")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert f"{len(invalid_names(expected))} image(s) could not be read" in lines[0] and "--strict" in lines[0]
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not any(tmp_path.iterdir())  # no temp files left behind either


def test_embed_strict_checks_every_image_first_and_embeds_nothing(tmp_path, monkeypatch):
    """4 bad files of different kinds, one per shard of 4: --strict counts all 4 (as the normal run
    skips 4), names the first, writes nothing and never runs the encoder."""
    from clipret.embedding import sharded

    folder = tmp_path / "imgs"
    names = write_normal_images(folder, 12)
    (folder / "normal_02a_empty.jpg").write_bytes(b"")
    (folder / "normal_05a_text.jpg").write_text("not an image")
    (folder / "normal_08a_truncated.jpg").write_bytes((folder / "normal_0.jpg").read_bytes()[:200])
    os.symlink("missing.png", folder / "normal_9a_link.png")
    assert len(names) + 4 == len(list(folder.iterdir()))

    r = embed(folder, tmp_path / "all.npy", "--shard-size", 4)
    assert r.exit_code == 0, r.output
    assert "skipped 4 unreadable image(s)" in r.stderr

    calls = []
    real = sharded.embed_shards
    monkeypatch.setattr(sharded, "embed_shards", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = tmp_path / "out" / "x.npy"
    r = embed(folder, out, "--shard-size", 4, "--strict")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "4 image(s) could not be read" in lines[0] and "--strict" in lines[0], r.stderr
    assert "normal_02a_empty.jpg: empty file" in lines[0] and "+1 more" in lines[0]
    assert calls == []  # nothing embedded
    assert not out.parent.exists()  # nothing written: no OUT, no OUT.parts


def test_strict_check_reports_its_progress_before_the_embedding(tmp_path):
    """--strict's up-front check is a progress stage of its own: the API's callback gets ("check",
    done, N) up to N before any ("embed", ...), and the CLI draws a "check images" bar for it."""
    from clipret import Encoder

    folder = tmp_path / "imgs"
    names = write_normal_images(folder, 5)
    seen: list[tuple[str, int, int]] = []
    emb = Encoder.load(TINY_RN, "none", device="cpu").embed_folder(folder, strict=True, workers=0, progress=lambda *e: seen.append(e))
    assert len(emb) == len(names)
    checks = [e for e in seen if e[0] == "check"]
    first_embed = next(i for i, e in enumerate(seen) if e[0] == "embed")
    assert checks[0] == ("check", 0, 5) and checks[-1] == ("check", 5, 5) and seen.index(checks[-1]) < first_embed
    assert [d for _, d, _ in checks] == sorted(d for _, d, _ in checks)  # counts only go up
    again: list[tuple[str, int, int]] = []  # verdicts from the check's cache still count as checked
    Encoder.load(TINY_RN, "none", device="cpu").embed_folder(folder, strict=True, workers=0, progress=lambda *e: again.append(e))
    assert ("check", 5, 5) in again
    quiet: list[tuple[str, int, int]] = []
    Encoder.load(TINY_RN, "none", device="cpu").embed_folder(folder, workers=0, progress=lambda *e: quiet.append(e))
    assert quiet and {e[0] for e in quiet} == {"embed"}  # no check without --strict

    r = subprocess.run([sys.executable, "-m", "clipret", "embed", str(folder), "--out", str(tmp_path / "x.npy"), "--strict",
                        *map(str, EMBED_FLAGS)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CLIPRET_PROGRESS": "1", "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "check images (embed)" in r.stderr and "5/5" in r.stderr.split("check images (embed)")[1].splitlines()[0]


def test_query_folder_with_bad_files(mixed, tmp_path):
    folder, expected = mixed
    gallery_dir = tmp_path / "gallery"
    gallery_names = write_normal_images(gallery_dir, 3)  # same pixels as the normal images in `mixed`
    g = tmp_path / "g.npy"
    r = embed(gallery_dir, g)
    assert r.exit_code == 0, r.output

    import torch

    torch.manual_seed(0)  # the same zero-shot weights as the gallery
    res = tmp_path / "r.json"
    r = run("query", folder, *EMBED_FLAGS, "--gallery", g, "--k", 2, "--out", res)
    assert r.exit_code == 0, r.output
    results = json.loads(res.read_text())
    assert [x["filename"] for x in results] == valid_names(expected)
    assert all(len(x["samples"]) == 2 and set(x["samples"]) <= set(gallery_names) for x in results)
    by_name = {x["filename"]: x for x in results}
    for name in gallery_names:  # an identical image finds itself first
        assert by_name[name]["samples"][0] == name and by_name[name]["scores"][0] == pytest.approx(1.0, abs=1e-4)
    assert f"skipped {len(invalid_names(expected))} unreadable image(s)" in r.stderr


def test_train_excludes_bad_training_images(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPRET_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "training", root / "training")
    first_class = sorted(p for p in (root / "training").iterdir() if p.is_dir())[0]
    expected = write_bad_images(first_class)
    invalid = invalid_names(expected)
    out = tmp_path / "run"
    r = run("train", root, "--out", out, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32,
            "--epochs", 1, "--p", 2, "--k", 2, "--workers", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"excluded {len(invalid)} unreadable training image(s)" in r.stderr
    for name in invalid[:5]:  # the warning names the first five
        assert f"{first_class.name}/{name}" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
    assert (out / "model.safetensors").is_file()
    excluded = json.loads((out / "excluded.json").read_text())  # every exclusion is kept, with its reason
    assert sorted(e["id"] for e in excluded) == sorted(f"{first_class.name}/{n}" for n in invalid)
    assert all(e["reason"] for e in excluded)


def test_fast_decode_keeps_both_sides_at_least_min_side_and_matches_the_full_decode(tmp_path):
    """A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) but never below min_side."""
    import numpy as np
    from PIL import Image

    from clipret.data.decode import decode_side_for, load_rgb

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1200, 0:1600]
    base = np.stack([xx / 1600 * 255, yy / 1200 * 255, (xx + yy) / 2800 * 255], -1)
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(img).save(tmp_path / "big.png")
    full, _ = load_rgb(tmp_path / "big.jpg")
    assert full.size == (1600, 1200)
    for side, want in [(100, (200, 150)), (150, (200, 150)), (151, (400, 300)), (600, (800, 600)), (601, (1600, 1200))]:
        fast, reason = load_rgb(tmp_path / "big.jpg", side)
        assert reason is None and fast.size == want and fast.mode == "RGB", side
        assert min(fast.size) >= min(side, 1200)
    fast, _ = load_rgb(tmp_path / "big.jpg", 300)  # 1/4 scale: 400 x 300
    down = np.asarray(full.resize(fast.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(fast, dtype=np.float64) - down).mean() < 3.0  # the same picture, scaled
    assert load_rgb(tmp_path / "big.png", 100)[0].size == (1600, 1200)  # only JPEGs have DCT scaling
    assert decode_side_for(224) == 448 and decode_side_for([224, 336]) == 672 and decode_side_for(224, exact=True) is None


def test_decoded_images_stay_usable_after_the_file_is_closed(tmp_path):
    from PIL import Image

    from clipret.data.decode import load_rgb

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "a.jpg")
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    for name in ("a.jpg", "anim.webp"):
        img, reason = load_rgb(tmp_path / name)
        assert reason is None
        assert img.resize((4, 4)).getpixel((0, 0))  # pixels still there after load_rgb closed the file
