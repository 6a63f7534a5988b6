"""Decoding speed of a trained run on test_2016_flickr: beam 5 and greedy, batches of 1, 16
sentences, and by tokens. Decoding time only (model loaded and warmed up first).

    python scripts/bench/decode_speed.py --run-dir runs/m30k
    python scripts/bench/decode_speed.py --run-dir runs/m30k --beams 5 --batches tokens
    python scripts/bench/decode_speed.py --run-dir runs/m30k --precisions bf16
    python scripts/bench/decode_speed.py --run-dir runs/m30k --engine ctranslate2 \
        --precisions fp32,int8     # after: traduire export --run-dir runs/m30k

Each precision's first pass over the file is timed too ("first_pass_s"): bf16 kernels are
compiled per shape on first use, which a user translating one file pays once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, apply_runtime_settings, machine, peak_rss_mib, print_table  # noqa: E402

from traduire.files import read_text_lines as read_text  # noqa: E402
from traduire.translate import DecodeOptions, Translator  # noqa: E402


def decode_all(translator: Translator, lines: list[str], options: DecodeOptions
               ) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for result in translator.translate_lines(lines, options):
        tokens += len(result.hypotheses[0].tokens) + 1 if result.hypotheses else 0
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--src", type=Path, default=DEFAULT_DATA / "test_2016_flickr.en")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", default="5,1", help="comma-separated beam sizes")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated weight precisions: fp32, bf16 (and int8 with "
                        "--engine ctranslate2)")
    parser.add_argument("--engine", choices=["torch", "ctranslate2"], default="torch")
    parser.add_argument("--engine-dir", type=Path, help="the CTranslate2 export to use "
                        "(default RUN/ctranslate2)")
    parser.add_argument("--batches", default="1,16,tokens",
                        help="comma-separated: sentence counts, or 'tokens'")
    parser.add_argument("--batch-tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--limit-batch1", type=int, default=200,
                        help="sentences for batch size 1 (slow); 0 = all")
    args = parser.parse_args()
    apply_runtime_settings()

    torch.set_num_threads(args.threads)
    lines = read_text(args.src)
    rows = []
    for precision in args.precisions.split(","):
        if args.engine == "torch":
            translator = Translator.load(args.run_dir, args.checkpoint, "cpu", precision)
        else:
            from traduire.export import CTranslate2Translator

            translator = CTranslate2Translator.open(args.run_dir, args.engine_dir,
                                                    precision=precision, threads=args.threads)
        first_pass, _ = decode_all(translator, lines, DecodeOptions(beam=5))
        for beam in (int(b) for b in args.beams.split(",")):
            for batch in args.batches.split(","):
                by_tokens = batch == "tokens"
                size = 0 if by_tokens else int(batch)
                subset = lines[:args.limit_batch1] if size == 1 and args.limit_batch1 else lines
                options = DecodeOptions(beam=beam, batch_size=size,
                                        batch_tokens=args.batch_tokens if by_tokens else 10**9)
                timings = [decode_all(translator, subset, options) for _ in range(args.repeats)]
                seconds = statistics.median(t for t, _ in timings)
                tokens = timings[0][1]
                rows.append({"engine": args.engine, "precision": precision, "beam": beam,
                             "batch": batch, "sentences": len(subset), "seconds": round(seconds, 2),
                             "sentences_per_s": round(len(subset) / seconds, 1),
                             "target_tokens_per_s": round(tokens / seconds, 1),
                             "first_pass_s": round(first_pass, 2)})
    result = {"benchmark": "decode_speed", "run_dir": str(args.run_dir), "rows": rows,
              "peak_rss_mib": peak_rss_mib(), **machine()}
    print(json.dumps(result))
    print_table(rows, ["engine", "precision", "beam", "batch", "sentences", "seconds",
                       "sentences_per_s", "target_tokens_per_s", "first_pass_s"])
    print(f"peak RSS {result['peak_rss_mib']:,.0f} MiB; torch {result['torch']}, "
          f"{result['threads']} threads, {result['cpu']}")


if __name__ == "__main__":
    main()
