"""Where and in what precision to compute: `device: auto` and `precision: auto` resolved, from
what the hardware computes natively (the probes below)."""

from __future__ import annotations

import torch

from traduire.errors import TraduireError

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
    (see native_bf16), else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


DECODING_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def decoding_precision(precision: str, device: torch.device) -> str:
    """The precision of the weights to decode with: fp32, bf16, int8 (CPU only: linear layers
    and the output projection quantised), or auto = bf16 where `device` computes it natively,
    else fp32. bf16 weights decoded 1.5x faster than fp32 on a Xeon with AMX, with the same
    BLEU within noise (Multi30k test_2016, beam 5, batches of 64: 96.5 against 65.6 sentences/s,
    BLEU 56.1 against 56.2; README, Results); search scores stay fp32."""
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


def int8_available() -> bool:
    """Whether this torch has dynamically quantized linear layers for the CPU."""
    return "fbgemm" in torch.backends.quantized.supported_engines or \
        "x86" in torch.backends.quantized.supported_engines
