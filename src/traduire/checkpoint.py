"""Everything that writes or reads the files a run depends on.

Writes are atomic: the bytes go to a temporary file in the same directory, are fsynced, and are
renamed over the target, so a crash or a full disk leaves either the old file or the new one,
never a torn one. Checkpoints are read with `weights_only=True`: a checkpoint is data, and
loading one can never run code.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from traduire.errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt")


# --- Atomic files ------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(Path(tmp))
        if isinstance(e, OSError) and e.filename is None:  # name the file: "disk full" where?
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename itself must reach the disk, or a power cut can undo it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def move_aside(paths: list[Path], run_dir: Path) -> Path | None:
    """Move existing outputs into run_dir/old/<timestamp>/ instead of deleting them."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return None
    (run_dir / "old").mkdir(parents=True, exist_ok=True)
    # A fresh directory each time, even twice in one second: nothing moved aside is replaced.
    target = Path(tempfile.mkdtemp(dir=run_dir / "old", prefix=time.strftime("%Y%m%d-%H%M%S-")))
    for p in existing:
        os.replace(p, target / p.name)
    return target


# --- Checkpoints -------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training state (tensors, numbers, strings, lists, dicts) atomically."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely. Raises CheckpointError naming the file if it is missing,
    truncated, not a checkpoint, unsafe, or written by a newer traduire."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a usable checkpoint"
        raise CheckpointError(f"{path}: not a readable traduire checkpoint "
                              f"({_why_unreadable(path, e)})") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise CheckpointError(f"{path}: not a traduire checkpoint (no model weights)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer traduire (checkpoint format "
                              f"{state['format_version']}, this version reads {FORMAT_VERSION})")
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    """torch.load's error, put in words a user can act on."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(error).split()))
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if not head:
        return "the file is empty"
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a pickle
        return f"not a torch checkpoint file; it starts with {head!r}"
    if "Weights only load failed" in message:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found:
            return (f"it holds Python objects ({found.group(1)}), not only tensors and plain "
                    "data; they were not loaded, since unpickling them could run code")
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)",
                          message)
        return ("not a pickle that is safe to load"
                + (f" ({found.group(1)})" if found else "")
                + "; it was not unpickled, since that could run code")
    if head.startswith(b"PK"):
        return f"a truncated, damaged or foreign zip archive: {message[:120]}"
    return message[:200]


def step_checkpoints(directory: Path) -> list[Path]:
    """Periodic checkpoints step_N.pt in the directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.pt")
             if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    for old in step_checkpoints(directory)[:-keep_last]:
        _remove_quietly(old)


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """Element-wise mean of the model weights of several checkpoints (Vaswani et al. average
    the last 5 or 20); the first checkpoint supplies everything else."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    total = {k: v.double() for k, v in first["model"].items()}
    for path in paths[1:]:
        weights = load_checkpoint(path)["model"]
        if weights.keys() != total.keys():
            raise CheckpointError(f"{path}: different model parameters than {paths[0]}")
        for k, v in weights.items():
            total[k] += v.double()
    first["model"] = {k: (v / len(paths)).to(first["model"][k].dtype) for k, v in total.items()}
    for key in ("optimizer", "rng"):
        first.pop(key, None)  # an average is for translating, not for resuming
    first["averaged_from"] = [str(p) for p in paths]
    return first
