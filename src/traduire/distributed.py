"""Data parallelism through torch.distributed, started by `torchrun`.

A process started by torchrun finds RANK, WORLD_SIZE and LOCAL_RANK in its environment; without
them traduire runs as a single process and every helper here is a no-op.

Two kinds of messages pass between ranks. Numbers the step computes — gradients (DDP) and
the step's loss — are summed on the training device (NCCL on GPUs, gloo on CPU), queued like
the step's other work, so the host never waits for them. Decisions — stop now, what to
restore — travel over a gloo group on the CPU, so agreeing on them never makes the host wait
for the GPU either.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from traduire.errors import TraduireError
from traduire.files import atomic_write_text

_control_group: Any = None  # the CPU (gloo) group for decisions; None: the default group


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_kind: str) -> Context:
    """Join the process group if started by torchrun: NCCL on GPUs, gloo on CPU."""
    global _control_group
    if "RANK" not in os.environ or dist.is_initialized():
        return current()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    # A dead rank becomes an error on the others after this long, not an endless hang. No
    # collective waits on the data stages (see run_on_main), so this bounds training steps
    # only.
    timeout = timedelta(seconds=float(os.environ.get("TRADUIRE_DIST_TIMEOUT", "600")))
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device_id)
    # device_id binds the rank to its GPU up front (NCCL otherwise guesses from the rank).
    dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    if backend != "gloo":
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    return current()


def current() -> Context:
    if not dist.is_available() or not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _active():
        dist.barrier(group=_control_group)


def sum_on_device(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of a tensor on the training device, in place. With NCCL the sum
    is queued on the GPU's stream like a kernel: the host goes on without waiting for it."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def any_rank(values: list[int]) -> list[int]:
    """Element-wise maximum over the ranks of small integers (flags, signal numbers): what one
    rank wants to stop for, every rank stops for, at the same step."""
    if not _active():
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    if not _active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_control_group)
    return t.tolist()


def broadcast_value(value: float) -> float:
    """Rank 0's value, seen by every rank."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0, group=_control_group)
    return t.item()


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (plain data and CPU tensors), in rank order."""
    if not _active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_control_group)
    return out


def launch_token() -> str:
    """A name for this launch, the same on every rank: rank 0's, broadcast right after the
    process group forms (every rank is there, so this waits for nobody)."""
    token = [uuid.uuid4().hex]
    if _active():
        dist.broadcast_object_list(token, src=0, group=_control_group)
    return token[0]


def run_on_main(work: Callable[[], None], status_file: Path, ctx: Context,
                say: Callable[[str], None]) -> None:
    """Run `work` on rank 0 while the other ranks wait for it, however long it takes.

    The wait is no collective, whose timeout would kill the job while rank 0 prepares a large
    corpus: rank 0 writes its outcome to `status_file` (on the run directory, which all nodes
    share), the others poll it, saying every minute what they wait for. If rank 0 fails, the
    others stop within seconds with rank 0's message."""
    if not ctx.enabled:
        work()
        return
    token = launch_token()
    if ctx.is_main:
        try:
            work()
        except BaseException as e:
            _write_status(status_file, token, "failed", str(e) or type(e).__name__)
            raise
        _write_status(status_file, token, "done", "")
        return
    with _TerminateRaises():
        try:
            _wait_for_main(status_file, token, ctx, say)
        except _Terminated:
            # The launcher stops the waiting ranks as soon as rank 0 exits, often before
            # they poll again: rank 0's outcome, if it wrote one, is still the news to give.
            _check_status(_read_status(status_file), token, ctx)
            raise SystemExit(128 + signal.SIGTERM) from None


def _wait_for_main(status_file: Path, token: str, ctx: Context,
                   say: Callable[[str], None]) -> None:
    started = last_said = time.monotonic()
    while not _check_status(_read_status(status_file), token, ctx):
        time.sleep(0.5)
        if time.monotonic() - last_said >= 60:
            last_said = time.monotonic()
            say(f"rank {ctx.rank}: waiting for rank 0 to prepare the data and tokenizer "
                f"({(last_said - started) / 60:.0f} min)")


def _check_status(status: dict[str, Any] | None, token: str, ctx: Context) -> bool:
    """True if rank 0 is done preparing for this launch; raises its error if it failed."""
    if status is None or status.get("token") != token:
        return False
    if status.get("state") == "failed":
        raise TraduireError(f"rank {ctx.rank}: rank 0 failed while preparing the run: "
                            f"{status.get('message')}")
    return status.get("state") == "done"


class _Terminated(Exception):
    """SIGTERM arrived."""


class _TerminateRaises:
    """Within the block, SIGTERM raises _Terminated in the main thread instead of ending the
    process at once (outside the main thread, signals cannot be caught: nothing changes)."""

    def __enter__(self) -> _TerminateRaises:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise _Terminated

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StopRequest:
    """SIGINT, SIGTERM or SIGHUP (the terminal closed) turned into a request to stop after the
    current step (while in the `with` block). The training loop passes `signal_number`
    through `any_rank` at every step, so a signal that reaches any rank stops every rank at
    the same step.

    The same request often arrives twice within milliseconds: Ctrl-C reaches every process of
    the terminal's group and torchrun passes it on to its workers again; a scheduler's SIGTERM
    reaches the workers and torchrun, which passes it on too. Aborting on that echo would lose
    the checkpoint, so only a SIGINT that comes `ABORT_AFTER` seconds or more after the first
    signal — a person pressing Ctrl-C again — stops at once (the last checkpoint stands)."""

    ABORT_AFTER = 1.0

    def __init__(self, say: Callable[[str], None]) -> None:
        self.signal_number = 0
        self._say = say
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signal_number:
            if signum == signal.SIGINT and now - self._first_at >= self.ABORT_AFTER:
                raise KeyboardInterrupt
            return
        self.signal_number, self._first_at = signum, now
        self._say(f"{signal.Signals(signum).name}: finishing the current step, then saving")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals go to it only
            self._previous = {sig: signal.signal(sig, self._request)
                              for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _write_status(path: Path, token: str, state: str, message: str) -> None:
    atomic_write_text(path, json.dumps({"token": token, "state": state, "message": message}))


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def failed_elsewhere(error: Exception) -> bool:
    """Whether `error` is a collective operation failing because another rank died (the
    process group may be gone by now: torchrun's environment tells)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    message = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in message for sign in ("Connection closed by peer", "Connection reset by peer",
                                     "remote worker crashing", "NCCL communicator was aborted"))


def shutdown() -> None:
    global _control_group
    if _active():
        dist.destroy_process_group()
    _control_group = None
