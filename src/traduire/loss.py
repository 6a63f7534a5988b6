"""The loss of training and validation: token-level cross-entropy, optionally label-smoothed
(Szegedy et al., 2016; section 5.4 of Vaswani et al., 2017: label smoothing of 0.1 "hurts
perplexity, as the model learns to be more unsure, but improves accuracy and BLEU").

The logits of a large batch are the largest tensor of a training step: 25k target tokens of a
32k vocabulary are 1.6 GB in bf16. `F.cross_entropy(logits.float(), ...)` makes an fp32 copy
(3.2 GB), its log-softmax (3.2 GB more) and, in backward, fp32 and bf16 gradients of the same
size: some 13 GB at peak. Here the arithmetic is the same, in float32, but done a slice of
tokens at a time, so that only one slice is ever in float32; the backward pass recomputes each
slice's softmax from the logits and the per-token log-normaliser kept from the forward pass.
With `reuse_logits` the gradient is written over the logits themselves, which the training step
has no further use for (the output projection's backward needs its inputs, not its output), so
the loss then allocates no tensor of the logits' size at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one float32 slice (64 Mi: 256 MiB): the slices of a 32k vocabulary are 2,048
# tokens, and a model of Multi30k's size computes a whole batch in one slice. A few such
# temporaries are alive at once; smaller slices would only add kernel launches.
SLICE_ELEMENTS = 2**26


def token_cross_entropy(logits: Tensor, targets: Tensor, pad_id: int,
                        label_smoothing: float = 0.0, reuse_logits: bool = False) -> Tensor:
    """The cross-entropy of `logits` (batch, length, vocab) against `targets` (batch, length),
    summed over the real target tokens (padding ignored). Summed, not averaged: the caller
    divides by the tokens of the whole (global) batch, so the gradient does not depend on how
    a batch is split between passes and ranks. Computed in float32 whatever the logits'
    precision. With label_smoothing = ε, the target distribution puts ε/vocab on every token
    and 1 - ε more on the reference. The same value and gradient as
    `F.cross_entropy(logits.float(), ..., ignore_index=pad_id, reduction="sum")`.

    reuse_logits: the backward pass overwrites `logits` with their gradient (saving a tensor of
    their size); only for logits that nothing reads after the loss's backward."""
    flat = logits.reshape(-1, logits.size(-1))
    return _SlicedCrossEntropy.apply(flat, targets.reshape(-1), pad_id, float(label_smoothing),
                                     reuse_logits)


def _slices(rows: int, vocab: int) -> list[slice]:
    step = max(1, SLICE_ELEMENTS // max(vocab, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _SlicedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of (tokens, vocab) logits, a slice at a time.

    Per token, with x its logits, t its target, lse = log Σ exp(x), V the vocabulary and ε the
    smoothing: loss = lse - (1 - ε) x_t - (ε / V) Σ_j x_j, and its gradient softmax(x) - (1 - ε)
    onehot(t) - ε / V. Tokens whose target is padding count zero and get a zero gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, pad_id: int, smoothing: float,
                reuse_logits: bool) -> Tensor:
        rows, vocab = logits.shape
        valid = targets != pad_id
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for part in _slices(rows, vocab):
            x = logits[part].float()
            lse[part] = torch.logsumexp(x, dim=-1)
            token_loss = lse[part] - (1.0 - smoothing) * x.gather(1, targets[part, None])[:, 0]
            if smoothing:
                token_loss = token_loss - (smoothing / vocab) * x.sum(dim=-1)
            total += torch.where(valid[part], token_loss, 0.0).sum()
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.smoothing, ctx.reuse_logits = smoothing, reuse_logits
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        logits, targets, valid, lse = ctx.saved_tensors
        smoothing, rows, vocab = ctx.smoothing, *logits.shape
        grad = logits.detach() if ctx.reuse_logits else torch.empty_like(logits)
        # The factor of each token: the incoming gradient, or zero where the target is padding.
        scale = torch.where(valid, grad_total.float(), 0.0)
        for part in _slices(rows, vocab):
            x = logits[part]
            # One float32 slice, worked on in place: a copy, except for float32 logits that
            # may be overwritten (then it is the slice of the gradient itself).
            if x.dtype != torch.float32:
                g = x.float()
            else:
                g = x.detach() if ctx.reuse_logits else x.clone()
            g.sub_(lse[part, None]).exp_()  # the softmax
            if smoothing:
                g.sub_(smoothing / vocab)
            g.scatter_add_(1, targets[part, None],
                           torch.full((g.size(0), 1), smoothing - 1.0, device=g.device))
            g.mul_(scale[part, None])
            if g.data_ptr() != grad[part].data_ptr():
                grad[part].copy_(g)
        return grad, None, None, None, None
