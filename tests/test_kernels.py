"""Tests for traduire.kernels: each speed path computes the same function as its plain form."""

from __future__ import annotations

import pytest
import torch

from traduire import kernels
from traduire.kernels import Dropout, dropout, fused_attention, top_per_row
from traduire.model import attention, causal_mask

# --- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_computes_the_papers_equation(causal):
    """The fused kernel gives model.attention's values and gradients, with padding, with a
    causal mask, and with causality as a flag (how fp32 training on CPU and GPUs call it)."""
    gen = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    if causal:
        mask = causal_mask(6, 6, torch.device("cpu"), mask)
    explicit, weights = attention(q, k, v, mask)
    fused = fused_attention(q, k, v, mask, causal=False, dropout_p=0.0)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert weights[0, :, :, 4:].eq(0).all()
    if causal:
        assert weights[1].triu(1).eq(0).all()
    grads = torch.autograd.grad(explicit.square().sum(), (q, k, v))
    fused_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    for got, want in zip(grads, fused_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if causal:  # the flag alone: the same as the lower-triangular mask
        flagged = fused_attention(q, k, v, None, causal=True, dropout_p=0.0)
        masked, _ = attention(q, k, v, causal_mask(6, 6, torch.device("cpu")))
        torch.testing.assert_close(flagged, masked, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="square without a mask"):
            fused_attention(q, k, v, mask, causal=True, dropout_p=0.0)


def test_fused_attention_is_chosen_for_fp32_training_on_cpu_only():
    x = torch.randn(2, 2, 3, 4)
    assert not kernels.fused_attention_wins(x)  # decoding
    assert kernels.fused_attention_wins(x.requires_grad_())
    assert not kernels.fused_attention_wins(x.detach().bfloat16().requires_grad_())
    with torch.no_grad():
        assert not kernels.fused_attention_wins(x)


# --- dropout -----------------------------------------------------------------------------------


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


# --- top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "vocab", "k"), [(7, 8000, 10), (3, 1001, 4), (2, 700, 1)])
def test_top_per_row_equals_topk(rows: int, vocab: int, k: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    scores = torch.randn(rows, vocab, generator=gen) * 4
    scores[0, 5:] = float("-inf")  # a row with fewer finite entries than k + blocks
    scores[-1, ::3] = float("-inf")
    values, index = top_per_row(scores, k)
    expected = scores.topk(k, dim=1)
    torch.testing.assert_close(values, expected.values)
    torch.testing.assert_close(scores.gather(1, index), expected.values)
    finite = expected.values.isfinite()
    assert torch.equal(index[finite], expected.indices[finite])
