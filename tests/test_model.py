import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from clipret import artifacts
from clipret.errors import ClipretError
from clipret.model import backbone
from clipret.model.build import build_encoder, create_encoder, load_model, make_spec, open_encoder, save_model
from clipret.model.net import ClipImageEncoder, RetrievalNet
from conftest import TINY_RN, TINY_VIT


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN])
def test_encoder_shapes_and_norm(cfg):
    spec = make_spec(str(cfg), "none", embed_dim=128)
    net = build_encoder(spec).eval()
    assert isinstance(net, RetrievalNet)
    y = net(torch.randn(3, 3, 64, 64))
    assert y.shape == (3, 128)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    assert "proj" not in dict(net.named_parameters())  # CLIP's projection is dropped


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (TINY_VIT, {"pool": "foo"}, "unknown --pool 'foo'; choose one of gem, cls, mean"),
        (TINY_VIT, {"gem_input": "relu"}, "unknown --gem-input 'relu'; choose one of clamp, softplus, shift"),
        (TINY_RN, {"pool": "cls"}, "--pool cls needs a ViT backbone"),
        ("RN50", {"pool": "cls"}, "RN50 is a ResNet; use --pool gem or --pool mean"),
        ("ViT-H-14-CLIPA", {"pool": "cls"}, "without a CLS token"),
        ("ViT-B-16-SigLIP", {"pool": "gem"}, "timm image towers"),
        ("coca_ViT-B-32", {"pool": "gem"}, "attentional pooling"),
    ],
)
def test_make_spec_refuses_bad_pool_settings_before_any_download(monkeypatch, model, kwargs, match):
    def no_download(*a, **k):
        raise AssertionError("make_spec must not fetch weights")

    import open_clip

    monkeypatch.setattr(backbone, "fetch_weights", no_download)
    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    with pytest.raises(ClipretError, match=re.escape(match)) as exc:
        make_spec(str(model), None, **kwargs)  # None: the model's default tag, never downloaded here
    assert "\n" not in str(exc.value)


def test_pool_choices_are_exported_without_torch():
    code = "import sys; from clipret.config import POOLS, GEM_INPUTS; print(POOLS, GEM_INPUTS, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() [-1] == "False"
    from clipret.model.net import POOLS
    from clipret.model.pooling import GEM_INPUTS

    assert POOLS == ("gem", "cls", "mean") and GEM_INPUTS == ("clamp", "softplus", "shift")
    for pool in POOLS:  # every exported choice is accepted
        for how in GEM_INPUTS:
            assert make_spec(str(TINY_VIT), "none", pool=pool, gem_input=how).pool == pool


def test_preprocess_comes_from_open_clip_not_imagenet():
    spec = make_spec(str(TINY_VIT), "none")
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert spec.preprocess["mean"] == list(OPENAI_DATASET_MEAN)
    assert spec.preprocess["std"] == list(OPENAI_DATASET_STD)
    assert spec.preprocess["size"] == 64
    assert make_spec(str(TINY_VIT), "none", image_size=32).preprocess["size"] == 32


def test_default_tag_and_tag_preprocessing_for_real_models():
    spec = make_spec("ViT-L-14")  # resolving a spec reads no weights
    assert spec.pretrained == "openai" and spec.quick_gelu is True
    laion = make_spec("ViT-L-14", "laion2b_s32b_b82k")
    from open_clip.constants import INCEPTION_MEAN

    assert laion.preprocess["mean"] == list(INCEPTION_MEAN)
    assert laion.quick_gelu is False


@pytest.mark.parametrize(
    ("cfg", "pool", "head_bn"),
    [(TINY_VIT, "gem", True), (TINY_VIT, "cls", False), (TINY_VIT, "mean", True), (TINY_RN, "gem", False),
     (TINY_RN, "mean", True)],
    ids=["vit-gem-bn", "vit-cls", "vit-mean-bn", "rn-gem", "rn-mean-bn"],
)
def test_save_load_roundtrip_gives_identical_embeddings(tmp_path, cfg, pool, head_bn):
    spec = make_spec(str(cfg), "none", embed_dim=64, pool=pool, head_bn=head_bn)
    torch.manual_seed(1)
    net = build_encoder(spec).eval()
    with torch.no_grad():  # move every tensor off its initial value: a key load_model skips shows up
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) * 0.1 + 0.01)
    x = torch.randn(4, 3, 64, 64)
    fp = save_model(tmp_path / "m", net, spec)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    # Rebuilding never needs the original config file.
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["clip_config"] == json.loads(cfg.read_text()) and saved["fingerprint"] == fp
    net2, spec2, fp2 = load_model(tmp_path / "m")
    assert fp2 == fp and spec2 == spec
    assert type(net2.pool) is type(net.pool) and net2.pool_kind == pool
    state, state2 = net.state_dict(), net2.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))


def test_fingerprint_changes_with_weights(tmp_path):
    spec = make_spec(str(TINY_VIT), "none")
    net = build_encoder(spec)
    fp1 = save_model(tmp_path / "a", net, spec)
    with torch.no_grad():
        net.head.fc.weight.add_(1e-3)
    assert save_model(tmp_path / "b", net, spec) != fp1


def test_local_weights_file_loads_into_tower(tmp_path):
    spec = make_spec(str(TINY_VIT), "none")
    torch.manual_seed(5)
    donor = backbone.build_visual(spec.clip_config, False)
    state = {f"visual.{k}": v for k, v in donor.state_dict().items()}
    state["text.dummy"] = torch.zeros(1)  # text-tower keys of a full CLIP checkpoint are ignored
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        enc = create_encoder(make_spec(str(TINY_VIT), str(tmp_path / f), pool="clip"))
        assert isinstance(enc, ClipImageEncoder)
        torch.testing.assert_close(enc.visual.conv1.weight, donor.conv1.weight)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(ClipretError, match="refusing to load"):
        artifacts.load_weights_file(bad)
    assert not marker.exists()
    with pytest.raises(ClipretError, match="refusing to load"):
        create_encoder(make_spec(str(TINY_VIT), str(bad)))
    assert not marker.exists()


def test_corrupt_safetensors_and_missing_config(tmp_path):
    spec = make_spec(str(TINY_VIT), "none")
    save_model(tmp_path / "m", build_encoder(spec), spec)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ClipretError, match="safetensors"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ClipretError, match="config.json"):
        load_model(tmp_path / "m")


def test_offline_tag_fails_fast_with_instructions(monkeypatch):
    import socket

    def no_dns(*a, **k):
        raise socket.gaierror("offline")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(backbone, "_cached", lambda cfg: False)
    with pytest.raises(ClipretError) as exc:
        open_encoder("ViT-B-32", "openai")
    msg = str(exc.value)
    assert "\n" not in msg and "--pretrained none" in msg and "local weights file" in msg
    assert "--pretrained openai=PATH.safetensors" in msg  # the file keeps the tag's settings


def test_unknown_model_and_tag_are_user_errors():
    with pytest.raises(ClipretError, match="unknown open_clip model"):
        make_spec("ViT-Q-99")
    with pytest.raises(ClipretError, match="run folder written by `clipret train`"):
        open_encoder("runs/does-not-exist")
    with pytest.raises(ClipretError, match="neither a file nor a known tag"):
        make_spec("ViT-B-32", "no-such-tag")


def test_zero_shot_encoder_is_clip_embedding():
    enc, spec, fp = open_encoder(str(TINY_VIT), "none")
    assert spec.pool == "clip" and len(fp) == 16
    y = enc(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 64)  # the config's CLIP embed_dim, no head
    np.testing.assert_allclose(y.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
