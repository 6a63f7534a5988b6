"""Tests for traduire.loss: the sliced cross-entropy equals torch's, in value and gradient, with
padding ignored and with or without label smoothing, whether the gradient is written over the
logits or not and however many slices the tokens are cut into."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from traduire import loss as loss_module
from traduire.loss import token_cross_entropy

PAD = 0


def reference(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD,
                           reduction="sum", label_smoothing=smoothing)


def random_batch(seed: int, batch: int = 3, length: int = 7, vocab: int = 50,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(1, vocab, (batch, length), generator=gen)
    targets[0, -3:] = PAD  # padded ends of shorter sentences
    targets[2, -1] = PAD
    return logits, targets


def value_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    value = fn(leaf)
    # A gradient other than 1 reaches the loss in training (it is scaled by the batch size).
    (grad,) = torch.autograd.grad(value * 0.37, leaf)
    return value.detach(), grad.clone()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("slice_elements", [2**26, 50 * 4])  # one slice; slices of 4 tokens
def test_value_and_gradient_equal_torch_cross_entropy(smoothing, reuse, slice_elements,
                                                      monkeypatch):
    monkeypatch.setattr(loss_module, "SLICE_ELEMENTS", slice_elements)
    for seed in range(3):
        logits, targets = random_batch(seed)
        want, want_grad = value_and_grad(
            lambda x, t=targets: reference(x, t, smoothing), logits)
        got, got_grad = value_and_grad(
            lambda x, t=targets: token_cross_entropy(x, t, PAD, smoothing, reuse_logits=reuse),
            logits)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_padding_contributes_nothing_and_gets_no_gradient():
    logits, targets = random_batch(4)
    leaf = logits.clone().requires_grad_()
    token_cross_entropy(leaf, targets, PAD, 0.1).backward()
    assert torch.all(leaf.grad[targets == PAD] == 0)
    assert torch.all(leaf.grad[targets != PAD].abs().sum(-1) > 0)
    # Changing the logits of padded positions leaves the loss as it is.
    changed = logits.clone()
    changed[targets == PAD] = 100.0
    assert token_cross_entropy(changed, targets, PAD, 0.1) == token_cross_entropy(
        logits, targets, PAD, 0.1)


def test_all_padding_is_zero_loss_and_zero_gradient():
    logits, _ = random_batch(5)
    targets = torch.full(logits.shape[:2], PAD)
    leaf = logits.clone().requires_grad_()
    value = token_cross_entropy(leaf, targets, PAD, 0.1)
    value.backward()
    assert value.item() == 0.0 and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("reuse", [False, True])
def test_bf16_logits_are_computed_in_float32(reuse, monkeypatch):
    """bf16 logits: the loss is float32 arithmetic on the bf16 values (torch's fp32 loss of the
    same values), and the gradient comes back in bf16, rounded from the float32 one."""
    monkeypatch.setattr(loss_module, "SLICE_ELEMENTS", 50 * 5)
    logits, targets = random_batch(6, dtype=torch.bfloat16)
    want, want_grad = value_and_grad(lambda x: reference(x, targets, 0.1), logits)
    got, got_grad = value_and_grad(
        lambda x: token_cross_entropy(x, targets, PAD, 0.1, reuse_logits=reuse), logits)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(got_grad.float(), want_grad.float().bfloat16().float(),
                               atol=1e-2, rtol=0)


def test_reuse_logits_overwrites_them_with_the_gradient_and_keeps_others_intact():
    logits, targets = random_batch(7)
    kept = logits.clone().requires_grad_()
    token_cross_entropy(kept, targets, PAD, 0.1).backward()
    assert torch.equal(kept.detach(), logits)  # without reuse_logits, the logits stay

    reused = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(token_cross_entropy(reused, targets, PAD, 0.1,
                                                      reuse_logits=True), reused)
    assert grad.data_ptr() == reused.data_ptr()  # no tensor of the logits' size allocated
    torch.testing.assert_close(grad, kept.grad, atol=1e-6, rtol=0)


def test_gradient_reaches_the_output_projection_like_torch_cross_entropy():
    """As in the model: logits of a projection, their gradient written over them, then passed
    on to the projection's weights and inputs."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    _, targets = random_batch(8)
    grads = []
    for fn in (lambda x: reference(x, targets, 0.1),
               lambda x: token_cross_entropy(x, targets, PAD, 0.1, reuse_logits=True)):
        grads.append(torch.autograd.grad(fn(F.linear(hidden, weight)), (hidden, weight)))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
