"""Recipe switches of issue 10: size-aware augmentation, the head's BatchNorm switch, --loss,
starting from a clipret run (--pretrained RUN) and the epoch-0 validation row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipret.config import TrainConfig
from clipret.data.transforms import AugmentConfig, resolve_augmentation
from clipret.data.validate import all_gray
from clipret.errors import ClipretError
from conftest import TINY_VIT

# ---------------------------------------------------------------------------
# augmentation defaults
# ---------------------------------------------------------------------------

STRONG = dict(crop=True, flip=True, color_jitter=0.2, grayscale=0.1, erasing=0.25, crop_scale=0.5)


@pytest.mark.parametrize("size, gray, want", [
    (224, False, STRONG),
    (128, False, STRONG),
    (224, True, {**STRONG, "color_jitter": 0.0, "grayscale": 0.0}),
    (127, False, {**STRONG, "crop": False, "erasing": 0.0}),
    (32, True, dict(crop=False, flip=True, color_jitter=0.0, grayscale=0.0, erasing=0.0, crop_scale=0.5)),
])
def test_automatic_augmentation_follows_size_and_gray_images(size, gray, want):
    assert resolve_augmentation(size, gray) == AugmentConfig(**want)


def test_given_augmentation_settings_win_over_the_automatic_ones():
    got = resolve_augmentation(32, True, crop=False, flip=False, color_jitter=0.3, grayscale=0.5, erasing=0.4,
                               crop_scale=0.6)
    assert got == AugmentConfig(crop=False, flip=False, color_jitter=0.3, grayscale=0.5, erasing=0.4, crop_scale=0.6)
    assert resolve_augmentation(224, False, erasing=0.0).erasing == 0.0  # an explicit 0 is not "auto"


def test_all_gray_tells_gray_from_colour_folders(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(tmp_path / f"g{i}.png")
        value = rng.integers(0, 255, (20, 20, 1), dtype=np.uint8)
        Image.fromarray(np.repeat(value, 3, axis=2), "RGB").save(tmp_path / f"rgb-gray{i}.png")
    ids = sorted(p.name for p in tmp_path.iterdir())
    assert all_gray(tmp_path, ids)
    colour = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(tmp_path / "zz-colour.png")
    assert not all_gray(tmp_path, [*ids, "zz-colour.png"], sample=100)
    assert not all_gray(tmp_path, [])


@pytest.mark.parametrize("field, value, message", [
    ("aug_crop_scale", 0.0, "--aug-crop-scale"), ("aug_erasing", 1.5, "--aug-erasing"),
    ("aug_grayscale", -0.1, "--aug-grayscale"), ("aug_color_jitter", -1.0, "--aug-color-jitter"),
    ("loss", "triplet", "--loss"),
])
def test_validate_rejects_bad_recipe_settings(field, value, message):
    with pytest.raises(ClipretError, match=message):
        TrainConfig(**{field: value}).validate()


# ---------------------------------------------------------------------------
# training with the new switches (tiny ViT, a few steps)
# ---------------------------------------------------------------------------


def _cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(root=str(root), out=str(out), model=str(TINY_VIT), pretrained="none", image_size=32, epochs=1, p=3, k=2,
                device="cpu", val_split=0.25, workers=0, seed=0, embed_dim=16)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_run(tiny_dataset, tmp_path_factory):
    from clipret.training.loop import train

    out = tmp_path_factory.mktemp("recipe") / "base"
    train(_cfg(tiny_dataset, out))
    return out


def test_no_head_bn_trains_saves_and_reloads(tiny_dataset, tmp_path):
    from clipret.model.build import load_model
    from clipret.training.loop import train

    train(_cfg(tiny_dataset, tmp_path / "run", head_bn=False))
    encoder, spec, _ = load_model(tmp_path / "run")
    assert spec.head_bn is False
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in encoder.head.modules())
    out = encoder(torch.zeros(2, 3, 32, 32))
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_run_saved_without_the_head_bn_key_still_has_its_batchnorm(base_run):
    from clipret.model.build import ModelSpec

    spec = json.loads((base_run / "config.json").read_text())["model"]
    spec.pop("head_bn")
    assert ModelSpec.from_dict(spec).head_bn is True  # folders written before the switch


@pytest.mark.parametrize("loss", ["multisimilarity", "arcface"])
def test_other_losses_train_and_arcface_proxies_are_optimised_and_checkpointed(tiny_dataset, tmp_path, loss, monkeypatch):
    from clipret.training import losses
    from clipret.training.loop import train
    from clipret.training.setup import prepare

    started: list[list[torch.Tensor]] = []  # each objective's parameters as built
    build = losses.Objective.__init__

    def record(self, *args, **kwargs):
        build(self, *args, **kwargs)
        started.append([p.detach().clone() for p in self.parameters()])

    monkeypatch.setattr(losses.Objective, "__init__", record)
    out = tmp_path / loss
    cfg = _cfg(tiny_dataset, out, loss=loss, epochs=2, mine_from_epoch=1)
    train(cfg)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    if loss == "arcface":
        (proxies,) = ckpt["objective"].values()
        assert proxies.shape == (16, 4)  # (embed_dim, classes)
        assert not torch.allclose(started[0][0], proxies)  # the optimiser moved them
        resumed = prepare(cfg, ckpt, lambda kind, payload: None)
        assert torch.equal(resumed.objective.parameters()[0].detach(), proxies)  # a resume starts from the saved ones
        assert not torch.equal(started[1][0], proxies)  # ...not from the fresh ones it built
        assert not any(r["mining"] for r in rows)  # a proxy loss takes no mined pairs
        groups = [g for g in ckpt["optimizer"]["param_groups"] if g.get("name") == "loss.no_decay"]
        assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    else:
        assert ckpt["objective"] == {} and all(r["mining"] for r in rows)


def test_arcface_proxies_change_in_training(tiny_dataset, tmp_path):
    from clipret.training.losses import Objective

    torch.manual_seed(0)
    obj = Objective(loss="arcface", num_classes=3, embed_dim=8)
    before = obj.parameters()[0].detach().clone()
    opt = torch.optim.SGD(obj.parameters(), lr=0.5)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    loss, info = obj(emb, torch.tensor([0, 0, 1, 1, 2, 2]), epoch=10)
    loss.backward()
    opt.step()
    assert info == {} and obj.scale == 1
    assert not torch.equal(before, obj.parameters()[0])


# ---------------------------------------------------------------------------
# --pretrained RUN
# ---------------------------------------------------------------------------


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from clipret import artifacts

    return artifacts.load_weights_file(run / "model.safetensors")


@pytest.mark.parametrize("source", ["folder", "weights file"])
def test_pretrained_run_starts_tower_and_head_from_it(base_run, tmp_path, source):
    from clipret.model.build import create_encoder, make_spec

    pretrained = str(base_run if source == "folder" else base_run / "model.safetensors")
    spec = make_spec(str(TINY_VIT), pretrained, embed_dim=16, image_size=32)
    notes: list[str] = []
    encoder = create_encoder(spec, notes)
    saved, mine = _weights(base_run), encoder.state_dict()
    assert notes == [] and set(saved) == set(mine)
    assert all(torch.equal(saved[k], mine[k]) for k in saved)
    assert spec.preprocess == json.loads((base_run / "config.json").read_text())["model"]["preprocess"]


def test_pretrained_run_with_another_head_keeps_the_tower_and_a_fresh_head(base_run):
    from clipret.model.build import build_encoder, create_encoder, make_spec

    spec = make_spec(str(TINY_VIT), str(base_run), embed_dim=24, image_size=32)
    notes: list[str] = []
    torch.manual_seed(5)
    encoder = create_encoder(spec, notes)
    torch.manual_seed(5)
    fresh = build_encoder(spec).state_dict()
    saved, mine = _weights(base_run), encoder.state_dict()
    assert any("head starts fresh" in n for n in notes) and not any("pool" in n for n in notes)
    assert all(torch.equal(saved[k], mine[k]) for k in mine if k.startswith(("tower.", "pool.")))
    assert all(torch.equal(fresh[k], mine[k]) for k in mine if k.startswith("head."))


def test_pretrained_run_of_another_backbone_is_refused_in_one_line(base_run):
    from clipret.model.build import make_spec
    from conftest import TINY_RN

    with pytest.raises(ClipretError, match=r"was trained from .*pass --model") as exc:
        make_spec(str(TINY_RN), str(base_run), image_size=32)
    assert "\n" not in str(exc.value)
    with pytest.raises(ClipretError, match="--image-size"):
        make_spec(str(TINY_VIT), str(base_run), image_size=48)


def test_fine_tune_logs_the_starting_weights_as_epoch_0(tiny_dataset, base_run, tmp_path):
    from clipret.data.decode import decode_side_for
    from clipret.data.transforms import eval_transform
    from clipret.embedding.batches import embed_images
    from clipret.model.build import load_model
    from clipret.training.loop import train
    from clipret.training.setup import load_data
    from clipret.training.validate import leave_one_out

    out = tmp_path / "tuned"
    events: list[str] = []
    cfg = _cfg(tiny_dataset, out, pretrained=str(base_run), seed=3)
    train(cfg, on_event=lambda kind, payload: events.append(kind))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["best"] is False and "baseline" in events
    # epoch 0 is the starting model's own leave-one-out score on this run's held-out images
    encoder, spec, _ = load_model(base_run)
    data = load_data(cfg, 0, lambda *a: None)
    val_ids = [data.ids[i] for i in data.val_idx]
    vecs, kept, _ = embed_images(encoder, data.folder, val_ids, eval_transform(spec.preprocess), batch_size=6,
                                 decode_side=decode_side_for(spec.preprocess["size"], False))
    by_id = dict(zip(data.ids, data.class_of))
    want = leave_one_out(vecs, [by_id[i] for i in kept])
    assert rows[0]["val_map@r"] == pytest.approx(want["val_map@r"], abs=1e-9)
    # a run from random init has no epoch-0 row
    assert json.loads((base_run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


# ---------------------------------------------------------------------------
# layer-wise LR decay: on for pretrained towers, off from random init
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("llrd, pretrained, want", [
    (None, "none", 1.0), (None, "random", 1.0), (None, "openai", 0.65), (None, "/runs/base", 0.65),
    (0.8, "none", 0.8), (0.8, "openai", 0.8),
])
def test_llrd_default_depends_on_whether_the_tower_is_pretrained(llrd, pretrained, want):
    assert TrainConfig(llrd=llrd).resolved_llrd(pretrained) == want


def test_runs_use_the_resolved_llrd_in_their_param_groups(tiny_dataset, base_run, tmp_path):
    from clipret.training.loop import train

    def scales(run: Path) -> dict[str, float]:
        groups = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
        return {g["name"]: g["lr_scale"] for g in groups}

    scratch = scales(base_run)  # pretrained="none"
    assert {s for n, s in scratch.items() if not n.startswith("head.")} == {1.0}
    train(_cfg(tiny_dataset, tmp_path / "tuned", pretrained=str(base_run)))
    tuned = scales(tmp_path / "tuned")
    blocks = 4  # tiny-vit.json: layers
    assert tuned["depth00.decay"] == pytest.approx(0.65 ** blocks) and tuned["head.decay"] == 10.0
