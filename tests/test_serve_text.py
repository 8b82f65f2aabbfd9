"""Text queries (issue 22): the zero-shot text tower (``clipret.TextEncoder``), ``clipret query --text``, the refusal
of a fine-tuned gallery, and ``clipret serve`` with ``--text-gallery``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from serve_fixtures import ZERO_SHOT, fine_tuned_run, zero_shot_gallery
from typer.testing import CliRunner

import clipret
from clipret.cli import app as cli_app
from conftest import TINY_RN, TINY_VIT

runner = CliRunner()
TEXTS = ["a red dress", "a striped square", "two cats on a sofa"]


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_text")
    folder = tiny_dataset / "test" / "gallery"
    g0 = zero_shot_gallery(folder, tmp / "g0.npy")
    run = fine_tuned_run(tmp / "run")
    ft = clipret.Encoder.load(run, device="cpu").embed_folder(folder, out=tmp / "ft.npy", workers=0)
    return SimpleNamespace(tmp=tmp, g0=g0, run=run, ft=ft, folder=folder, queries=sorted((tiny_dataset / "test" / "query").rglob("*.png")))


@pytest.fixture(scope="module")
def text_encoder():
    return clipret.TextEncoder.load(ZERO_SHOT, "none", device="cpu")


def brute_top(vectors: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = [float(np.dot(np.asarray(v, np.float64), np.asarray(q, np.float64))) for v in vectors]
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]


def test_the_text_tower_is_open_clips_own_for_the_same_weights_file(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = json.loads(TINY_VIT.read_text())
    torch.manual_seed(11)
    clip = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    enc = clipret.TextEncoder.load(TINY_VIT, str(weights), device="cpu")
    with torch.no_grad():
        ref = clip.encode_text(open_clip.SimpleTokenizer()(TEXTS), normalize=True).numpy()
    got = enc.embed_text(TEXTS)
    np.testing.assert_allclose(got.vectors, ref, atol=1e-5)
    assert got.ids == TEXTS and got.vectors.dtype == np.float32 and got.vectors.shape == (3, cfg["embed_dim"])
    # the same weights file gives the image embeddings the same fingerprint: the two towers share one space
    image = clipret.Encoder.load(TINY_VIT, str(weights), device="cpu")
    assert enc.fingerprint == image.fingerprint != clipret.TextEncoder.load(TINY_VIT, "none", device="cpu").fingerprint
    with torch.no_grad():
        pixels = torch.rand(1, 3, 64, 64)
        np.testing.assert_allclose(image.module(pixels).numpy(), clip.encode_image(pixels, normalize=True).numpy(), atol=1e-5)


def test_embed_text_rows_are_unit_deterministic_and_blank_text_is_refused(text_encoder):
    a = text_encoder.embed_text(TEXTS).vectors
    b = clipret.TextEncoder.load(ZERO_SHOT, "none", device="cpu").embed_text(TEXTS).vectors
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-6)  # random weights, seeded: the same every time
    assert not np.allclose(a[0], a[1])
    with pytest.raises(clipret.ClipretError, match="empty"):
        text_encoder.embed_text(["ok", "   "])


def test_query_text_searches_a_zero_shot_gallery_like_a_brute_force_search(env, text_encoder, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(cli_app, ["query", "--text", TEXTS[0], "--text", TEXTS[1], "--gallery", str(env.tmp / "g0.npy"),
                                "--k", "4", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "using the gallery's --model" in r.output  # model and weights come from the manifest
    records = json.loads(out.read_text())
    q = text_encoder.embed_text(TEXTS[:2]).vectors
    for record, text, vec in zip(records, TEXTS, q):
        assert record["filename"] == text
        assert record["samples"] == [env.g0.ids[j] for j in brute_top(env.g0.vectors, vec, 4)]
    named = tmp_path / "named.json"  # the same model named on the command line: the same results, no note
    r = runner.invoke(cli_app, ["query", "--text", TEXTS[0], "--text", TEXTS[1], "--gallery", str(env.tmp / "g0.npy"),
                                "--model", str(ZERO_SHOT), "--pretrained", "none", "--k", "4", "--out", str(named),
                                "--device", "cpu"])
    assert r.exit_code == 0 and "using the gallery's --model" not in r.output, r.output
    assert json.loads(named.read_text()) == records


def test_a_text_query_against_a_fine_tuned_gallery_is_refused_in_one_line(env):
    ft = str(env.tmp / "ft.npy")
    for extra in ([], ["--model", ZERO_SHOT, "--pretrained", "none"]):
        r = runner.invoke(cli_app, ["query", "--text", "a red dress", "--gallery", ft, "--device", "cpu", *extra])
        assert r.exit_code == 2, r.output
        line = r.output.strip()
        assert "\n" not in line and "fine-tuned" in line and "clipret embed" in line and "--text-gallery" in line
        assert "--out g0.npy" in line and str(env.folder) in line  # the command to run, with the gallery's own folder
    with pytest.raises(clipret.ClipretError, match="fine-tuned run"):
        clipret.TextEncoder.load(env.run)


def test_a_gallery_of_another_zero_shot_model_is_refused_and_bad_arguments_fail(env, tmp_path):
    g0 = str(env.tmp / "g0.npy")
    r = runner.invoke(cli_app, ["query", "--text", "x", "--gallery", g0, "--model", str(TINY_RN), "--pretrained", "none"])
    assert r.exit_code == 2 and "another model" in r.output
    r = runner.invoke(cli_app, ["query", "--text", "x", "--gallery", g0, "--model", str(TINY_RN), "--pretrained", "none",
                                "--allow-mismatch", "--out", str(tmp_path / "r.json"), "--device", "cpu"])
    assert r.exit_code == 0 and "another model" in r.output  # a warning now
    r = runner.invoke(cli_app, ["query", str(env.tmp / "g0.npy"), "--text", "x", "--gallery", g0])
    assert r.exit_code == 2 and "one of the two" in r.output
    r = runner.invoke(cli_app, ["query", "--gallery", g0])
    assert r.exit_code == 2 and "one of the two" in r.output
    r = runner.invoke(cli_app, ["query", "--text", "x", "--gallery", g0, "--tta", "flip"])
    assert r.exit_code == 2 and "text query" in r.output


def _service(env, **kw):
    from clipret.serve.service import SearchService
    from clipret.serve.settings import Settings

    settings = Settings(**{"gallery": env.tmp / "ft.npy", "model": str(env.run), "device": "cpu", "k": 3, **kw})
    return settings, SearchService.load(settings)


def test_serve_answers_text_from_the_text_gallery_and_images_from_the_fine_tuned_one(env, text_encoder):
    from fastapi.testclient import TestClient

    from clipret.serve.app import create_app

    settings, service = _service(env, text_gallery=env.tmp / "g0.npy")  # --text-model from g0's manifest
    with TestClient(create_app(settings, service)) as c:
        assert c.get("/readyz").json()["text"] is True
        body = c.post("/search", json={"text": TEXTS[2], "k": 4}).json()
        assert body["gallery"] == "text" and body["stages"]["embed"] == "text tower"
        q = text_encoder.embed_text([TEXTS[2]]).vectors[0]
        assert body["ids"] == [env.g0.ids[j] for j in brute_top(env.g0.vectors, q, 4)]
        path = env.queries[0]
        image = c.post("/search", files={"image": (path.name, path.read_bytes())}).json()
        from clipret.data.decode import load_rgb

        img, _ = load_rgb(path, min_side=service.decode_side)
        v = service.encoder.embed([img]).vectors[0]
        assert image["gallery"] == "image" and image["ids"] == [env.ft.ids[j] for j in brute_top(env.ft.vectors, v, 3)]
        assert c.get(f"/items/{body['ids'][0]}/thumbnail").status_code == 200


def test_serve_refuses_text_on_a_fine_tuned_gallery_alone_and_a_fine_tuned_text_gallery(env):
    from fastapi.testclient import TestClient

    from clipret.serve.app import create_app

    settings, service = _service(env)
    with TestClient(create_app(settings, service)) as c:
        assert c.get("/readyz").json()["text"] is False
        r = c.post("/search", json={"text": "a red dress"})
        assert r.status_code == 400 and r.json()["kind"] == "no_text"
        assert "--text-gallery" in r.json()["detail"] and "clipret embed" in r.json()["detail"]
        assert c.post("/search", json={"id": env.ft.ids[0]}).status_code == 200  # images still served
    with pytest.raises(clipret.ClipretError, match="fine-tuned"):
        _service(env, text_gallery=env.tmp / "ft.npy")
    with pytest.raises(clipret.ClipretError, match="another model"):
        _service(env, text_gallery=env.tmp / "g0.npy", text_model=str(TINY_RN), pretrained="none")


def test_a_zero_shot_server_answers_text_with_its_own_gallery(env):
    from clipret.serve.service import SearchService
    from clipret.serve.settings import Settings

    service = SearchService.load(Settings(gallery=env.tmp / "g0.npy", model=ZERO_SHOT, pretrained="none", device="cpu"))
    assert service.text is not None and service.text_gallery is service.gallery
    from clipret.serve.query import Query

    [answer] = service.run([Query("text", "a red dress", k=2)])
    assert answer.gallery == "text" and len(answer.ids) == 2
    assert Path(service.item_file(answer.ids[0])).is_file()
