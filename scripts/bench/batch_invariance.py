"""Whether a sentence's translation depends on what it is batched with: test_2016_flickr, beam
5, translated alone (batch 1), in batches of 16 and 64 sentences, in batches of 4,000 tokens,
and shuffled (batches of 64 after a seeded shuffle); per precision, the share of lines whose
translation is the same as alone, and the share the same in every batching.

    python scripts/bench/batch_invariance.py --run-dir runs/m30k
    python scripts/bench/batch_invariance.py --run-dir runs/m30k --precisions fp32 --limit 200
    python scripts/bench/batch_invariance.py --tiny     # a toy model trained here, in seconds

Not a speed figure: it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, TESTS, apply_runtime_settings, machine, print_table  # noqa: E402
from decode_speed import train_tiny  # noqa: E402

from traduire.files import read_text_lines  # noqa: E402
from traduire.translate import DecodeOptions, Translator  # noqa: E402

BATCHINGS = {"1": dict(batch_size=1), "16": dict(batch_size=16), "64": dict(batch_size=64),
             "4000 tokens": dict(batch_tokens=4000)}


def translations(translator: Translator, lines: list[str], seed: int) -> dict[str, list[str]]:
    """Each batching's best translations, in input order."""
    out = {name: [r.best for r in translator.translate_lines(
        lines, DecodeOptions(beam=5, **({"batch_tokens": 10**9} | batching)))]
        for name, batching in BATCHINGS.items()}
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    shuffled = [r.best for r in translator.translate_lines(
        [lines[i] for i in order], DecodeOptions(beam=5, batch_size=64, batch_tokens=10**9))]
    back = [""] * len(lines)
    for position, i in enumerate(order):
        back[i] = shuffled[position]
    out["64 shuffled"] = back
    return out


def shares(outputs: dict[str, list[str]]) -> dict[str, float]:
    """Per batching, the share of lines translated as alone; and in every batching alike."""
    alone = outputs["1"]
    n = len(alone)
    result = {f"same as alone, {name}": round(sum(a == b for a, b in zip(o, alone)) / n, 4)
              for name, o in outputs.items() if name != "1"}
    result["same in all"] = round(sum(len(set(line)) == 1 for line in zip(*outputs.values()))
                                  / n, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--src", type=Path, default=DEFAULT_DATA / f"{TESTS[0]}.en")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N lines only (0: all)")
    parser.add_argument("--seed", type=int, default=1, help="of the shuffle")
    parser.add_argument("--tiny", action="store_true", help="train a toy model in a temporary "
                        "directory and check it, fp32")
    args = parser.parse_args()
    apply_runtime_settings()
    torch.set_num_threads(args.threads)
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-batch-invariance-"))
        args.run_dir, args.src = train_tiny(tiny_dir, args.threads)
        args.precisions = "fp32"
    elif args.run_dir is None:
        parser.error("--run-dir is required (or --tiny)")
    lines = read_text_lines(args.src)
    lines = lines[:args.limit] if args.limit else lines
    rows = []
    for precision in args.precisions.split(","):
        translator = Translator.load(args.run_dir, device="cpu", precision=precision)
        rows.append({"precision": precision, "sentences": len(lines),
                     **shares(translations(translator, lines, args.seed))})
    result = {"benchmark": "batch_invariance", "run_dir": str(args.run_dir), "beam": 5,
              "rows": rows, **machine()}
    print(json.dumps(result))
    print_table(rows, list(rows[0]))
    print(f"torch {result['torch']}, {result['threads']} threads, {result['cpu']}")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
