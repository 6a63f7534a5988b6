"""Does the model's confidence predict translation quality?

Translates a test set with per-sentence confidence (as `traduire translate --format jsonl`
reports it), scores every translation with sentence-level chrF (sacreBLEU), and prints the mean
chrF of the least confident tenth of the sentences against the rest, with Spearman's rank
correlation between confidence and chrF (computed here with numpy, ties given their mean rank).

    python scripts/confidence_vs_chrf.py RUN_DIR \\
        ../shared/data/multi30k-en-fr/test_2016_flickr.en \\
        ../shared/data/multi30k-en-fr/test_2016_flickr.fr

Confidence is `mean_logprob` (mean token log-probability of the best translation) unless
--signal low_attention_share is given (then *fewer* neglected source words = more confident).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    result = np.empty(len(values), dtype=float)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        result[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks; nan when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def compare(confidences: list[float], chrfs: list[float]) -> dict[str, float]:
    """Mean chrF of the lowest-confidence decile (at least one sentence) and of the rest."""
    conf, chrf = np.asarray(confidences, dtype=float), np.asarray(chrfs, dtype=float)
    n_low = max(1, len(conf) // 10)
    order = np.argsort(conf, kind="stable")
    low, rest = chrf[order[:n_low]], chrf[order[n_low:]]
    return {"sentences": len(conf), "low_decile": n_low,
            "chrf_low_decile": float(low.mean()),
            "chrf_rest": float(rest.mean()) if len(rest) else float("nan"),
            "spearman": spearman(conf, chrf)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("src", type=Path, help="source sentences, one per line")
    parser.add_argument("ref", type=Path, help="reference translations, aligned with src")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="only the first N lines (0: all)")
    parser.add_argument("--signal", choices=["mean_logprob", "low_attention_share"],
                        default="mean_logprob")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from traduire.evaluate import sentence_chrf
    from traduire.files import check_line_counts
    from traduire.files import read_text_lines as read_text
    from traduire.translate import DecodeOptions, Translator

    sources, references = read_text(args.src), read_text(args.ref)
    check_line_counts(args.src, len(sources), args.ref, len(references),
                      "sources and references must be line-aligned")
    if args.limit:
        sources, references = sources[:args.limit], references[:args.limit]
    translator = Translator.load(args.run_dir, device=args.device)
    options = DecodeOptions(beam=args.beam, confidence=True)
    confidences, chrfs = [], []
    for result, reference in zip(translator.translate_lines(sources, options), references):
        if result.confidence is None:  # an empty source line: nothing to judge
            continue
        value = result.confidence[args.signal]
        confidences.append(-value if args.signal == "low_attention_share" else value)
        chrfs.append(sentence_chrf(result.best, reference))
    if not chrfs:
        sys.exit("no non-empty source lines")
    summary = compare(confidences, chrfs)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['sentences']} sentences, confidence = {args.signal}")
        print(f"mean chrF, least confident {summary['low_decile']}: "
              f"{summary['chrf_low_decile']:.2f}")
        print(f"mean chrF, the rest: {summary['chrf_rest']:.2f}")
        print(f"Spearman rank correlation (confidence, chrF): {summary['spearman']:.3f}")
    return summary


if __name__ == "__main__":
    main()
