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

import contextlib
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


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` (small plain data), seen by every rank."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def broadcast_state(state: Any) -> Any:
    """Rank 0's `state` (dicts and lists of CPU tensors and plain data, such as a checkpoint),
    on every rank; the other ranks pass None. The structure travels as one small object and
    each tensor as itself, straight into a tensor of its own on the receiving ranks: no rank
    holds a second serialised copy."""
    if not _active():
        return state
    from traduire.checkpoint import distinct_tensors, join_tensors, split_tensors

    tensors: list[torch.Tensor] = []
    skeleton = split_tensors(state, tensors) if dist.get_rank() == 0 else None
    tensors, where = distinct_tensors(tensors)  # tied weights travel once, and stay tied
    shapes = [(t.shape, t.dtype) for t in tensors]
    skeleton, shapes, where = broadcast_object((skeleton, shapes, where))
    if dist.get_rank() != 0:
        tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in shapes]
    for i, tensor in enumerate(tensors):
        if tensor.numel():
            if not tensor.is_contiguous():
                tensors[i] = tensor = tensor.contiguous()
            dist.broadcast(tensor, src=0, group=_control_group)
    return join_tensors(skeleton, [tensors[i] for i in where])


def check_same(value: str, what: str) -> None:
    """Stop every rank, with one line naming the ranks that differ from rank 0, unless all
    hold the same `value` (e.g. a hash of their weights)."""
    values = all_gather(value)
    differ = [rank for rank, v in enumerate(values) if v != values[0]]
    if differ:
        names = ", ".join(map(str, differ))
        who = f"ranks {names} differ" if len(differ) > 1 else f"rank {names} differs"
        raise TraduireError(f"{who} from rank 0 in {what}; every rank must train from the "
                            "same checkpoint: is the run directory one directory shared by "
                            "every node, with the same files on each?")


def launch_token() -> str:
    """A name for this launch, the same on every rank: rank 0's, broadcast right after the
    process group forms (every rank is there, so this waits for nobody)."""
    token = [uuid.uuid4().hex]
    if _active():
        dist.broadcast_object_list(token, src=0, group=_control_group)
    return token[0]


# The file rank 0 writes into the run directory at start-up, for every rank to read back.
SHARED_DIR_TOKEN = ".launch"
HEARTBEAT_S = 5.0  # how often rank 0 says, in the status file, that it is still preparing


def _seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise TraduireError(f"{name}={value!r}: not a number of seconds") from None


def check_shared_run_dir(run_dir: Path, ctx: Context) -> None:
    """Stop every rank with one line unless every rank sees the run directory rank 0 writes
    into: rank 0 writes a file named for this launch there and the others look for it, for
    up to TRADUIRE_RUN_DIR_TIMEOUT seconds (120: a network filesystem may take a while to show
    another node's new file). A node that has its own directory at that path would otherwise
    wait for rank 0's stages for ever, or train from other files."""
    if not ctx.enabled:
        return
    token = launch_token()
    path = Path(run_dir) / SHARED_DIR_TOKEN
    bound = _seconds_from_env("TRADUIRE_RUN_DIR_TIMEOUT", 120.0)
    seen = True
    if ctx.is_main:
        atomic_write_text(path, token)
    else:
        deadline = time.monotonic() + bound
        while _read_text(path) != token:
            if time.monotonic() >= deadline:
                seen = False
                break
            time.sleep(0.2)
    blind = [rank for rank, saw in enumerate(all_gather(seen)) if not saw]
    if ctx.is_main:
        path.unlink(missing_ok=True)
    if blind:
        ranks = ", ".join(map(str, blind))
        raise TraduireError(
            f"rank{'s' if len(blind) > 1 else ''} {ranks} did not see, within {bound:.0f} s, "
            f"the file rank 0 wrote into the run directory {run_dir}: the run directory must be "
            "on a filesystem all nodes share, at the same path on each (set "
            "TRADUIRE_RUN_DIR_TIMEOUT to wait longer)")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def run_on_main(work: Callable[[], None], status_file: Path, ctx: Context,
                say: Callable[[str], None]) -> None:
    """Run `work` on rank 0 while the other ranks wait for it, however long it takes.

    The wait is no collective, whose timeout would kill the job while rank 0 prepares a large
    corpus: rank 0 writes its outcome to `status_file` (on the run directory, which all nodes
    share: see check_shared_run_dir), and while it works a heartbeat every HEARTBEAT_S; the
    others poll it, saying every minute what they wait for. If rank 0 fails, the others stop
    within seconds with rank 0's message; if its heartbeat stops for
    TRADUIRE_HEARTBEAT_TIMEOUT seconds (60), they stop saying that rank 0 stopped reporting."""
    if not ctx.enabled:
        work()
        return
    token = launch_token()
    if ctx.is_main:
        with _Heartbeat(status_file, token):
            work()
        return
    stale = _seconds_from_env("TRADUIRE_HEARTBEAT_TIMEOUT", 60.0)
    with _TerminateRaises():
        try:
            _wait_for_main(status_file, token, ctx, say, stale)
        except _Terminated:
            # The launcher stops the waiting ranks as soon as rank 0 exits, often before
            # they poll again: rank 0's outcome, if it wrote one, is still the news to give.
            _check_status(_read_status(status_file), token, ctx)
            raise SystemExit(128 + signal.SIGTERM) from None


class _Heartbeat:
    """Within the block, a thread writes {"state": "working", "beat": n} into the status file
    every HEARTBEAT_S; on leaving, the thread stops and the outcome is written: "done", or
    "failed" with the error's message."""

    def __init__(self, status_file: Path, token: str) -> None:
        self._file, self._token = status_file, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="traduire-heartbeat")

    def _beat(self) -> None:
        beat = 0
        while True:
            with contextlib.suppress(OSError):  # a missed beat is no error; many are
                _write_status(self._file, self._token, "working", "", beat)
            beat += 1
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._thread.join()  # no beat may land after the outcome
        if error is None:
            _write_status(self._file, self._token, "done", "")
        else:
            _write_status(self._file, self._token, "failed", str(error) or type(error).__name__)


def _wait_for_main(status_file: Path, token: str, ctx: Context,
                   say: Callable[[str], None], stale: float = 60.0) -> None:
    started = last_said = last_beat_at = time.monotonic()
    last_beat: Any = None
    while True:
        status = _read_status(status_file)
        if _check_status(status, token, ctx):
            return
        now = time.monotonic()
        beat = status.get("beat") if status and status.get("token") == token else None
        if beat is not None and beat != last_beat:
            last_beat, last_beat_at = beat, now  # this node's clock: nodes' clocks differ
        elif now - last_beat_at >= stale:
            raise TraduireError(f"rank {ctx.rank}: rank 0 stopped reporting: no word from it "
                                f"in {status_file} for {stale:.0f} s while it prepared the "
                                "data and tokenizer (see rank 0's output; set "
                                "TRADUIRE_HEARTBEAT_TIMEOUT to wait longer)")
        time.sleep(0.5)
        if now - last_said >= 60:
            last_said = now
            say(f"rank {ctx.rank}: waiting for rank 0 to prepare the data and tokenizer "
                f"({(now - started) / 60:.0f} min)")


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


def _write_status(path: Path, token: str, state: str, message: str, beat: int | None = None
                  ) -> None:
    record: dict[str, Any] = {"token": token, "state": state, "message": message}
    if beat is not None:
        record["beat"] = beat
    atomic_write_text(path, json.dumps(record))


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


def shutdown(together: bool = False) -> None:
    """Leave the process group. `together` (a run that ended the same way on every rank): wait
    for every rank first, so that none closes its connections while another still reads or
    writes on them; gloo ends a process with SIGABRT when a connection closes under it. Not
    after an error: a rank that died would keep the others waiting until the timeout."""
    global _control_group
    if _active():
        if together:
            dist.barrier(group=_control_group)
        dist.destroy_process_group()
    _control_group = None


def data_parallel(model: torch.nn.Module, grad_reduce: str) -> torch.nn.Module:
    """`model` wrapped for data parallelism (DDP). No buffer is broadcast before each forward
    pass (the model's one buffer, the position table, never changes); the gradients live in
    DDP's all-reduce buckets instead of being copied into them and back; and with NCCL,
    grad_reduce "bf16" sends them in bf16, half the bytes of fp32 (242 MB a step for
    Transformer-base, 836 MB for Transformer-big, in fp32): each rank's gradient is rounded to
    bf16, summed, and written back in fp32. gloo (CPU training) keeps fp32 whatever it says."""
    import inspect

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False is spelled forward_sync_buffers=False from torch 2.13 on.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True, **{no_sync: False})
    if grad_reduce == "bf16" and bf16_reduce_supported():
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def bf16_reduce_supported() -> bool:
    """Whether the gradients' backend sums bf16 itself: NCCL from 2.10, on GPUs with bf16."""
    return (_active() and dist.get_backend() == "nccl" and torch.cuda.is_bf16_supported()
            and torch.cuda.nccl.version() >= (2, 10))


class Agreement:
    """`any_rank` without waiting for it: the maximum over the ranks of small integers,
    started when made and read with `result`. The training loop starts one as a step begins
    and reads it when the step is done, so that the exchange runs while the step computes
    instead of holding the host after it; what any rank asked for by the start of a step,
    every rank learns at its end, at the same step."""

    def __init__(self, values: list[int]) -> None:
        self._values, self._work = values, None
        if _active():
            self._tensor = torch.tensor(values, dtype=torch.int64)
            self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX,
                                         group=_control_group, async_op=True)

    def result(self) -> list[int]:
        if self._work is None:
            return self._values
        self._work.wait()
        return self._tensor.tolist()
