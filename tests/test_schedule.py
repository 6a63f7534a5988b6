"""Tests for traduire.schedule: the shapes of the learning rate, and the budget schedule's
decision for a time budget."""

from __future__ import annotations

import pytest

from traduire.config import TrainConfig
from traduire.schedule import (
    DECIDE_AT,
    DECIDE_AT_LEAST,
    Budget,
    decision_due,
    decision_time,
    learning_rate,
    rate_from_time,
    step_budget,
    time_budget,
)

PEAK, FLOOR = 1e-3, 1e-5


def budget_cfg(**keys: object) -> TrainConfig:
    return TrainConfig(**{"schedule": "budget", "lr": PEAK, "min_lr": FLOOR,
                          "warmup_steps": 100, "max_steps": 1000, **keys})


def test_budget_warms_up_holds_the_peak_then_decays_to_min_lr_at_the_end():
    cfg = budget_cfg(decay_fraction=0.2)
    lrs = [learning_rate(step, cfg) for step in range(1, 1001)]
    # Linear warmup: step s of 100 has s/100 of the peak.
    assert lrs[0] == pytest.approx(PEAK / 100)
    assert lrs[49] == pytest.approx(PEAK / 2)
    assert all(b - a == pytest.approx(PEAK / 100) for a, b in zip(lrs[:99], lrs[1:100]))
    # The peak, held from the end of warmup to the decay's start, the last fifth.
    assert all(lr == PEAK for lr in lrs[99:800])
    # Then down in a straight line, reaching min_lr at the last step.
    decay = lrs[799:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    steps = [b - a for a, b in zip(decay, decay[1:])]
    assert max(steps) == pytest.approx(min(steps))
    assert lrs[899] == pytest.approx(FLOOR + (PEAK - FLOOR) / 2)
    assert lrs[-1] == pytest.approx(FLOOR)
    # Past the budget (max_steps raised on resume without a new schedule): min_lr.
    assert learning_rate(1200, cfg, Budget(100, 800, 1000)) == pytest.approx(FLOOR)


def test_the_warmup_may_be_a_share_of_max_steps_and_the_decay_any_share():
    cfg = budget_cfg(warmup_fraction=0.05, decay_fraction=0.5, max_steps=2000)
    assert step_budget(cfg) == Budget(warmup=100, decay_start=1000, end=2000)
    assert learning_rate(50, cfg) == pytest.approx(PEAK / 2)
    assert learning_rate(1000, cfg) == PEAK and learning_rate(1001, cfg) < PEAK
    assert learning_rate(1500, cfg) == pytest.approx(FLOOR + (PEAK - FLOOR) / 2)


def test_a_warmup_longer_than_the_stable_phase_meets_the_decay_line():
    """A time budget shorter than the warmup: the rate rises until it meets the decay, then
    follows it down, never jumping."""
    cfg = budget_cfg(warmup_steps=1000, max_steps=0, max_time="1m")
    budget = Budget(warmup=1000, decay_start=400, end=500)
    lrs = [learning_rate(step, cfg, budget) for step in range(1, 501)]
    top = lrs.index(max(lrs))
    assert 400 < top < 500 and max(lrs) < PEAK
    assert all(a < b for a, b in zip(lrs[:top], lrs[1:top + 1]))
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))
    assert lrs[-1] == pytest.approx(FLOOR)


def test_an_undecided_time_budget_holds_the_peak_after_warmup():
    cfg = budget_cfg(max_steps=0, max_time="9m")
    assert step_budget(cfg) is None
    assert learning_rate(100, cfg) == learning_rate(10**6, cfg) == PEAK


def test_a_time_budget_decides_halfway_to_its_decay_or_when_the_step_budget_decays():
    time_only = budget_cfg(max_steps=0, max_time="10m", decay_fraction=0.2)
    # Halfway to the decay at 80% of the time; the rate measured over the second half of that.
    assert decision_time(time_only) == pytest.approx(DECIDE_AT * 0.8 * 600) == 240
    assert rate_from_time(time_only) == pytest.approx(120)
    assert not decision_due(time_only, 10**6, 239.9)
    assert decision_due(time_only, 1, 240.0)
    # A decay over most of the budget: still no sooner than a tenth of the time in.
    assert decision_time(budget_cfg(max_steps=0, max_time="10m", decay_fraction=0.9)) == (
        pytest.approx(DECIDE_AT_LEAST * 600))
    both = budget_cfg(max_steps=1000, max_time="10h")
    assert not decision_due(both, 799, 1.0) and decision_due(both, 800, 1.0)
    # A step budget alone never decides anything at run time; nor do other schedules.
    assert not decision_due(budget_cfg(), 10**6, 10**6)
    assert not decision_due(TrainConfig(max_time="1m"), 10**6, 10**6)


def test_the_time_budget_ends_where_the_measured_rate_runs_out_or_max_steps_first():
    cfg = budget_cfg(max_steps=0, max_time="9m", decay_fraction=0.2)
    # At 10 steps a second, 54 s in (step 540): 486 s of 10 steps left.
    assert time_budget(cfg, 540, 54.0, 10.0) == Budget(100, 4320, 5400)
    # max_steps ends first: its budget, the decay start clamped to the decision's step.
    both = budget_cfg(max_steps=3000, max_time="9m")
    assert time_budget(both, 540, 54.0, 10.0) == Budget(100, 2400, 3000)
    assert time_budget(both, 540, 54.0, 1.0).end == 540 + 486
    late = time_budget(budget_cfg(max_steps=0, max_time="9m", decay_fraction=1.0),
                       540, 54.0, 10.0)
    assert late.decay_start == 540 and late.end == 5400
