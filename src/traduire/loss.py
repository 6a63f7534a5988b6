"""The loss of training and validation: token-level cross-entropy, optionally label-smoothed
(Szegedy et al., 2016; section 5.4 of Vaswani et al., 2017: label smoothing of 0.1 "hurts
perplexity, as the model learns to be more unsure, but improves accuracy and BLEU")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_cross_entropy(logits: Tensor, targets: Tensor, pad_id: int,
                        label_smoothing: float = 0.0) -> Tensor:
    """The cross-entropy of `logits` (batch, length, vocab) against `targets` (batch, length),
    summed over the real target tokens (padding ignored). Summed, not averaged: the caller
    divides by the tokens of the whole (global) batch, so the gradient does not depend on how
    a batch is split between passes and ranks. Computed in float32 whatever the logits'
    precision. With label_smoothing = ε, the target distribution puts ε/vocab on every token
    and 1 - ε more on the reference."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=pad_id, reduction="sum",
                           label_smoothing=label_smoothing)
