"""Decoding speed of a trained run on test_2016_flickr: beam 5 and greedy, batches of 1, 16
sentences, and by tokens. Decoding time only: the model is loaded before the clock starts.

    python scripts/bench/decode_speed.py --run-dir runs/m30k
    python scripts/bench/decode_speed.py --run-dir runs/m30k --beams 5 --batches tokens
    python scripts/bench/decode_speed.py --run-dir runs/m30k --precisions bf16,int8
    python scripts/bench/decode_speed.py --run-dir runs/m30k --engine ctranslate2 \
        --precisions fp32,int8     # after: traduire export --run-dir runs/m30k
    python scripts/bench/decode_speed.py --tiny     # a toy model trained here, in seconds

--warmup-passes (default 1) untimed passes over the file come first for each precision, so
that the timed runs are steady: bf16 kernels are compiled per shape on first use, which a
user translating one file pays once. Their time is reported too ("first_pass_s"). With
--warmup-passes 0 the first timed run is a cold one, which is how fairseq-generate times
itself (compare.py measures every system so: one batching per process, no warm-up pass).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    TESTS,
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    peak_rss_mib,
    print_table,
    write_tiny_corpus,
)

from traduire.files import read_text_lines as read_text  # noqa: E402
from traduire.translate import DecodeOptions, Translator, load_translator  # noqa: E402


def decode_all(translator: Translator, lines: list[str], options: DecodeOptions
               ) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for result in translator.translate_lines(lines, options):
        tokens += len(result.hypotheses[0].tokens) + 1 if result.hypotheses else 0
    return time.perf_counter() - start, tokens


def _parallel_worker(run_dir: Path, engine: str, engine_dir: Path | None,
                     checkpoint: Path | None, precision: str, threads: int, lines: list[str],
                     options: DecodeOptions, ready: Any, results: Any) -> None:
    """One process of decode_parallel: load the model, wait for the others, translate. A
    spawned process starts with none of the parent's settings: apply them as the parent did."""
    apply_runtime_settings()
    torch.set_num_threads(threads)
    translator = load_translator(run_dir, engine=engine, engine_dir=engine_dir,
                                 checkpoint=checkpoint, device="cpu", precision=precision)
    ready.wait()
    start = time.perf_counter()
    _, tokens = decode_all(translator, lines, options)
    results.put((start, time.perf_counter(), tokens))


def decode_parallel(args: argparse.Namespace, precision: str, lines: list[str],
                    options: DecodeOptions) -> tuple[float, int]:
    """Seconds and target tokens of `args.workers` processes translating a share of `lines`
    each (consecutive, as translate's chunks), `args.threads` threads each: from when every
    process has loaded its model to when the last one is done, as one process's figure is
    timed with its model loaded."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(args.workers), context.Queue()
    share = -(-len(lines) // args.workers)
    processes = [context.Process(target=_parallel_worker, args=(
        args.run_dir, args.engine, args.engine_dir,
        args.checkpoint if args.engine == "torch" else None, precision, args.threads,
        lines[i * share:(i + 1) * share], options, ready, results))
        for i in range(args.workers)]
    for process in processes:
        process.start()
    spans = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return (max(end for _, end, _ in spans) - min(start for start, _, _ in spans),
            sum(tokens for _, _, tokens in spans))


def train_tiny(root: Path, threads: int) -> tuple[Path, Path]:
    """A toy model trained for 100 steps (the --tiny mode's run) and its test_2016 file.
    Fewer steps leave a model that rarely ends a sentence, and beam search then runs to the
    length limit: slow, and unlike a real model's decoding."""
    from traduire.config import load_config
    from traduire.pipeline import run

    data = write_tiny_corpus(root / "data")
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "multi30k-en-fr.yaml",
                         [f"data.dir={data}", *TINY_OVERRIDES, "train.max_steps=100",
                          "train.save_every=100", "train.valid_every=100",
                          "train.progress=false", "train.precision=fp32",
                          f"train.threads={threads}"])
    run(config, root / "run")
    return root / "run", data / f"{TESTS[0]}.en"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--src", type=Path, default=DEFAULT_DATA / f"{TESTS[0]}.en")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", default="5,1", help="comma-separated beam sizes")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated weight precisions: fp32, bf16, int8 (either "
                        "engine)")
    parser.add_argument("--engine", choices=["torch", "ctranslate2"], default="torch")
    parser.add_argument("--engine-dir", type=Path, help="the CTranslate2 export to use "
                        "(default RUN/ctranslate2)")
    parser.add_argument("--batches", default="1,16,tokens",
                        help="comma-separated: sentence counts, or 'tokens'")
    parser.add_argument("--batch-tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--warmup-passes", type=int, default=1,
                        help="untimed passes over the file per precision first (0: cold)")
    parser.add_argument("--limit-batch1", type=int, default=200,
                        help="sentences for batch size 1 (slow); 0 = all")
    parser.add_argument("--workers", type=int, default=1, help="processes translating a "
                        "share of the file each, --threads threads each (a fresh process "
                        "per timed run, timed once all have loaded the model)")
    parser.add_argument("--lines", type=int, default=0, help="the first N lines of --src "
                        "(0: all), repeated as needed to make N")
    parser.add_argument("--tiny", action="store_true", help="train a toy model in a temporary "
                        "directory and time it, beam 5, batches of 16 and by tokens")
    args = parser.parse_args()
    apply_runtime_settings()

    torch.set_num_threads(args.threads)
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-decode-speed-"))
        args.run_dir, args.src = train_tiny(tiny_dir, args.threads)
        args.beams, args.batches, args.repeats = "5", "16,tokens", 1
    elif args.run_dir is None:
        parser.error("--run-dir is required (or --tiny)")
    lines = read_text(args.src)
    if args.lines:
        lines = (lines * -(-args.lines // len(lines)))[:args.lines]
    rows = []
    checkpoint = None
    for precision in args.precisions.split(","):
        translator = load_translator(
            args.run_dir, engine=args.engine, engine_dir=args.engine_dir,
            checkpoint=args.checkpoint if args.engine == "torch" else None, device="cpu",
            precision=precision)
        checkpoint = translator.checkpoint
        first_pass = None
        for _ in range(args.warmup_passes):
            seconds, _ = decode_all(translator, lines, DecodeOptions(beam=5))
            first_pass = seconds if first_pass is None else first_pass
        for beam in (int(b) for b in args.beams.split(",")):
            for batch in args.batches.split(","):
                by_tokens = batch == "tokens"
                size = 0 if by_tokens else int(batch)
                subset = lines[:args.limit_batch1] if size == 1 and args.limit_batch1 else lines
                options = DecodeOptions(beam=beam, batch_size=size,
                                        batch_tokens=args.batch_tokens if by_tokens else 10**9)
                timings = [decode_all(translator, subset, options) if args.workers == 1
                           else decode_parallel(args, precision, subset, options)
                           for _ in range(args.repeats)]
                seconds = statistics.median(t for t, _ in timings)
                tokens = timings[0][1]
                rows.append({"engine": args.engine, "precision": precision,
                             "workers": args.workers, "beam": beam,
                             "batch": batch, "sentences": len(subset), "seconds": round(seconds, 2),
                             "sentences_per_s": round(len(subset) / seconds, 1),
                             "target_tokens_per_s": round(tokens / seconds, 1),
                             "first_pass_s": (round(first_pass, 2) if first_pass is not None
                                              else None)})
    result = {"benchmark": "decode_speed", "run_dir": str(args.run_dir),
              "checkpoint": str(checkpoint), "warmup_passes": args.warmup_passes,
              "rows": rows, "peak_rss_mib": peak_rss_mib(), **machine()}
    print(json.dumps(result))
    print_table(rows, ["engine", "precision", "workers", "beam", "batch", "sentences",
                       "seconds",
                       "sentences_per_s", "target_tokens_per_s", "first_pass_s"])
    print(f"peak RSS {result['peak_rss_mib']:,.0f} MiB; torch {result['torch']}, "
          f"{result['threads']} threads, {result['cpu']}; checkpoint {checkpoint.name}; "
          + (f"{args.warmup_passes} warm-up pass(es) first" if args.warmup_passes
             else "no warm-up pass: the first timed run is cold"))
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
