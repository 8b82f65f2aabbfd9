"""The token tower against open_clip's own forward, and the open_clip shim."""

import json
from importlib.metadata import version

import open_clip
import pytest
import torch
import torch.nn.functional as F
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from clipret.model import _open_clip, backbone
from clipret.model.build import build_encoder, create_encoder, make_spec
from clipret.model.net import RetrievalNet
from conftest import TINY_RN, TINY_VIT
from reference import ref_gem


def test_open_clip_is_a_version_the_shim_was_checked_against():
    # clipret/model/_open_clip.py relies on how open_clip builds and shapes its towers.
    # If this fails after an upgrade, re-run tests/test_tower.py against the new open_clip
    # and widen CHECKED_VERSIONS only if everything else here passes.
    installed = version("open_clip_torch")
    assert Version(installed) in SpecifierSet(_open_clip.CHECKED_VERSIONS), (
        f"open_clip {installed} is outside the checked range {_open_clip.CHECKED_VERSIONS}"
    )


def _reference_clip(cfg_path, output_tokens: bool) -> torch.nn.Module:
    """open_clip's full CLIP model, built from the config as open_clip reads it."""
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_cfg"]["output_tokens"] = output_tokens
    return open_clip.CLIP(**cfg).eval()


def test_vit_tokens_match_open_clip_output_tokens():
    torch.manual_seed(0)
    net = build_encoder(make_spec(str(TINY_VIT), "none")).eval()
    ref = _reference_clip(TINY_VIT, output_tokens=True)
    missing, unexpected = ref.visual.load_state_dict(net.tower.visual.state_dict(), strict=False)
    assert missing == ["proj"] and unexpected == []  # everything but CLIP's projection is shared
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cls, tokens = net.tower(x)
        ref_pooled, ref_tokens = ref.visual(x)
    assert tokens.shape == (2, 64, 96)  # 8x8 patches, the CLS token excluded
    torch.testing.assert_close(tokens, ref_tokens)
    # open_clip's pooled output is the CLS token projected; ours is the same token, unprojected.
    torch.testing.assert_close(cls @ ref.visual.proj, ref_pooled)


def test_rn_tokens_are_the_map_open_clip_attention_pools():
    torch.manual_seed(0)
    net = build_encoder(make_spec(str(TINY_RN), "none")).eval()
    ref = _reference_clip(TINY_RN, output_tokens=False)
    missing, unexpected = ref.visual.load_state_dict(net.tower.visual.state_dict(), strict=False)
    assert missing and all(k.startswith("attnpool.") for k in missing) and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cls, tokens = net.tower(x)
        b, n, c = tokens.shape
        side = int(n**0.5)
        fmap = tokens.transpose(1, 2).reshape(b, c, side, side)  # back to (B, C, h, w), row-major
        assert cls is None and (side, c) == (2, 16 * 32)  # 64 px / 32; width 16 * 32 channels
        torch.testing.assert_close(ref.visual.attnpool(fmap), ref.visual(x))


@pytest.mark.parametrize("pool", ["gem", "mean", "cls"])
def test_vit_pooling_reads_patch_tokens_only_except_cls(pool):
    torch.manual_seed(0)
    net = build_encoder(make_spec(str(TINY_VIT), "none", pool=pool)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cls, tokens = net.tower(x)
        pooled = net.pooled(x)
        net.tower.register_forward_hook(lambda mod, inp, out: (out[0] + 5.0, out[1]))  # change the CLS token alone
        changed = net.pooled(x)
    if pool == "cls":
        torch.testing.assert_close(pooled, cls)
        assert not torch.allclose(changed, pooled)
        return
    torch.testing.assert_close(changed, pooled)
    if pool == "mean":
        slow = [[sum(tok[ch] for tok in img) / len(img) for ch in range(96)] for img in tokens.tolist()]
    else:
        slow = ref_gem(tokens.tolist(), float(net.pool.p), eps=net.pool.eps)
    torch.testing.assert_close(pooled, torch.tensor(slow), rtol=1e-4, atol=1e-5)
    # The CLS token would change the result if it were pooled (the check above can fail).
    with_cls = torch.cat([cls[:, None], tokens], dim=1)
    assert not torch.allclose(net.pool(with_cls), pooled)


def _save_donor(tmp_path, cfg_path):
    """A full-CLIP-style state dict (``visual.*``) of a random tower, saved as safetensors."""
    from safetensors.torch import save_file

    cfg = json.loads(cfg_path.read_text())
    torch.manual_seed(7)
    donor = backbone.build_visual(cfg, False)
    state = {f"visual.{k}": v.contiguous() for k, v in donor.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    return donor, tmp_path / "w.safetensors"


@pytest.mark.parametrize("new_size", [32, 96])
def test_pos_embed_is_resized_when_image_size_differs_from_weights(tmp_path, new_size):
    donor, weights = _save_donor(tmp_path, TINY_VIT)  # 64 px: 8x8 grid of 8 px patches
    old = donor.positional_embedding.detach()
    # Make the grid easy to reason about: channel 0 depends on the row only, channel 1 on the
    # column only, channel 2 is constant.
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    old[1:, 0], old[1:, 1], old[1:, 2] = rows.flatten(), cols.flatten(), 0.25
    from safetensors.torch import save_file

    save_file({f"visual.{k}": v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    net = create_encoder(make_spec(str(TINY_VIT), str(weights), image_size=new_size)).eval()
    g = new_size // 8
    new = net.tower.visual.positional_embedding.detach()
    assert new.shape == (g * g + 1, 96)
    torch.testing.assert_close(new[0], old[0])  # the CLS position is kept as is
    grid = new[1:].reshape(g, g, 96)
    # An obvious reference: resample each channel's 8x8 image to g x g.
    expected = F.interpolate(old[1:].reshape(1, 8, 8, 96).permute(0, 3, 1, 2), size=(g, g), mode="bicubic",
                             antialias=True, align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(grid, expected)
    # Independent of the interpolation kernel: row-major order kept, constants stay constant.
    torch.testing.assert_close(grid[:, :, 0], grid[:, :1, 0].expand(g, g))
    torch.testing.assert_close(grid[:, :, 1], grid[:1, :, 1].expand(g, g))
    assert grid[-1, 0, 0] > grid[0, 0, 0] and grid[0, -1, 1] > grid[0, 0, 1]
    torch.testing.assert_close(grid[:, :, 2], torch.full((g, g), 0.25))
    # Everything else is loaded unchanged, and the net runs at the new size.
    torch.testing.assert_close(net.tower.visual.conv1.weight, donor.conv1.weight)
    with torch.no_grad():
        y = net(torch.randn(2, 3, new_size, new_size))
    assert y.shape == (2, 512) and torch.isfinite(y).all()


def test_rn_weights_load_at_another_image_size_without_clip_attention_pool(tmp_path):
    donor, weights = _save_donor(tmp_path, TINY_RN)  # 64 px; attnpool's pos-embed is 2x2+1
    net = create_encoder(make_spec(str(TINY_RN), str(weights), image_size=96))
    assert isinstance(net, RetrievalNet)
    torch.testing.assert_close(net.tower.visual.layer4[0].conv1.weight, donor.layer4[0].conv1.weight)
    # CLIP's own embedding needs the attention pool, whose pos-embed cannot be resized: one line.
    from clipret.errors import ClipretError

    with pytest.raises(ClipretError, match="do not fit") as exc:
        create_encoder(make_spec(str(TINY_RN), str(weights), image_size=96, pool="clip"))
    assert "\n" not in str(exc.value)


def test_config_kind_agrees_with_the_built_tower():
    for cfg_path, kind in ((TINY_VIT, "vit"), (TINY_RN, "cnn")):
        cfg = json.loads(cfg_path.read_text())
        assert _open_clip.tower_kind_of_config(cfg) == kind
        assert build_encoder(make_spec(str(cfg_path), "none", pool="mean")).tower.kind == kind


def test_building_never_opens_a_socket(monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("building a model must not touch the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for cfg in (TINY_VIT, TINY_RN):
        build_encoder(make_spec(str(cfg), "none"))


def _clipa_like_config(tmp_path):
    """The tiny ViT shaped like open_clip's CLIPA configs: no ln_pre, mean pooling, ln_post after the pool."""
    cfg = json.loads(TINY_VIT.read_text())
    cfg["vision_cfg"].update(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
    path = tmp_path / "tiny-clipa.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("pool", ["gem", "mean"])
def test_clipa_like_tower_tokens_are_normalised_and_every_parameter_trains(tmp_path, pool):
    torch.manual_seed(0)
    net = build_encoder(make_spec(str(_clipa_like_config(tmp_path)), "none", pool=pool, embed_dim=32))
    visual = net.tower.visual
    assert visual.final_ln_after_pool  # open_clip's own forward leaves the tokens before ln_post
    with torch.no_grad():  # a non-trivial ln_post, so that normalised and raw tokens differ clearly
        visual.ln_post.weight.uniform_(0.5, 2.0)
        visual.ln_post.bias.uniform_(-0.5, 0.5)
    seen = {}
    visual.transformer.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", out))
    x = torch.randn(4, 3, 64, 64)
    _, tokens = net.tower(x)
    torch.testing.assert_close(tokens, visual.ln_post(seen["x"][:, 1:]))  # the CLS token excluded
    net(x).pow(2).sum().backward()  # BatchNorm in train mode: every row feeds every other
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # DDP with find_unused_parameters=False needs every one
    assert visual.ln_post.weight.grad.abs().sum() > 0
