"""Training pieces: validation metric, split, augmentation, per-sample seeding, the miner switch, logged LRs, settings."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from clipret.config import TrainConfig
from clipret.data.dataset import ImageFolderDataset, collate
from clipret.data.sampler import PKBatchSampler
from clipret.data.transforms import AugmentConfig, train_transform
from clipret.training.split import stratified_split
from clipret.training.validate import leave_one_out
from conftest import TINY_RN
from reference import ref_warmup_cosine

# ---------------------------------------------------------------------------
# leave_one_out: the metric that picks the exported epoch
# ---------------------------------------------------------------------------


def _ref_leave_one_out(vectors, labels):
    """Each vector queries all the others (ties: lower index first); R@1 and MAP@R by definition."""
    n = len(vectors)
    r1, mapr = [], []
    for q in range(n):
        r = sum(1 for j in range(n) if j != q and labels[j] == labels[q])
        if r == 0:
            continue  # nothing to retrieve
        others = sorted((j for j in range(n) if j != q), key=lambda j: (-float(np.dot(vectors[q], vectors[j])), j))
        hits = [labels[j] == labels[q] for j in others]
        r1.append(1.0 if hits[0] else 0.0)
        total, found = 0.0, 0
        for i in range(r):
            if hits[i]:
                found += 1
                total += found / (i + 1)
        mapr.append(total / r)
    return {"val_recall@1": sum(r1) / len(r1), "val_map@r": sum(mapr) / len(mapr)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 30
    # few distinct directions, so many exact ties (the tie rule matters), and a class with a single image
    base = rng.normal(size=(6, 8))
    vectors = base[rng.integers(0, 6, size=n)].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [str(x) for x in rng.integers(0, 4, size=n - 1)] + ["lonely"]
    got = leave_one_out(vectors, labels)
    want = _ref_leave_one_out(vectors, labels)
    assert got["val_recall@1"] == pytest.approx(want["val_recall@1"], abs=1e-12)
    assert got["val_map@r"] == pytest.approx(want["val_map@r"], abs=1e-12)


# ---------------------------------------------------------------------------
# stratified_split
# ---------------------------------------------------------------------------


def test_stratified_split_holds_out_round_n_times_fraction_per_class():
    sizes = {"a": 20, "b": 7, "c": 3, "d": 1, "e": 12}
    labels = [c for c, n in sizes.items() for _ in range(n)]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert list(train) == sorted(train) and list(val) == sorted(val)
    assert sorted(set(train) | set(val)) == list(range(len(labels))) and not set(train) & set(val)
    for c, n in sizes.items():
        want = round(n * 0.2)  # 4, 1 -> 0 (a lone validation image has nothing to retrieve), 1 -> 0, 0, 2
        want = want if 2 <= want <= n - 1 else 0
        assert sum(labels[i] == c for i in val) == want, c
        assert sum(labels[i] == c for i in train) == n - want >= 1, c


def test_stratified_split_is_seeded_and_keeps_a_training_image():
    labels = ["a"] * 30 + ["b"] * 30 + ["c"] * 2
    t0, v0 = stratified_split(labels, 0.5, seed=0)
    t1, v1 = stratified_split(labels, 0.5, seed=0)
    assert list(v0) == list(v1) and list(t0) == list(t1)
    assert list(stratified_split(labels, 0.5, seed=1)[1]) != list(v0)
    assert sum(labels[i] == "c" for i in t0) >= 1  # 2 images at 0.5 -> 1 val image -> none held out
    train, val = stratified_split(labels, 0.0, seed=0)
    assert len(val) == 0 and list(train) == list(range(len(labels)))
    _, val = stratified_split(["a"] * 4 + ["b"] * 4, 0.9, seed=0)
    assert len(val) == 6  # capped at n - 1 per class


# ---------------------------------------------------------------------------
# train_transform: what each switch does
# ---------------------------------------------------------------------------

PRE = {"size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
OFF = dict(crop=False, flip=False, color_jitter=0.0, grayscale=0.0, erasing=0.0)


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))


def _apply(aug, seed, img=None):
    torch.manual_seed(seed)
    return train_transform(PRE, aug)(img or _image())


def _unnormalise(x):
    return x * torch.tensor(PRE["std"])[:, None, None] + torch.tensor(PRE["mean"])[:, None, None]


def test_all_switches_off_is_deterministic_resize_and_normalise():
    img = _image()
    out = [_apply(AugmentConfig(**OFF), s, img) for s in range(3)]
    assert out[0].shape == (3, 16, 16)
    assert all(torch.equal(out[0], o) for o in out)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # already 16x16: resize is a no-op
    torch.testing.assert_close(_unnormalise(out[0]), pixels, atol=1e-5, rtol=0)


def test_flip_gives_the_image_or_its_mirror():
    base = _apply(AugmentConfig(**OFF), 0)
    outs = [_apply(AugmentConfig(**{**OFF, "flip": True}), s) for s in range(20)]
    assert all(torch.equal(o, base) or torch.equal(o, base.flip(-1)) for o in outs)
    assert any(torch.equal(o, base) for o in outs) and any(torch.equal(o, base.flip(-1)) for o in outs)


def test_crop_changes_the_geometry_and_keeps_the_size():
    base = _apply(AugmentConfig(**OFF), 0)
    outs = [_apply(AugmentConfig(**{**OFF, "crop": True}), s) for s in range(5)]
    assert all(o.shape == base.shape for o in outs)
    assert sum(not torch.allclose(o, base) for o in outs) >= 4


def test_grayscale_one_makes_equal_channels():
    out = _unnormalise(_apply(AugmentConfig(**{**OFF, "grayscale": 1.0}), 0))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=0)


def test_color_jitter_changes_values_not_geometry():
    base = _apply(AugmentConfig(**OFF), 0)
    out = _apply(AugmentConfig(**{**OFF, "color_jitter": 0.4}), 1)
    assert out.shape == base.shape and not torch.allclose(out, base)
    # brightness/contrast/saturation/hue keep the spatial layout: pixel rankings of the grey level stay close
    grey_b, grey_o = _unnormalise(base).mean(0).flatten(), _unnormalise(out).mean(0).flatten()
    assert np.corrcoef(grey_b.numpy(), grey_o.numpy())[0, 1] > 0.8


def test_erasing_one_replaces_a_rectangle_only():
    base = _apply(AugmentConfig(**OFF), 0)
    out = _apply(AugmentConfig(**{**OFF, "erasing": 1.0}), 0)
    changed = (out != base).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert len(rows) > 0
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.float().mean() > 0.9  # the changed pixels fill their bounding box


# ---------------------------------------------------------------------------
# per-sample augmentation seeds: results independent of workers
# ---------------------------------------------------------------------------


def _train_images(tiny_dataset):
    folder = tiny_dataset / "training"
    ids = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    return folder, ids, [i.split("/")[0] for i in ids]


def test_augmentation_is_seeded_per_sample_and_leaves_the_global_rng_alone(tiny_dataset):
    folder, ids, _ = _train_images(tiny_dataset)
    ds = ImageFolderDataset(folder, ids, train_transform(PRE, AugmentConfig()), seed=3)
    before = torch.get_rng_state()
    a, again, second_draw = ds[(5, 0)]["image"], ds[(5, 0)]["image"], ds[(5, 1)]["image"]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, again) and not torch.equal(a, second_draw)
    ds.set_epoch(1)
    assert not torch.equal(ds[(5, 0)]["image"], a)
    assert torch.equal(ImageFolderDataset(folder, ids, train_transform(PRE, AugmentConfig()), seed=3)[5]["image"], a)


def test_two_workers_load_the_same_batches_as_none(tiny_dataset):
    from torch.utils.data import DataLoader

    folder, ids, classes = _train_images(tiny_dataset)
    labels = np.unique(classes, return_inverse=True)[1]

    def load(workers):
        ds = ImageFolderDataset(folder, ids, train_transform(PRE, AugmentConfig()), seed=0)
        sampler = PKBatchSampler(labels, 3, 2, seed=0, with_draws=True)
        sampler.set_epoch(2)
        ds.set_epoch(2)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(workers))
        return [b["images"] for b in loader]

    zero, two = load(0), load(2)
    assert len(zero) == len(two) > 0
    assert all(torch.equal(a, b) for a, b in zip(zero, two))


# ---------------------------------------------------------------------------
# a short run: the miner switch, logged LRs, the exported epoch, automatic workers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spied_run(tiny_dataset, tmp_path_factory):
    """Two epochs, miner from epoch 2; every miner call and every event in one log."""
    from clipret.training import losses
    from clipret.training.loop import train

    log: list[tuple[str, dict]] = []

    class SpyMiner:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, emb, labels):
            log.append(("miner", {}))
            return self.inner(emb, labels)

    original_init = losses.Objective.__init__

    def spied_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.miner = SpyMiner(self.miner)

    out = tmp_path_factory.mktemp("spied") / "run"
    cfg = TrainConfig(root=str(tiny_dataset), out=str(out), model=str(TINY_RN), pretrained="none", image_size=32,
                      epochs=2, p=3, k=2, device="cpu", val_split=0.25, mine_from_epoch=2, warmup=0.3, seed=1)
    assert cfg.workers is None  # automatic
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(losses.Objective, "__init__", spied_init)
        summary = train(cfg, on_event=lambda kind, payload: log.append((kind, payload)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, out, log, rows, summary


def test_miner_is_called_from_mine_from_epoch_on(spied_run):
    _, _, log, rows, _ = spied_run
    assert [r["mining"] for r in rows] == [False, True]
    epoch_of_step = []
    pending_miner_calls = 0
    for kind, payload in log:
        if kind == "miner":
            pending_miner_calls += 1
        elif kind == "step":
            epoch_of_step.append((payload["epoch"], pending_miner_calls, "mined_pairs" in payload))
            pending_miner_calls = 0
    assert pending_miner_calls == 0
    assert {e for e, _, _ in epoch_of_step} == {1, 2}
    for epoch, calls, reported in epoch_of_step:
        assert calls == (1 if epoch >= 2 else 0) and reported == (epoch >= 2)


def test_logged_lr_is_the_base_lr_with_the_head_lr_beside_it(spied_run):
    cfg, _, log, rows, _ = spied_run
    setup = next(p for k, p in log if k == "setup")
    total = setup["total_steps"]
    warm = round(cfg.warmup * total)
    steps = [p for k, p in log if k == "step"]
    assert [s["step"] for s in steps] == list(range(1, total + 1))
    for s in steps:  # the LR each step used
        assert s["lr"] == pytest.approx(cfg.lr * ref_warmup_cosine(s["step"] - 1, total, warm))
        assert s["head_lr"] == pytest.approx(cfg.head_lr_mult * s["lr"])
    for row in rows:  # an epoch logs its last step's
        assert row["lr"] == pytest.approx(cfg.lr * ref_warmup_cosine(row["step"] - 1, total, warm))
        assert row["head_lr"] == pytest.approx(cfg.head_lr_mult * row["lr"])


def test_automatic_workers_are_zero_for_a_tiny_set(spied_run):
    _, _, log, _, _ = spied_run
    assert next(p for k, p in log if k == "setup")["workers"] == 0


def test_exported_model_is_the_best_epoch(spied_run, tiny_dataset):
    from clipret.data.layout import training_set
    from clipret.data.transforms import eval_transform
    from clipret.embedding.batches import embed_images
    from clipret.model.build import load_model

    cfg, out, _, rows, summary = spied_run
    scores = [r["val_map@r"] for r in rows]
    best = scores.index(max(scores))  # the first epoch with the highest validation MAP@R
    assert summary["best_epoch"] == best + 1
    running = [-math.inf] + [max(scores[: i + 1]) for i in range(len(scores))]
    assert [r["best"] for r in rows] == [s > running[i] for i, s in enumerate(scores)]
    # the model on disk scores exactly what the best epoch logged
    ids, classes, folder, _ = training_set(tiny_dataset)
    _, val = stratified_split(classes, cfg.val_split, cfg.seed)
    model, spec, _ = load_model(out)
    vecs, _, _ = embed_images(model, folder, [ids[i] for i in val], eval_transform(spec.preprocess), batch_size=6)
    metrics = leave_one_out(vecs, [classes[i] for i in val])
    assert metrics["val_map@r"] == pytest.approx(rows[best]["val_map@r"], abs=1e-9)
    assert metrics["val_recall@1"] == pytest.approx(rows[best]["val_recall@1"], abs=1e-9)


# ---------------------------------------------------------------------------
# settings: every TrainConfig field reachable from the CLI (and so from TOML)
# ---------------------------------------------------------------------------


def _train_params():
    import typer

    from clipret.cli import app

    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def test_every_train_setting_is_a_flag_with_the_same_default():
    params = _train_params()
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        assert f.name in params, f"TrainConfig.{f.name} cannot be set from the CLI or TOML"
        if f.name == "root":
            continue  # the positional ROOT
        cli_default = params[f.name].default
        if isinstance(cli_default, enum.Enum):
            cli_default = cli_default.value
        if f.name == "out":
            cli_default = str(cli_default)
        assert cli_default == getattr(defaults, f.name), f.name


@pytest.mark.parametrize("field,value,message", [
    ("pool", "foo", "--pool"), ("gem_input", "relu", "--gem-input"), ("amp", "fp8", "--amp"),
    ("device", "tpu", "--device"), ("workers", -1, "--workers"), ("grad_clip", 0.0, "--grad-clip"),
    ("seed", -1, "--seed"), ("circle_gamma", 0.0, "--circle-gamma"),
])
def test_validate_rejects_bad_settings(field, value, message):
    from clipret.errors import ClipretError

    with pytest.raises(ClipretError, match=message):
        TrainConfig(**{field: value}).validate()
    TrainConfig(device="cuda:1", amp="bf16", pool="mean", gem_input="shift").validate()


def test_pretrained_help_of_train_names_run_folders_and_random_init_of_a_config_json():
    text = " ".join(_train_params()["pretrained"].help.split())
    assert "run folder written by clipret train or its model.safetensors" in text
    assert "A --model config JSON without a usual tag starts from random weights unless weights are given" in text


@pytest.mark.parametrize("field,message", [("p", "--classes-per-batch (--p)"), ("k", "--images-per-class (--k)")])
def test_p_and_k_errors_name_the_long_flags(field, message):
    from clipret.errors import ClipretError

    with pytest.raises(ClipretError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: 1}).validate()
