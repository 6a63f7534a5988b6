"""Training speed of traduire's whole training loop, measured the way fairseq's is: the target
tokens per second of the log windows after a warm-up, from the run's own metrics.jsonl.

It runs what `traduire train` runs (pipeline.run: the data and tokenizer stages are prepared
once in --run-dir and kept; the model stage starts afresh each time) for --warmup + --steps
steps, logging every --log-every steps, with validation and checkpoints left until after the
last step. A log window holds everything the loop does between two log lines: building and
padding batches, forward, backward, the optimizer, the logging itself. fairseq's wps covers the
same (its target tokens over the wall time since its previous log line), so the two figures
compare like with like. Prints one JSON line of results plus a table.

    python scripts/bench/train_throughput.py --steps 50 --warmup 50 --threads 2
    python scripts/bench/train_throughput.py --precision bf16
    python scripts/bench/train_throughput.py --tiny      # a toy corpus and model, in seconds

bf16 on a CPU needs a long warm-up: oneDNN builds a kernel for each batch shape it meets, and
token-budget batches come in hundreds of shapes (with 10 warm-up steps one round measured a
third of the steady speed). Compare the windows in the output: they should agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    peak_rss_mib,
    spread,
    write_tiny_corpus,
)

from traduire.config import load_config  # noqa: E402
from traduire.monitor import read_metrics  # noqa: E402
from traduire.pipeline import STAGE_OUTPUTS, run  # noqa: E402


def fresh_model_stage(run_dir: Path) -> None:
    """Remove what the model stage wrote, so that training starts at step 1 (the data and
    tokenizer stages are kept: they do not change between measurements)."""
    for name in [*STAGE_OUTPUTS["model"], "stages/model.json"]:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def windows_after(records: list[dict], warmup: int, steps: int, log_every: int) -> list[dict]:
    """The log windows of steps warmup+1 .. warmup+steps, each with its tokens and seconds."""
    wanted = list(range(warmup + log_every, warmup + steps + 1, log_every))
    found = {r["step"]: r for r in records if "tgt_tok_per_s" in r}
    missing = [step for step in wanted if step not in found]
    if missing:
        raise SystemExit(f"metrics.jsonl has no training record at step(s) "
                         f"{', '.join(map(str, missing))}: the run stopped early?")
    return [{"step": step, "tgt_tokens": found[step]["tgt_tokens"],
             "src_tokens": found[step]["src_tokens"],
             "seconds": found[step]["tgt_tokens"] / found[step]["tgt_tok_per_s"]}
            for step in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k-en-fr.yaml")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-train"))
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=50, help="steps before the timed ones")
    parser.add_argument("--log-every", type=int, default=10,
                        help="log window (fairseq's --log-interval in compare.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--tiny", action="store_true", help="a toy corpus and model in a "
                        "temporary run directory, 2 + 4 steps: checks that it runs")
    args = parser.parse_args()
    apply_runtime_settings()

    tiny_dir = None
    overrides = list(args.set)
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-train-throughput-"))
        args.data = write_tiny_corpus(tiny_dir / "data")
        args.run_dir = tiny_dir / "run"
        args.warmup, args.steps, args.log_every = 2, 4, 2
        overrides = [*TINY_OVERRIDES, *overrides]
    if args.warmup % args.log_every or args.steps % args.log_every or args.steps <= 0:
        parser.error("--warmup and --steps must be multiples of --log-every: the figure is "
                     "whole log windows")
    config = load_config(args.config, [
        f"data.dir={args.data}", *overrides, f"train.precision={args.precision}",
        f"train.threads={args.threads}", "train.progress=false",
        f"train.compile={str(args.compile).lower()}",
        f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
        # Validation and checkpoints only once the timed steps are over.
        "train.valid_every=100000000", "train.save_every=100000000", "train.average_last=0"])
    fresh_model_stage(args.run_dir)
    run(config, args.run_dir)
    windows = windows_after(read_metrics(args.run_dir / "metrics.jsonl"), args.warmup,
                            args.steps, args.log_every)
    seconds = sum(w["seconds"] for w in windows)
    tgt = sum(w["tgt_tokens"] for w in windows)
    src = sum(w["src_tokens"] for w in windows)
    rates = [w["tgt_tokens"] / w["seconds"] for w in windows]
    result = {
        "benchmark": "train_throughput", "measured": "whole training loop, log windows",
        "precision": args.precision,
        "threads": args.threads, "compile": args.compile, "warmup": args.warmup,
        "steps": args.steps, "log_every": args.log_every, "seconds": round(seconds, 2),
        "src_tgt_tokens_per_s": round((src + tgt) / seconds, 1),
        "tgt_tokens_per_s": round(tgt / seconds, 1),
        "steps_per_s": round(args.steps / seconds, 3),
        "window_tgt_tokens_per_s": [round(r, 1) for r in rates],
        "window_spread": round(spread(rates), 3),
        "peak_rss_mib": peak_rss_mib(), **machine(),
    }
    print(json.dumps(result))
    print(f"{'source+target tokens/s':<24}{result['src_tgt_tokens_per_s']:>12,.0f}")
    print(f"{'target tokens/s':<24}{result['tgt_tokens_per_s']:>12,.0f}")
    print(f"{'steps/s':<24}{result['steps_per_s']:>12.3f}")
    print(f"{'peak RSS (MiB)':<24}{result['peak_rss_mib']:>12,.0f}")
    print(f"{result['precision']}, steps {args.warmup + 1}-{args.warmup + args.steps} of the "
          f"whole loop; windows of {args.log_every} steps: "
          + " · ".join(f"{r:,.0f}" for r in rates) + " target tok/s")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
