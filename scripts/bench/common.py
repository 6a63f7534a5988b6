"""What every benchmark prints beside its figures (versions, threads, processor), and what
several of them share: the command line's runtime settings, the check that repeated rounds of
a figure agree, and the toy corpus of their --tiny modes."""

from __future__ import annotations

import platform
import random
import resource
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from traduire.runtime import configure_runtime

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "multi30k-en-fr"
# The vector extensions that decide which of traduire's speed paths wins on a CPU.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
TESTS = ("test_2016_flickr", "test_2017_flickr")
# The rounds of one figure must agree within this (largest / smallest - 1): a wider spread
# means some rounds were not in the steady state (oneDNN building a bf16 kernel per shape,
# another job on the machine), and their median would be a guess.
AGREEMENT = 0.15
# A model small enough for every --tiny mode to train and decode in seconds, with a schedule
# that learns the toy language in those seconds.
TINY_OVERRIDES = ("model.layers=1", "model.d_model=32", "model.heads=2", "model.ffn_dim=64",
                  "model.max_positions=64", "tokenizer.vocab_size=40",
                  "train.batch_tokens=300", "train.average_last=0", "train.lr=0.003",
                  "train.warmup_steps=10")


def apply_runtime_settings() -> None:
    """What the traduire command does before anything else (the allocator and oneDNN cache
    settings), so that a benchmark measures the command's speed."""
    configure_runtime()


def machine() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "isa": cpu_flags()}


def cpu_model() -> str:
    """The model name /proc/cpuinfo gives (Linux), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """Which of ISA_FLAGS the CPU has, from /proc/cpuinfo: the hardware itself, whatever
    ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA make torch use."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    present = set(line.split(":", 1)[1].split())
    return [flag for flag in ISA_FLAGS if flag in present]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def spread(values: Sequence[float]) -> float:
    """How far apart rounds are: largest / smallest - 1 (0 for a single round)."""
    low = min(values)
    if low <= 0:
        return float("inf")
    return max(values) / low - 1


def agree(values: Sequence[float], tolerance: float = AGREEMENT) -> bool:
    return spread(values) <= tolerance


def median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 1)


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "" if value is None else str(value)


def write_tiny_corpus(directory: Path, train: int = 300) -> Path:
    """A Multi30k-shaped toy corpus for the --tiny modes: train, val and both test sets of a
    word-for-word English -> French toy language."""
    words = {"a": "un", "dog": "chien", "cat": "chat", "runs": "court", "sleeps": "dort",
             "big": "grand", "red": "rouge", "here": "ici", "the": "le", "eats": "mange"}
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", 30), *((t, 20) for t in TESTS)):
        pairs = []
        for _ in range(count):
            sentence = rng.choices(list(words), k=rng.randint(2, 6))
            pairs.append((" ".join(sentence), " ".join(words[w] for w in sentence)))
        for side, lang in ((0, "en"), (1, "fr")):
            (directory / f"{split}.{lang}").write_text(
                "".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    return directory
