"""Tests for traduire.ops: the same function as torch's dropout, computed differently."""

from __future__ import annotations

import pytest
import torch

from traduire.ops import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_a_share_p_and_scales_the_rest(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.rand(1001, 999, dtype=dtype) + 1  # odd size: not a multiple of four
    out = dropout(x, p, training=True)
    assert out.dtype == dtype and out.shape == x.shape
    dropped = out == 0
    # 1M Bernoulli(p) draws: the share is within 5 standard deviations of p.
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(out[~dropped], (x / (1 - p)).to(dtype)[~dropped])
    # Neighbouring elements (which share a 64-bit random draw) are independent.
    pairs = dropped.flatten()[: x.numel() // 2 * 2].view(-1, 2).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / pairs.size(0)) ** 0.5


def test_gradient_uses_the_same_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.25, training=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.75)


def test_seeded_reproducible_and_identity_when_off() -> None:
    x = torch.randn(100, 10)
    torch.manual_seed(2)
    first = dropout(x, 0.1, training=True)
    torch.manual_seed(2)
    assert torch.equal(first, dropout(x, 0.1, training=True))
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert dropout(x, 1.0, training=True).eq(0).all()
    module = Dropout(0.1).eval()
    assert module(x) is x
