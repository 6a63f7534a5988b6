"""Checkpoints: the training state written to disk, read back safely, found on resume,
pruned and averaged.

A checkpoint is written atomically (files.atomic_write_bytes: a crash or a full disk leaves the
previous one intact) and read with `weights_only=True`: a checkpoint is data, and loading one
can never run code. It holds the model, the optimizer, the loss scaler, the `TrainState`, the
random state of every rank, the config, the world size it was written at and the fingerprint
of its vocabulary (Tokenizer.fingerprint): weights trained with one tokenizer mean nothing with
another of the same size, and would load without complaint.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from traduire.config import Config, config_from_dict
from traduire.errors import CheckpointError
from traduire.files import atomic_write_bytes

if TYPE_CHECKING:
    from traduire.tokenizer import Tokenizer

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt")


# --- Training state ----------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where training is: with the weights, the optimizer and the random states, enough to
    continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    elapsed: float = 0.0  # seconds of training, summed over all runs
    best_valid_loss: float = math.inf
    best_valid_bleu: float = -1.0
    validations_without_improvement: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    bad_steps_in_a_row: int = 0


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random state: torch's CPU generator and, on a GPU, the device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank `rank`'s own random stream, derived from train.seed (and, for a resume
    at another world size, the step), so that ranks never draw the same dropout masks."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def training_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, state: TrainState,
                        rng: list[dict[str, torch.Tensor]], config: Config, vocabulary: str
                        ) -> dict[str, Any]:
    """Everything a run needs to continue: `rng` holds every rank's random state, by rank;
    `vocabulary` is the tokenizer's fingerprint, checked by check_vocabulary on load."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "train_state": vars(state).copy(), "rng": rng,
            "config": config.to_dict(), "world_size": len(rng), "vocabulary": vocabulary}


def check_vocabulary(state: dict[str, Any], tokenizer: Tokenizer, checkpoint: Path,
                     tokenizer_dir: Path) -> None:
    """Raise CheckpointError, naming both, if the checkpoint `state` (read from `checkpoint`)
    was trained with another vocabulary than `tokenizer` (loaded from `tokenizer_dir`). A
    checkpoint written before checkpoints carried the fingerprint is accepted unchecked: there
    is nothing to compare."""
    stored = state.get("vocabulary")
    if stored is not None and stored != tokenizer.fingerprint():
        raise CheckpointError(f"{checkpoint}: trained with another vocabulary (fingerprint "
                              f"{stored}) than {tokenizer_dir} ({tokenizer.fingerprint()}); "
                              "use it with the run that wrote it")


def restore_training(saved: dict[str, Any], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     config: Config, rank: int, world_size: int, device: torch.device
                     ) -> TrainState:
    """Load a training checkpoint into the model, optimizer and scaler, and this rank's random
    state: its own if the checkpoint was written at the same world size (so the run continues
    exactly), else a fresh stream of its own derived from (seed, rank, step): the batches are
    the same at any world size, the dropout masks are not."""
    if config_from_dict(saved["config"]).model != config.model:
        raise CheckpointError("checkpoint model settings differ from the config")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved.get("scaler", {}))
    state = TrainState(**saved["train_state"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if len(rngs) == world_size or rank == 0:
        set_rng_state(rngs[rank], device)
    else:
        torch.manual_seed(rank_seed(config.train.seed, rank, state.step))
    return state


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
    except OSError as e:  # unreadable (permissions, a failing disk): the system's words
        return e.strerror or message[:200]
    if not head:
        return "the file is empty"
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a pickle
        return f"not a torch checkpoint file; it starts with {head!r}"
    if "Weights only load failed" in message:
        # torch names the global "Unsupported global: GLOBAL x.y" or, for a module it blocks
        # outright (os, subprocess, ...), "unsupported GLOBAL x.y whose module x is blocked".
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", message)
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
    return f"a truncated or damaged pickle: {message[:120]}"


def load_latest(directory: Path, map_location: str | torch.device,
                warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest readable periodic checkpoint in `directory` (None if there is none). A
    damaged one is reported through `warn` and the one before it used; if none of several can
    be read it is an error, since starting over silently would throw away a whole run."""
    found = step_checkpoints(directory)
    for path in reversed(found):
        try:
            return load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            warn(f"{e}; falling back to an earlier checkpoint")
    if found:
        raise CheckpointError(
            f"none of the {len(found)} checkpoints in {directory} can be read; move them aside "
            "to start again, or train with --overwrite")
    return None


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of saves that were killed half-way."""
    for leftover in [*(run_dir / "checkpoints").glob(".step_*.pt.*.tmp"),
                     *run_dir.glob(".best.pt.*.tmp")]:
        leftover.unlink(missing_ok=True)


def default_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run is used by: average.pt if the run wrote one (train.average_last),
    else best.pt, else the newest periodic checkpoint."""
    for name in ("average.pt", "best.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    periodic = step_checkpoints(run_dir / "checkpoints")
    if not periodic:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (train first)")
    return periodic[-1]


def step_checkpoints(directory: Path) -> list[Path]:
    """Periodic checkpoints step_N.pt in the directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.pt")
             if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    for old in step_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """Element-wise mean of the model weights of several checkpoints (Vaswani et al. average
    the last 5 or 20); the first checkpoint supplies everything else. Checkpoints of different
    vocabularies are refused; one without a fingerprint goes with any (a run resumed after
    checkpoints began to carry it has some of each)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    total = {k: v.double() for k, v in first["model"].items()}
    # The first fingerprint found and where: the average carries it.
    vocabulary, vocabulary_path = first.get("vocabulary"), paths[0]
    for path in paths[1:]:
        state = load_checkpoint(path)
        weights, other = state["model"], state.get("vocabulary")
        if weights.keys() != total.keys():
            raise CheckpointError(f"{path}: different model parameters than {paths[0]}")
        if vocabulary is None:
            vocabulary, vocabulary_path = other, path
        elif other is not None and other != vocabulary:
            raise CheckpointError(f"{path}: trained with another vocabulary (fingerprint "
                                  f"{other}) than {vocabulary_path} ({vocabulary}); average "
                                  "checkpoints of one run")
        for k, v in weights.items():
            total[k] += v.double()
    first["model"] = {k: (v / len(paths)).to(first["model"][k].dtype) for k, v in total.items()}
    for key in ("optimizer", "rng"):
        first.pop(key, None)  # an average is for translating, not for resuming
    first["averaged_from"] = [str(p) for p in paths]
    if vocabulary is not None:
        first["vocabulary"] = vocabulary
    return first


def average_last(directory: Path, last: int, output: Path) -> list[Path]:
    """Write the average of the newest `last` periodic checkpoints to `output`; returns the
    checkpoints averaged."""
    paths = step_checkpoints(directory)[-last:] if last > 0 else []
    if not paths:
        raise CheckpointError(f"{directory}: no checkpoints to average")
    save_average(output, average_checkpoints(paths))
    return paths


def save_average(output: Path, state: dict[str, Any]) -> None:
    """Write a state from average_checkpoints (it takes the current format version)."""
    state.pop("format_version", None)
    save_checkpoint(output, state)
