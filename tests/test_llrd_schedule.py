import math

import pytest
import torch

from clipret.model.build import build_encoder, make_spec
from clipret.training.llrd import current_lrs, layer_depth, param_groups
from clipret.training.schedule import make_scheduler, warmup_cosine, warmup_steps_for
from conftest import TINY_RN, TINY_VIT
from reference import ref_warmup_cosine


def _lr_of(groups, name):
    found = [g for g in groups for p in g["params"] if p is name]
    assert len(found) == 1
    return found[0]


def test_llrd_exact_lr_per_vit_block():
    net = build_encoder(make_spec(str(TINY_VIT), "none"))  # 4 blocks
    base, d, mult = 1e-3, 0.5, 10.0
    groups = param_groups(net, base, 0.05, llrd=d, head_lr_mult=mult)
    v = net.tower.visual
    expected = {
        # written out by hand for L = 4 blocks
        v.conv1.weight: base * d**4,
        v.positional_embedding: base * d**4,
        v.class_embedding: base * d**4,
        v.ln_pre.weight: base * d**4,
        v.transformer.resblocks[0].attn.in_proj_weight: base * d**3,
        v.transformer.resblocks[1].mlp.c_fc.weight: base * d**2,
        v.transformer.resblocks[2].ln_1.weight: base * d**1,
        v.transformer.resblocks[3].attn.out_proj.weight: base,
        v.ln_post.weight: base,
        net.head.fc.weight: base * mult,
        net.head.bn.weight: base * mult,
        net.pool.p: base * mult,
    }
    for param, lr in expected.items():
        assert math.isclose(_lr_of(groups, param)["lr"], lr, rel_tol=1e-12)
    # every trainable parameter is in exactly one group
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len([p for p in net.parameters() if p.requires_grad])


def test_no_weight_decay_on_biases_norms_and_gem_p():
    net = build_encoder(make_spec(str(TINY_VIT), "none"))  # 4 blocks
    groups = param_groups(net, 1e-3, 0.05)
    v = "tower.visual."
    block = [f"{v}transformer.resblocks.{i}." for i in range(4)]
    decayed = {f"{v}conv1.weight", f"{v}positional_embedding", "head.fc.weight"}
    decayed |= {b + w for b in block for w in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    not_decayed = {f"{v}class_embedding", f"{v}ln_pre.weight", f"{v}ln_pre.bias", f"{v}ln_post.weight", f"{v}ln_post.bias",
                   "pool.p", "head.bn.weight", "head.bn.bias"}
    not_decayed |= {b + w for b in block for w in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj_bias",
                                                    "attn.out_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")}
    names = dict(net.named_parameters())
    assert set(names) == decayed | not_decayed
    for name in decayed:
        assert _lr_of(groups, names[name])["weight_decay"] == 0.05, name
    for name in not_decayed:
        assert _lr_of(groups, names[name])["weight_decay"] == 0.0, name


def test_llrd_resnet_stages():
    net = build_encoder(make_spec(str(TINY_RN), "none"))
    assert layer_depth("tower.visual.conv1.weight", 4) == 0
    assert layer_depth("tower.visual.layer3.0.conv1.weight", 4) == 3
    assert layer_depth("head.fc.weight", 4) is None
    groups = param_groups(net, 1.0, 0.0, llrd=0.5, head_lr_mult=2.0)
    assert _lr_of(groups, net.tower.visual.layer4[0].conv1.weight)["lr"] == 1.0
    assert _lr_of(groups, net.tower.visual.layer1[0].conv1.weight)["lr"] == 0.125
    assert _lr_of(groups, net.tower.visual.conv1.weight)["lr"] == 0.0625
    assert _lr_of(groups, net.head.fc.weight)["lr"] == 2.0


@pytest.mark.parametrize("total,warm", [(100, 15), (10, 0), (7, 3), (50, 50)])
def test_warmup_cosine_matches_reference(total, warm):
    for step in range(total + 2):
        assert math.isclose(warmup_cosine(step, total, warm), ref_warmup_cosine(step, total, warm), abs_tol=1e-12)


def test_warmup_cosine_curve_shape():
    total, warm = 100, warmup_steps_for(100, 0.15)
    assert warm == 15
    curve = [warmup_cosine(s, total, warm) for s in range(total)]
    assert curve[0] == pytest.approx(1 / 15) and curve[14] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(curve[:14], curve[1:15]))  # rising warmup
    assert all(a >= b for a, b in zip(curve[15:], curve[16:]))  # falling cosine
    assert curve[15 + 85 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (85 // 2) / 85)))
    assert warmup_cosine(total, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert warmup_steps_for(100, 20) == 20  # >= 1 means a step count


def test_scheduler_applies_multiplier_to_each_group():
    net = build_encoder(make_spec(str(TINY_VIT), "none"))
    groups = param_groups(net, 1e-3, 0.05, llrd=0.5)
    base = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups)
    sched = make_scheduler(opt, total_steps=20, warmup_steps=4)
    for step in range(20):
        for g, b in zip(opt.param_groups, base):
            assert g["lr"] == pytest.approx(b * ref_warmup_cosine(step, 20, 4))
        opt.step()
        sched.step()


def test_current_lrs_are_the_base_and_the_head_lr():
    net = build_encoder(make_spec(str(TINY_VIT), "none"))
    base, mult = 1e-3, 10.0
    opt = torch.optim.AdamW(param_groups(net, base, 0.05, llrd=0.5, head_lr_mult=mult))
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2)
    top_block = net.tower.visual.transformer.resblocks[3].attn.in_proj_weight
    for step in range(10):
        lr, head_lr = current_lrs(opt)
        assert lr == pytest.approx(base * ref_warmup_cosine(step, 10, 2))
        assert lr == pytest.approx(_lr_of(opt.param_groups, top_block)["lr"])  # the top block's LR, not the head's
        assert head_lr == pytest.approx(mult * lr)
        opt.step()
        sched.step()
