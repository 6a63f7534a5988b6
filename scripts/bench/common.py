"""What every benchmark prints beside its figures: versions, threads, processor."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "multi30k-en-fr"


def apply_runtime_settings() -> None:
    """What the traduire command does before anything else (kernels.configure_runtime: the
    allocator and oneDNN cache settings), so that a benchmark measures the command's speed.
    Versions before the module split applied them when traduire was imported."""
    try:
        from traduire.kernels import configure_runtime
    except ImportError:
        return
    configure_runtime()


def machine() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "" if value is None else str(value)
