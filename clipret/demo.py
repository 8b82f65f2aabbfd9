"""``clipret demo``: the whole pipeline, offline, on a drawn dataset, in about a minute.

It calls the same core functions as the commands (train, embed, query,
evaluate), so a green demo means the pipeline works on this machine.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from clipret import artifacts
from clipret.config import LONG_NAMES, TrainConfig

# A width-8 ModifiedResNet at 64 px: the stem divides the image by 4, so at 32 px
# the textures are gone after it and the layer4 map is 1x1; at 64 px (2x2 map)
# it learns far faster for about the same CPU time per step as tiny-rn at 32 px.
DEMO_MODEL = "demo-rn.json"
DEMO_IMAGE_SIZE = 64
DEMO_EPOCHS = 18  # ~610 steps; keep the CLI's --epochs default in step
# Many distinct training images (cheap to draw): with 24 per class the random-init
# model memorises the training images and R@1 on new images stays near chance.
DEMO_DATASET: dict[str, int] = {
    "n_classes": 8, "train_per_class": 150, "query_per_class": 12, "gallery_per_class": 12, "image_size": DEMO_IMAGE_SIZE,
}



def train_command_line(cfg: TrainConfig, *, overwrite: bool = False) -> str:
    """The ``clipret train`` command that trains what ``cfg`` says: its root, then every setting
    that differs from the default, each under its long flag name (quoted for a POSIX shell)."""
    default = TrainConfig()
    words = ["clipret", "train", cfg.root]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "root" or value == getattr(default, f.name) or value is None:
            continue
        flag = LONG_NAMES.get(f.name, f.name.replace("_", "-"))
        if isinstance(value, bool):
            words.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            words += [f"--{flag}", str(value)]
    if overwrite:
        words.append("--overwrite")
    return " ".join(shlex.quote(w) for w in words)


def demo_train_config(root: Path, out: Path, *, epochs: int, seed: int) -> TrainConfig:
    """Settings that train a random-init tiny CNN tower quickly on the CPU.

    No random resized crop: at this size every crop is resampled (blurred), so
    training images never look like the untouched eval images and R@1 drops
    to near chance. Colour jitter adds nothing (colours are random already) and
    costs time. The miner runs only over the last epochs.
    """
    return TrainConfig(
        root=str(root), out=str(out), model=DEMO_MODEL, pretrained="none",  # a bundled config: resolves by name anywhere
        image_size=DEMO_IMAGE_SIZE, epochs=epochs, p=8, k=4, lr=4e-3, head_lr_mult=1.0, llrd=1.0,
        mine_from_epoch=max(1, epochs - 2),
        aug_crop=False, aug_color_jitter=0.0, aug_erasing=0.0, aug_grayscale=0.0,
        val_split=0.1, workers=0, device="cpu", seed=seed,
    )


def run_demo(
    workdir: Path,
    *,
    epochs: int = DEMO_EPOCHS,
    seed: int = 0,
    on_stage: Callable[[str], None] = lambda s: None,
    on_train_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Generate data, train, embed, query and evaluate under ``workdir``; return the metrics."""
    from clipret.data.layout import read_labels_csv
    from clipret.data.synthetic import make_synthetic_dataset
    from clipret.evaluation import evaluate_results
    from clipret.embedding.folder import embed_folder
    from clipret.retrieval.search import ExactSearcher
    from clipret.training.loop import train

    workdir = workdir.resolve()  # the printed commands run from any folder
    root, run = workdir / "data", workdir / "run"
    if not (root / "training").is_dir():
        on_stage(f"drawing a synthetic dataset into {root}")
        make_synthetic_dataset(root, seed=seed, **DEMO_DATASET)
    cfg = demo_train_config(root, run, epochs=epochs, seed=seed)
    on_stage(train_command_line(cfg, overwrite=True))
    train(cfg, overwrite=True, on_event=on_train_event or (lambda k, p: None))
    embs = {}
    for split in ("gallery", "query"):
        out = workdir / f"{split}.npy"
        on_stage(_line("embed", root / "test" / split, "--model", run, "--out", out))
        e = embed_folder(root / "test" / split, str(run), workers=0, device="cpu")
        artifacts.save_embeddings(out, e.vectors, e.ids, fingerprint=e.fingerprint, flags=e.flags, skipped=e.skipped,
                                  root=e.root)
        embs[split] = e
    results = workdir / "results.json"
    on_stage(_line("query", workdir / "query.npy", "--gallery", workdir / "gallery.npy", "--k", 10, "--out", results))
    scores, idx = ExactSearcher(embs["gallery"].vectors).search(embs["query"].vectors, 10)
    artifacts.save_results(results, embs["query"].ids, [[embs["gallery"].ids[j] for j in row] for row in idx], scores)
    labels = root / "test" / "labels.csv"
    on_stage(_line("evaluate", results, "--labels", labels, "--k", 1, 5, 10))
    metrics = evaluate_results(artifacts.load_results(results), read_labels_csv(labels), embs["gallery"].ids, [1, 5, 10])
    n_classes = len({v for v in read_labels_csv(labels).values()})
    metrics["chance_recall@1"] = 1.0 / n_classes
    return metrics


def _line(*words: Any) -> str:
    """A ``clipret`` command line, each word quoted for a POSIX shell."""
    return " ".join(shlex.quote(str(w)) for w in ("clipret", *words))
