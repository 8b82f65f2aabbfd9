"""``clipret serve`` (issue 22): every endpoint, bad inputs (413/400/422, never 500), path traversal, the
token, metrics, readiness, micro-batching against a real server, and SIGTERM draining."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_fixtures import ZERO_SHOT, free_port, live_server, wait_ready, zero_shot_gallery  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from clipret.cli import app as cli_app  # noqa: E402
from clipret.serve.app import create_app  # noqa: E402
from clipret.serve.service import SearchService  # noqa: E402
from clipret.serve.settings import Settings, is_loopback, parse_size  # noqa: E402
from conftest import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    gallery = zero_shot_gallery(tiny_dataset / "test" / "gallery", tmp / "g.npy")
    settings = Settings(gallery=tmp / "g.npy", model=ZERO_SHOT, pretrained="none", device="cpu", k=5)
    return SimpleNamespace(tmp=tmp, gallery=gallery, settings=settings, service=SearchService.load(settings),
                           queries=sorted((tiny_dataset / "test" / "query").rglob("*.png")))


@pytest.fixture(scope="module")
def client(env):
    with TestClient(create_app(env.settings, env.service)) as c:
        yield c


def brute_top(vectors: np.ndarray, q: np.ndarray, k: int, exclude: int = -1) -> tuple[list[int], np.ndarray]:
    """The obvious reference: every score, sorted best first (ties to the lower row), own row left out."""
    scores = [float(np.dot(np.asarray(v, np.float64), np.asarray(q, np.float64))) for v in vectors]
    order = [j for j in sorted(range(len(scores)), key=lambda j: (-scores[j], j)) if j != exclude][:k]
    return order, np.array([scores[j] for j in order])


def expect(env, rows: list[int], answer: dict) -> None:
    assert answer["ids"] == [env.gallery.ids[j] for j in rows]


def embed_file(env, path: Path) -> np.ndarray:
    from clipret.data.decode import load_rgb

    img, _ = load_rgb(path, min_side=env.service.decode_side)
    return env.service.encoder.embed([img]).vectors[0]


def test_image_upload_base64_and_vector_give_the_same_top_k_as_a_brute_force_search(env, client):
    path = env.queries[0]
    q = embed_file(env, path)
    rows, scores = brute_top(env.gallery.vectors, q, 4)
    up = client.post("/search", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"k": "4"})
    assert up.status_code == 200, up.text
    body = up.json()
    expect(env, rows, body)
    np.testing.assert_allclose(body["scores"], scores, atol=1e-5)
    assert body["stages"] == {"embed": "image tower", "tta": None} and body["gallery"] == "image"
    assert body["batch"] >= 1 and body["took_ms"] > 0
    b64 = client.post("/search", json={"image": base64.b64encode(path.read_bytes()).decode(), "k": 4}).json()
    assert b64["ids"] == body["ids"]
    vec = client.post("/search", json={"vector": [float(x) * 3 for x in q], "k": 4}).json()  # normalised by the server
    assert vec["ids"] == body["ids"] and vec["stages"]["embed"] is None


def test_an_id_query_lists_its_neighbours_without_itself(env, client):
    own = 3
    rows, scores = brute_top(env.gallery.vectors, env.gallery.vectors[own], 5, exclude=own)
    body = client.post("/search", json={"id": env.gallery.ids[own]}).json()  # k: the server's --k (5)
    expect(env, rows, body)
    np.testing.assert_allclose(body["scores"], scores, atol=1e-5)


def test_qe_rerank_and_tta_match_the_python_api(env, client):
    import clipret

    path = env.queries[1]
    q = embed_file(env, path)
    for options in ({"qe": 2}, {"rerank": True}, {"qe": 1, "rerank": True}):
        ref = clipret.retrieve(q[None], env.gallery, k=4, keep_self=True, **options)
        body = client.post("/search", json={"vector": q.tolist(), "k": 4, **options}).json()
        assert body["ids"] == ref.ids[0], options
        np.testing.assert_allclose(body["scores"], ref.scores[0][:4], atol=1e-5)
        assert set(body["stages"]) >= set(ref.meta["stages"]) and ref.meta["stages"]
    from clipret.data.decode import load_rgb

    img, _ = load_rgb(path)
    flip = clipret.retrieve(env.service.encoder.embed([img], tta="flip"), env.gallery, k=4, keep_self=True)
    body = client.post("/search", files={"image": (path.name, path.read_bytes())}, data={"k": "4", "tta": "flip"}).json()
    assert body["ids"] == flip.ids[0] and body["stages"]["tta"] == "flip"


def test_batch_answers_each_query_as_search_does(env, client):
    path = env.queries[2]
    queries = [{"id": env.gallery.ids[0], "k": 2}, {"image": base64.b64encode(path.read_bytes()).decode()},
               {"vector": env.gallery.vectors[5].tolist(), "k": 3, "qe": 1}]
    batch = client.post("/search/batch", json={"queries": queries})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == 3 and [len(r["ids"]) for r in results] == [2, 5, 3]
    for query, got in zip(queries, results):
        alone = client.post("/search", json=query).json()
        assert got["ids"] == alone["ids"]
    files = [("image", (p.name, p.read_bytes())) for p in env.queries[:3]]
    multi = client.post("/search/batch", files=files, data={"k": "2"}).json()["results"]
    assert [r["ids"] for r in multi] == [client.post("/search", files={"image": f[1]}, data={"k": "2"}).json()["ids"]
                                         for f in files]


@pytest.mark.parametrize("body, status, kind", [
    ({"vector": [0.1] * 7}, 422, "bad_vector"),                       # wrong dim
    ({"vector": [0.0] * 64}, 422, "bad_vector"),                      # no direction
    ({"vector": ["a"] * 64}, 422, "bad_vector"),
    ({"vector": [True] * 64}, 422, "bad_vector"),
    ({"vector": 3}, 422, "bad_vector"),
    ({"id": "no/such.png"}, 404, "unknown_id"),
    ({"text": "x", "tta": "flip"}, 422, "bad_option"),               # tta is for images
    ({"id": "x", "k": 0}, 422, "bad_option"),
    ({"id": "x", "k": 10**6}, 422, "bad_option"),
    ({"id": "x", "qe": -1}, 422, "bad_option"),
    ({"id": "x", "k": "\u00b2"}, 422, "bad_option"),                # a digit to str.isdigit, not to int()
    ({"id": "x", "qe": "\u0663"}, 422, "bad_option"),               # an Arabic-Indic digit
    ({"id": "x", "k": "9" * 5000}, 422, "bad_option"),               # past int()'s digit limit
    ({"id": "x", "rerank": "maybe"}, 422, "bad_option"),
    ({"id": "x", "topk": 3}, 422, "bad_option"),                     # a typo is not silently ignored
    ({"image": base64.b64encode(b"png").decode(), "tta": "flips"}, 422, "bad_option"),
    ({"image": "!!not base64!!"}, 400, "bad_image"),
    ({"image": base64.b64encode(b"not an image at all").decode()}, 400, "bad_image"),
    ({}, 400, "bad_request"),
    ({"id": "a", "text": "b"}, 400, "bad_request"),
    ([1, 2], 400, "bad_request"),
])
def test_bad_json_queries_are_refused_with_their_reason_and_the_server_keeps_serving(env, client, body, status, kind):
    r = client.post("/search", json=body)
    assert (r.status_code, r.json()["kind"]) == (status, kind), r.text
    assert r.json()["detail"] and "\n" not in r.json()["detail"]
    assert client.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200


def test_malformed_bodies_nan_and_wrong_content_types_are_4xx(env, client):
    nan = json.dumps({"vector": [float("nan")] + [0.1] * 63})  # Python's json writes NaN; the server must refuse it
    inf = json.dumps({"vector": [float("inf")] + [0.1] * 63})
    for text in (nan, inf):
        r = client.post("/search", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["kind"] == "bad_vector"
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert client.post("/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/search", files={"other": ("a.png", b"x")}).status_code == 400  # no 'image' file
    r = client.post("/search", files={"image": ("a.png", env.queries[0].read_bytes())}, data={"topk": "3"})
    assert r.status_code == 422 and "topk" in r.json()["detail"]  # an unknown form field
    for k in ("\u00b2", "7" * 5000):  # form fields too: 422, never a 500
        r = client.post("/search", files={"image": ("a.png", env.queries[0].read_bytes())}, data={"k": k})
        assert r.status_code == 422 and r.json()["kind"] == "bad_option" and len(r.json()["detail"]) < 200, r.text
    r = client.post("/search", data={"k": "3"}, files={"image": ("a.png", b"")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    assert client.post("/search/batch", json={"queries": []}).status_code == 400
    assert client.post("/search/batch", json={"queries": [{"id": "x"}] * 300}).status_code == 422
    assert client.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200


def test_every_bad_image_in_the_corpus_gets_400_with_its_reason(env, client, tmp_path):
    from badimages import bomb_png_bytes, write_bad_images

    cases = write_bad_images(tmp_path / "bad")
    for name, reason in cases.items():
        path = tmp_path / "bad" / name
        if path.is_symlink() or not os.access(path, os.R_OK):
            continue  # a broken link or an unreadable file cannot be uploaded: they are the file system's, not the bytes'
        r = client.post("/search", files={"image": (name, path.read_bytes())}, data={"k": "2"})
        if reason is None:
            assert r.status_code == 200 and len(r.json()["ids"]) == 2, (name, r.text)
        else:
            assert r.status_code == 400 and r.json()["kind"] == "bad_image" and reason in r.json()["detail"], (name, r.text)
    bomb = client.post("/search", json={"image": base64.b64encode(bomb_png_bytes()).decode()})
    assert bomb.status_code == 400 and "decompression bomb" in bomb.json()["detail"]
    assert client.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200


def test_a_body_over_max_upload_gets_413_with_or_without_content_length(env):
    settings = dataclasses.replace(env.settings, max_upload=2000)
    with TestClient(create_app(settings, env.service)) as c:
        big = os.urandom(5000)
        r = c.post("/search", files={"image": ("big.png", big)})
        assert r.status_code == 413 and r.json()["kind"] == "too_large" and "--max-upload" in r.json()["detail"]
        chunks = (big[i : i + 500] for i in range(0, len(big), 500))  # chunked: no Content-Length to trust
        r = c.post("/search", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200
        errors = _samples(c.get("/metrics").text, "clipret_errors_total")
        assert errors[("too_large",)] == 2


def test_the_token_guards_everything_but_the_probes_page_and_docs(env):
    settings = dataclasses.replace(env.settings, token="s3cret-token")
    with TestClient(create_app(settings, env.service)) as c:
        query = {"id": env.gallery.ids[0]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            r = c.post("/search", json=query, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics").status_code == 401
        assert c.get(f"/items/{env.gallery.ids[0]}/thumbnail").status_code == 401
        for open_path in ("/healthz", "/readyz", "/", "/openapi.json", "/docs"):
            assert c.get(open_path).status_code == 200, open_path
        good = {"Authorization": "Bearer s3cret-token"}
        assert c.post("/search", json=query, headers=good).status_code == 200
        assert c.get("/metrics", headers=good).status_code == 200


def test_a_public_bind_needs_a_token_and_loopback_is_the_default(env, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert Settings(gallery=Path("g.npy"), model="m").host == "127.0.0.1"
    runner = CliRunner()
    base = ["serve", "--gallery", str(env.settings.gallery), "--model", ZERO_SHOT, "--pretrained", "none"]
    r = runner.invoke(cli_app, [*base, "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--token-env" in r.output
    monkeypatch.delenv("CLIPRET_TEST_TOKEN", raising=False)
    r = runner.invoke(cli_app, [*base, "--host", "0.0.0.0", "--token-env", "CLIPRET_TEST_TOKEN"])
    assert r.exit_code == 2 and "CLIPRET_TEST_TOKEN" in r.output and "not set" in r.output
    r = runner.invoke(cli_app, [*base, "--max-upload", "ten"])
    assert r.exit_code == 2 and "10MB" in r.output
    assert parse_size("10MB") == 10_000_000 and parse_size("1KiB") == 1024 and parse_size("512") == 512


def test_thumbnails_serve_gallery_items_and_nothing_outside_the_root(env, client, tmp_path, monkeypatch):
    import clipret.serve.thumbs as thumbs

    item = env.gallery.ids[0]
    r = client.get(f"/items/{item}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    import io

    assert Image.open(io.BytesIO(r.content)).size[0] <= env.settings.thumb_size
    encoded = client.get("/items/" + item.replace("/", "%2F") + "/thumbnail")
    assert encoded.status_code == 200 and encoded.content == r.content  # %2F is a slash: the same id
    reads: list[str] = []
    monkeypatch.setattr(thumbs, "_cached_thumbnail", lambda p, *a: reads.append(p))
    root = Path(env.gallery.root)
    for bad in ("..%2F" + item, "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd", f"{root}/{item}",
                "%2E%2E/%2E%2E/etc/passwd", "no/such.png", item + "%00"):
        r = client.get(f"/items/{bad}/thumbnail")
        assert r.status_code == 404 and r.json()["kind"] == "not_found", bad
    assert reads == []  # refused ids never reach a file read


def test_thumbnails_of_manifest_ids_that_leave_the_root_are_404_over_http(env, tmp_path, monkeypatch):
    """Ids that are in the manifest but lead outside its root (a symlink out, ``..``, an absolute
    path): the request reaches the route and is refused there, and no file outside is read."""
    import copy

    import clipret.serve.thumbs as thumbs

    root, outside = tmp_path / "root", tmp_path / "secret.png"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "a" / "ok.png")
    Image.new("RGB", (8, 8), "blue").save(outside)
    os.symlink(outside, root / "a" / "link.png")
    service = copy.copy(env.service)
    service.gallery = copy.copy(env.service.gallery)
    service.gallery.root = root
    bad = ["a/link.png", "../secret.png", str(outside)]
    service._rows = {name: i for i, name in enumerate(["a/ok.png", *bad])}
    reads: list[str] = []
    real = thumbs._cached_thumbnail
    monkeypatch.setattr(thumbs, "_cached_thumbnail", lambda p, *a: reads.append(p) or real(p, *a))
    with TestClient(create_app(env.settings, service)) as c:
        assert c.get("/items/a/ok.png/thumbnail").status_code == 200
        for item in bad:
            r = c.get("/items/" + item.replace("/", "%2F").replace(".", "%2E") + "/thumbnail")
            assert r.status_code == 404 and r.json()["kind"] == "not_found", item
    assert reads == [os.path.realpath(root / "a" / "ok.png")]


def test_item_path_refuses_traversal_and_symlinks_that_leave_the_root(tmp_path):
    from clipret.serve.thumbs import item_path

    root, outside = tmp_path / "root", tmp_path / "secret.png"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "ok.png")
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, root / "a" / "link.png")  # inside the root, pointing out
    os.symlink(root / "a" / "ok.png", root / "a" / "inner.png")  # inside, pointing inside: fine
    ids = {"a/ok.png", "a/link.png", "a/inner.png", "../secret.png", str(outside), "a/../../secret.png"}
    assert item_path("a/ok.png", ids, root) == (root / "a" / "ok.png").resolve()
    assert item_path("a/inner.png", ids, root) == (root / "a" / "ok.png").resolve()
    for bad in ("a/link.png", "../secret.png", str(outside), "a/../../secret.png", "a/missing.png"):
        assert item_path(bad, ids | {"a/missing.png"}, root) is None, bad
    assert item_path("a/ok.png", set(), root) is None  # not in the manifest
    assert item_path("a/ok.png", ids, None) is None  # no root recorded


def _samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(v for k, v in sorted(s.labels.items()) if k != "le")] = s.value
    return out


def test_metrics_count_requests_errors_latency_and_batch_sizes(env):
    with TestClient(create_app(env.settings, env.service)) as c:
        for _ in range(3):
            assert c.post("/search", json={"id": env.gallery.ids[1]}).status_code == 200
        assert c.post("/search", json={"vector": [1.0]}).status_code == 422
        assert c.get("/items/x/thumbnail").status_code == 404
        text = c.get("/metrics").text
    requests = _samples(text, "clipret_requests_total")
    assert requests[("/search", "200")] == 3 and requests[("/search", "422")] == 1
    assert requests[("/items/{id}/thumbnail", "404")] == 1
    errors = _samples(text, "clipret_errors_total")
    assert errors[("bad_vector",)] == 1 and errors[("not_found",)] == 1
    assert _samples(text, "clipret_request_seconds_count")[("/search",)] == 4
    assert _samples(text, "clipret_batch_size_count")[()] == 3 and _samples(text, "clipret_batch_size_sum")[()] == 3
    assert _samples(text, "clipret_queries_total")[("id",)] == 3


def test_readyz_is_503_until_the_service_is_loaded(env):
    release = threading.Event()

    def slow_load() -> SearchService:
        release.wait(30)
        return env.service

    with TestClient(create_app(env.settings, slow_load)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["kind"] == "not_ready"
        assert c.post("/search", json={"id": env.gallery.ids[0]}).status_code == 503
        release.set()
        ready = wait_ready(c)
        assert ready.status_code == 200 and ready.json()["gallery"] == len(env.gallery) and ready.json()["dim"] == 64
        assert c.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200


def test_docs_and_page_are_served_and_the_page_loads_nothing_from_elsewhere(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/search"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"/search/batch", "/healthz", "/readyz", "/metrics", "/items/{item_id}/thumbnail"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/").text
    assert 'type="file"' in page and 'id="text"' in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


def test_micro_batching_on_a_real_server_answers_200_concurrent_requests(env):
    import httpx

    settings = dataclasses.replace(env.settings, max_wait_ms=50.0, max_batch=64)
    uploads = [(p.name, p.read_bytes()) for p in env.queries]
    answers: list = []
    with live_server(create_app(settings, env.service)) as url:
        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for n in range(i, 200, 16):
                    name, data = uploads[n % len(uploads)]
                    r = c.post("/search", files={"image": (name, data)}, data={"k": "3"})
                    answers.append((r.status_code, r.json()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = httpx.get(url + "/metrics").text
    assert len(answers) == 200 and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    ids = set(env.gallery.ids)
    for _, body in answers:
        assert len(body["ids"]) == 3 and set(body["ids"]) <= ids and len(body["scores"]) == 3
        assert all(np.isfinite(body["scores"])) and body["scores"] == sorted(body["scores"], reverse=True)
    batches = _samples(metrics, "clipret_batch_size_count")[()]
    assert _samples(metrics, "clipret_batch_size_sum")[()] == 200 and batches < 200  # some batch held more than one
    assert max(body["batch"] for _, body in answers) > 1


@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_then_exits_0(env):
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "clipret", "serve", "--gallery", str(env.settings.gallery), "--model",
                             ZERO_SHOT, "--pretrained", "none", "--device", "cpu", "--port", str(port),
                             "--max-wait-ms", "1500", "--no-access-log"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/search", json={"id": env.gallery.ids[0]},
                                                                             timeout=30)))
        worker.start()
        in_flight = lambda: _samples(httpx.get(url + "/metrics").text, "clipret_requests_in_flight")[()]  # noqa: E731
        deadline = time.monotonic() + 10
        while in_flight() < 2 and time.monotonic() < deadline:  # the search, and this /metrics request itself
            time.sleep(0.05)  # the search now waits in the micro-batcher (--max-wait-ms 1500)
        proc.send_signal(signal.SIGTERM)
        worker.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["r"].status_code == 200 and len(result["r"].json()["ids"]) == 10  # the CLI's default --k
    assert result["r"].json()["took_ms"] > 1000  # it waited out --max-wait-ms: it was in flight when SIGTERM came
    assert code == 0, proc.stdout.read()



def test_hostile_json_and_images_are_4xx_never_500(env, client):
    deep = "[" * 100_000 + "]" * 100_000  # nesting too deep for the JSON parser
    huge_int = '{"vector": [' + "9" * 5000 + "]}"  # an integer longer than Python converts
    for text in (deep, huge_int):
        r = client.post("/search", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["kind"] == "bad_request", r.text
    r = client.post("/search", content='{"vector": [' + ",".join(["1" + "0" * 400] * 64) + "]}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["kind"] == "bad_vector"
    import io

    buf = io.BytesIO()
    Image.new("RGB", (5000, 2)).save(buf, "PNG")  # 10k pixels, but 2500:1: resizing its short side would explode
    r = client.post("/search", files={"image": ("strip.png", buf.getvalue())})
    assert r.status_code == 400 and "100:1" in r.json()["detail"]
    assert client.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200


def test_an_image_the_model_cannot_take_fails_alone_in_its_batch(env, monkeypatch):
    from clipret.serve.query import Query, RequestError

    good = Image.new("RGB", (40, 40), (200, 10, 10))
    real = env.service.encoder.embed

    def picky(images, **kw):
        if any(img.size == (41, 41) for img in images):
            raise RuntimeError("the model choked")
        return real(images, **kw)

    monkeypatch.setattr(env.service.encoder, "embed", picky)
    answers = env.service.run([Query("image", good, k=2), Query("image", Image.new("RGB", (41, 41)), k=2),
                               Query("id", env.gallery.ids[0], k=2)])
    assert len(answers[0].ids) == 2 and len(answers[2].ids) == 2
    assert isinstance(answers[1], RequestError) and answers[1].status == 400 and "choked" in answers[1].detail


def test_an_internal_failure_is_a_bare_500_and_the_next_request_is_served(env, monkeypatch):
    calls = []
    real = env.service.run

    def failing_once(queries):
        calls.append(len(queries))
        if len(calls) == 1:
            raise RuntimeError("/secret/path leaked?")
        return real(queries)

    monkeypatch.setattr(env.service, "run", failing_once)
    with TestClient(create_app(env.settings, env.service), raise_server_exceptions=False) as c:
        r = c.post("/search", json={"id": env.gallery.ids[0]})
        assert r.status_code == 500 and r.json()["kind"] == "internal" and "secret" not in r.text
        assert c.post("/search", json={"id": env.gallery.ids[0]}).status_code == 200
        assert _samples(c.get("/metrics").text, "clipret_errors_total")[("internal",)] == 1
