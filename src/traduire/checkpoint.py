"""Checkpoints: the training state written to disk, read back safely, found on resume,
pruned and averaged.

A checkpoint is written atomically (files.atomic_open: a crash or a full disk leaves the
previous one intact) and read with `weights_only=True`: a checkpoint is data, and loading one
can never run code. It holds the model, the optimizer, the loss scaler, the `TrainState`, the
random state of every rank, the config, the world size it was written at and the fingerprint
of its vocabulary (Tokenizer.fingerprint): weights trained with one tokenizer mean nothing with
another of the same size, and would load without complaint. best.pt and average.pt hold only
what translating needs (`for_translation`): no optimizer, scaler or random state.

Periodic checkpoints are written by a `CheckpointWriter`: the training loop pauses only to copy
the state to host memory; serialising, fsync and rename happen in a background thread, one
write at a time, so a crash during a write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from traduire.config import Config, config_from_dict
from traduire.errors import CheckpointError
from traduire.files import atomic_open

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
    # train.schedule budget with max_time: the schedule.Budget decided from the step rate, as
    # a dict (None: not decided yet, or not a time budget). A resumed run keeps it.
    budget: dict[str, int] | None = None


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


def for_translation(state: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint's state without what only resuming needs (the optimizer's moments
    are twice the weights): what best.pt and average.pt hold."""
    return {k: v for k, v in state.items() if k not in ("optimizer", "scaler", "rng")}


def weights_digest(model: torch.nn.Module, step: int) -> str:
    """A hash of the model's weights (their bytes, in order) and the step: equal on two ranks
    exactly when they hold the same state to train on."""
    digest = hashlib.blake2b(str(step).encode(), digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
    """Write a training state (tensors, numbers, strings, lists, dicts) atomically: serialised
    straight into the temporary file, never whole in memory first."""
    with atomic_open(path, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def split_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """`obj` (dicts, lists, tuples of tensors and plain data) with every tensor replaced by
    its position in `tensors`, to which it is appended: the skeleton travels as one small
    object, the tensors as they are."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(split_tensors(v, tensors) for v in obj)
    return obj


def join_tensors(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of split_tensors."""
    if isinstance(skeleton, _TensorSlot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(join_tensors(v, tensors) for v in skeleton)
    return skeleton


@dataclass(frozen=True)
class _TensorSlot:
    index: int


def distinct_tensors(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors that are not views of the same data as one before them (tied embeddings
    appear under several names), and for each tensor, the position of its distinct one: a
    copy of the distinct ones keeps the ties, as torch.save does."""
    seen: dict[tuple, int] = {}
    distinct, where = [], []
    for t in tensors:
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        if key not in seen or t.numel() == 0:
            seen[key] = len(distinct)
            distinct.append(t)
        where.append(seen[key])
    return distinct, where


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time.

    `save` pauses the caller only to copy the state's tensors into host buffers, kept from one
    save to the next (allocating and first touching gigabytes costs more than copying into
    them), then returns while a thread serialises the copy into a temporary file, fsyncs and
    renames it (save_checkpoint) and runs `then` (pruning). A save waits for the write before
    it; an error of a write is raised by the next `save` or by `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self.pause_s = self.write_s = 0.0  # of the last save

    def save(self, path: Path, state: dict[str, Any], then: Callable[[], None] | None = None,
             best: Path | None = None) -> None:
        """Write `state` to `path`, then (with `best`) its for_translation part to `best`,
        from the same copy, then run `then`."""
        self.wait()
        start = time.perf_counter()
        tensors: list[torch.Tensor] = []
        skeleton = split_tensors(state, tensors)
        distinct, where = distinct_tensors(tensors)
        # One set of buffers per kind of state: a training checkpoint, a translation one.
        kind = (tuple((t.shape, t.dtype) for t in distinct), tuple(where))
        if kind not in self._buffers:
            pin = torch.cuda.is_available() and any(t.is_cuda for t in distinct)
            self._buffers[kind] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                                   for t in distinct]
        buffers = self._buffers[kind]
        for buffer, tensor in zip(buffers, distinct):
            buffer.copy_(tensor.detach(), non_blocking=True)
        if any(t.is_cuda for t in distinct):
            torch.cuda.synchronize()  # the copies are complete before training goes on
        copy = join_tensors(skeleton, [buffers[i] for i in where])
        self.pause_s = time.perf_counter() - start

        def write() -> None:
            began = time.perf_counter()
            try:
                save_checkpoint(path, copy)
                if best is not None:
                    save_checkpoint(best, for_translation(copy))
                if then is not None:
                    then()
            except BaseException as e:  # raised again in the training thread
                self._error = e
            self.write_s = time.perf_counter() - began

        self._thread = threading.Thread(target=write, name="traduire-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write in progress; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the write in progress and free the host buffers."""
        try:
            self.wait()
        finally:
            self._buffers = {}


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Read a checkpoint safely. Raises CheckpointError naming the file if it is missing,
    truncated, not a checkpoint, unsafe, or written by a newer traduire. With `mmap`, the
    tensors are mapped from the file and read only when used (a file in torch's older,
    non-zip format is read whole)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as f:
            mmap = mmap and f.read(2) == b"PK"
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    found = latest_readable(directory, map_location, warn)
    return found[1] if found else None


def latest_readable(directory: Path, map_location: str | torch.device,
                    warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """load_latest, with the path of the checkpoint read."""
    found = step_checkpoints(directory)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location=map_location)
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
    the last 5 or 20); the first checkpoint supplies the rest of what translating needs (no
    optimizer or random state). Checkpoints of different vocabularies are refused; one
    without a fingerprint goes with any (a run resumed after checkpoints began to carry it has
    some of each).

    The checkpoints are memory-mapped and read one after another, so only their model weights
    are read (never the optimizer's moments, twice their size) and only one checkpoint's are
    resident at a time beside the sum: at its peak, about twice the weights. Floating-point
    weights are summed in their own precision (at least float32: a mean of a few checkpoints
    loses nothing a float32 model keeps); integer buffers in float64."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(paths[0], mmap=True)
    total = {k: _accumulator(v) for k, v in first["model"].items()}
    dtypes = {k: v.dtype for k, v in first["model"].items()}
    averaged = {k: v for k, v in for_translation(first).items() if k != "model"}
    del first
    # The first fingerprint found and where: the average carries it.
    vocabulary, vocabulary_path = averaged.get("vocabulary"), paths[0]
    for path in paths[1:]:
        state = load_checkpoint(path, mmap=True)
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
            total[k].add_(v)
        del state, weights  # unmaps the file before the next one is read
    averaged["model"] = {k: v.div_(len(paths)).to(dtypes[k]) for k, v in total.items()}
    averaged["averaged_from"] = [str(p) for p in paths]
    if vocabulary is not None:
        averaged["vocabulary"] = vocabulary
    return averaged


def _accumulator(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` to sum others into (in RAM, not in the mapped file)."""
    if tensor.is_floating_point():
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32), copy=True)
    return tensor.to(torch.float64, copy=True)


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
