"""Which input mapping should GeM use on ViT patch tokens?

open_clip's ViT tokens come out of a LayerNorm: about half of each token's
values are negative, and the classic ``clamp(min=eps)`` discards them and
their gradients. This script trains the same tiny random-init ViT with each
pooling variant on the same data and seed, and prints query->gallery R@1 and
MAP@R side by side, as ratios to the seed's clamp baseline, plus the learned p.

    python bench/gem_remedies.py --data synthetic
    python bench/gem_remedies.py --data fashion-mnist     # needs the Debian package dataset-fashion-mnist

Results are recorded in docs/gem.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from clipret import metrics
from clipret.config import TrainConfig
from clipret.data.layout import list_images, read_labels_csv
from clipret.data.transforms import eval_transform
from clipret.embedding.batches import embed_images
from clipret.model.build import load_model
from clipret.retrieval.ranking import full_ranking
from clipret.training.loop import train

SIZES = {"synthetic": 64, "fashion-mnist": 32}  # textures need 64 px; Fashion-MNIST is 28 px
VARIANTS = [
    ("gem", "clamp"),  # the seed: clamp(min=eps) on LayerNorm'd tokens
    ("gem", "softplus"),
    ("gem", "shift"),
    ("mean", "softplus"),
    ("cls", "softplus"),
]


def make_data(kind: str, root: Path, seed: int) -> None:
    if kind == "synthetic":
        from clipret.data.synthetic import make_synthetic_dataset

        make_synthetic_dataset(root, n_classes=8, train_per_class=60, query_per_class=10, gallery_per_class=20,
                               image_size=SIZES[kind], seed=seed)
    else:
        from fashion_mnist import export_fashion_mnist, find_fashion_mnist

        src = find_fashion_mnist()
        if src is None:
            raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
        export_fashion_mnist(src, root, train_per_class=60, query_per_class=20, gallery_per_class=50, seed=seed,
                             size=SIZES[kind])


def score(run: Path, root: Path) -> dict[str, float]:
    net, spec, _ = load_model(run)
    tf = eval_transform(spec.preprocess)
    labels = read_labels_csv(root / "test" / "labels.csv")
    emb = {}
    for split in ("query", "gallery"):
        ids = list_images(root / "test" / split)
        vecs, kept, _ = embed_images(net, root / "test" / split, ids, tf, workers=0)
        emb[split] = (vecs, np.array([labels[i] for i in kept]))
    (q, ql), (g, gl) = emb["query"], emb["gallery"]
    m = metrics.evaluate_full(ql, gl, full_ranking(q, g), [1])
    p = float(net.pool.p.detach()) if spec.pool == "gem" else float("nan")
    # How much of the patch-token signal is positive after training (what clamp keeps)?
    import torch
    from PIL import Image

    ids = list_images(root / "test" / "gallery")[:64]
    with torch.no_grad():
        batch = torch.stack([tf(Image.open(root / "test" / "gallery" / i).convert("RGB")) for i in ids])
        _, tokens = net.tower(batch)
    return {"recall@1": m["recall@1"], "map@r": m["map@r"], "p": p, "positive": float((tokens > 0).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "fashion-mnist"], default="synthetic")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    config = Path(__file__).resolve().parents[1] / "clipret" / "configs" / "tiny-vit.json"
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"data{seed}"
            make_data(args.data, root, seed)
            for pool, gem_input in VARIANTS:
                name = f"{pool}" + (f"/{gem_input}" if pool == "gem" else "")
                run = Path(tmp) / "run"
                shutil.rmtree(run, ignore_errors=True)
                cfg = TrainConfig(root=str(root), out=str(run), model=str(config), pretrained="none",
                                  image_size=SIZES[args.data], pool=pool, gem_input=gem_input, epochs=args.epochs,
                                  p=8, k=4, lr=1e-3, head_lr_mult=1.0, llrd=1.0, mine_from_epoch=3,
                                  aug_crop=False, aug_color_jitter=0.0, aug_erasing=0.0, aug_grayscale=0.0,
                                  val_split=0.0, workers=0, device="cpu", seed=seed)
                t0 = time.perf_counter()
                train(cfg)
                r = score(run, root)
                r["seconds"] = time.perf_counter() - t0
                rows.setdefault(name, []).append(r)
                print(f"seed {seed} {name:14s} R@1 {r['recall@1']:.3f}  MAP@R {r['map@r']:.3f}  p {r['p']:.2f}  "
                      f"positive tokens {r['positive']:.2f}", flush=True)
    base = rows["gem/clamp"]
    b_r1 = np.mean([r["recall@1"] for r in base])
    b_map = np.mean([r["map@r"] for r in base])
    print(f"\n{args.data}, tiny ViT (random init), {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'pooling':14s} {'R@1':>7s} {'MAP@R':>7s} {'R@1 / clamp':>12s} {'MAP@R / clamp':>14s} {'final p':>8s} {'tokens > 0':>11s}")
    for name, rs in rows.items():
        r1, mp = np.mean([r["recall@1"] for r in rs]), np.mean([r["map@r"] for r in rs])
        p, pos = np.mean([r["p"] for r in rs]), np.mean([r["positive"] for r in rs])
        print(f"{name:14s} {r1:7.3f} {mp:7.3f} {r1 / b_r1:12.2f} {mp / b_map:14.2f} {p:8.2f} {pos:11.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
