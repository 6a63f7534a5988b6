"""Time per training step spent outside forward, backward and the optimizer: building the
batch, padding, logging, agreeing on when to stop, every piece of host work on the step's
path. Measured with torch.profiler on CPU over whole iterations of the real training loop.

    python scripts/bench/step_overhead.py --steps 40 --warmup 10 --threads 2
    python scripts/bench/step_overhead.py --tiny      # a toy corpus and model, in seconds
    # the same measurement of another checkout (e.g. an older commit), by its own script:
    git worktree add --detach ../old COMMIT
    PYTHONPATH=../old/src python ../old/scripts/bench/step_overhead.py --run-dir runs/bench-old

It measures whichever traduire Python imports (its commit is printed). The run directory keeps
the data and tokenizer stages between runs; the model stage starts afresh each time (no
checkpoint is written or resumed, no validation).

A step, in the profile, is one iteration of the training loop: from the start of one
optimizer step's work to the start of the next. Inside it, three labelled ranges: forward
(the model and the loss, Trainer._loss), backward (Tensor.backward) and optimizer
(Trainer._optimizer_step: learning rate, clipping, the update, zeroing the gradients).
Everything else is the overhead this script reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    write_tiny_corpus,
)

import traduire  # noqa: E402
from traduire.config import load_config  # noqa: E402
from traduire.pipeline import run  # noqa: E402
from traduire.training import Trainer  # noqa: E402

RANGES = ("forward", "backward", "optimizer")


def traduire_commit() -> str:
    """The commit of the traduire checkout being measured ('unknown' outside git)."""
    source = Path(traduire.__file__).resolve().parent
    found = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def labelled(name: str, fn):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def instrument(profiler: profile, seen: dict) -> None:
    """Label forward, backward and the optimizer, and mark each step's start for the
    profiler; validation and checkpoints are skipped (they are not per-step work)."""
    train_step = Trainer._train_step

    def step(self, *args, **kwargs):
        seen["precision"] = self.precision
        profiler.step()
        return train_step(self, *args, **kwargs)

    Trainer._train_step = step
    Trainer._loss = labelled("forward", Trainer._loss)
    Trainer._optimizer_step = labelled("optimizer", Trainer._optimizer_step)
    torch.Tensor.backward = labelled("backward", torch.Tensor.backward)
    Trainer._validate = lambda self, *args: False
    Trainer._save = lambda self, *args: None


def per_step(events, steps: int) -> list[dict[str, float]]:
    """Milliseconds of each profiled step: the whole iteration and each labelled range."""
    marks = [e for e in events if e.name.startswith("ProfilerStep")]  # "#N" or "*"
    marks = sorted(marks, key=lambda e: e.time_range.start)[:steps]
    ranges = [e for e in events if e.name in RANGES]
    out = []
    for mark in marks:
        start, end = mark.time_range.start, mark.time_range.end
        row = {"step": (end - start) / 1e3, **dict.fromkeys(RANGES, 0.0)}
        for e in ranges:
            if e.thread == mark.thread and start <= e.time_range.start < end:
                row[e.name] += (e.time_range.end - e.time_range.start) / 1e3
        row["outside"] = row["step"] - sum(row[name] for name in RANGES)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k-en-fr.yaml")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-step-overhead"))
    parser.add_argument("--steps", type=int, default=40, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before profiling")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--tiny", action="store_true", help="a toy corpus and model in a "
                        "temporary run directory, 4 steps after 2: checks that it runs")
    args = parser.parse_args()
    apply_runtime_settings()
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-step-overhead-"))
        args.data = write_tiny_corpus(tiny_dir / "data")
        args.run_dir = tiny_dir / "run"
        args.steps, args.warmup = 4, 2
        args.set = [*TINY_OVERRIDES, *args.set]
    # Two steps past the profiled ones, so that the last profiled step ends where the next
    # begins, before the final step's validation and checkpoint.
    config = load_config(args.config, [
        f"data.dir={args.data}", f"train.threads={args.threads}", "train.progress=false",
        f"train.max_steps={args.warmup + args.steps + 2}",
        "train.valid_every=100000", "train.save_every=100000", "train.log_every=100000",
        *args.set])
    for output in ("checkpoints", "best.pt", "metrics.jsonl"):  # start the model afresh
        path = args.run_dir / output
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    seen: dict = {}
    with profile(activities=[ProfilerActivity.CPU],
                 schedule=schedule(wait=0, warmup=args.warmup, active=args.steps,
                                   repeat=1)) as profiler:
        instrument(profiler, seen)
        run(config, args.run_dir)
    rows = per_step(profiler.events(), args.steps)

    mean = {key: statistics.fmean(r[key] for r in rows) for key in ("step", *RANGES,
                                                                       "outside")}
    result = {"benchmark": "step_overhead", "traduire": traduire_commit(),
              "config": args.config, "batch_tokens": config.train.batch_tokens,
              "precision": seen.get("precision"), "steps": len(rows),
              **{f"{key}_ms": round(value, 2) for key, value in mean.items()},
              "outside_median_ms": round(statistics.median(r["outside"] for r in rows), 2),
              "outside_share": round(mean["outside"] / mean["step"], 4), **machine()}
    print(f"traduire {result['traduire']} | {result['cpu']} | torch {result['torch']}, "
          f"{result['threads']} threads | {result['precision']} | "
          f"{result['batch_tokens']} tokens a step | {len(rows)} profiled steps")
    for key in ("step", *RANGES, "outside"):
        print(f"  {key:<10}{mean[key]:>9.1f} ms  {mean[key] / mean['step']:>6.1%}")
    print(json.dumps(result))
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
