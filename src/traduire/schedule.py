"""The learning-rate schedule: a linear warmup, then inverse_sqrt, cosine, linear or budget.

`budget` is warmup-stable-decay (Hu et al. 2024, "MiniCPM"): warm up, hold the
peak, and decay linearly to min_lr over the last `train.decay_fraction` of the run's budget.
With `train.max_steps` the budget is known from the start. With `train.max_time` it is not:
the step training will end at is estimated once, from the step rate measured over a stretch
of steady training (`decision_time`; sooner when a step budget's decay would begin), and from
then on it is fixed: the Trainer records the `Budget` in the training state and in
metrics.jsonl, and a resumed run continues that decay instead of estimating again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from traduire.config import TrainConfig, parse_duration

# A time budget's end is estimated halfway to where its decay would begin (at least a tenth of
# train.max_time in), from the step rate of the second half of that stretch: late enough that
# the first steps' one-off costs are left out (on a CPU, bf16 kernels built for each new batch
# shape can run the first hundred steps at a third of the steady speed), early enough that the
# decay has not begun.
DECIDE_AT, DECIDE_AT_LEAST = 0.5, 0.1


@dataclass(frozen=True)
class Budget:
    """Where a budget schedule's phases end: warmup to step `warmup`, the peak until
    `decay_start`, then linearly down to min_lr at `end`, the run's last step."""

    warmup: int
    decay_start: int
    end: int


def learning_rate(step: int, cfg: TrainConfig, budget: Budget | None = None) -> float:
    """The learning rate of `step` (1-based): a linear warmup to train.lr over warmup_steps,
    then the configured decay: inverse_sqrt (Vaswani et al., section 5.3: lr * sqrt(warmup /
    step)), or cosine or linear to min_lr at decay_steps (0: max_steps), or budget: the peak
    until the decay of `budget` (by default the step budget's, step_budget; none yet for a
    time budget not yet decided: the peak)."""
    step = max(step, 1)
    if cfg.schedule == "budget":
        return _budget_rate(step, cfg, budget or step_budget(cfg))
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(cfg.warmup_steps, 1) / step)
    end = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(end - cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)


def _budget_rate(step: int, cfg: TrainConfig, budget: Budget | None) -> float:
    # The stable phase holds the peak rather than decaying as 1/sqrt(step): a constant rate
    # presupposes no end, so the decay can start wherever the budget turns out to end, and a
    # short decay from the peak does as well as a schedule tuned to the run's length (MiniCPM).
    warmup = budget.warmup if budget else warmup_steps(cfg)
    rate = cfg.lr * min(1.0, step / warmup) if warmup else cfg.lr
    if budget is None or step <= budget.decay_start:
        return rate
    left = max(0, budget.end - step) / max(budget.end - budget.decay_start, 1)
    # min(): a warmup that outlasts the stable phase (a time budget shorter than expected)
    # meets the decay line instead of jumping up to the peak.
    return min(rate, cfg.min_lr + (cfg.lr - cfg.min_lr) * left)


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup's length in steps: train.warmup_steps, or train.warmup_fraction of
    train.max_steps (the config refuses a fraction without max_steps)."""
    if cfg.warmup_fraction is not None:
        return round(cfg.warmup_fraction * cfg.max_steps)
    return cfg.warmup_steps


def decay_start(end: int, cfg: TrainConfig) -> int:
    """The step after which a budget ending at `end` decays: its last decay_fraction."""
    return round(end * (1 - cfg.decay_fraction))


def step_budget(cfg: TrainConfig) -> Budget | None:
    """The budget of train.max_steps, known before training (None: no step budget)."""
    if not cfg.max_steps:
        return None
    return Budget(warmup_steps(cfg), decay_start(cfg.max_steps, cfg), cfg.max_steps)


def decision_time(cfg: TrainConfig) -> float:
    """Seconds into max_time after which a time budget is decided: DECIDE_AT of the way to
    where its decay would begin, and no sooner than DECIDE_AT_LEAST of max_time. The step rate
    is measured from half that time on (rate_from_time)."""
    share = max(DECIDE_AT_LEAST, DECIDE_AT * (1 - cfg.decay_fraction))
    return share * parse_duration(cfg.max_time)


def rate_from_time(cfg: TrainConfig) -> float:
    """Seconds into max_time from which the step rate of a time budget is measured."""
    return decision_time(cfg) / 2 if cfg.schedule == "budget" and cfg.max_time else 0.0


def decision_due(cfg: TrainConfig, step: int, elapsed: float) -> bool:
    """Whether a budget schedule with a time budget, not yet decided, decides after `step`:
    decision_time has passed, or the step budget's own decay is about to begin (with
    max_steps too: then the decision says which of the two ends first)."""
    if cfg.schedule != "budget" or not cfg.max_time:
        return False
    steps = step_budget(cfg)
    return (elapsed >= decision_time(cfg)
            or (steps is not None and step >= steps.decay_start))


def time_budget(cfg: TrainConfig, step: int, elapsed: float, steps_per_second: float) -> Budget:
    """The budget decided after `step`, `elapsed` seconds into max_time: the steps still to
    come at the measured rate, or max_steps if that ends first. The decay starts no earlier
    than the step after the decision, so the rate never jumps down."""
    left = max(0.0, parse_duration(cfg.max_time) - elapsed)
    end = step + math.floor(steps_per_second * left)
    if cfg.max_steps:
        end = min(end, cfg.max_steps)
    end = max(end, step)
    return Budget(warmup_steps(cfg), max(decay_start(end, cfg), step), end)
