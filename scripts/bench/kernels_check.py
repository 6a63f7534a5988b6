"""Does each speed path of traduire.kernels win on this CPU? Times every path against the plain
form it replaces, alternately (medians of --repeats), at the Multi30k model's shapes.

    python scripts/bench/kernels_check.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python scripts/bench/kernels_check.py      # roughly a CPU without AVX-512 or bf16

  attention, training    explicit (two matrix products and a softmax) vs torch's fused
                         scaled_dot_product_attention, forward and backward, 290 sentences
                         of 20 tokens, 4 heads of 64 (self-attention, padded; causal)
  attention, decoding    a step of 64 sentences x beam 5: self-attention (one query per row,
                         20 cached keys) and cross-attention (5 queries per sentence)
  dropout                kernels.dropout vs torch's, forward and backward, 4096 x 1024
  top-k                  kernels.top_per_row vs topk, k = 10 of 8,000, 320 rows

A ratio above 1 means traduire's path is faster here. Prints one JSON line and a table.
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
from common import machine, print_table  # noqa: E402

from traduire.kernels import (  # noqa: E402
    configure_runtime,
    cpu_features,
    dropout,
    explicit_attention,
    native_bf16,
    top_per_row,
)


def seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, ours: Callable[[], object], plain: Callable[[], object],
            repeats: int) -> dict[str, object]:
    """Median milliseconds of both, measured alternately after a warm-up of each."""
    ours(), plain()
    a, b = [], []
    for _ in range(repeats):
        a += seconds(ours, 1)
        b += seconds(plain, 1)
    ours_ms, plain_ms = statistics.median(a) * 1e3, statistics.median(b) * 1e3
    return {"path": name, "traduire_ms": round(ours_ms, 3), "plain_ms": round(plain_ms, 3),
            "speed-up": round(plain_ms / ours_ms, 2)}


def attention_training(dtype: torch.dtype, causal: bool):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(290, 4, 20, 64, generator=gen, dtype=dtype, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(290, 1, 1, 20, dtype=torch.bool)
    mask[::3, ..., 15:] = False
    if causal:
        mask = mask & torch.ones(20, 20, dtype=torch.bool).tril()

    def explicit():
        out, _ = explicit_attention(q, k, v, mask)
        out.sum().backward()

    def fused():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()

    return explicit, fused


def attention_decoding(dtype: torch.dtype, cross: bool):
    """A decoding step of 64 sentences x beam 5: self-attention, one query per row against
    its 20 cached keys; cross-attention, a sentence's 5 queries together against its 20
    source positions (the model's grouped form)."""
    gen = torch.Generator().manual_seed(1)
    rows, queries = (64, 5) if cross else (320, 1)
    q = torch.randn(rows, 4, queries, 64, generator=gen, dtype=dtype)
    k, v = (torch.randn(rows, 4, 20, 64, generator=gen, dtype=dtype) for _ in range(2))

    @torch.inference_mode()
    def explicit():
        explicit_attention(q, k, v)

    @torch.inference_mode()
    def fused():
        F.scaled_dot_product_attention(q, k, v)

    return explicit, fused


def dropouts(dtype: torch.dtype):
    x = torch.randn(4096, 1024, dtype=dtype, requires_grad=True)

    def ours():
        dropout(x, 0.1, True).sum().backward()

    def plain():
        F.dropout(x, 0.1, training=True).sum().backward()

    return ours, plain


def top_k():
    scores = torch.randn(320, 8000, generator=torch.Generator().manual_seed(2))
    return (lambda: top_per_row(scores, 10)), (lambda: scores.topk(10, dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    configure_runtime()
    torch.set_num_threads(args.threads)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device("cpu")) else [])
    rows = []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for causal in (False, True):
            rows.append(compare(f"attention training {name}{' causal' if causal else ''}",
                                *attention_training(dtype, causal), args.repeats))
        for cross in (False, True):
            rows.append(compare(f"attention decoding {name} {'cross' if cross else 'self'}",
                                *attention_decoding(dtype, cross), args.repeats))
        rows.append(compare(f"dropout {name}", *dropouts(dtype), args.repeats))
    rows.append(compare("top-k of 8,000", *top_k(), args.repeats))
    result = {"benchmark": "kernels_check", "features": cpu_features(), "rows": rows,
              **machine()}
    print(json.dumps(result))
    print_table(rows, ["path", "traduire_ms", "plain_ms", "speed-up"])
    print(f"{result['cpu']}; as torch sees it: {result['features']}; torch {result['torch']}, "
          f"{result['threads']} threads")


if __name__ == "__main__":
    main()
