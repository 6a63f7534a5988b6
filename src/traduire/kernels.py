"""Speed paths: the places where traduire computes something differently from the textbook
form because the textbook form measured slow on some hardware. Each computes the same function
as the plain form (tests/test_kernels.py checks the equivalence); only speed differs. The
measurements behind each choice are in its docstring and in docs/performance.md.

  attention        explicit matrix products on CPU, torch's fused kernels on GPU
  dropout          four 15-bit random numbers per 64-bit draw on CPU
  top_per_row      top-k of wide rows through block maxima
  configure_runtime  glibc allocator and oneDNN cache settings, for the command line

Nothing here runs on import: `configure_runtime` is called by the command line (and by
whoever embeds traduire and wants the same speed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- Attention ---------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
              causal: bool = False, dropout_p: float = 0.0, need_weights: bool = False
              ) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(d)) v for q (batch, heads, q_len, d) and k, v (batch, heads,
    k_len, d). mask: boolean, broadcastable to (batch, heads, q_len, k_len), True where
    attention is allowed. causal: query i sees keys up to i, aligned so that the last query
    sees the last key (as in a cached decoding step). Returns the output and, if
    need_weights, the weights.

    Which computation: returning the weights needs the explicit one. On CPUs (torch 2.13) the
    explicit one is also faster in bf16, whose fused backward is slow (forward and backward of
    290 sentences of 20 tokens: 16.7 ms explicit, 93 ms fused), and in the few-query steps of
    decoding (1.1-1.3x); forward passes alone are even. The fused kernel wins in fp32 training
    (fp32 forward and backward: 29 ms explicit, 20 ms fused with AMX; 22 and 18 ms with AVX2
    only). GPUs get the fused kernels (flash attention and friends). Measured with
    scripts/bench/kernels_check.py: docs/performance.md.
    """
    fp32_training = q.requires_grad and torch.is_grad_enabled() and q.dtype == torch.float32
    explicit = need_weights or (q.device.type == "cpu" and not fp32_training)
    # The fused kernels know causality themselves (flash attention accepts no mask tensor),
    # so a plain causal square gets is_causal rather than a mask.
    is_causal = causal and mask is None and q.size(2) == k.size(2) and not explicit
    if causal and not is_causal:
        mask = causal_mask(q.size(2), k.size(2), q.device, mask)
    if not explicit:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=is_causal)
        return out, None
    out, weights = explicit_attention(q, k, v, mask, dropout_p)
    return out, weights if need_weights else None


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                       dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v step by step; also returns the weights. The softmax runs in
    float32 whatever the inputs' precision."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return dropout(weights, dropout_p, dropout_p > 0).to(v.dtype) @ v, weights


def causal_mask(q_len: int, k_len: int, device: torch.device, mask: Tensor | None = None
                ) -> Tensor:
    """Lower-triangular mask, aligned so the last query sees the last key (for cached steps)."""
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return causal if mask is None else mask & causal


# --- Dropout -----------------------------------------------------------------------------------

_RANDOM_BITS = 15  # per kept-or-dropped decision: p is honoured to within 2^-16


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    On CPU, torch's dropout draws one random number per element (bernoulli_), which took a
    fifth of a bf16 training step of the Multi30k model (torch 2.13, Xeon with AMX). Here each
    64-bit draw is cut into four 15-bit numbers, one per element: the same Bernoulli mask from
    a quarter of the draws (bf16 training +13%, fp32 +5-8%). Elsewhere this is torch's dropout.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    count = x.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
    numbers = draws.view(torch.int16)[:count].view(x.shape) & (2**_RANDOM_BITS - 1)
    keep = numbers >= round(p * 2**_RANDOM_BITS)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """nn.Dropout computed with `dropout` above."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# --- Top-k -------------------------------------------------------------------------------------


def top_per_row(scores: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """`scores.topk(k, dim=1)` for a wide (rows, vocab) matrix, about three times faster on CPU
    (torch's topk over 8,000 entries took 15 ms for 1,350 rows, torch 2.13).

    Cut each row into blocks and keep the k blocks with the highest maxima: a row's k best
    entries lie in them, since a block holding one of them has a maximum at least the k-th
    best, and at most k blocks can. The exact topk then runs on k * block entries, not vocab.
    """
    rows, vocab = scores.shape
    if vocab <= 4 * k * block:
        return scores.topk(k, dim=1)
    padding = -vocab % block
    if padding:
        scores = F.pad(scores, (0, padding), value=float("-inf"))
    blocks = scores.view(rows, -1, block)
    best_blocks = blocks.amax(-1).topk(k, dim=1).indices  # (rows, k)
    candidates = blocks.gather(1, best_blocks[:, :, None].expand(-1, -1, block))
    values, within = candidates.view(rows, k * block).topk(k, dim=1)
    return values, best_blocks.gather(1, within // block) * block + within % block


# --- int8 decoding -----------------------------------------------------------------------------


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` for decoding on CPU whose linear layers and output projection multiply
    int8 weights by int8 activations (torch's dynamic quantization: weights quantized once,
    per output channel; activations per call). The model's `project` becomes the int8
    projection of the tied embedding matrix. Speed and quality: see docs/performance.md."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch's eager quantization is marked for removal
        warnings.simplefilter("ignore")
        per_channel = {nn.Linear: per_channel_dynamic_qconfig}
        quantized = quantize_dynamic(copy.deepcopy(model), per_channel, dtype=torch.qint8)
        embedding = model.decoder.embedding.weight.detach().float()
        tied = nn.Linear(embedding.size(1), embedding.size(0), bias=False)
        tied.weight = nn.Parameter(embedding.clone())
        projection = quantize_dynamic(nn.Sequential(tied), per_channel, dtype=torch.qint8)[0]
    quantized.int8_projection = projection
    quantized.project = projection.forward  # this instance's output projection
    return quantized


def int8_available() -> bool:
    """Whether this torch has dynamically quantized linear layers for the CPU."""
    return "fbgemm" in torch.backends.quantized.supported_engines or \
        "x86" in torch.backends.quantized.supported_engines


# --- Process settings --------------------------------------------------------------------------

# glibc's mallopt parameter numbers (malloc.h), and its defaults for them.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}
_allocator_tuned = False


def configure_runtime() -> None:
    """Process-wide settings that make PyTorch faster on CPUs, applied by the command line:
    the oneDNN kernel cache and the glibc allocator (see below). Results are identical with or
    without them. Call it early, before torch first computes in bf16, to get the same speed
    from Python. TRADUIRE_SYSTEM_MALLOC=1 leaves the allocator alone."""
    tune_onednn()
    tune_allocator()


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


# --- Hardware ----------------------------------------------------------------------------------


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: an NVIDIA GPU of compute
    capability 8.0 or newer (Ampere: bf16 tensor cores), or a CPU with AMX or AVX512-BF16.
    Elsewhere bf16 is emulated and slower than fp32 (torch.cuda.is_bf16_supported() also says
    yes for emulated bf16 on older GPUs, so it is not asked)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type != "cpu":
        return False
    return cpu_features()["amx"] or cpu_features()["avx512_bf16"]


def cpu_features() -> dict[str, bool]:
    """The CPU's vector extensions that decide which speed path wins, as torch sees them (an
    ATEN_CPU_CAPABILITY=avx2 setting hides AVX-512 and AMX, to imitate an older CPU)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()  # "avx2", "avx512", ...
    avx512 = capability.startswith("avx512")
    try:  # private probes (torch >= 2.3); without them, assume no
        amx = bool(torch.cpu._is_amx_tile_supported())
        avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        amx = avx512_bf16 = False
    return {"avx2": capability.startswith(("avx2", "avx512")), "avx512f": avx512,
            "avx512_bf16": avx512 and avx512_bf16, "amx": avx512 and amx}


def cpu_name() -> str:
    """The CPU's model name, for benchmark reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"
