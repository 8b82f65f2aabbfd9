"""Fashion-MNIST protocols for benchmarks on real images: export, train, embed, evaluate, with a resumable cache.

Two protocols (``PROTOCOLS``):

- **closed**: train on the training split of all 10 classes; query and gallery
  are disjoint images of the same 10 classes from the test split;
- **open**: train on classes 0-5; query and gallery come from classes 6-9 only;
- **finetune**: train on classes 6-9 (the open set's held-out classes), query and gallery as in
  *open*: for fine-tuning a model trained on *open* (bench/recipe.py's fine-tuning proxy).

The query and gallery images of a class are the same in both protocols for the
same seed (see :func:`fashion_mnist.export_fashion_mnist`). A seed picks the
data subset and seeds training. Everything is cached on disk under a work
folder, keyed by a hash of its settings, so a script killed half way resumes:
:func:`prepare` exports once, :func:`train_run` trains once (or resumes an
interrupted run), :func:`embed` embeds once; :class:`ResultCache` keeps the
finished result rows of a benchmark in a JSON-lines file.

The model is a tiny random-init ViT (``configs/fmnist-vit.json``: width 128,
4 layers, patch 4, 32 px), trained with clipret's recipe plus the overrides
given (any :class:`clipret.config.TrainConfig` field).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from result_cache import ResultCache, settings_key

from clipret.errors import ClipretError

__all__ = ["CONFIG", "PROTOCOLS", "Prepared", "ResultCache", "Sizes", "embed", "evaluate", "export", "locate",
           "pixel_vectors", "prepare", "protocol_overrides", "raw_pixels", "run_key", "settings_key", "time_search",
           "train_config", "train_run"]

BENCH = Path(__file__).resolve().parent
CONFIG = BENCH / "configs" / "fmnist-vit.json"
PROTOCOLS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "closed": (tuple(range(10)), tuple(range(10))),
    "open": (tuple(range(6)), tuple(range(6, 10))),
    "finetune": (tuple(range(6, 10)), tuple(range(6, 10))),  # the open set's held-out classes, trained on
}
# TrainConfig fields that say where or how a run executes, not what it computes: not part of a run's key.
_NOT_KEYED = {"root", "out", "workers", "device", "amp", "save_every"}
_DONE = "bench-done.json"


@dataclass(frozen=True)
class Sizes:
    """Images per class: training (of each training class), query and gallery (of each test class); side in px."""

    train_per_class: int = 500
    query_per_class: int = 100
    gallery_per_class: int = 200
    size: int = 32


@dataclass(frozen=True)
class Prepared:
    """One protocol and seed, exported (``root``) and trained (``run``); ``train_seconds`` of the first training."""

    protocol: str
    seed: int
    root: Path
    run: Path
    train_seconds: float
    train: dict[str, Any] = field(default_factory=dict)  # the TrainConfig of the run, as a dict

    @property
    def labels(self) -> Path:
        return self.root / "test" / "labels.csv"

    def folder(self, split: str) -> Path:
        """``query`` or ``gallery`` images."""
        return self.root / "test" / split


def add_data_arguments(ap: Any, *, train_per_class: int) -> None:
    """The work-folder, subset-size and training options the benches over this protocol share
    (``ap``: an ``argparse.ArgumentParser``)."""
    ap.add_argument("--work", type=Path, help="data, runs and embeddings (default: beside --out)")
    ap.add_argument("--train-per-class", type=int, default=train_per_class)
    ap.add_argument("--query-per-class", type=int, default=100)
    ap.add_argument("--gallery-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--p", type=int, default=10)
    ap.add_argument("--k", type=int, default=8)


def _source() -> Path:
    from fashion_mnist import find_fashion_mnist

    src = find_fashion_mnist()
    if src is None:
        raise ClipretError("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or set CLIPRET_FASHION_MNIST")
    return src


def export(root: str | os.PathLike[str], protocol: str, sizes: Sizes, seed: int, src: Path | None = None) -> dict[str, Any]:
    """Export ``protocol`` at ``sizes`` and ``seed`` into ``root`` once; later calls return the recorded summary.

    A half-written export (no ``bench-done.json``) is removed and redone.
    """
    if protocol not in PROTOCOLS:
        raise ClipretError(f"unknown protocol {protocol!r}; use {', '.join(PROTOCOLS)}")
    from fashion_mnist import export_fashion_mnist

    root = Path(root)
    settings = {"protocol": protocol, "seed": seed, **asdict(sizes)}
    done = _read_done(root, settings)
    if done is not None:
        return done
    shutil.rmtree(root, ignore_errors=True)
    train_classes, test_classes = PROTOCOLS[protocol]
    summary = export_fashion_mnist(src or _source(), root, train_per_class=sizes.train_per_class,
                                   query_per_class=sizes.query_per_class, gallery_per_class=sizes.gallery_per_class,
                                   seed=seed, size=sizes.size, train_classes=train_classes, test_classes=test_classes)
    summary = {**summary, "train_classes": list(train_classes), "test_classes": list(test_classes)}
    _write_done(root, settings, summary)
    return summary


def train_config(root: str | os.PathLike[str], out: str | os.PathLike[str], seed: int, **overrides: Any) -> Any:
    """The TrainConfig of a benchmark run: the tiny ViT at 32 px from scratch, on the CPU, plus ``overrides``."""
    from clipret.config import TrainConfig

    base = {"root": str(root), "out": str(out), "model": str(CONFIG), "pretrained": "none", "image_size": 32,
            "device": "cpu", "seed": seed}
    cfg = TrainConfig.from_dict({**base, **overrides})
    unknown = set(overrides) - set(cfg.to_dict())
    if unknown:
        raise ClipretError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    cfg.validate()
    return cfg


def run_key(cfg: Any) -> dict[str, Any]:
    """What a run computes: its TrainConfig without paths and execution settings (and the model config's content)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_KEYED}
    model = Path(d["model"])
    if model.is_file():
        d["model"] = json.loads(model.read_text())
    return d


def train_run(root: str | os.PathLike[str], out: str | os.PathLike[str], seed: int, **overrides: Any) -> Path:
    """Train on ``root/training`` into ``out`` once; resume an interrupted run; return ``out``.

    ``out/bench-done.json`` records the settings and the wall time of training
    (``seconds``; of the last session only, when it was resumed).
    """
    from clipret.training.loop import CHECKPOINT_NAME, resume, train

    out = Path(out)
    cfg = train_config(root, out, seed, **overrides)
    settings = _plain(run_key(cfg))
    if _read_done(out, settings) is not None:
        return out
    t0 = time.perf_counter()
    resumed = (out / CHECKPOINT_NAME).is_file() and _read_json(out / "bench-started.json") == settings
    if resumed:
        summary = resume(out, overrides={"device": cfg.device})
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "bench-started.json").write_text(json.dumps(settings, sort_keys=True))
        summary = train(cfg, overwrite=True)
    _write_done(out, settings, {"seconds": time.perf_counter() - t0, "best_epoch": summary["best_epoch"],
                                "steps": summary["steps"], "resumed": resumed})
    return out


def protocol_overrides(protocol: str, train: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` with P (classes per batch) capped at the protocol's number of training classes."""
    from clipret.config import TrainConfig

    n_classes = len(PROTOCOLS[protocol][0])
    return {**train, "p": min(int(train.get("p", TrainConfig.p)), n_classes)}


def locate(work: str | os.PathLike[str], protocol: str, seed: int, sizes: Sizes, train: Mapping[str, Any],
           src: Path | None = None) -> Prepared:
    """Export (once) ``protocol``'s data for ``seed`` under ``work``, and say where its run with the
    ``train`` overrides lives, without training it (``train_seconds`` is NaN until it has trained)."""
    work = Path(work)
    data_key = settings_key({"protocol": protocol, "seed": seed, **asdict(sizes)})
    root = work / "data" / f"{protocol}-s{seed}-{data_key}"
    export(root, protocol, sizes, seed, src)
    cfg = train_config(root, "unused", seed, **protocol_overrides(protocol, train))
    run = work / "runs" / f"{protocol}-s{seed}-{settings_key({'data': data_key, 'train': run_key(cfg)})}"
    return Prepared(protocol, seed, root, run, _train_seconds(run), run_key(cfg))


def _train_seconds(run: Path) -> float:
    """Wall seconds of the run's first training; NaN while it has not trained."""
    done = _read_json(run / _DONE) or {}
    return float(done.get("result", {}).get("seconds", float("nan")))


def prepare(work: str | os.PathLike[str], protocol: str, seed: int, sizes: Sizes, train: Mapping[str, Any],
            src: Path | None = None) -> Prepared:
    """Export and train (each once) for ``protocol`` and ``seed`` under ``work``; ``train`` overrides TrainConfig."""
    where = locate(work, protocol, seed, sizes, train, src)
    train_run(where.root, where.run, seed, **protocol_overrides(protocol, train))
    return replace(where, train_seconds=_train_seconds(where.run))


def embed(run: str | os.PathLike[str], folder: str | os.PathLike[str], out_npy: str | os.PathLike[str],
          tta: str | None = None) -> float:
    """Embed ``folder`` with the run into ``out_npy`` once (optionally with TTA); return the embedding's wall seconds.

    The seconds (of the first, real embedding) are kept in ``OUT.bench.json``.
    """
    from clipret.embedding.folder import embed_folder

    out_npy = Path(out_npy)
    timing = out_npy.with_name(out_npy.stem + ".bench.json")
    settings = {"run": str(run), "folder": str(folder), "tta": tta}
    done = _read_json(timing)
    if out_npy.is_file() and out_npy.with_suffix(".json").is_file() and done and done.get("settings") == settings:
        return float(done["seconds"])
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    embed_folder(folder, str(run), out=out_npy, tta=tta, device="cpu", strict=True)
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return seconds


def pixel_vectors(folder: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """Raw-pixel embeddings of every image under ``folder``: (N, H*W) float32 unit rows, and their ids.

    Each image is read as grayscale, flattened, scaled to [0, 1] and L2-normalised.
    """
    from PIL import Image

    from clipret.data.layout import list_images

    ids = list_images(folder)
    rows = []
    for i in ids:
        with Image.open(Path(folder) / i) as im:
            rows.append(np.asarray(im.convert("L"), dtype=np.float32).ravel() / 255.0)
    x = np.stack(rows)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32), ids


def raw_pixels(root: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the raw-pixel baseline of ``root/test/{query,gallery}`` to ``out_dir/{query,gallery}.npy``."""
    from clipret.artifacts import save_embeddings

    paths = []
    for split in ("query", "gallery"):
        path = Path(out_dir) / f"{split}.npy"
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            x, ids = pixel_vectors(Path(root) / "test" / split)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_embeddings(path, x, ids, fingerprint="raw-pixels", flags={"model": "raw pixels"})
        paths.append(path)
    return paths[0], paths[1]


def evaluate(q_npy: str | os.PathLike[str], g_npy: str | os.PathLike[str], labels: str | os.PathLike[str],
             stages: Any = None) -> dict[str, float]:
    """Full-ranking R@1, MAP@R and mAP of ``q_npy`` against ``g_npy`` after the post-processing ``stages``.

    The same code path as ``clipret evaluate --query --gallery`` (without
    caching the re-ranking graph): :func:`prepare_search`, then
    :func:`score_function`, then :func:`evaluate_embeddings`.
    """
    from clipret import artifacts
    from clipret.data.layout import read_labels_csv
    from clipret.evaluation import chunk_rows, evaluate_embeddings
    from clipret.retrieval.gallery import open_gallery
    from clipret.retrieval.prepare import prepare_search
    from clipret.retrieval.pipeline import Stages, score_function

    stages = stages or Stages()
    q, g = artifacts.load_embeddings(q_npy), open_gallery(g_npy)
    setup = prepare_search(g, stages, cache=False)
    score_fn = score_function(q.vectors, setup.vectors, stages, chunk_rows(len(g)), searcher=setup.searcher,
                              graph=setup.graph) if stages.any else None
    m = evaluate_embeddings(q, g, read_labels_csv(labels), [1], score_fn=score_fn)  # type: ignore[arg-type]
    return {"recall@1": float(m["recall@1"]), "map@r": float(m["map@r"]), "map": float(m["map"])}


def time_search(q_npy: str | os.PathLike[str], g_npy: str | os.PathLike[str], stages: Any = None, *, k: int = 10,
                min_seconds: float = 0.3, max_repeats: int = 200) -> float:
    """Best-of-n wall seconds of what ``clipret query`` does for the stages: DBA, the re-ranking graph, QE, search.

    One untimed warm-up call, then repeats until ``min_seconds`` have passed
    in all (at most ``max_repeats``): the minimum is the least disturbed by
    other processes, which matters for millisecond-scale plain searches.
    """
    from clipret import artifacts
    from clipret.retrieval.pipeline import Stages, apply_dba, retrieve

    stages = stages or Stages()
    q = np.ascontiguousarray(artifacts.load_embeddings(q_npy).vectors)
    g = np.ascontiguousarray(artifacts.load_embeddings(g_npy).vectors)
    retrieve(q, apply_dba(g, stages.dba), k, stages)  # warm-up: lazy imports, thread pools
    best, total, n = float("inf"), 0.0, 0
    while n < max_repeats and (n == 0 or total < min_seconds):
        t0 = time.perf_counter()
        retrieve(q, apply_dba(g, stages.dba), k, stages)
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(obj, default=str))


def _read_done(folder: Path, settings: Any) -> Any:
    done = _read_json(folder / _DONE)
    if isinstance(done, dict) and done.get("settings") == _plain(settings):
        return done.get("result")
    return None


def _write_done(folder: Path, settings: Any, result: Any) -> None:
    from clipret.artifacts import write_json

    write_json(folder / _DONE, {"settings": _plain(settings), "result": result})
