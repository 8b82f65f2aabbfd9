"""A local weights file takes the settings (quick_gelu, preprocessing) of the tag it holds.

open_clip's pretrained table is faked: a tiny config registered as ``Tiny-Fake`` with two
tags whose settings differ, and a local safetensors file made from a random tiny tower.
"""

import json
import re

import open_clip
import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipret.errors import ClipretError
from clipret.model import backbone
from clipret.model.build import build_encoder, create_encoder, load_model, make_spec, open_encoder, save_model
from conftest import TINY_VIT

NAME = "Tiny-Fake"
TAGS = {
    "squashed": {"hf_hub": "fake/squashed/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                 "interpolation": "bilinear", "resize_mode": "squash"},
    "quick": {"hf_hub": "fake/quick/", "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD,
              "interpolation": "bicubic", "resize_mode": "shortest", "quick_gelu": True},
}


def _fake_table(monkeypatch, tags):
    """Register Tiny-Fake (the tiny ViT config) with ``tags`` in open_clip's public lookups; no downloads."""
    cfg = json.loads(TINY_VIT.read_text())
    real_config, real_tags, real_cfg = open_clip.get_model_config, open_clip.list_pretrained_tags_by_model, open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_model_config", lambda m: dict(cfg) if m == NAME else real_config(m))
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda m: list(tags) if m == NAME else real_tags(m))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda m, t: dict(tags.get(t, {})) if m == NAME else real_cfg(m, t))

    def no_download(*a, **k):
        raise AssertionError("a local weights file must never be downloaded")

    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    return cfg


@pytest.fixture
def weights(tmp_path):
    """A full-CLIP-style state dict (``visual.*``) of a random tiny ViT, as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    donor = backbone.build_visual(json.loads(TINY_VIT.read_text()), False)
    path = tmp_path / "weights.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    return donor, path


def _has_quick_gelu(module: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in module.modules())


@pytest.mark.parametrize("tag", list(TAGS))
def test_tag_equals_path_builds_the_tags_network_and_preprocessing(monkeypatch, weights, tag):
    _fake_table(monkeypatch, TAGS)
    donor, path = weights
    spec = make_spec(NAME, f"{tag}={path}", pool="clip")
    expected = TAGS[tag]
    assert spec.quick_gelu is expected.get("quick_gelu", False)
    assert spec.preprocess["mean"] == list(expected["mean"]) and spec.preprocess["std"] == list(expected["std"])
    assert spec.preprocess["resize_mode"] == expected["resize_mode"]
    assert spec.preprocess["interpolation"] == expected["interpolation"]
    enc = create_encoder(spec)
    assert _has_quick_gelu(enc) is expected.get("quick_gelu", False)
    torch.testing.assert_close(enc.visual.conv1.weight, donor.conv1.weight)  # the file's weights, loaded


def test_run_config_records_the_tags_settings_and_rebuilds_with_them(monkeypatch, weights, tmp_path):
    _fake_table(monkeypatch, TAGS)
    spec = make_spec(NAME, f"quick={weights[1]}", embed_dim=32)
    save_model(tmp_path / "run", create_encoder(spec), spec)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["quick_gelu"] is True and saved["pretrained"] == f"quick={weights[1]}"
    assert saved["preprocess"]["mean"] == list(OPENAI_DATASET_MEAN)
    encoder, _, _ = load_model(tmp_path / "run")
    assert _has_quick_gelu(encoder)


def test_bare_file_is_refused_when_tags_disagree(monkeypatch, weights):
    _fake_table(monkeypatch, TAGS)
    with pytest.raises(ClipretError) as exc:
        make_spec(NAME, str(weights[1]))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{NAME}'s tags disagree on quick_gelu/mean/std/interpolation/resize_mode; ")
    assert f"--pretrained TAG={weights[1]} (tags: squashed, quick)" in msg


def test_bare_file_takes_the_settings_its_tags_agree_on(monkeypatch, weights):
    same = {"a": TAGS["quick"], "b": {**TAGS["quick"], "hf_hub": "fake/b/"}}
    _fake_table(monkeypatch, same)
    spec = make_spec(NAME, str(weights[1]), pool="clip")
    assert spec.quick_gelu is True and _has_quick_gelu(build_encoder(spec))


def test_bare_file_for_a_config_without_tags_keeps_the_defaults(weights):
    spec = make_spec(str(TINY_VIT), str(weights[1]), pool="clip")
    assert spec.quick_gelu is False and spec.preprocess["mean"] == list(OPENAI_DATASET_MEAN)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (NAME, "'nope' is not a tag of Tiny-Fake; use one of: squashed, quick"),
        (str(TINY_VIT), "tiny-vit has no open_clip tags; pass the file alone"),
    ],
)
def test_unknown_tag_in_tag_equals_path_is_refused_with_the_choices(monkeypatch, weights, model, match):
    _fake_table(monkeypatch, TAGS)
    with pytest.raises(ClipretError, match=re.escape(match)) as exc:
        make_spec(model, f"nope={weights[1]}")
    assert "\n" not in str(exc.value)


def test_tag_equals_missing_file_is_refused_before_any_weights_are_read(monkeypatch, tmp_path):
    _fake_table(monkeypatch, TAGS)
    with pytest.raises(ClipretError, match=re.escape(f"weights file not found: {tmp_path / 'gone.safetensors'}")):
        make_spec(NAME, f"quick={tmp_path / 'gone.safetensors'}")


def test_split_tagged_keeps_plain_values_and_files_with_equals_signs(tmp_path):
    odd = tmp_path / "a=b.safetensors"
    odd.write_bytes(b"")
    assert backbone.split_tagged("openai") == (None, "openai")
    assert backbone.split_tagged("openai=/w/x.safetensors") == ("openai", "/w/x.safetensors")
    assert backbone.split_tagged(str(odd)) == (None, str(odd))  # an existing file is a file
    assert backbone.split_tagged("runs/x=1/model.safetensors") == (None, "runs/x=1/model.safetensors")


def test_zero_shot_fingerprint_follows_the_file_and_the_tag(monkeypatch, weights):
    _fake_table(monkeypatch, TAGS)
    _, _, quick = open_encoder(NAME, f"quick={weights[1]}")
    _, _, squashed = open_encoder(NAME, f"squashed={weights[1]}")
    assert quick != squashed  # other settings, other embeddings
    assert open_encoder(NAME, f"quick={weights[1]}")[2] == quick


def test_real_table_vit_l_14_file_takes_its_tags_settings(weights):
    # The case: ViT-L-14 from a local file of the openai or the laion2b weights (open_clip's
    # real table; only the spec is resolved, so the tiny file is never loaded into ViT-L-14).
    path = weights[1]
    openai = make_spec("ViT-L-14", f"openai={path}", pool="clip")
    laion = make_spec("ViT-L-14", f"laion2b_s32b_b82k={path}", pool="clip")
    assert openai.quick_gelu is True and openai.preprocess["mean"] == list(OPENAI_DATASET_MEAN)
    assert laion.quick_gelu is False and laion.preprocess["mean"] == laion.preprocess["std"] == [0.5, 0.5, 0.5]
    with pytest.raises(ClipretError, match=r"ViT-L-14's tags disagree on quick_gelu/mean/std; .*\(tags: openai, "):
        make_spec("ViT-L-14", str(path))
