"""Peak memory of the training loss, forward and backward, above the bf16 logits it is given.

Each form runs in a process of its own, which makes bf16 logits of TOKENS x VOCAB, reads its
peak resident memory (the logits are then the largest thing it holds), computes the loss and
its gradient with respect to the logits, and reads the peak again: the difference is what the
loss needs beyond the logits. Large tensors come from mmap on Linux and go back to the system
when freed, so resident memory follows the tensors alive. Forms:

  fp32_copy  F.cross_entropy(logits.float(), ...), label smoothing 0.1: traduire's loss
             before the sliced form
  sliced     traduire.loss.token_cross_entropy(..., reuse_logits=True), as the training step
             calls it (the gradient written over the logits)
  sliced_new the same with reuse_logits=False (a new tensor for the gradient)

    python scripts/bench/loss_memory.py                    # 25,000 tokens x 32,000 vocabulary
    python scripts/bench/loss_memory.py --forms sliced --tokens 8000
    python scripts/bench/loss_memory.py --tiny             # seconds, for the tests
    python scripts/bench/loss_memory.py --time --tokens 4096 --vocab 8000 --threads 2

--time times the forward and backward of each form instead, in one process, the forms
alternating round after round (the median of --rounds), at the Multi30k model's shape above:
what a CPU training step spends on its loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import cpu_flags, cpu_model, peak_rss_mib

FORMS = ("fp32_copy", "sliced", "sliced_new")
PAD = 0


def measure(form: str, tokens: int, vocab: int, smoothing: float) -> dict[str, object]:
    """Run one form in this process; its figures."""
    from traduire.loss import token_cross_entropy

    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16)
    for start in range(0, tokens, 1024):  # filled in place: no float32 copy along the way
        logits[start:start + 1024].normal_(0.0, 3.0)
    logits.requires_grad_()
    targets = torch.randint(1, vocab, (tokens,))
    targets[::10] = PAD
    before = peak_rss_mib()
    started = time.perf_counter()
    if form == "fp32_copy":
        loss = F.cross_entropy(logits.float(), targets, ignore_index=PAD, reduction="sum",
                               label_smoothing=smoothing)
    else:
        loss = token_cross_entropy(logits[None], targets[None], PAD, smoothing,
                                   reuse_logits=form == "sliced")
    (grad,) = torch.autograd.grad(loss, logits)
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    logits_mib = logits.numel() * logits.element_size() / 2**20
    return {"form": form, "tokens": tokens, "vocab": vocab, "label_smoothing": smoothing,
            "logits_mib": round(logits_mib, 1), "rss_before_mib": before, "peak_mib": peak,
            "above_logits_mib": round(peak - before, 1),
            "above_logits_gb": round((peak - before) * 2**20 / 1e9, 3),
            "grad_is_logits": grad.data_ptr() == logits.data_ptr(),
            "loss": round(loss.item(), 1), "seconds": round(seconds, 2)}


def time_forms(forms: list[str], tokens: int, vocab: int, smoothing: float,
               rounds: int) -> dict[str, float]:
    """Median milliseconds of each form's forward and backward, the forms alternating."""
    import statistics

    from traduire.loss import token_cross_entropy

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(tokens, vocab, generator=gen) * 3).bfloat16()
    targets = torch.randint(1, vocab, (tokens,), generator=gen)
    targets[::10] = PAD
    times: dict[str, list[float]] = {form: [] for form in forms}
    for round_ in range(rounds + 2):  # two warm-up rounds
        for form in forms:
            logits = base.clone().requires_grad_()
            started = time.perf_counter()
            if form == "fp32_copy":
                loss = F.cross_entropy(logits.float(), targets, ignore_index=PAD,
                                       reduction="sum", label_smoothing=smoothing)
            else:
                loss = token_cross_entropy(logits[None], targets[None], PAD, smoothing,
                                           reuse_logits=form == "sliced")
            torch.autograd.grad(loss, logits)
            if round_ >= 2:
                times[form].append((time.perf_counter() - started) * 1000)
    return {form: round(statistics.median(t), 2) for form, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=25_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="2,000 tokens x 4,000 vocabulary")
    parser.add_argument("--time", action="store_true", help="time the forms instead")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.tokens, args.vocab = 2_000, 4_000
    if args.time:
        ms = time_forms(args.forms, args.tokens, args.vocab, args.label_smoothing, args.rounds)
        print(f"forward + backward of the loss, {args.tokens:,} tokens x {args.vocab:,} "
              f"vocabulary, bf16 logits, median of {args.rounds} alternating rounds:")
        for form, value in ms.items():
            print(f"  {form:<11} {value:>9.2f} ms  ({ms[args.forms[0]] / value:.2f}x "
                  f"{args.forms[0]})")
        print(f"{cpu_model()} ({', '.join(cpu_flags())}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(json.dumps({"ms": ms, "tokens": args.tokens, "vocab": args.vocab,
                          "cpu": cpu_model(), "isa": cpu_flags()}))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.label_smoothing)))
        return
    rows = []
    for form in args.forms:
        done = subprocess.run(
            [sys.executable, __file__, "--child", form, "--tokens", str(args.tokens),
             "--vocab", str(args.vocab), "--label-smoothing", str(args.label_smoothing),
             "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"loss_memory: form {form} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.splitlines()[-1]))
    print(f"{args.tokens:,} tokens x {args.vocab:,} vocabulary, bf16 logits "
          f"({rows[0]['logits_mib']:,.0f} MiB), label smoothing {args.label_smoothing}; "
          f"peak resident memory of the loss's forward and backward above the logits:")
    for r in rows:
        print(f"  {r['form']:<11} {r['above_logits_mib']:>9,.0f} MiB ({r['above_logits_gb']} GB)"
              f"  {r['seconds']:>6.2f} s  gradient {'in' if r['grad_is_logits'] else 'beside'} "
              f"the logits")
    print(f"{cpu_model()} ({', '.join(cpu_flags())}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(json.dumps({"rows": rows, "cpu": cpu_model(), "isa": cpu_flags(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
