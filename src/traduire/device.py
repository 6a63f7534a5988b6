"""Where and in what precision to compute: `device: auto` and `precision: auto` resolved, and
the CPU cores the data stages may use."""

from __future__ import annotations

import os

import torch

from traduire.errors import TraduireError
from traduire.kernels import int8_available, native_bf16

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N, or auto (the GPU if there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TraduireError(f"device '{name}' requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TraduireError(f"device '{name}': expected cpu, cuda, cuda:N or auto") from None


def training_precision(precision: str, device: torch.device) -> str:
    """The autocast precision to train in: auto is bf16 where `device` computes it natively
    (see kernels.native_bf16), else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


DECODING_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def decoding_precision(precision: str, device: torch.device) -> str:
    """The precision of the weights to decode with: fp32, bf16, int8 (CPU only: linear layers
    and the output projection quantised), or auto = bf16 where `device` computes it natively,
    else fp32. bf16 weights decoded 1.4x faster than fp32 on a Xeon with AMX with the same
    BLEU (Multi30k test_2016: 51.9 either way); search scores stay fp32."""
    if precision not in DECODING_PRECISIONS:
        raise TraduireError(f"precision {precision!r}: expected one of "
                            f"{', '.join(DECODING_PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise TraduireError("precision 'int8' decodes on CPUs only; use bf16 on a GPU")
    if precision == "int8" and not int8_available():
        raise TraduireError("precision 'int8': this torch has no quantized CPU kernels")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


# --- CPU cores ---------------------------------------------------------------------------------

# Below this many rows per process, `datasets` is given fewer processes (a small split runs in
# this one): starting a worker costs more than it saves.
ROWS_PER_PROCESS = 50_000


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a cluster job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def data_workers(workers: int) -> int:
    """`data.workers` resolved: 0 is every core this process may use."""
    return workers or available_cores()


def processes(rows: int, workers: int) -> int | None:
    """How many processes `datasets` should use on `rows` rows, at most `workers` (None: this
    process alone)."""
    n = min(workers, rows // ROWS_PER_PROCESS)
    return n if n > 1 else None
