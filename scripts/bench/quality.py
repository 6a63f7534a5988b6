"""'BLEU in 30 CPU-minutes': train the benchmark config for a wall-clock budget, then score
beam-5 translations of test_2016_flickr and test_2017_flickr with sacreBLEU.

    python scripts/bench/quality.py --run-dir runs/m30k-quality            # 30 minutes
    python scripts/bench/quality.py --budget 30m --set train.warmup_steps=400
    python scripts/bench/quality.py --tiny      # a toy corpus and model for 3 s, then scored

Re-running with the same run directory skips training that is already done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    TESTS,
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    print_table,
    write_tiny_corpus,
)

from traduire.config import load_config  # noqa: E402
from traduire.evaluate import score  # noqa: E402
from traduire.files import read_text_lines as read_text  # noqa: E402
from traduire.pipeline import run  # noqa: E402
from traduire.translate import DecodeOptions, Translator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k-en-fr.yaml")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/m30k-quality"))
    parser.add_argument("--budget", default="30m", help="training wall clock (train.max_time)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", choices=["best", "last"], default="last")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="decoding precision (as traduire translate --precision)")
    parser.add_argument("--tiny", action="store_true", help="a toy corpus and model in a "
                        "temporary run directory, trained for 3 s: checks that it runs")
    args = parser.parse_args()
    apply_runtime_settings()
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-quality-"))
        args.data = write_tiny_corpus(tiny_dir / "data")
        args.run_dir, args.budget = tiny_dir / "run", "3s"
        args.set = [*TINY_OVERRIDES, "train.save_every=20", "train.progress=false", *args.set]

    overrides = [f"train.max_time={args.budget}", f"data.dir={args.data}", *args.set]
    config = load_config(args.config, overrides)
    state = run(config, args.run_dir)
    checkpoint = None
    if args.checkpoint == "last":
        checkpoint = sorted((args.run_dir / "checkpoints").glob("step_*.pt"))[-1]
    translator = Translator.load(args.run_dir, checkpoint, "cpu", args.precision)
    torch.set_num_threads(config.train.threads or torch.get_num_threads())
    rows = []
    for test in TESTS:
        sources = read_text(args.data / f"{test}.en")
        references = read_text(args.data / f"{test}.fr")
        start = time.perf_counter()
        hypotheses = [t.best for t in translator.translate_lines(
            sources, DecodeOptions(beam=args.beam))]
        seconds = time.perf_counter() - start
        scores = score(hypotheses, references)
        rows.append({"test": test, "precision": args.precision, "bleu": scores["bleu"],
                     "chrf": scores["chrf"],
                     "decode_s": round(seconds, 1), "bleu_signature": scores["signature"]["bleu"],
                     "chrf_signature": scores["signature"]["chrf"]})
    result = {"benchmark": "quality", "budget": args.budget, "steps": state.step,
              "epochs": state.epoch, "train_seconds": round(state.elapsed, 1),
              "best_valid_loss": round(state.best_valid_loss, 4),
              "checkpoint": str(translator.checkpoint), "overrides": overrides, "rows": rows,
              **machine()}
    print(json.dumps(result))
    print_table(rows, ["test", "bleu", "chrf", "decode_s"])
    print(f"{state.step} steps, {state.epoch} epochs in {state.elapsed / 60:.1f} min; "
          f"checkpoint {translator.checkpoint.name}; {rows[0]['bleu_signature']}")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
