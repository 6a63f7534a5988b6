"""Does each speed path of traduire.kernels win on this CPU? Times every path against the plain
form it replaces, alternately (medians of --repeats), at the Multi30k model's shapes, and says
which of the two traduire runs in that case.

    python scripts/bench/kernels_check.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python scripts/bench/kernels_check.py      # roughly a CPU without AVX-512 or bf16
    python scripts/bench/kernels_check.py --tiny  # small shapes, 2 repeats: checks that it runs

  attention, training    the explicit form (model.attention: two matrix products and a
                         softmax) and torch's fused kernel (kernels.fused_attention), forward
                         and backward, 290 sentences of 20 tokens, 4 heads of 64: padded
                         (encoder self-attention, cross-attention) and causal (decoder
                         self-attention: a mask for the explicit form, the kernel's own flag
                         for the fused one, as the model calls them)
  attention, decoding    a step of 64 sentences x beam 5: self-attention (one query per row,
                         20 cached keys) and cross-attention (5 queries per sentence)
  dropout                kernels.dropout vs torch's, forward and backward, 4096 x 1024
  top-k                  kernels.top_per_row vs topk, k = 10 of 8,000, 320 rows

For attention, traduire runs the fused kernel where kernels.fused_attention_wins says so (asked
here with each case's own queries); "choice_speed_up" is the other form's time over the time
of the one traduire runs: above 1, traduire's choice is the faster one on this CPU. Dropout and
top-k always run traduire's path on a CPU. Prints one JSON line and two tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_runtime_settings, machine, print_table  # noqa: E402

from traduire.device import cpu_features, native_bf16  # noqa: E402
from traduire.kernels import (  # noqa: E402
    dropout,
    fused_attention,
    fused_attention_wins,
    top_per_row,
)
from traduire.model import attention as explicit_attention  # noqa: E402
from traduire.model import causal_mask  # noqa: E402

# Sentences in a training batch, sentences decoded at once (x beam 5), dropout rows, top-k rows.
FULL = {"sentences": 290, "decoded": 64, "dropout_rows": 4096, "topk_rows": 320}
TINY = {"sentences": 16, "decoded": 4, "dropout_rows": 64, "topk_rows": 32}


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(forms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each form, measured alternately after a warm-up of each."""
    for fn in forms.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def row(path: str, forms: dict[str, Callable[[], object]], runs: str, repeats: int
        ) -> dict[str, object]:
    """The timings of every form (as NAME_ms), which one traduire runs, and how much faster
    that one is than the other."""
    ms = timed(forms, repeats)
    other = next(name for name in forms if name != runs)
    return {"path": path, **{f"{name}_ms": round(t, 3) for name, t in ms.items()},
            "traduire_runs": runs, "choice_speed_up": round(ms[other] / ms[runs], 2)}


def attention_training(dtype: torch.dtype, causal: bool, sentences: int):
    """Forward and backward of both forms, and the queries traduire decides by."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sentences, 4, 20, 64, generator=gen, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    if causal:  # decoder self-attention: no padding mask, causality only
        mask, flag = causal_mask(20, 20, q.device), True
        fused_mask = None
    else:  # padded sources: a third of the sentences are 15 tokens long
        mask = torch.ones(sentences, 1, 1, 20, dtype=torch.bool)
        mask[::3, ..., 15:] = False
        fused_mask, flag = mask, False

    def explicit():
        out, _ = explicit_attention(q, k, v, mask)
        out.sum().backward()

    def fused():
        fused_attention(q, k, v, fused_mask, flag, 0.0).sum().backward()

    return {"explicit": explicit, "fused": fused}, q


def attention_decoding(dtype: torch.dtype, cross: bool, decoded: int):
    """A decoding step of `decoded` sentences x beam 5: self-attention, one query per row
    against its 20 cached keys; cross-attention, a sentence's 5 queries together against its
    20 source positions (the model's grouped form)."""
    gen = torch.Generator().manual_seed(1)
    rows, queries = (decoded, 5) if cross else (decoded * 5, 1)
    q = torch.randn(rows, 4, queries, 64, generator=gen, dtype=dtype)
    k, v = (torch.randn(rows, 4, 20, 64, generator=gen, dtype=dtype) for _ in range(2))

    @torch.inference_mode()
    def explicit():
        explicit_attention(q, k, v)

    @torch.inference_mode()
    def fused():
        fused_attention(q, k, v, None, False, 0.0)

    return {"explicit": explicit, "fused": fused}, q


def picks(q: torch.Tensor, grad: bool) -> str:
    """Which form traduire's model runs for these queries (kernels.fused_attention_wins)."""
    with torch.set_grad_enabled(grad):
        return "fused" if fused_attention_wins(q) else "explicit"


def dropouts(dtype: torch.dtype, rows: int):
    x = torch.randn(rows, 1024, dtype=dtype, requires_grad=True)

    def ours():
        dropout(x, 0.1, True).sum().backward()

    def plain():
        F.dropout(x, 0.1, training=True).sum().backward()

    return {"kernels.dropout": ours, "F.dropout": plain}


def top_k(rows: int):
    scores = torch.randn(rows, 8000, generator=torch.Generator().manual_seed(2))
    return {"top_per_row": lambda: top_per_row(scores, 10),
            "topk": lambda: scores.topk(10, dim=1)}


def shown(r: dict[str, object]) -> dict[str, object]:
    """A row for the table: milliseconds to the microsecond, speed-ups to two decimals (the
    table's own format keeps one)."""
    return {key: (f"{value:.3f}" if key.endswith("_ms") else f"{value:.2f}")
            if isinstance(value, float) else value for key, value in r.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="small shapes and 2 repeats")
    args = parser.parse_args()
    apply_runtime_settings()
    torch.set_num_threads(args.threads)
    shapes = TINY if args.tiny else FULL
    repeats = 2 if args.tiny else args.repeats
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device("cpu")) else [])
    attention_rows, other_rows = [], []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for causal in (False, True):
            forms, q = attention_training(dtype, causal, shapes["sentences"])
            attention_rows.append(row(f"attention training {name}{' causal' if causal else ''}",
                                      forms, picks(q, grad=True), repeats))
        for cross in (False, True):
            forms, q = attention_decoding(dtype, cross, shapes["decoded"])
            attention_rows.append(row(f"attention decoding {name} "
                                      f"{'cross' if cross else 'self'}",
                                      forms, picks(q, grad=False), repeats))
        other_rows.append(row(f"dropout {name}", dropouts(dtype, shapes["dropout_rows"]),
                              "kernels.dropout", repeats))
    other_rows.append(row("top-k of 8,000", top_k(shapes["topk_rows"]), "top_per_row", repeats))
    result = {"benchmark": "kernels_check", "tiny": args.tiny, "features": cpu_features(),
              "rows": attention_rows + other_rows, **machine()}
    print(json.dumps(result))
    print_table([shown(r) for r in attention_rows],
                ["path", "explicit_ms", "fused_ms", "traduire_runs", "choice_speed_up"])
    print()
    # Each of these paths has forms of its own names: one table row names both.
    print_table([shown({**r, "traduire_ms": r[f"{r['traduire_runs']}_ms"], "plain": plain,
                  "plain_ms": r[f"{plain}_ms"]}) for r in other_rows
                 for plain in [next(key.removesuffix("_ms") for key in r
                                    if key.endswith("_ms") and not key.startswith(
                                        r["traduire_runs"]))]],
                ["path", "traduire_runs", "traduire_ms", "plain", "plain_ms",
                 "choice_speed_up"])
    print(f"{result['cpu']} ({', '.join(result['isa']) or 'no AVX2'}); as torch sees it: "
          f"{result['features']}; torch {result['torch']}, {result['threads']} threads")


if __name__ == "__main__":
    main()
