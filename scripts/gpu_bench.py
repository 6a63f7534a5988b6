"""traduire's training on one GPU, in one call: Transformer-base and Transformer-big (a 32k joint
vocabulary) and the Multi30k model, bf16, at several target-token budgets per step, eager and
compiled (train.compile), on a synthetic corpus made here (no download, no tokenizer).

    python scripts/gpu_bench.py                       # every part, about 8 minutes on an H200
    python scripts/gpu_bench.py --part training --models big --tokens 16384
    python scripts/gpu_bench.py --dry-run             # tiny shapes on the CPU, in seconds

Parts (--part, default all):
  training  one row per (model, target tokens per step, eager|compiled): target tokens/s, MFU
            (monitor.ModelFlops over the GPU's peak, monitor.PEAK_FLOPS), peak memory, step
            time, compilations; steps are traduire's own (Trainer._train_step: the forward
            pass under autocast, the sliced loss, backward, the fused Adam update)
  loss      peak memory of the loss's forward and backward above bf16 logits of 25,000 tokens x
            32,000 (what the step feeds it), the sliced loss against F.cross_entropy of the
            logits in fp32
  decoding  beam 5 on 3,000 synthetic sentences of WMT length, Transformer-base and -big:
            traduire bf16 against CTranslate2 (bfloat16, float16, int8_float16) on the same
            GPU with traduire's export of the same weights; sentences/s and target tokens/s
  attention encoder self-attention of Transformer-base, forward and backward through SDPA, with
            the padding as traduire's additive mask, as a boolean mask (traduire's earlier
            form) and, for scale, without padding at all (the flash kernel's case)

Every row's figures are printed as a table and the whole as the last line of stdout, in JSON.
Rows that do not fit the time budget (--budget-s) are listed as skipped, not run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from traduire.batch import StepPlan, rounded_steps, training_steps  # noqa: E402
from traduire.config import load_config, replace  # noqa: E402
from traduire.loss import token_cross_entropy  # noqa: E402
from traduire.monitor import ModelFlops, peak_flops  # noqa: E402

MODELS = {"base": ROOT / "configs" / "wmt14-en-fr-base.yaml",
          "big": ROOT / "configs" / "wmt14-en-fr-big.yaml",
          "multi30k": ROOT / "configs" / "multi30k-en-fr.yaml"}
# Sentence lengths of the synthetic corpora (tokens, log-normal): WMT14 en-fr after a 32k
# SentencePiece model has a median near 27 and a long tail; Multi30k's captions near 13.
LENGTHS = {"base": (27, 0.55), "big": (27, 0.55), "multi30k": (13, 0.35)}
PAD, UNK, BOS, EOS = 0, 1, 2, 3


@dataclass
class Shapes:
    """What a run measures: the GPU's, or the dry run's tiny stand-ins on the CPU."""

    models: list[str]
    tokens: list[int]
    modes: list[str]
    warmup: int
    steps: int
    loss_tokens: int
    loss_vocab: int
    dry_run: bool


def synthetic_corpus(model: str, vocab: int, tokens: int, seed: int = 0):
    """Enough random sentence pairs for `tokens` target tokens, lengths as in LENGTHS."""
    import datasets

    from traduire.batch import EncodedCorpus

    median, sigma = LENGTHS[model]
    rng = np.random.default_rng(seed)
    count = max(64, int(tokens / median * 1.3))
    src_len = np.clip(rng.lognormal(math.log(median), sigma, count), 1, 250).astype(np.int64)
    tgt_len = np.clip(src_len * rng.uniform(0.8, 1.3, count), 1, 250).astype(np.int64)
    ids = [rng.integers(4, vocab, n).tolist() for n in np.concatenate([src_len, tgt_len])]
    return EncodedCorpus(datasets.Dataset.from_dict({
        "src_ids": ids[:count], "tgt_ids": ids[count:], "src_len": src_len.tolist(),
        "tgt_len": tgt_len.tolist()}))


def stub_tokenizer(vocab: int) -> SimpleNamespace:
    """What the trainer asks of a tokenizer, for a vocabulary of `vocab` ids."""
    return SimpleNamespace(src_vocab_size=vocab, tgt_vocab_size=vocab, pad_id=PAD, unk_id=UNK,
                           bos_id=BOS, eos_id=EOS, fingerprint=lambda: f"synthetic-{vocab}")


def model_config(model: str, shapes: Shapes, device: str, compiled: bool, batch_tokens: int):
    config = load_config(MODELS[model])
    model_keys: dict[str, Any] = {}
    vocab = config.tokenizer.vocab_size
    if shapes.dry_run:
        model_keys = {"layers": 1, "encoder_layers": None, "decoder_layers": None,
                      "d_model": 32, "heads": 2, "ffn_dim": 64}
        vocab = 96
    train = {"batch_tokens": batch_tokens, "precision": "bf16", "compile": compiled,
             "device": device, "max_time": None, "max_steps": 0, "log_every": 10**9,
             "valid_every": 10**9, "save_every": 10**9, "progress": False, "threads": 0,
             "average_last": 0, "init_from": None}
    return replace(config, model=model_keys, train=train), vocab


def trainer_for(model: str, mode: str, shapes: Shapes, device: torch.device,
                trainers: dict) -> SimpleNamespace:
    """The trainer of (model, mode), made at its first row and kept for its other budgets: a
    compiled model is compiled once, and a row that compiled again would show it."""
    from traduire.training import Trainer

    if (model, mode) not in trainers:
        config, vocab = model_config(model, shapes, device.type, mode == "compiled",
                                     max(shapes.tokens))
        tokens = max([*shapes.tokens, 4096]) * (shapes.warmup + shapes.steps + 2)
        data = synthetic_corpus(model, vocab, tokens)
        run_dir = tempfile.TemporaryDirectory()
        # The training data serve as validation data too: no step of a row validates.
        trainer = Trainer(config, Path(run_dir.name), stub_tokenizer(vocab), data, data)
        trainers[model, mode] = SimpleNamespace(trainer=trainer, data=data, config=config,
                                                run_dir=run_dir, flops=ModelFlops(trainer.model))
    return trainers[model, mode]


def train_row(model: str, batch_tokens: int, mode: str, shapes: Shapes,
              device: torch.device, trainers: dict) -> dict[str, Any]:
    """Time traduire's training step for one row; its figures."""
    compiled = mode == "compiled"
    graphs_before = _graphs_compiled()
    kept = trainer_for(model, mode, shapes, device, trainers)
    trainer, data, config, flops = kept.trainer, kept.data, kept.config, kept.flops
    steps_needed = shapes.warmup + shapes.steps
    plan = StepPlan(batch_tokens=batch_tokens, seed=1, pad=PAD, bos=BOS, eos=EOS)
    stream = training_steps(data, plan)
    if compiled and config.train.compile_multiple > 1:  # as Trainer.train does
        stream = rounded_steps(stream, config.train.compile_multiple, PAD)
    planned = [next(stream) for _ in range(steps_needed)]
    _sync(device)
    started = time.perf_counter()
    for step in planned[:shapes.warmup]:  # compilation and the allocator's first steps
        trainer._train_step(step.parts, int(step.tgt_lengths.sum()))
    _sync(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = planned[shapes.warmup:]
    started = time.perf_counter()
    for step in timed:
        loss = trainer._train_step(step.parts, int(step.tgt_lengths.sum()))
    _sync(device)
    seconds = time.perf_counter() - started
    final_loss = float(loss.item())
    tgt = sum(int(s.tgt_lengths.sum()) for s in timed)
    src = sum(int(s.src_lengths.sum()) for s in timed)
    model_flops = sum(flops(s.src_lengths, s.tgt_lengths) for s in timed)
    peak = peak_flops(device)
    row = {"model": model, "batch_tokens": batch_tokens, "mode": mode,
           "tgt_tokens_per_step": round(tgt / len(timed)),
           "tgt_tok_per_s": round(tgt / seconds), "src_tgt_tok_per_s": round((src + tgt) / seconds),
           "step_ms": round(seconds / len(timed) * 1000, 1),
           "mfu": round(model_flops / seconds / peak, 4) if peak else None,
           "tflops": round(model_flops / seconds / 1e12, 2),
           "peak_mem_gib": _peak_memory_gib(device), "compilations": _graphs_compiled()
           - graphs_before if compiled else 0, "warmup_s": round(warmup_s, 1),
           "loss": round(final_loss / max(tgt / len(timed), 1), 3)}
    return row


def loss_rows(shapes: Shapes, device: torch.device) -> list[dict[str, Any]]:
    """Peak memory of each loss over bf16 logits, above the logits (GPU: the allocator's own
    count; CPU dry run: nothing to count, the shapes are checked only)."""
    rows = []
    for form in ("fp32_copy", "sliced"):
        gc.collect()
        logits = torch.randn(shapes.loss_tokens, shapes.loss_vocab, device=device,
                             dtype=torch.bfloat16).requires_grad_()
        targets = torch.randint(4, shapes.loss_vocab, (shapes.loss_tokens,), device=device)
        targets[::10] = PAD
        _sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        if form == "fp32_copy":
            loss = F.cross_entropy(logits.float(), targets, ignore_index=PAD, reduction="sum",
                                   label_smoothing=0.1)
        else:
            loss = token_cross_entropy(logits[None], targets[None], PAD, 0.1, reuse_logits=True)
        (grad,) = torch.autograd.grad(loss, logits)
        _sync(device)
        seconds = time.perf_counter() - started
        above = (torch.cuda.max_memory_allocated(device) - base) / 2**30 \
            if device.type == "cuda" else None
        rows.append({"form": form, "tokens": shapes.loss_tokens, "vocab": shapes.loss_vocab,
                     "logits_gib": round(logits.numel() * 2 / 2**30, 3),
                     "above_logits_gib": round(above, 3) if above is not None else None,
                     "ms": round(seconds * 1000, 1), "loss": round(loss.item(), 1)})
        del logits, targets, loss, grad
    return rows


def attention_rows(shapes: Shapes, device: torch.device) -> list[dict[str, Any]]:
    """Encoder self-attention of Transformer-base (8 heads of 64) over a padded batch, forward
    and backward, as each mask form reaches SDPA."""
    from traduire.model import additive_mask

    rows_, length, heads, dim = (8, 16, 2, 16) if shapes.dry_run else (512, 48, 8, 64)
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (rows_,), generator=gen)
    keep = (torch.arange(length)[None, :] < lengths[:, None]).to(device)[:, None, None, :]
    dtype = torch.bfloat16
    q, k, v = (torch.randn(rows_, heads, length, dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    forms = {"additive": additive_mask(keep, dtype), "boolean": keep, "none": None}
    out = []
    repeats = 3 if shapes.dry_run else 50
    for name, mask in forms.items():
        def once(mask=mask):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        for _ in range(3):
            once()
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            once()
        _sync(device)
        out.append({"mask": name, "batch": rows_, "length": length,
                    "ms": round((time.perf_counter() - started) / repeats * 1000, 3)})
    base = next(r["ms"] for r in out if r["mask"] == "boolean")
    for r in out:
        r["vs_boolean"] = round(base / r["ms"], 2) if r["ms"] else None
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_training(shapes: Shapes, device: torch.device, deadline: float) -> dict[str, Any]:
    rows, skipped = [], []
    plan = [(m, t, mode) for m in shapes.models for t in shapes.tokens for mode in shapes.modes]
    # The Multi30k model at its own budget and the middle one: its batches are small.
    plan = [p for p in plan if p[0] != "multi30k" or p[1] in (4096, shapes.tokens[0])]
    if "multi30k" in shapes.models and not shapes.dry_run:
        plan += [("multi30k", 4096, mode) for mode in shapes.modes]
    plan = list(dict.fromkeys(plan))
    trainers: dict = {}
    for model, tokens, mode in plan:
        if trainers and model not in {m for m, _ in trainers}:  # the last model's are done
            trainers.clear()
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if time.monotonic() > deadline:
            skipped.append(f"{model} {tokens} {mode}")
            continue
        try:
            row = train_row(model, tokens, mode, shapes, device, trainers)
        except torch.OutOfMemoryError as e:  # a row that does not fit is a finding, not a crash
            row = {"model": model, "batch_tokens": tokens, "mode": mode,
                   "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows, "skipped": skipped}


def synthetic_sources(count: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """`count` source sentences of WMT length (LENGTHS["base"]), random ids, without EOS."""
    median, sigma = LENGTHS["base"]
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), sigma, count), 1, 200).astype(np.int64)
    return [rng.integers(4, vocab, n).tolist() for n in lengths]


def stub_pieces(vocab: int) -> SimpleNamespace:
    """A tokenizer stand-in for the search and the CTranslate2 export: ids and made-up pieces."""
    pieces = ["<pad>", "<unk>", "<s>", "</s>", *(f"w{i}" for i in range(4, vocab))]
    return SimpleNamespace(**vars(stub_tokenizer(vocab)),
                           src=SimpleNamespace(id_to_piece=lambda i: pieces[i]),
                           src_pieces=lambda ids: [pieces[i] for i in ids],
                           tgt_pieces=lambda ids: [pieces[i] for i in ids])


def decoding_rows(shapes: Shapes, device: torch.device, deadline: float) -> dict[str, Any]:
    """Beam 5 over a newstest-size input (3,000 synthetic sentences of WMT length) with
    Transformer-base and -big: traduire in bf16 (search.decode, batches of 4,000 source
    tokens, as translate makes them) against CTranslate2 on the same device with traduire's
    export of the same weights (bfloat16, float16, int8_float16; the dry run: float32 and int8
    on the CPU). The weights are random, so outputs run to each sentence's length limit
    (1.2 n + 10 tokens); CTranslate2 decodes to the longest limit of a batch and cuts. Sentences
    and target tokens per second, decoding time only (the models are loaded first)."""
    import importlib.util

    from traduire.batch import sentence_batches
    from traduire.export import export_ctranslate2
    from traduire.model import Transformer, TransformerShape
    from traduire.search import SearchOptions, decode

    rows, skipped = [], []
    options = SearchOptions(beam=5)
    count = 48 if shapes.dry_run else 3000
    for name in [m for m in shapes.models if m != "multi30k"]:
        if time.monotonic() > deadline:
            skipped.append(f"decoding {name}")
            continue
        config, vocab = model_config(name, shapes, device.type, False, 4096)
        torch.manual_seed(0)
        model = Transformer(TransformerShape.from_config(config.model, vocab, vocab, PAD)).eval()
        tokenizer = stub_pieces(vocab)
        sources = synthetic_sources(count, vocab)
        batches = list(sentence_batches([len(s) for s in sources], 4000, 0))
        with tempfile.TemporaryDirectory() as tmp:
            exports = {}
            if importlib.util.find_spec("ctranslate2") is not None:
                exports = {q: export_ctranslate2(SimpleNamespace(model=model,
                                                                 tokenizer=tokenizer),
                                                 Path(tmp) / q, q)
                           for q in (["float32", "int8"] if shapes.dry_run
                                     else ["bfloat16", "float16", "int8_float16"])}
            else:
                skipped.append(f"ctranslate2 {name} (not installed)")
            precision = "fp32" if shapes.dry_run else "bf16"
            ours = (model if shapes.dry_run else model.to(torch.bfloat16)).to(device)
            rows.append(_decode_row(name, "traduire", precision, batches, sources, device,
                                    functools.partial(decode, ours, tokenizer,
                                                      options=options)))
            del ours
            for quantization, directory in exports.items():
                from traduire.ctranslate2_engine import CTranslate2Engine, ctranslate2_module

                translator = ctranslate2_module().Translator(
                    str(directory), device=device.type, compute_type=quantization)
                engine = CTranslate2Engine(translator, tokenizer,
                                           model.shape.max_positions, quantization)
                rows.append(_decode_row(name, "ctranslate2", quantization, batches, sources,
                                        device, functools.partial(engine.decode,
                                                                  options=options)))
                del engine, translator
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "skipped": skipped}


def _decode_row(model: str, engine: str, precision: str, batches: list[list[int]],
                sources: list[list[int]], device: torch.device, search) -> dict[str, Any]:
    search(src_ids=[sources[i] for i in batches[0]])  # warm-up: kernels chosen, memory pooled
    _sync(device)
    start = time.perf_counter()
    tokens = 0
    for batch in batches:
        tokens += sum(len(h[0].tokens) + 1
                      for h in search(src_ids=[sources[i] for i in batch]))
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"model": model, "engine": engine, "precision": precision,
           "sentences": len(sources), "seconds": round(seconds, 2),
           "sent_per_s": round(len(sources) / seconds, 1),
           "tgt_tok_per_s": round(tokens / seconds, 1),
           "peak_mem_gib": _peak_memory_gib(device)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


PARTS = {
    "training": run_training,
    "decoding": decoding_rows,
    "loss": lambda shapes, device, deadline: {"rows": loss_rows(shapes, device)},
    "attention": lambda shapes, device, deadline: {"rows": attention_rows(shapes, device)},
}
COLUMNS = {
    "training": ["model", "batch_tokens", "mode", "tgt_tokens_per_step", "tgt_tok_per_s", "mfu",
                 "tflops", "step_ms", "peak_mem_gib", "compilations", "warmup_s", "error"],
    "loss": ["form", "tokens", "vocab", "logits_gib", "above_logits_gib", "ms"],
    "attention": ["mask", "batch", "length", "ms", "vs_boolean"],
    "decoding": ["model", "engine", "precision", "sentences", "seconds", "sent_per_s",
                 "tgt_tok_per_s", "peak_mem_gib"],
}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    columns = [c for c in columns if any(c in r for r in rows)]
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "mfu":
        return f"{value:.1%}"
    if isinstance(value, (int, float)):
        return f"{value:,}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["big", "base", "multi30k"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 8192, 32768],
                        help="train.batch_tokens of the rows (target tokens per step follow)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        default=["compiled", "eager"])
    parser.add_argument("--warmup", type=int, default=8, help="steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no training row after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (compiled rows through aot_eager)")
    args = parser.parse_args()
    started = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
        shapes = Shapes(args.models, [256], args.modes, 1, 2, 2000, 500, True)
        # Inductor's C++ build takes minutes on a small CPU: the dry run traces the model as a
        # compiled run does and runs the traced graphs as they are.
        compile_ = torch.compile
        torch.compile = lambda model, **kw: compile_(model, backend="aot_eager", **kw)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench: no CUDA device (use --dry-run on a CPU)")
        device = torch.device("cuda", 0)
        shapes = Shapes(args.models, args.tokens, args.modes, args.warmup, args.steps, 25_000,
                        32_000, False)
    parts = list(PARTS) if args.part == "all" else [args.part]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "peak_flops": peak_flops(device), "dry_run": args.dry_run}
    for part in parts:
        deadline = started + args.budget_s
        result[part] = PARTS[part](shapes, device, deadline)
        print(f"\n== {part} ({name}, torch {torch.__version__}) ==")
        print_table(result[part]["rows"], COLUMNS[part])
        if result[part].get("skipped"):
            print(f"skipped (over --budget-s {args.budget_s:.0f}): "
                  + ", ".join(result[part]["skipped"]))
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"\n{result['seconds']:.0f} s in all; MFU: model FLOPs (monitor.ModelFlops) over "
          f"{result['peak_flops'] or 'an unknown'} FLOP/s peak")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
