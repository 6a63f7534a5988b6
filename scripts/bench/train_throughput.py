"""Steady-state training throughput of traduire on the benchmark config.

Prepares the data and tokenizer stages once (in --run-dir), then times optimizer steps after a
warm-up, with a fixed seed, and prints one JSON line of results plus a table.

    python scripts/bench/train_throughput.py --steps 40 --warmup 10 --threads 2
    python scripts/bench/train_throughput.py --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, apply_runtime_settings, machine, peak_rss_mib  # noqa: E402

from traduire.batch import EncodedCorpus, training_steps  # noqa: E402
from traduire.config import load_config, replace  # noqa: E402
from traduire.pipeline import prepare  # noqa: E402
from traduire.tokenizer import Tokenizer  # noqa: E402
from traduire.training import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k-en-fr.yaml")
    parser.add_argument("--run-dir", default="runs/bench-train")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    apply_runtime_settings()

    config = load_config(args.config, [f"data.dir={DEFAULT_DATA}", *args.set])
    config = replace(config, train={"precision": args.precision, "threads": args.threads,
                                    "progress": False})
    run_dir = Path(args.run_dir)
    prepare(config, run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    train = EncodedCorpus(datasets.load_from_disk(str(run_dir / "encoded" / "train")),
                          max_len=config.train.max_len)
    trainer = Trainer(config, run_dir, tokenizer, train, train)
    if args.compile:
        trainer.net = torch.compile(trainer.net)
    steps = training_steps(train, config.train.batch_tokens, config.train.seed, 0, 0, 0, 1,
                           config.train.accumulate, pad=tokenizer.pad_id, bos=tokenizer.bos_id,
                           eos=tokenizer.eos_id)
    src = tgt = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        planned = next(steps)
        loss = trainer._train_step(planned.parts, int(planned.tgt_lengths.sum()))
        if i >= args.warmup:
            src += planned.src_lengths.sum()
            tgt += planned.tgt_lengths.sum()
    loss.item()  # the last step has finished (a GPU computes asynchronously)
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "train_throughput", "precision": args.precision, "threads": args.threads,
        "compile": args.compile, "steps": args.steps, "seconds": round(seconds, 2),
        "src_tgt_tokens_per_s": round((src + tgt) / seconds, 1),
        "tgt_tokens_per_s": round(tgt / seconds, 1),
        "steps_per_s": round(args.steps / seconds, 3),
        "peak_rss_mib": peak_rss_mib(), **machine(),
    }
    print(json.dumps(result))
    print(f"{'source+target tokens/s':<24}{result['src_tgt_tokens_per_s']:>12,.0f}")
    print(f"{'target tokens/s':<24}{result['tgt_tokens_per_s']:>12,.0f}")
    print(f"{'steps/s':<24}{result['steps_per_s']:>12.3f}")
    print(f"{'peak RSS (MiB)':<24}{result['peak_rss_mib']:>12,.0f}")


if __name__ == "__main__":
    main()
