"""How long a prepared run takes to start training: from loading the encoded corpus to the end
of the first optimizer step, in parts, as `traduire train` does them.

    traduire prepare -c configs/multi30k-en-fr.yaml -r RUN --set data.dir=CORPUS   # once
    python scripts/bench/first_step.py --run-dir RUN --set train.threads=2
    python scripts/bench/first_step.py --tiny      # a toy corpus prepared here, in seconds

The parts: open the encoded splits (pipeline.open_encoded: map the ids, read the lengths),
build the model and optimizer (Trainer), plan the first epoch's batches
(token_batches, timed alone, then again as training plans them with the first batch), the
first step, and a second batch and step for comparison. Nothing is written into RUN: the
trainer's outputs go to a temporary directory. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    peak_rss_mib,
    print_table,
    write_tiny_corpus,
)

from traduire.batch import StepPlan, token_batches, training_steps  # noqa: E402
from traduire.config import load_config  # noqa: E402
from traduire.pipeline import open_encoded  # noqa: E402
from traduire.tokenizer import Tokenizer  # noqa: E402
from traduire.training import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path,
                        help="a run directory that `traduire prepare` has filled")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--tiny", action="store_true", help="prepare a toy corpus for a toy "
                        "model in a temporary run directory first: checks that it runs")
    args = parser.parse_args()
    apply_runtime_settings()
    tiny_dir = None
    if args.tiny:
        from traduire.pipeline import prepare

        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-first-step-"))
        args.run_dir = tiny_dir / "run"
        prepare(Path(__file__).resolve().parents[2] / "configs" / "multi30k-en-fr.yaml",
                args.run_dir, [f"data.dir={write_tiny_corpus(tiny_dir / 'data')}",
                               *TINY_OVERRIDES, "train.precision=fp32"])
    elif args.run_dir is None:
        parser.error("--run-dir is required (or --tiny)")
    config = load_config(args.run_dir / "config.yaml", ["train.progress=false", *args.set])
    seconds: dict[str, float] = {}
    last = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[part] = round(now - last, 3)
        last = now

    tokenizer = Tokenizer.load(args.run_dir / "tokenizer")
    train_data = open_encoded(args.run_dir, "train", max_len=min(config.train.max_len,
                                                                 config.model.max_positions))
    valid_data = open_encoded(args.run_dir, "valid", max_len=config.model.max_positions)
    lap("open_encoded")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, Path(out), tokenizer, train_data, valid_data)
        lap("build_model")
        plan = token_batches(train_data.src_lens, train_data.tgt_lens, train_data.usable,
                             config.train.batch_tokens, config.train.seed, 0)
        lap("token_batches")
        tok = tokenizer
        steps = training_steps(train_data, StepPlan(
            batch_tokens=config.train.batch_tokens, seed=config.train.seed, pad=tok.pad_id,
            bos=tok.bos_id, eos=tok.eos_id, accumulate=config.train.accumulate))
        planned = next(steps)  # plans the epoch again (as training does), then the first batch
        lap("plan_and_first_batch")
        trainer._train_step(planned.parts, planned.tgt_lengths.sum())
        lap("first_step")
        # For comparison: the first step pays one-time costs (kernel selection, allocation)
        # that do not depend on the corpus; the second shows a step's usual time.
        planned = next(steps)
        lap("second_batch")
        trainer._train_step(planned.parts, planned.tgt_lengths.sum())
        lap("second_step")
    after_model = round(seconds["plan_and_first_batch"] + seconds["first_step"], 3)
    result = {"benchmark": "first_step", "train_pairs": len(train_data.src_lens),
              "usable": len(train_data),
              "batches_in_epoch": len(plan), "seconds": seconds,
              "model_built_to_first_step_end_s": after_model,
              "peak_rss_mib": peak_rss_mib(), "run_dir": str(args.run_dir), **machine()}
    print(json.dumps(result))
    print_table([{"part": part, "seconds": s} for part, s in seconds.items()],
                ["part", "seconds"])
    print(f"model built -> end of first step (as training does it): {after_model} s")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
