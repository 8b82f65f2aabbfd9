"""Test-time augmentation: views, averaging, one decode per image, symmetric use through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from clipret.cli import app
from clipret.errors import ClipretError
from clipret.embedding.tta import SCALES, ScaledView, TTAViews, n_views, parse_tta, tta_transform
from conftest import TINY_VIT

PRE = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "resize_mode": "shortest"}
runner = CliRunner()


def _img(seed=0, size=(40, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("spec,want", [(None, None), ("none", None), ("flip", "flip"), ("flip,scales", "flip,scales"),
                                       ("scales, flip", "flip,scales"), ("FLIP", "flip")])
def test_parse_tta(spec, want):
    assert parse_tta(spec) == want


@pytest.mark.parametrize("spec", ["scales", "rotate", "flip,rotate"])
def test_parse_tta_rejects_unknown_views(spec):
    with pytest.raises(ClipretError, match="unknown --tta"):
        parse_tta(spec)


def test_views_are_the_plain_view_its_mirror_and_two_rescaled_crops():
    img = _img()
    plain = tta_transform(PRE, None)(img)
    views = tta_transform(PRE, "flip,scales")(img)
    assert views.shape == (4, 3, 32, 32) and n_views("flip,scales") == 4
    torch.testing.assert_close(views[0], plain)
    # for a square image the mirrored tensor is exactly the view of the mirrored image
    torch.testing.assert_close(views[1], plain.flip(-1))
    torch.testing.assert_close(views[1], tta_transform(PRE, None)(ImageOps.mirror(img)), atol=1e-5, rtol=0)
    # the scaled views: the image resized so its short side is round(32 * s), then centre-cropped to 32
    from torchvision import transforms as T

    for view, s in zip(views[2:], SCALES):
        side = round(32 * s)
        expect = T.Compose([T.Resize(side, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                            T.Normalize(PRE["mean"], PRE["std"])])(img)
        torch.testing.assert_close(view, expect, atol=1e-5, rtol=0)
    assert not torch.allclose(views[2], plain) and not torch.allclose(views[3], plain)
    assert tta_transform(PRE, "flip")(img).shape == (2, 3, 32, 32)


def _reference_scaled(pre, scale, img):
    """The scaled view built from open_clip's own resize steps with a target ``scale`` times the input size."""
    from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
    from torchvision import transforms as T

    h, w = (pre["size"], pre["size"]) if isinstance(pre["size"], int) else pre["size"]
    interp = T.InterpolationMode.BILINEAR if pre["interpolation"] == "bilinear" else T.InterpolationMode.BICUBIC
    if pre["resize_mode"] == "squash":
        resize = T.Resize((round(h * scale), round(w * scale)), interpolation=interp)
    elif pre["resize_mode"] == "shortest" and h == w:
        resize = T.Resize(round(h * scale), interpolation=interp)
    elif pre["resize_mode"] == "shortest":  # open_clip's non-square shortest: ResizeKeepRatio's default (bicubic)
        resize = ResizeKeepRatio((h * scale, w * scale))
    else:
        resize = ResizeKeepRatio((h * scale, w * scale), longest=1, interpolation=interp)
    return T.Compose([resize, CenterCropOrPad((h, w), fill=pre["fill_color"]), T.ToTensor(),
                      T.Normalize(pre["mean"], pre["std"])])(img)


@pytest.mark.parametrize("size", [32, [32, 48], [40, 24]])  # open_clip takes a non-square (H, W) input too
@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_scaled_views_for_every_resize_mode_have_the_model_input_size(mode, size):
    """SigLIP, CLIPA and DFN tags use ``longest``/``squash``: every view is built, at the exact input size."""
    h, w = (size, size) if isinstance(size, int) else size
    for interpolation, fill in (("bicubic", 0), ("bilinear", 200)):
        pre = {**PRE, "size": size, "resize_mode": mode, "interpolation": interpolation, "fill_color": fill}
        plain = tta_transform(pre, None)
        for img_size in ((40, 40), (50, 37), (23, 61), (100, 33)):  # (W, H): square, wide, tall, very wide
            img = _img(sum(img_size), img_size)
            views = tta_transform(pre, "flip,scales")(img)
            assert views.shape == (4, 3, h, w)
            torch.testing.assert_close(views[0], plain(img), atol=0, rtol=0)
            torch.testing.assert_close(ScaledView(plain, pre, 1.0)(img), plain(img), atol=0, rtol=0)  # unscaled = plain
            for view, s in zip(views[2:], SCALES):
                torch.testing.assert_close(view, _reference_scaled(pre, s, img), atol=1e-5, rtol=0)
                assert not torch.allclose(view, views[0])


def test_an_unknown_resize_mode_is_refused_in_one_line():
    with pytest.raises(ClipretError, match=r"resize_mode 'crop'.*use --tta flip"):
        ScaledView(lambda img: img, {**PRE, "resize_mode": "crop"}, 1.15)


def test_embed_images_averages_view_embeddings_and_renormalises(tmp_path):
    from clipret.embedding.batches import embed_images
    from clipret.model.build import open_encoder

    for i in range(3):
        _img(i).save(tmp_path / f"{i}.png")
    ids = ["0.png", "1.png", "2.png"]
    encoder, spec, _ = open_encoder(str(TINY_VIT), "none")
    got, kept, _ = embed_images(encoder, tmp_path, ids, TTAViews(tta_transform(spec.preprocess, None), "flip"),
                                batch_size=2)
    assert kept == ids
    plain = tta_transform(spec.preprocess, None)
    with torch.no_grad():
        for row, i in zip(got, ids):
            x = plain(Image.open(tmp_path / i).convert("RGB"))
            a, b = encoder(x[None])[0], encoder(x.flip(-1)[None])[0]  # unit vectors each
            ref = (a + b) / 2
            ref = ref / ref.norm()
            np.testing.assert_allclose(row, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_each_image_is_decoded_once_whatever_the_views(tmp_path, monkeypatch):
    from clipret.data import dataset
    from clipret.embedding.folder import embed_folder

    for i in range(5):
        _img(i).save(tmp_path / f"{i}.png")
    calls = []
    real = dataset.load_rgb
    monkeypatch.setattr(dataset, "load_rgb", lambda p, *a: calls.append(p) or real(p, *a))
    emb = embed_folder(tmp_path, str(TINY_VIT), "none", workers=0, device="cpu", tta="flip,scales")
    assert len(emb) == 5 and len(calls) == 5
    assert emb.flags["tta"] == "flip,scales"


def test_cli_records_tta_warns_on_asymmetry_and_refuses_tta_on_npy_queries(tiny_dataset, tmp_path):
    gal, qry = tiny_dataset / "test" / "gallery", tiny_dataset / "test" / "query"
    common = ["--model", TINY_VIT, "--pretrained", "none", "--device", "cpu", "--workers", 0]
    r = runner.invoke(app, [str(a) for a in ["embed", gal, "--out", tmp_path / "g.npy", "--tta", "flip", *common]])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g.json").read_text())["flags"]["tta"] == "flip"
    r = runner.invoke(app, [str(a) for a in ["embed", qry, "--out", tmp_path / "q.npy", *common]])
    assert json.loads((tmp_path / "q.json").read_text())["flags"]["tta"] is None
    r = runner.invoke(app, [str(a) for a in ["query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--out", tmp_path / "r.json"]])
    assert r.exit_code == 0 and "TTA should be symmetric" in r.output
    r = runner.invoke(app, [str(a) for a in ["query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--tta", "flip"]])
    assert r.exit_code == 2 and "pass --tta to the `clipret embed`" in r.output
    # a query folder with the gallery's --tta: no warning, and the lists match the symmetric .npy route
    r = runner.invoke(app, [str(a) for a in ["query", qry, "--gallery", tmp_path / "g.npy", "--tta", "flip", "--out",
                                             tmp_path / "r2.json", *common]])
    assert r.exit_code == 0, r.output
    assert "symmetric" not in r.output
    r = runner.invoke(app, [str(a) for a in ["embed", qry, "--out", tmp_path / "qf.npy", "--tta", "flip", *common]])
    r = runner.invoke(app, [str(a) for a in ["query", tmp_path / "qf.npy", "--gallery", tmp_path / "g.npy", "--out", tmp_path / "r3.json"]])
    a, b = json.loads((tmp_path / "r2.json").read_text()), json.loads((tmp_path / "r3.json").read_text())
    assert [x["samples"] for x in a] == [x["samples"] for x in b]


@pytest.mark.parametrize("args,want", [
    (["query", "q.npy", "--tta", "--rerank"], ["query", "q.npy", "--tta", "flip", "--rerank"]),
    (["embed", "dir", "--tta"], ["embed", "dir", "--tta", "flip"]),
    (["query", "--tta", "./queries", "--model", "m"], ["query", "--tta", "flip", "./queries", "--model", "m"]),
    (["query", "q", "--tta", "flip,scales", "--qe", "3"], ["query", "q", "--tta", "flip,scales", "--qe", "3"]),
    (["query", "q", "--tta=flip"], ["query", "q", "--tta=flip"]),
    (["query", "q", "--tta", "--rerank", "--qe"], ["query", "q", "--tta", "flip", "--rerank", "--qe", "5"]),
    (["query", "q", "--qe", "3", "--rerank"], ["query", "q", "--qe", "3", "--rerank"]),
    (["query", "q", "--qe", "--k", "3"], ["query", "q", "--qe", "5", "--k", "3"]),
])
def test_a_bare_tta_means_flip_and_a_bare_qe_means_5(args, want):
    from clipret.cli import expand_bare_options

    assert expand_bare_options(args) == want
