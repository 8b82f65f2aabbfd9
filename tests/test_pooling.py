import pytest
import torch

from clipret.model.head import EmbeddingHead
from clipret.model.pooling import GeM, gem, nonnegative
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
