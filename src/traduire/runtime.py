"""Process settings: how many CPU cores this process may use, and the glibc allocator and
oneDNN cache settings that make PyTorch faster on CPUs.

Nothing here imports torch or runs on import: the data stages count cores without loading
torch, and `configure_runtime` is called by the command line (and by whoever embeds traduire
and wants the same speed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

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


# --- Allocator and oneDNN ----------------------------------------------------------------------

# glibc's mallopt parameter numbers (malloc.h), and its defaults for them.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}
_allocator_tuned = False
_configured = False


def configure_runtime() -> None:
    """Process-wide settings that make PyTorch faster on CPUs, applied by the command line:
    the oneDNN kernel cache and the glibc allocator (see below). Results are identical with or
    without them. Call it early, before torch first computes in bf16, to get the same speed
    from Python. TRADUIRE_SYSTEM_MALLOC=1 leaves the allocator alone."""
    global _configured
    tune_onednn()
    tune_allocator()
    _configured = True


def runtime_configured() -> bool:
    """Whether configure_runtime ran in this process: the processes it starts (translate's
    workers) then apply it too, since a spawned process inherits the environment but not the
    allocator's settings."""
    return _configured


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the system at once.

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free. Logits
    over an 8,000-piece vocabulary for a batch are such allocations, made and freed at every
    training or decoding step, so each step pays a page fault per 4 KiB touched: copying or
    exponentiating a 40 MB tensor took 15-20 ms instead of 2 (2-core Xeon, torch 2.13), and
    beam search went from 66.6 to 83.0 sentences/s. Serving them from the heap and not
    trimming it makes them reuse warm pages; peak memory is unchanged. Returns whether the
    setting was applied (only on Linux with glibc, and not with TRADUIRE_SYSTEM_MALLOC=1).
    """
    global _allocator_tuned
    if os.environ.get("TRADUIRE_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    _allocator_tuned = _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return _allocator_tuned


@contextlib.contextmanager
def default_allocator() -> Iterator[None]:
    """glibc's own allocator settings for a while, where tune_allocator changed them. Data
    preparation allocates large, short-lived buffers (SentencePiece's sample and counts, the
    encoding workers' batches); handed back to the system when freed, they do not add up in
    the processes forked next (4M pairs: peak memory of the process tree 3,211 MiB tuned,
    2,912 MiB with glibc's settings, the same speed)."""
    global _allocator_tuned
    if not _allocator_tuned:
        yield
        return
    for parameter, value in _GLIBC_DEFAULTS.items():
        _mallopt(parameter, value)
    _allocator_tuned = False
    try:
        yield
    finally:
        tune_allocator()


def _mallopt(parameter: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(parameter, value))
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False


def tune_onednn() -> None:
    """bf16 matrix products on CPU go through oneDNN, which compiles a kernel per tensor shape
    and keeps 1024 of them by default. Token-budget batches come in hundreds of shapes, so the
    default cache thrashes and recompiles every step (about -10% bf16 training throughput); a
    larger one keeps them all. The user's own value wins. oneDNN reads it when it first runs."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
