"""Speed paths: the places where traduire computes something differently from the textbook
form because the textbook form measured slow on some hardware. Each computes the same function
as the plain form (tests/test_kernels.py checks the equivalence); only speed differs. The
measurements behind each choice are in its docstring and in docs/performance.md.

  fused_attention  torch's fused attention kernels, where they beat the explicit form
                   written out in model.py (`attention`)
  dropout          four 15-bit random numbers per 64-bit draw on CPU
  top_per_row      top-k of wide rows through block maxima

Process settings (allocator, oneDNN cache) are in runtime.py, hardware probes in device.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- Attention ---------------------------------------------------------------------------------


def fused_attention_wins(q: Tensor) -> bool:
    """Whether torch's fused attention kernel (`fused_attention`) computes softmax(q k^T /
    sqrt(d)) v for queries `q` faster than the explicit matrix products of model.attention.

    GPUs: always (flash attention and friends). CPUs (torch 2.13): only in fp32 training. The
    fused backward is slow in bf16 (forward and backward of 290 sentences of 20 tokens: 16.7 ms
    explicit, 93 ms fused), and in the few-query steps of decoding the explicit form is
    1.1-1.3x faster; forward passes alone are even. In fp32 training the fused kernel wins
    (forward and backward: 29 ms explicit, 20 ms fused with AMX; 22 and 18 ms with AVX2 only).
    Measured with scripts/bench/kernels_check.py: docs/performance.md.
    """
    if q.device.type != "cpu":
        return True
    return q.requires_grad and torch.is_grad_enabled() and q.dtype == torch.float32


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                    dropout_p: float) -> Tensor:
    """model.attention's output through torch's fused kernel (the weights are not kept).
    mask: boolean, True where attention is allowed, or additive (0 or -inf). causal: a plain
    causal square (query i sees keys up to i) without a mask tensor, which the kernels apply
    themselves (flash attention accepts no mask)."""
    if causal and (mask is not None or q.size(2) != k.size(2)):
        raise ValueError("causal fused attention takes a square without a mask")
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # the kernels take an additive mask in the queries' dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal)


# --- Dropout -----------------------------------------------------------------------------------

_RANDOM_BITS = 15  # per kept-or-dropped decision: p is honoured to within 2^-16


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    On CPU, torch's dropout draws one random number per element (bernoulli_), which took a
    fifth of a bf16 training step of the Multi30k model (torch 2.13, Xeon with AMX). Here each
    64-bit draw is cut into four 15-bit numbers, one per element: the same Bernoulli mask from
    a quarter of the draws (bf16 training +13%, fp32 +5-8%). Elsewhere, and in a compiled
    model, this is torch's dropout.
    """
    if not training or p == 0.0:
        return x
    # torch.compile cannot trace random_ (in place): a compiled model takes torch's dropout,
    # which it fuses into the neighbouring kernels anyway.
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    count = x.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
    numbers = draws.view(torch.int16)[:count].view(x.shape) & (2**_RANDOM_BITS - 1)
    keep = numbers >= round(p * 2**_RANDOM_BITS)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """nn.Dropout computed with `dropout` above."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# --- Top-k -------------------------------------------------------------------------------------


def top_per_row(scores: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """`scores.topk(k, dim=1)` for a wide (rows, vocab) matrix, about three times faster on CPU
    (torch's topk over 8,000 entries took 15 ms for 1,350 rows, torch 2.13).

    Cut each row into blocks and keep the k blocks with the highest maxima: a row's k best
    entries lie in them, since a block holding one of them has a maximum at least the k-th
    best, and at most k blocks can. The exact topk then runs on k * block entries, not vocab.
    """
    rows, vocab = scores.shape
    if vocab <= 4 * k * block:
        return scores.topk(k, dim=1)
    padding = -vocab % block
    if padding:
        scores = F.pad(scores, (0, padding), value=float("-inf"))
    blocks = scores.view(rows, -1, block)
    best_blocks = blocks.amax(-1).topk(k, dim=1).indices  # (rows, k)
    candidates = blocks.gather(1, best_blocks[:, :, None].expand(-1, -1, block))
    values, within = candidates.view(rows, k * block).topk(k, dim=1)
    return values, best_blocks.gather(1, within // block) * block + within % block
