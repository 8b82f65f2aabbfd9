"""Training speed switches checked on the CPU (they act on CUDA), and the pure helpers of DDP training.

Each fast path must compute what the plain path computes: grad checkpointing exactly, the
others to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipret.model.build import build_encoder, make_spec
from clipret.training.fast import CompiledForward, apply_memory_paths, uses_channels_last
from conftest import TINY_RN, TINY_VIT
from reference import ref_warmup_cosine


def _net(config, seed=0):
    torch.manual_seed(seed)
    return build_encoder(make_spec(str(config), "none", image_size=32, dropout=0.0)).train()


def _loss_and_grads(net, images, channels_last=False):
    x = images.to(memory_format=torch.channels_last) if channels_last else images
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_close_to_rounding(a, b, rel=1e-4, what=""):
    """max |a - b| within ``rel`` of b's largest entry (plus 1e-6 for gradients that cancel to ~0):
    float32 sums in another order, not another result."""
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-6, what


def test_grad_checkpointing_goes_through_every_vit_block_and_changes_nothing(monkeypatch):
    import open_clip.transformer as oct

    plain, ckpt = _net(TINY_VIT), _net(TINY_VIT)
    assert apply_memory_paths(ckpt, torch.device("cpu"), grad_checkpointing=True, channels_last=False, tf32=True) == []
    calls = [0]
    original = oct.checkpoint

    def counting(*a, **kw):
        calls[0] += 1
        return original(*a, **kw)

    monkeypatch.setattr(oct, "checkpoint", counting)
    out_a, grads_a = _loss_and_grads(plain, IMAGES)
    assert calls[0] == 0
    out_b, grads_b = _loss_and_grads(ckpt, IMAGES)
    assert calls[0] == len(ckpt.tower.visual.transformer.resblocks) == 4
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_grad_checkpointing_on_a_resnet_says_it_does_nothing():
    warnings = apply_memory_paths(_net(TINY_RN), torch.device("cpu"), grad_checkpointing=True, channels_last=False, tf32=True)
    assert len(warnings) == 1 and "no effect on ResNet" in warnings[0]


def test_channels_last_resnet_computes_the_same_to_rounding():
    plain, fast = _net(TINY_RN), _net(TINY_RN)
    assert apply_memory_paths(fast, torch.device("cpu"), grad_checkpointing=False, channels_last=True, tf32=True) == []
    assert uses_channels_last(fast, True) and not uses_channels_last(fast, False)
    assert fast.tower.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    out_a, grads_a = _loss_and_grads(plain, IMAGES)
    out_b, grads_b = _loss_and_grads(fast, IMAGES, channels_last=True)
    assert_close_to_rounding(out_b, out_a)
    for name in grads_a:
        assert_close_to_rounding(grads_b[name], grads_a[name], what=name)


def test_channels_last_is_ignored_with_a_warning_on_a_vit():
    net = _net(TINY_VIT)
    warnings = apply_memory_paths(net, torch.device("cpu"), grad_checkpointing=False, channels_last=True, tf32=True)
    assert len(warnings) == 1 and "only helps CNN" in warnings[0]
    assert not uses_channels_last(net, True)
    assert net.tower.visual.conv1.weight.is_contiguous()


def test_compiled_forward_computes_what_the_module_does():
    plain, compiled_net = _net(TINY_VIT), _net(TINY_VIT)
    warnings: list[str] = []
    forward = CompiledForward(compiled_net, warnings.append, backend="aot_eager")  # AOTAutograd without codegen: fast
    out_a, grads_a = _loss_and_grads(plain, IMAGES)
    compiled_net.zero_grad(set_to_none=True)
    out_b = forward(IMAGES)
    (out_b * torch.linspace(-1, 1, out_b.numel()).reshape(out_b.shape)).sum().backward()
    assert warnings == [] and forward.compiled is not None
    assert_close_to_rounding(out_b.detach(), out_a)
    for name, p in compiled_net.named_parameters():
        assert_close_to_rounding(p.grad, grads_a[name], what=name)


def test_a_failing_compile_falls_back_to_eager_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    net = _net(TINY_RN)
    warnings: list[str] = []
    forward = CompiledForward(net, warnings.append, backend=broken_backend)
    expected = net(IMAGES)
    for _ in range(2):
        torch.testing.assert_close(forward(IMAGES), expected)
    assert len(warnings) == 1 and warnings[0].startswith("--compile failed") and "no compiler here" in warnings[0]
    assert "\n" not in warnings[0]


def test_tf32_is_set_for_cuda_devices_only():
    from clipret import runtime

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        runtime.set_tf32(torch.device("cpu"), True)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        runtime.set_tf32(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        runtime.set_tf32(torch.device("cuda", 0), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("local_rank,asked,expected", [
    ("0", "cuda", "cuda:0"), ("1", "cuda", "cuda:1"), ("1", "auto", "cuda:1"), ("3", "cuda", "cuda:1"),  # 2 visible GPUs
    ("1", "cuda:0", "cuda:0"), ("1", "cpu", "cpu"),
])
def test_device_under_torchrun_is_the_local_ranks_gpu(monkeypatch, local_rank, asked, expected):
    from clipret import runtime

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert str(runtime.resolve_device(asked)) == expected


# ---------------------------------------------------------------------------
# pure helpers: where a resumed run goes on, the validation blocks, rank seeds
# ---------------------------------------------------------------------------


def ref_continue_at(epoch, batch, saved_world, world, epoch_length):
    """Walk the epoch plan: the old ranks took plan batches 0 .. batch*saved_world - 1; a new rank's
    first batch is the first row of `world` plan batches that starts at or after that."""
    done = batch * saved_world
    start = 0
    while start * world < done and start < epoch_length:
        start += 1
    return start, epoch * epoch_length + start


@pytest.mark.parametrize("saved_world", [1, 2, 3, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_continue_at_matches_a_walk_over_the_plan(saved_world, world):
    from clipret.training.resume import continue_at

    n_plan = 50  # batches in the epoch plan
    for epoch in (0, 3):
        for batch in range(n_plan // saved_world + 1):
            length = n_plan // world
            assert continue_at(epoch, batch, saved_world, world, length) == ref_continue_at(epoch, batch, saved_world, world, length)


def test_same_world_size_continues_where_it_stopped():
    from clipret.training.resume import continue_at

    assert continue_at(2, 5, 4, 4, 12) == (5, 29)


def test_move_to_step_puts_every_group_on_the_schedule():
    from clipret.training.schedule import make_scheduler, move_to_step

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = make_scheduler(opt, 20, 3)
    move_to_step(sched, 7)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([ref_warmup_cosine(7, 20, 3), 0.1 * ref_warmup_cosine(7, 20, 3)])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([ref_warmup_cosine(8, 20, 3), 0.1 * ref_warmup_cosine(8, 20, 3)])


def test_rank_seeds_keep_rank_zero_and_differ_between_ranks():
    from clipret.training.ddp import rank_seed

    assert rank_seed(7, 0) == 7
    seeds = [rank_seed(7, r) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert rank_seed(8, 1) != rank_seed(7, 1)


def test_every_resume_overridable_setting_is_about_how_it_runs():
    from clipret.config import RESUME_OVERRIDABLE

    assert {"grad_checkpointing", "channels_last", "compile", "tf32"} <= set(RESUME_OVERRIDABLE)
    assert np.isin(["lr", "p", "k", "epochs", "seed"], RESUME_OVERRIDABLE).sum() == 0
