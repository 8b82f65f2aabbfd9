import pytest
import torch

from clipret.model.head import EmbeddingHead
from clipret.model.pooling import GeM, clamp_min_recoverable, gem, nonnegative
from reference import ref_gem


def test_gem_matches_naive_loop():
    torch.manual_seed(0)
    x = torch.rand(3, 7, 5, dtype=torch.float64) * 2
    for p in (1.0, 2.5, 3.0, 6.0):
        fast = gem(x, p, eps=1e-6, dim=1)
        slow = torch.tensor(ref_gem(x.tolist(), p, eps=1e-6), dtype=torch.float64)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_gem_limits_are_mean_and_max():
    x = torch.rand(2, 9, 4, dtype=torch.float64) + 0.1
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=1))
    assert torch.allclose(gem(x, 200.0), x.amax(dim=1), rtol=2e-2)


@pytest.mark.parametrize("p", [3.0, 7.6, 12.0])
def test_gem_stays_finite_when_a_channel_is_all_clamped(p):
    # float32, a learned p past ~7.5 and one channel whose tokens are all negative (so all clamped to eps):
    # the direct (mean x^p)^(1/p) underflows to 0 there and its backward gives NaN (seen in training)
    torch.manual_seed(0)
    pool = GeM(p=p)
    x = torch.randn(4, 64, 8)
    x[:, :, 0] = -torch.rand(4, 64)
    x[:, 0, 1], x[:, 1:, 1] = 2e-6, -1.0  # one token just above eps, the rest clamped
    x.requires_grad_(True)
    y = pool(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(pool.p.grad)
    torch.testing.assert_close(y[:, 0], torch.full((4,), 1e-6), rtol=1e-4, atol=0)  # all eps: GeM is eps
    want = ((2e-6**p + 63 * 1e-6**p) / 64) ** (1 / p)  # exact, in float64
    torch.testing.assert_close(y[:, 1].double(), torch.full((4,), want, dtype=torch.float64), rtol=1e-4, atol=0)


def test_gem_module_p_is_learnable_and_receives_gradient():
    pool = GeM(p=3.0, input_map="softplus")
    assert pool.p.item() == 3.0 and pool.p.requires_grad
    x = torch.randn(4, 10, 6)  # signed, like LayerNorm'd ViT tokens
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0


def _ref_gem_slope_at(x: torch.Tensor, p: float, h: float = 1e-5) -> float:
    """d/dp of sum(ref_gem(x, p)), by a central difference of the slow reference (float64)."""
    total = lambda q: sum(sum(row) for row in ref_gem(x.tolist(), q))  # noqa: E731
    return (total(p + h) - total(p - h)) / (2 * h)


def test_clamp_min_recoverable_passes_only_the_gradient_that_raises_a_value_below_the_floor():
    x = torch.tensor([0.5, 0.5, 1.0, 2.0, 2.0], requires_grad=True)
    y = clamp_min_recoverable(x, 1.0)
    assert y.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
    (y * torch.tensor([-3.0, 3.0, 3.0, -3.0, 3.0])).sum().backward()
    # below the floor: an upward pull (negative gradient) passes, a downward one does not; above: as clamp
    assert x.grad.tolist() == [-3.0, 0.0, 3.0, -3.0, 3.0]


def test_gem_p_below_one_pools_at_one_and_climbs_back_when_a_larger_p_helps():
    torch.manual_seed(0)
    pool = GeM(p=3.0)
    with torch.no_grad():
        pool.p.fill_(0.6)  # e.g. an Adam step overshot
    x = torch.rand(4, 10, 6) + 0.05
    y = pool(x)
    slow = torch.tensor(ref_gem(x.double().tolist(), 1.0), dtype=torch.float64)
    torch.testing.assert_close(y.double(), slow, rtol=1e-5, atol=1e-6)  # the forward uses p = 1
    (-y.sum()).backward()  # a power mean grows with p: this loss wants p larger
    want = -_ref_gem_slope_at(x.double(), 1.0)
    assert pool.p.grad < 0 and pool.p.grad.item() == pytest.approx(want, rel=1e-3)
    opt = torch.optim.SGD(pool.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (-pool(x).sum()).backward()
        opt.step()
    assert pool.p.item() > 1.0  # back in the range where p does something


def test_gem_p_below_one_does_not_drift_further_down():
    pool = GeM(p=3.0)
    with torch.no_grad():
        pool.p.fill_(0.6)
    pool(torch.rand(2, 5, 3) + 0.05).sum().backward()  # this loss wants p smaller: it has no effect below 1
    assert pool.p.grad.item() == 0.0


def test_gem_p_above_one_gets_the_plain_gradient_and_old_checkpoints_load():
    torch.manual_seed(1)
    x = torch.rand(3, 7, 4) + 0.05
    pool = GeM(p=3.0)
    pool.load_state_dict({"p": torch.tensor(2.5)})  # the parameter and its meaning are unchanged
    y = pool(x)
    slow = torch.tensor(ref_gem(x.double().tolist(), 2.5), dtype=torch.float64)
    torch.testing.assert_close(y.double(), slow, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert pool.p.grad.item() == pytest.approx(_ref_gem_slope_at(x.double(), 2.5), rel=1e-3)


@pytest.mark.parametrize("how", ["softplus", "shift"])
def test_nonnegative_maps_keep_gradient_for_negative_tokens(how):
    x = -torch.rand(2, 5, 3) - 0.5  # all negative
    x.requires_grad_(True)
    gem(nonnegative(x, how), 3.0).sum().backward()
    # every token keeps a gradient (shift: all but each channel's minimum, 4 of 5 here);
    # the classic clamp zeroes them all
    assert (x.grad.abs() > 0).float().mean() >= 0.8
    x.grad = None
    gem(nonnegative(x, "clamp"), 3.0).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_nonnegative_outputs_are_nonnegative_and_unknown_mapping_fails():
    x = torch.randn(3, 8, 4)
    for how in ("clamp", "softplus", "shift"):
        assert (nonnegative(x, how) >= 0).all()
    with pytest.raises(ValueError):
        nonnegative(x, "relu6")


def test_head_shapes_and_unit_norm():
    head = EmbeddingHead(96, 512, dropout=0.1)
    assert head.fc.bias is None and head.fc.in_features == 96 and head.fc.out_features == 512
    assert isinstance(head.bn, torch.nn.BatchNorm1d) and head.drop.p == 0.1
    for mode in (head.train, head.eval):
        mode()
        y = head(torch.randn(6, 96))
        assert y.shape == (6, 512) and y.dtype == torch.float32
        torch.testing.assert_close(y.norm(dim=1), torch.ones(6))
