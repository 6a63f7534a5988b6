"""The host's work per training step, counted: the aten operator calls of one step of the
Multi30k model (configs/multi30k-en-fr.yaml, bf16 autocast), eager against train.compile,
counted with torch.profiler on the CPU.

A GPU step is bound by the host when it issues more operator calls than the GPU has arithmetic
to hide them behind, so the count is what matters there, and a CPU can count it. The step runs
the GPU's code path: torch's fused attention (SDPA) and torch's dropout, as on a GPU (on a CPU
traduire picks other forms where they measured faster). Steps are Trainer._train_step on a
synthetic corpus (scripts/gpu_bench.py's), each of its own batch shape, after warm-up steps
(which, compiled, compile the model: minutes on a small CPU).

    python scripts/bench/aten_calls.py                 # eager and compiled (inductor)
    python scripts/bench/aten_calls.py --modes eager
    python scripts/bench/aten_calls.py --tiny          # a tiny model, compiled through aot_eager

Counts: `aten` every aten:: event of the step (an operator and the operators it calls);
`top` only those not inside another aten:: event (what Python, or a compiled graph, called).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_flags, cpu_model  # noqa: E402
from gpu_bench import BOS, EOS, PAD, Shapes, model_config, stub_tokenizer, synthetic_corpus  # noqa: E402,I001

from traduire import kernels  # noqa: E402
from traduire.batch import StepPlan, rounded_steps, training_steps  # noqa: E402


def gpu_code_path() -> None:
    """The forms a GPU step runs: fused attention everywhere, torch's dropout."""
    kernels.fused_attention_wins = lambda q: True
    kernels.dropout = lambda x, p, training: F.dropout(x, p, training) if p else x


def count(mode: str, args: argparse.Namespace) -> dict[str, object]:
    from traduire.training import Trainer

    compiled = mode == "compiled"
    shapes = Shapes(["multi30k"], [args.batch_tokens], [mode], 0, 0, 0, 0, args.tiny)
    config, vocab = model_config("multi30k", shapes, "cpu", compiled, args.batch_tokens)
    steps = args.warmup + args.steps
    data = synthetic_corpus("multi30k", vocab, args.batch_tokens * (steps + 2))
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), stub_tokenizer(vocab), data, data)
        stream = training_steps(data, StepPlan(batch_tokens=args.batch_tokens, seed=1, pad=PAD,
                                               bos=BOS, eos=EOS))
        if compiled:
            stream = rounded_steps(stream, config.train.compile_multiple, PAD)
        planned = [next(stream) for _ in range(steps)]
        for step in planned[:args.warmup]:
            trainer._train_step(step.parts, int(step.tgt_lengths.sum()))
        per_step = []
        for step in planned[args.warmup:]:
            graphs = _graphs_compiled()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer._train_step(step.parts, int(step.tgt_lengths.sum()))
            per_step.append({**aten_counts(prof.events()),
                             "compilations": _graphs_compiled() - graphs})
    # The median step: a step that compiled again (a batch shape breaking a guard of the
    # first compilation) counts the compiler's own calls, and is reported apart.
    return {"mode": mode, "steps": len(per_step),
            **{key: round(statistics.median(c[key] for c in per_step))
               for key in ("aten", "top", "casts")},
            "compilations": sum(c["compilations"] for c in per_step), "per_step": per_step}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def aten_counts(events) -> dict[str, int]:
    aten = [e for e in events if e.name.startswith("aten::")]
    spans = sorted((e.time_range.start, e.time_range.end) for e in aten)
    top, covered_until = 0, -1.0
    for start, end in spans:  # an event starting inside an earlier one is nested in it
        if start >= covered_until:
            top += 1
            covered_until = end
    casts = sum(1 for e in aten if e.name in ("aten::_to_copy",))
    return {"aten": len(aten), "top": top, "casts": casts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        default=["eager", "compiled"])
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model, 256 tokens a step, compiled through aot_eager")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.batch_tokens, args.warmup, args.steps = 256, 1, 2
        compile_ = torch.compile
        torch.compile = lambda model, **kw: compile_(model, backend="aot_eager", **kw)
    gpu_code_path()
    rows = [count(mode, args) for mode in args.modes]
    print(f"aten calls per training step of the Multi30k model{' (tiny)' if args.tiny else ''}, "
          f"bf16 autocast, {args.batch_tokens} batch tokens, the GPU's code path, median of "
          f"{args.steps} steps after {args.warmup}:")
    for r in rows:
        print(f"  {r['mode']:<9} aten {r['aten']:>6,}   top-level {r['top']:>6,}   "
              f"casts {r['casts']:>5,}   compilations during the counted steps "
              f"{r['compilations']}")
    if len(rows) == 2:
        print(f"  compiled / eager: {rows[1]['aten'] / rows[0]['aten']:.3f} of the aten calls, "
              f"{rows[1]['top'] / rows[0]['top']:.3f} of the top-level ones")
    print(f"{cpu_model()} ({', '.join(cpu_flags())}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(json.dumps({"rows": rows, "batch_tokens": args.batch_tokens, "tiny": args.tiny,
                      "cpu": cpu_model(), "isa": cpu_flags(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
