"""Process-wide settings that make PyTorch fast on CPUs, applied once when traduire is imported
(`apply`), and the hardware probe behind `precision: auto` (`native_bf16`).

The settings are about memory and kernels, never about results: numbers are identical with or
without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the system at once.

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free. Logits
    over an 8,000-piece vocabulary for a batch are such allocations, made and freed at every
    training or decoding step, so each step pays a page fault per 4 KiB touched: copying or
    exponentiating a 40 MB tensor took 15-20 ms instead of 2 (2-core Xeon, torch 2.13).
    Serving them from the heap and not trimming it makes them reuse warm pages; peak memory
    is unchanged. Set TRADUIRE_SYSTEM_MALLOC=1 to leave the allocator alone. Returns whether
    the setting was applied (only on Linux with glibc).
    """
    if os.environ.get("TRADUIRE_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def tune_onednn() -> None:
    """bf16 matrix products on CPU go through oneDNN, which compiles a kernel per tensor shape
    and keeps 1024 of them by default. Token-budget batches come in hundreds of shapes, so the
    default cache thrashes and recompiles every step; a larger one keeps them all (the user's
    value wins). Must run before torch first uses oneDNN."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a GPU that supports bf16, or a
    CPU with AMX or AVX512-BF16. Elsewhere bf16 is emulated and slower than fp32."""
    import torch  # not at module level: tune_onednn must run before torch loads

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # private probes (torch >= 2.3); without them, assume no
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def apply() -> None:
    tune_onednn()
    tune_allocator()
