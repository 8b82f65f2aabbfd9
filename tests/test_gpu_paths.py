"""The GPU code paths on a machine without a GPU: how each path is chosen, and the CPU fallbacks.

* JPEG decoding on the device (clipret/embedding/gpu_decode.py): the choice (CUDA, the env
  override, --exact-decode), the device preprocessing against the model's own PIL transform in
  every resize mode, the bad-image corpus through the device path (the same skips and reasons),
  and the per-file fallback to PIL. The device path runs here on the CPU device (torchvision's
  libjpeg instead of nvJPEG), so the code that runs on a GPU is exercised.
* Exact search, QE, DBA and score blocks as torch matmuls (clipret/retrieval/search.py,
  scores.py): the choice (CLIPRET_SEARCH_DEVICE, the size threshold, no torch import without a
  driver), and the torch path on the CPU device against the numpy path and a slow loop, ties included.
* The benches: bench/embed.py --steady, bench/train.py's FLOPs and MFU, bench/evaluate.py's torch floor.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badimages import write_bad_images, write_normal_images
from clipret.embedding import gpu_decode
from clipret.embedding.gpu_decode import DevicePlan, device_decode_plan, plain_jpeg, wanted
from clipret.errors import ClipretError
from clipret.retrieval import scores as scores_mod
from clipret.retrieval import search as search_mod
from clipret.retrieval.search import ExactSearcher, TorchSearcher, search_device, topk_tensor
from conftest import ROOT, TINY_RN, TINY_VIT

PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
              "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def _transform(**changes):
    from clipret.data.transforms import eval_transform

    return eval_transform({**PREPROCESS, **changes})


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (bench/embed.py's generator)."""
    from embed import make_photo

    return make_photo(seed, seed=7, width=w, height=h)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# --- which decode path -------------------------------------------------------------------------------


def test_decode_path_choice(monkeypatch):
    monkeypatch.delenv(gpu_decode.ENV, raising=False)
    assert wanted("cpu") is False  # automatic: PIL on the CPU
    assert wanted(torch.device("cuda")) is None  # automatic on CUDA: decided by the nvJPEG probe
    assert wanted("cuda", exact=True) is False and wanted("cuda", exact=True, choice=True) is False
    assert wanted("cpu", choice=True) is True and wanted("cuda", choice=False) is False
    for value, expected in (("1", True), ("0", False), ("auto", False)):
        monkeypatch.setenv(gpu_decode.ENV, value)
        assert wanted("cpu") is expected
    monkeypatch.setenv(gpu_decode.ENV, "0")
    assert wanted("cuda") is False and wanted("cuda", choice=True) is True  # the argument wins over the variable
    monkeypatch.setenv(gpu_decode.ENV, "yes")
    with pytest.raises(ClipretError, match="CLIPRET_GPU_DECODE"):
        wanted("cuda")


def test_plan_is_chosen_on_cuda_only_when_nvjpeg_works(monkeypatch):
    from clipret.embedding.tta import tta_transform

    monkeypatch.delenv(gpu_decode.ENV, raising=False)
    assert gpu_decode.nvjpeg_works("cpu")  # torchvision's CPU decoder takes the probe
    transform = _transform()
    assert device_decode_plan(transform, "cpu") is None
    monkeypatch.setattr(gpu_decode, "nvjpeg_works", lambda device: True)
    assert isinstance(device_decode_plan(transform, "cuda"), DevicePlan)
    assert device_decode_plan(transform, "cuda", exact=True) is None  # --exact-decode keeps PIL
    monkeypatch.setattr(gpu_decode, "nvjpeg_works", lambda device: False)
    assert device_decode_plan(transform, "cuda") is None  # broken nvJPEG: PIL, silently
    scales = tta_transform(PREPROCESS, "flip,scales")
    assert device_decode_plan(scales, "cuda") is None  # no device version: PIL
    with pytest.raises(ClipretError, match="no device version"):
        device_decode_plan(scales, "cpu", choice=True)


def test_plan_recognises_eval_transforms_and_nothing_else():
    from clipret.data.transforms import AugmentConfig, train_transform
    from clipret.embedding.tta import tta_transform

    for mode in ("shortest", "longest", "squash"):
        plan = DevicePlan.of(_transform(resize_mode=mode))
        assert plan is not None and not plan.flip and plan.mean == tuple(PREPROCESS["mean"])
    assert DevicePlan.of(tta_transform(PREPROCESS, "flip")).flip
    assert DevicePlan.of(tta_transform(PREPROCESS, "flip,scales")) is None
    assert DevicePlan.of(train_transform(PREPROCESS, AugmentConfig())) is None
    assert DevicePlan.of(lambda img: img) is None


# --- the device preprocessing against the PIL transform -------------------------------------------------


@pytest.mark.parametrize("changes", [
    {}, {"resize_mode": "longest"}, {"resize_mode": "squash"}, {"size": [32, 48]},
    {"interpolation": "bilinear"}, {"resize_mode": "longest", "fill_color": 128},
])
def test_device_preprocessing_matches_the_pil_transform(changes):
    transform = _transform(**changes)
    plan = DevicePlan.of(transform)
    for w, h, seed in ((75, 50, 1), (50, 90, 2), (32, 32, 3), (20, 14, 4)):  # wide, tall, exact, upscaled
        img = _photo(w, h, seed)
        want = transform(img)
        got = plan([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)])[0]
        assert got.shape == want.shape
        diff = (got - want).abs() * torch.tensor(PREPROCESS["std"]).view(3, 1, 1) * 255  # in 8-bit levels
        # torch resamples in one float pass, PIL rounds to uint8 between its two: a fraction of a level on
        # average, a few levels at hard edges when upscaling (bicubic overshoot clamped at different points)
        p99 = float(torch.quantile(diff.flatten(), 0.99))
        assert diff.mean() < 0.5 and p99 <= 3.0 and diff.max() <= 10.0, (changes, (w, h), float(diff.mean()), p99)


def test_device_plan_groups_sizes_and_keeps_order():
    plan = DevicePlan.of(_transform())
    images = [_photo(60 + 10 * (i % 2), 40, i) for i in range(5)]
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    batch = plan(tensors)
    for i, t in enumerate(tensors):
        assert torch.equal(batch[i], plan([t])[0])  # the same, resized alone or with its size group
    flip = DevicePlan(plan.geometry, plan.mean, plan.std, flip=True)(tensors)
    assert flip.shape == (5, 2, 3, 32, 32) and torch.equal(flip[:, 1], torch.flip(batch, dims=[-1]))


# --- which files take the device path; the bad-image corpus; the fallback -------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_plain_jpeg_accepts_only_files_nvjpeg_and_pil_decode_alike(tmp_path):
    from clipret.data import decode

    expected = write_bad_images(tmp_path)
    photo = _photo(40, 30, 1)
    assert plain_jpeg(_jpeg(photo)) and plain_jpeg(_jpeg(photo.convert("L"))) and plain_jpeg(_jpeg(photo, progressive=True))
    accepted = {name for name in expected if (tmp_path / name).is_file() and os.access(tmp_path / name, os.R_OK)
                and plain_jpeg((tmp_path / name).read_bytes())}
    # the corpus's only plain JPEG is the chmod-000 one (readable here only as root): CMYK, EXIF-rotated,
    # truncated, empty, text and PNG-named-.jpg files all go to PIL
    assert accepted <= {"unreadable.jpg"}
    assert not plain_jpeg(_jpeg(photo) + b"trailing")  # no EOI at the end: PIL decides
    saved = decode.MAX_PIXELS
    try:
        decode.set_max_pixels(40 * 30 - 1)
        assert not plain_jpeg(_jpeg(photo))  # over the pixel limit: PIL refuses it with its reason
    finally:
        decode.set_max_pixels(saved)


def _encoder(config):
    from clipret.model.build import open_encoder

    torch.manual_seed(0)
    return open_encoder(str(config), "none")


@pytest.mark.slow
def test_bad_image_corpus_behaves_the_same_through_the_device_path(tmp_path):
    from clipret.embedding.batches import embed_images

    write_bad_images(tmp_path)
    write_normal_images(tmp_path, n=4)
    for i in range(3):
        _photo(90, 60, 10 + i).save(tmp_path / f"photo_{i}.jpg", quality=90)
    ids = sorted(p.name for p in tmp_path.iterdir())
    encoder, spec, _ = _encoder(TINY_RN)
    from clipret.data.transforms import eval_transform

    transform = eval_transform(spec.preprocess)
    pil = embed_images(encoder, tmp_path, ids, transform, batch_size=5, decode_side=64, gpu_decode=False)
    dev = embed_images(encoder, tmp_path, ids, transform, batch_size=5, decode_side=64, gpu_decode=True)
    assert dev[1] == pil[1] and dev[2] == pil[2]  # the same images kept, the same skips and reasons
    assert len(pil[2]) >= 5
    assert np.einsum("nd,nd->n", dev[0], pil[0]).min() >= 0.999


def test_a_file_the_device_refuses_falls_back_to_pil(tmp_path, monkeypatch):
    from clipret.data.transforms import eval_transform
    from clipret.embedding.batches import embed_images

    for i in range(5):
        _photo(70, 50, i).save(tmp_path / f"p{i}.jpg", quality=90)
    ids = sorted(p.name for p in tmp_path.iterdir())
    refused = len((tmp_path / "p2.jpg").read_bytes())
    real, calls = gpu_decode._decode, []

    def fussy(jpegs, device):  # refuses any batch holding p2.jpg, and p2.jpg alone
        calls.append(len(jpegs))
        if any(len(j) == refused for j in jpegs):
            raise RuntimeError("nvJPEG says no")
        return real(jpegs, device)

    monkeypatch.setattr(gpu_decode, "_decode", fussy)
    encoder, spec, _ = _encoder(TINY_VIT)
    transform = eval_transform(spec.preprocess)
    dev = embed_images(encoder, tmp_path, ids, transform, batch_size=5, decode_side=64, gpu_decode=True)
    pil = embed_images(encoder, tmp_path, ids, transform, batch_size=5, decode_side=64, gpu_decode=False)
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then file by file
    assert dev[1] == ids and dev[2] == []
    np.testing.assert_array_equal(dev[0][2], pil[0][2])  # p2.jpg went through the PIL path: identical row
    assert np.einsum("nd,nd->n", dev[0], pil[0]).min() >= 0.999


def test_device_path_embeddings_agree_with_pil_on_photos(tmp_path):
    from clipret.data.decode import decode_side_for
    from clipret.embedding.batches import embed_images
    from clipret.embedding.tta import tta_transform

    for i in range(6):
        _photo(320 + 40 * (i % 3), 240, i).save(tmp_path / f"p{i}.jpg", quality=90)
    ids = sorted(p.name for p in tmp_path.iterdir())
    encoder, spec, _ = _encoder(TINY_VIT)
    side = decode_side_for(spec.preprocess["size"])
    for tta in (None, "flip"):
        transform = tta_transform(spec.preprocess, tta)
        pil = embed_images(encoder, tmp_path, ids, transform, batch_size=4, decode_side=side, gpu_decode=False)
        dev = embed_images(encoder, tmp_path, ids, transform, batch_size=4, decode_side=side, gpu_decode=True)
        assert dev[1] == pil[1] == ids
        assert np.einsum("nd,nd->n", dev[0], pil[0]).min() >= 0.999


def test_embed_decode_flag_forces_either_path_and_the_resume_record_says_which(tmp_path, monkeypatch):
    """``clipret embed --decode gpu|pil``: the device path runs only when asked (here on the CPU device), gives
    the PIL path's ids and skips with a cosine >= 0.999, and an interrupted run's parts record the path taken."""
    from conftest import invoke_cli

    monkeypatch.delenv(gpu_decode.ENV, raising=False)
    images = tmp_path / "images"
    images.mkdir()
    write_bad_images(images)
    for i in range(5):
        _photo(160 + 20 * i, 120, 30 + i).save(images / f"photo_{i}.jpg", quality=90)
    finished: list[int] = []
    real_finish = DevicePlan.finish
    monkeypatch.setattr(DevicePlan, "finish", lambda self, batch, *a, **kw: finished.append(1) or real_finish(self, batch, *a, **kw))
    common = ["embed", images, "--model", TINY_VIT, "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    invoke_cli(*common, "--out", tmp_path / "pil.npy", "--decode", "pil")
    assert finished == []
    invoke_cli(*common, "--out", tmp_path / "auto.npy")  # auto on the CPU device: PIL
    assert finished == []
    invoke_cli(*common, "--out", tmp_path / "gpu.npy", "--decode", "gpu")
    assert finished  # the device path ran

    import clipret

    pil, gpu = clipret.Embeddings.load(tmp_path / "pil.npy"), clipret.Embeddings.load(tmp_path / "gpu.npy")
    assert gpu.ids == pil.ids and [s["id"] for s in gpu.skipped] == [s["id"] for s in pil.skipped] and pil.skipped
    assert np.einsum("nd,nd->n", gpu.vectors, pil.vectors).min() >= 0.999
    np.testing.assert_array_equal(clipret.Embeddings.load(tmp_path / "auto.npy").vectors, pil.vectors)

    # parts left by an interrupted --decode gpu run (its run.json as embed writes it) refuse --resume --decode pil
    from clipret.embedding.parts import parts_dir, prepare_parts

    out = tmp_path / "again.npy"
    settings = {"shard_size": 4, "batch_size": 4, "tta": None, "exact_decode": False, "amp": "none", "device": "cpu"}
    parts, _ = prepare_parts(out, sorted(gpu.ids + [s["id"] for s in gpu.skipped]), gpu.fingerprint,
                             {**settings, "decode": "gpu"}, {}, resume=False)
    (parts / "shard-000000.json").write_text("{}")
    r = invoke_cli(*common, "--out", out, "--decode", "pil", "--shard-size", "4", "--resume", code=2)
    assert "made with --decode gpu (now --decode pil)" in r.output
    assert "another model" not in r.output and "other images" not in r.output  # nothing else differs
    assert parts_dir(out).is_dir()  # nothing thrown away


def test_embed_decode_flag_refuses_an_unknown_value(tmp_path):
    from conftest import invoke_cli

    r = invoke_cli("embed", tmp_path, "--model", TINY_VIT, "--decode", "nvjpeg", code=2)
    assert "--decode takes auto, gpu, pil" in r.output and len(r.output.strip().splitlines()) == 1


# --- where search runs -----------------------------------------------------------------------------


def test_search_device_choice(monkeypatch):
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cpu")
    assert search_device(10**15) == "cpu"
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "bogus")
    with pytest.raises(ClipretError, match="CLIPRET_SEARCH_DEVICE"):
        search_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cuda")
    with pytest.raises(ClipretError, match="no CUDA GPU"):
        search_device()
    monkeypatch.delenv(search_mod.SEARCH_DEVICE_ENV)
    assert search_device(10**15) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU (faked; nothing touches it)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert search_device(10**15) == "cuda:0"
    assert search_device(search_mod.AUTO_MIN_WORK - 1) == "cpu"  # small jobs stay on the CPU
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cuda")
    assert search_device(1) == "cuda:0"  # forced: whatever the size


def test_a_chosen_search_device_beats_the_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cuda")
    with search_mod.searching_on("cpu"):
        assert search_device(10**15) == "cpu"
    with pytest.raises(ClipretError, match="CLIPRET_SEARCH_DEVICE=cuda but torch sees no CUDA GPU"):
        search_device()  # the choice ends with the block
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cpu")
    with search_mod.searching_on(" CUDA:0"), pytest.raises(ClipretError, match="--search-device cuda:0 but torch sees no CUDA GPU"):
        search_device()
    with search_mod.searching_on(None):
        assert search_device(10**15) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU (faked; nothing touches it)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with search_mod.searching_on("cuda:1"), pytest.raises(ClipretError, match="--search-device cuda:1 but torch sees 1 CUDA GPU"):
        search_device()
    from clipret.runtime import resolve_device

    with pytest.raises(ClipretError, match="--device cuda:2 was asked for but torch sees 1 CUDA GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ClipretError, match="not understood"), search_mod.searching_on(bad):
            pass


def test_search_device_flag_and_argument(tmp_path, monkeypatch):
    import clipret
    from clipret import artifacts
    from conftest import invoke_cli

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "x.npy"
    artifacts.save_embeddings(path, x, [f"c{i % 4}/{i}.png" for i in range(40)], fingerprint="fp")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cuda")  # no GPU here: on its own, this fails
    r = invoke_cli("evaluate", "--query", path, "--gallery", path, "--json", code=2)
    assert "CLIPRET_SEARCH_DEVICE=cuda but torch sees no CUDA GPU" in r.output
    got = json.loads(invoke_cli("evaluate", "--query", path, "--gallery", path, "--json", "--search-device", "cpu").stdout)
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cpu")
    assert got == json.loads(invoke_cli("evaluate", "--query", path, "--gallery", path, "--json").stdout)
    monkeypatch.setenv(search_mod.SEARCH_DEVICE_ENV, "cuda")
    invoke_cli("query", path, "--gallery", path, "--k", 3, "--out", tmp_path / "r.json", "--search-device", "cpu")
    assert clipret.Results.load(tmp_path / "r.json").ids == clipret.retrieve(path, path, k=3, search_device="cpu").ids
    for args, said in ((("--search-device", "cuda"), "--search-device cuda but torch sees no CUDA GPU"),
                       (("--search-device", "gpu"), "--search-device 'gpu' is not understood")):
        for command in (["evaluate", "--query", path], ["query", path, "--out", tmp_path / "s.json"]):
            r = invoke_cli(*command, "--gallery", path, *args, code=2)
            assert said in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="an NVIDIA driver is here")
def test_without_a_driver_search_never_imports_torch():
    code = ("import sys; from clipret.retrieval.pipeline import default_searcher; import numpy as np; "
            "s = default_searcher(np.ones((70000, 256), np.float32)); print(type(s).__name__, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != search_mod.SEARCH_DEVICE_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.split()[1] == "False" and out.stdout.split()[0] != "TorchSearcher"


def test_default_searcher_and_score_blocks_follow_the_choice(monkeypatch):
    from clipret.retrieval import pipeline

    g = np.eye(4, dtype=np.float32)
    monkeypatch.setattr(pipeline, "search_device", lambda work: "cuda:0")
    searcher = pipeline.default_searcher(g)
    assert isinstance(searcher, TorchSearcher) and searcher.device == "cuda:0" and searcher.exact  # lazy: no GPU touched
    monkeypatch.setattr(pipeline, "search_device", lambda work: "cpu")
    assert not isinstance(pipeline.default_searcher(g), TorchSearcher)
    seen = []
    monkeypatch.setattr(scores_mod, "search_device", lambda work, min_work: "cuda:0")
    monkeypatch.setattr(scores_mod, "device_matmul_scores",
                        lambda q, gal, rows, device, to_host: seen.append((device, to_host)) or "fn")
    assert scores_mod.matmul_scores(g, g, 2) == "fn" and seen == [("cuda:0", True)]
    assert scores_mod.matmul_scores(g, g, 2, to_host=False) == "fn" and seen[-1] == ("cuda:0", False)
    monkeypatch.setattr(scores_mod, "search_device", lambda work, min_work: "cpu")
    assert scores_mod.matmul_scores(g, g, 2)(0, 2).tolist() == g[:2].tolist()  # numpy


# --- the torch path, run on the CPU device, against numpy and a slow loop ----------------------------------


def _tied(n: int, d: int, seed: int) -> np.ndarray:
    """Rows of halves in {-0.5, 0, 0.5}: dot products are exact in float32, so ties are real ties."""
    return (np.random.default_rng(seed).integers(-1, 2, (n, d)) / 2).astype(np.float32)


def _slow_topk(q: np.ndarray, g: np.ndarray, k: int) -> list[list[int]]:
    scores = q.astype(np.float64) @ g.T.astype(np.float64)
    return [sorted(range(len(g)), key=lambda j: (-row[j], j))[: min(k, len(g))] for row in scores]


@pytest.mark.parametrize("gallery_chunk,block_bytes", [(None, 2**28), (64, 2**28), (37, 4 * 37 * 3)])
def test_torch_search_equals_numpy_and_the_slow_loop_with_ties(gallery_chunk, block_bytes):
    g, q = _tied(300, 6, 0), _tied(40, 6, 1)
    g[150] = g[3]  # exact duplicates across gallery chunks
    for k in (1, 5, 17, 300, 400):
        want_s, want_i = ExactSearcher(g, query_chunk=7, gallery_chunk=50).search(q, k)
        got_s, got_i = TorchSearcher(g, device="cpu", gallery_chunk=gallery_chunk, block_bytes=block_bytes).search(q, k)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)
        assert got_i.tolist() == _slow_topk(q, g, k)


def test_topk_tensor_repairs_ties_that_straddle_k():
    scores = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]], dtype=torch.float32)
    vals, idx = topk_tensor(scores, 6, offset=10)
    assert idx.tolist() == [[10, 17, 18, 19, 11, 12], [10, 11, 12, 13, 14, 15]]
    assert vals.tolist() == [[1, 1, 1, 1, 0, 0], [3] * 6]


def test_qe_and_dba_through_the_torch_searcher_equal_numpy():
    from clipret.retrieval.expansion import dba, expand_queries

    rng = np.random.default_rng(3)
    g = rng.standard_normal((200, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:30] + 0.1 * rng.standard_normal((30, 16)).astype(np.float32)
    torch_searcher = TorchSearcher(g, device="cpu", gallery_chunk=64)
    for alpha in (None, 3.0):
        want = expand_queries(q, g, 5, alpha=alpha, searcher=ExactSearcher(g))
        got = expand_queries(q, g, 5, alpha=alpha, searcher=torch_searcher)
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(dba(g, 4, searcher=torch_searcher, chunk=70), dba(g, 4, searcher=ExactSearcher(g)), atol=1e-6)


def test_device_score_blocks_equal_the_numpy_blocks_and_give_the_same_metrics():
    from clipret.evaluation import evaluate_scores, score_chunks

    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((23, 8)).astype(np.float32), rng.standard_normal((90, 8)).astype(np.float32)
    g[40] = g[7]  # a tie
    numpy_fn = scores_mod.matmul_scores(q, g, 10, device="cpu")
    for chunk in (None, 32):
        torch_fn = scores_mod.device_matmul_scores(q, g, 10, "cpu", gallery_chunk=chunk)
        for q0, q1 in ((0, 10), (10, 20), (20, 23)):
            np.testing.assert_allclose(torch_fn(q0, q1), numpy_fn(q0, q1), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="holds 10"):
            torch_fn(0, 11)
    q_codes, g_codes = rng.integers(0, 3, 23), rng.integers(0, 3, 90)
    want = evaluate_scores(score_chunks(scores_mod.matmul_scores(q, g, 10, device="cpu"), q_codes, 10), g_codes, [1, 5])
    got = evaluate_scores(score_chunks(scores_mod.device_matmul_scores(q, g, 10, "cpu"), q_codes, 10), g_codes, [1, 5])
    assert got == pytest.approx(want)


# --- the benches ------------------------------------------------------------------------------------


def test_steady_rate_skips_the_warm_up():
    from embed_steady import parse_sets, steady_rate

    marks = [(0.0, 0), (5.0, 10), (6.0, 20), (7.0, 30), (10.0, 60)]  # a slow start, then 10 img/s
    assert steady_rate(marks, 0.1) == pytest.approx((60 - 10) / (10.0 - 5.0))
    assert steady_rate(marks, 0.0) == pytest.approx(60 / 10.0)
    assert parse_sets("640x480, 2000X1500") == [(640, 480), (2000, 1500)]


def test_mfu_helpers_count_matmul_flops_and_know_the_cards():
    from mfu import PEAK_TFLOPS, card_of, count_flops, peak_tflops

    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * 4 * 16 * 8)  # forward + the weight gradient
    assert card_of("NVIDIA H100 80GB HBM3") == "H100 SXM" and card_of("NVIDIA H100 PCIe") == "H100 PCIe"
    assert card_of("NVIDIA H200") == "H200 SXM" and card_of("NVIDIA H200 NVL") == "H200 NVL"
    assert card_of("NVIDIA A100-SXM4-80GB") == "A100" and card_of("Tesla T4") is None and card_of(None) is None
    assert peak_tflops("NVIDIA H200", {"bf16", "ckpt"}) == PEAK_TFLOPS["H200 SXM"]["bf16"]
    assert peak_tflops("NVIDIA H200", {"fp32"}) == PEAK_TFLOPS["H200 SXM"]["fp32"]
    assert peak_tflops("Tesla T4", {"bf16"}) is None and peak_tflops("Tesla T4", {"bf16"}, 65.0) == 65.0
    for card, peaks in PEAK_TFLOPS.items():  # dense tensor-core peaks: bf16 is twice tf32 on these cards
        assert peaks["bf16"] == pytest.approx(2 * peaks["tf32"], rel=0.01), card


def _bench(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.slow
def test_steady_embed_bench_runs_small(tmp_path):
    out = tmp_path / "steady.json"
    r = _bench(["bench/embed.py", "--steady", "--model-preset", "tiny", "--device", "cpu", "--n", "12", "--distinct", "3",
                "--sets", "80x60,96x72", "--batch-size", "4", "--workers", "0", "--paths", "pil,gpu", "--whole", "auto,gpu",
                "--forward-variants", "plain,channels_last", "--check", "6", "--cache", str(tmp_path / "cache"),
                "--json", str(out)])
    assert "whole clipret embed" in r.stdout and "forward only" in r.stdout
    res = json.loads(out.read_text())
    assert set(res["forward"]) == {"plain", "channels_last"} and all(v["img_s"] > 0 for v in res["forward"].values())
    assert [s["set"] for s in res["sets"]] == ["80x60", "96x72"]
    for s in res["sets"]:
        assert set(s["decode"]) == {"pil", "gpu"} and all(v > 0 for v in s["decode"].values())
        assert {k: v["rows"] for k, v in s["whole"].items()} == {"auto": 12, "gpu": 12}
        assert s["cosine"]["rows"] == 6 and s["cosine"]["min"] >= 0.999
    folder = next((tmp_path / "cache").glob("steady-n12-d3-80x60-*"))
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 12 and len({f.stat().st_ino for f in files}) == 3  # 3 photos, linked 4 times each


@pytest.mark.slow
def test_train_bench_prints_flops_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    r = _bench(["bench/train.py", "--model-preset", "tiny", "--device", "cpu", "--p", "2", "--k", "2", "--steps", "1",
                "--warmup-steps", "0", "--image-size", "32", "--n-images", "40", "--n-classes", "4", "--variants", "fp32",
                "--in-process", "--peak-tflops", "0.5", "--json", str(out)])
    assert "MFU" in r.stdout and "GFLOP/step" in r.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["flops"] > 0 and row["tflops_s"] == pytest.approx(row["flops"] / row["step_s"] / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_s"] / 0.5)


@pytest.mark.slow
def test_evaluate_bench_compares_with_a_torch_floor(tmp_path):
    out = tmp_path / "eval.json"
    r = _bench(["bench/evaluate.py", "--queries", "30", "--gallery", "500", "--dim", "16", "--old-subset", "0",
                "--torch-floor", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert "ratio (b)/(t)" in r.stdout
    res = json.loads(out.read_text())
    assert set(res["ratios"]) == {"a", "t"} and res["ratios"]["t"] == pytest.approx(res["clipret_s"] / res["torch_floor_s"])
    split = res["device_split"]  # the rank counting's share, measured apart from the matmuls
    assert "(s) inside clipret on cpu" in r.stdout and 0 < split["scores_s"] and 0 < split["scores_and_ranks_s"]
    assert 0 < split["scores_and_ranks_spread_s"] and "HOT_BIN_SPREAD 4096" in r.stdout
    assert 0 <= res["metrics"]["map"] <= 1
