"""Draw the learning rate of the shipped configs' `train.schedule: budget` for their two time
budgets, from traduire's own schedule functions, into docs/schedule.png (needs matplotlib).

    python scripts/plot_schedule.py [--out docs/schedule.png]

The step rates are assumptions, not measurements made here: those the budget schedule measured
in the recipe searches of docs/performance.md on 2 CPU cores (STEP_RATES), held constant. Each
budget is decided as the trainer decides it: at schedule.decision_time, from the steps done by
then. `inverse_sqrt` with the same warmup, the configs' schedule before `budget`, is drawn
beside each (dashed) for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from traduire.config import load_config  # noqa: E402
from traduire.schedule import decision_time, learning_rate, time_budget  # noqa: E402

# steps/s: the quickstart's winning run on the AVX2 stand-in, fp32; Multi30k's round-1 budget
# run, bf16, one thread beside another run.
STEP_RATES = [("configs/quickstart-en-fr.yaml", 3.61),
              ("configs/multi30k-en-fr.yaml", 1.22)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "schedule.png")
    args = parser.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot_schedule.py needs matplotlib: "
                         "pip install 'traduire[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(STEP_RATES), figsize=(11, 3.6))
    for ax, (path, rate) in zip(axes, STEP_RATES):
        cfg = load_config(ROOT / path, ["train.schedule=budget"]).train
        before = load_config(ROOT / path, ["train.schedule=inverse_sqrt"]).train
        decided_after = decision_time(cfg)
        budget = time_budget(cfg, int(rate * decided_after), decided_after, rate)
        steps = range(1, budget.end + 1)
        minutes = [step / rate / 60 for step in steps]
        ax.plot(minutes, [learning_rate(s, cfg, budget) for s in steps],
                label="budget (decay_fraction 0.2)")
        ax.plot(minutes, [learning_rate(s, before) for s in steps], "--",
                label="inverse_sqrt, same warmup and peak (before)")
        ax.axvline(decided_after / 60, color="grey", lw=0.8, ls=":")
        ax.text(decided_after / 60, cfg.lr * 0.05, " decided", color="grey", fontsize=8)
        ax.set_title(f"{Path(path).stem}: {cfg.max_time}, assumed {rate:.2f} steps/s\n"
                     f"warmup {budget.warmup}, decay from step {budget.decay_start}, "
                     f"end {budget.end}", fontsize=9)
        ax.set_xlabel("minutes")
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
