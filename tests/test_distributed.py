"""Data parallelism on CPU with gloo: the same result whatever the number of ranks, resumable
at another world size, and a failing rank ends the whole job quickly; with dropout on, a run
stopped (by a signal to one rank) and resumed at the same world size is the run that never
stopped, on one machine or across two launchers as on two machines."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_settings, write_config, write_corpus
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import load_config
from traduire.monitor import read_metrics
from traduire.pipeline import run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed unavailable")


# PYTHONFAULTHANDLER: a rank that crashes (SIGABRT, SIGSEGV) prints its threads' stacks.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRADUIRE_DIST_TIMEOUT": "60",
       "PYTHONFAULTHANDLER": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def ranks_output(result: subprocess.CompletedProcess) -> str:
    """What a failed launch's ranks printed: the end of stderr without torchrun's own report
    of the failure (a Python traceback and a table), which would fill a short tail."""
    text = result.stderr
    report = text.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    start = text.rfind("Traceback (most recent call last)", 0, max(report, 0))
    return text[:start if start != -1 else None][-6000:]


def torchrun(nproc: int, args: list[str], timeout: float = 240, script: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `traduire` (or a script) under torchrun with `nproc` CPU ranks."""
    target = [str(script)] if script else ["-m", "traduire"]
    command = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})


def deterministic_config(tmp_path: Path, corpus_dir: Path, **train) -> Path:
    # No dropout: each rank draws its own dropout masks, so only a dropout-free step can be
    # compared exactly across world sizes. A large Adam epsilon: Adam's first steps move every
    # weight by about lr * sign(gradient), so a gradient that is zero in exact arithmetic (the
    # key bias: softmax ignores it) but 1e-10 in floats would flip sign with the summation order.
    settings = tiny_settings(corpus_dir, model={"dropout": 0.0},
                             train={"batch_tokens": 512, "threads": 1, "adam_eps": 1e-3,
                                    **train})
    return write_config(tmp_path / "ddp.yaml", settings)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(step_checkpoints(run_dir / "checkpoints")[-1])["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_two_ranks_with_half_batches_equal_one_rank_with_whole(tmp_path, corpus_dir):
    config_path = deterministic_config(tmp_path, corpus_dir, max_steps=2, save_every=1,
                                       valid_every=2)
    run(load_config(config_path), tmp_path / "one")
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "two")])
    assert result.returncode == 0, ranks_output(result)
    single, double = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_weights(single, double)
    # The second step really moved the weights, so the comparison is not vacuous.
    after_one_step = load_checkpoint(step_checkpoints(tmp_path / "one" / "checkpoints")[0])
    assert any(not torch.equal(single[k], v) for k, v in after_one_step["model"].items())


def test_two_ranks_sample_and_decide_a_budget_as_one_rank_does(tmp_path, corpus_dir):
    """Subword sampling draws per sentence, whichever rank trains it; the budget schedule's
    decision (here the step budget's decay, at step 8, ends first: max_time is an hour) is
    taken on every rank at the same step."""
    settings = tiny_settings(corpus_dir, model={"dropout": 0.0},
                             tokenizer={"sample_alpha": 0.5, "sample_nbest": 8},
                             train={"batch_tokens": 512, "threads": 1, "adam_eps": 1e-3,
                                    "max_steps": 10, "max_time": "1h", "schedule": "budget",
                                    "warmup_steps": 2, "save_every": 10, "valid_every": 10})
    config_path = write_config(tmp_path / "sampled.yaml", settings)
    run(load_config(config_path), tmp_path / "one")
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "two")])
    assert result.returncode == 0, ranks_output(result)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    for name in ("one", "two"):
        records = [json.loads(line) for line in
                   (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        decided = [(r["step"], r["decay_start"], r["end"]) for r in records if "schedule" in r]
        assert decided == [(8, 8, 10)], name


def test_resume_at_another_world_size_continues_the_same_run(tmp_path, corpus_dir):
    config_path = deterministic_config(tmp_path, corpus_dir, max_steps=6, save_every=3,
                                       valid_every=3)
    run(load_config(config_path), tmp_path / "straight")  # world size 1 throughout

    # World size 2 stops at step 3 (as if killed after its checkpoint) ...
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "moved"),
                          "--set", "train.max_steps=3"])
    assert result.returncode == 0, ranks_output(result)
    saved = load_checkpoint(step_checkpoints(tmp_path / "moved" / "checkpoints")[-1])
    assert saved["train_state"]["step"] == 3 and saved["world_size"] == 2
    # ... and world size 1 continues from step 3 to 6 over the same batches.
    state = run(load_config(config_path), tmp_path / "moved")
    assert state.step == 6
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "moved"))
    losses = {}
    for name in ("straight", "moved"):
        records = [json.loads(line) for line in
                   (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}
    assert losses["straight"][6] == pytest.approx(losses["moved"][6], abs=1e-4)


def test_an_error_on_one_rank_ends_the_whole_job_quickly(tmp_path, corpus_dir):
    config_path = deterministic_config(tmp_path, corpus_dir, max_steps=1000, save_every=1000,
                                       valid_every=1000)
    script = tmp_path / "fail_on_rank1.py"
    failed_at = tmp_path / "failed_at"  # the wall clock when rank 1 fails
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from traduire import cli, training

        original = training.Trainer._train_step

        def failing_step(self, *args):
            if self.dist.rank == 1 and self.state.step == 2:
                Path({str(failed_at)!r}).write_text(repr(time.time()))
                raise RuntimeError("injected failure on rank 1")
            return original(self, *args)

        training.Trainer._train_step = failing_step
        sys.argv = ["traduire", *sys.argv[1:]]
        cli.main()
    """))
    # The process-group timeout of a real job (600 s): a hang waits that long, far beyond
    # what ending after the failure takes even on a slow, busy machine. The subprocess
    # timeout only keeps a hung job from holding the suite for all of it.
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "run")],
                      script=script, timeout=300, env={"TRADUIRE_DIST_TIMEOUT": "600"})
    ended = time.time()
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    # The bystander says why it stops in one line instead of a second traceback.
    assert "rank 0: stopping because another rank failed" in result.stderr
    # Timed from the failure, not from the launch: start-up (two interpreters importing
    # torch, the data stages) takes as long as the machine needs.
    took = ended - float(failed_at.read_text())
    assert took < 120, f"the job took {took:.0f}s to end after the failure"


# --- Exact resume with dropout: a signal to one rank, two launchers, another world size ------

# The toy corpus makes 4 batches of 1024 tokens an epoch: the second half crosses into epoch 1.
STEPS, HALF, BATCH_TOKENS = 6, 3, 1024
NAN_RANK, NAN_STEP = 1, 2  # the rank and step whose loss is made NaN in every dropout run
PEAK = 1e12  # a made-up peak FLOP/s per CPU device, so that records carry an MFU
README = Path(__file__).resolve().parents[1] / "README.md"

# `traduire` as the command line runs it (after a line setting PEAK, NAN_RANK and NAN_STEP),
# with PEAK as each device's peak, rank NAN_RANK's loss of step NAN_STEP made NaN (as a rare
# bad batch would), and, when WAIT_FOR_SIGNAL=RANK:STEP:FILE is set, that rank writing its pid
# to FILE before STEP and waiting there until a signal reaches it (the others wait for it in
# the step's all-reduce).
RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
from traduire import cli, training

training.peak_flops = lambda device: PEAK
original_loss = training.Trainer._loss

def loss(self, *args):
    value = original_loss(self, *args)
    bad = self.dist.rank == NAN_RANK and self.state.step + 1 == NAN_STEP
    return value * float("nan") if bad else value

training.Trainer._loss = loss
if "WAIT_FOR_SIGNAL" in os.environ:
    rank, step, ready = os.environ["WAIT_FOR_SIGNAL"].split(":", 2)
    original = training.Trainer._train_step

    def waiting_step(self, *args):
        if self.dist.rank == int(rank) and self.state.step + 1 == int(step):
            Path(ready).write_text(str(os.getpid()))
            while not self.stop_request.signal_number:
                time.sleep(0.01)
        return original(self, *args)

    training.Trainer._train_step = waiting_step
sys.argv = ["traduire", *sys.argv[1:]]
cli.main()
"""


class DropoutRuns:
    """A config with dropout 0.1 (STEPS steps, a log line per step, no periodic checkpoint),
    the script that runs its ranks (one loss is NaN in every run: see RANK_SCRIPT), and the
    straight two-rank run every interrupted run must end equal to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        settings = tiny_settings(write_corpus(root / "data"), model={"dropout": 0.1},
                                 train={"batch_tokens": BATCH_TOKENS, "threads": 1,
                                        "max_steps": STEPS, "save_every": 100,
                                        "valid_every": 100, "log_every": 1})
        self.config = write_config(root / "dropout.yaml", settings)
        self.script = root / "rank.py"
        self.script.write_text(f"PEAK, NAN_RANK, NAN_STEP = {PEAK!r}, {NAN_RANK}, {NAN_STEP}\n"
                               + RANK_SCRIPT)
        self.straight = root / "straight"

    def train_args(self, run_dir: Path, *overrides: str) -> list[str]:
        return ["train", "-c", str(self.config), "-r", str(run_dir),
                *(arg for o in overrides for arg in ("--set", o))]


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory) -> DropoutRuns:
    runs = DropoutRuns(tmp_path_factory.mktemp("dropout"))
    result = torchrun(2, runs.train_args(runs.straight), script=runs.script)
    assert result.returncode == 0, ranks_output(result)
    state = load_checkpoint(step_checkpoints(runs.straight / "checkpoints")[-1])["train_state"]
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise the same weights at the end, and the same batch and loss at every step."""
    got, want = final_weights(run_dir), final_weights(reference)
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    got_steps, want_steps = train_records(run_dir), train_records(reference)
    assert sorted(got_steps) == sorted(want_steps) == list(range(1, STEPS + 1))
    for step, want_step in want_steps.items():
        for key in ("loss", "src_tokens", "tgt_tokens"):
            assert got_steps[step][key] == want_step[key], (step, key)


def readme_launcher_flags() -> list[str]:
    """The torchrun flags of the README's command for two machines."""
    found = re.search(r"^torchrun --nnodes=2(?:[^\n]*\\\n)*[^\n]*", README.read_text("utf-8"),
                      re.M)
    assert found, "README: no two-machine torchrun command"
    words = shlex.split(found.group(0).replace("\\\n", " "))
    return words[1:words.index("-m")]


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


class Preempted:
    """The dropout run as two machines would train it (two torchrun launchers of one process
    each, with the README's command, the host made 127.0.0.1 and one process a node), stopped
    by SIGTERM to the process of rank 1 while the other waits for it in step HALF. Tests copy
    `run_dir` before resuming it."""

    def __init__(self, runs: DropoutRuns) -> None:
        self.run_dir, ready = runs.root / "two-launchers", runs.root / "rank1-ready"
        flags = [flag.replace("HOST0:29500", f"127.0.0.1:{free_port()}")
                 .replace("--nproc_per_node=8", "--nproc_per_node=1")
                 for flag in readme_launcher_flags()]
        assert flags[:2] == ["--nnodes=2", "--nproc_per_node=1"] and "--standalone" not in flags
        command = [*TORCHRUN, *flags, str(runs.script), *runs.train_args(self.run_dir)]
        self.logs = [runs.root / f"launcher{node}.log" for node in (0, 1)]
        # The process-group timeout of a real job (600 s), which a hang would wait out: far
        # beyond what stopping takes even on a slow, busy machine (see `took`).
        env = {**ENV, "WAIT_FOR_SIGNAL": f"1:{HALF}:{ready}", "TRADUIRE_DIST_TIMEOUT": "600"}
        launchers = [subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      env=env) for log in self.logs]
        try:
            deadline = time.monotonic() + 300  # a safety net for a start-up that never ends
            while not ready.exists():  # rank 1 is about to train step HALF
                assert time.monotonic() < deadline and all(x.poll() is None for x in launchers), \
                    self.output()
                time.sleep(0.05)
            sent = time.monotonic()
            os.kill(int(ready.read_text()), signal.SIGTERM)
            self.codes = [launcher.wait(timeout=300) for launcher in launchers]
            self.took = time.monotonic() - sent
        finally:
            for launcher in launchers:
                launcher.kill()

    def output(self) -> str:
        return "\n".join(flat(log.read_text()) for log in self.logs)

    def worker_exit_codes(self) -> dict[int, int]:
        """Each rank's exit status, from its launcher's report of a failed worker."""
        found = re.findall(r"rank : (\d+) \(local_rank: 0\) exitcode : (-?\d+)", self.output())
        return {int(rank): int(code) for rank, code in found}


@pytest.fixture(scope="module")
def preempted(dropout_runs) -> Preempted:
    return Preempted(dropout_runs)


def test_sigterm_to_one_rank_stops_every_rank_at_once_with_one_checkpoint(preempted):
    output = preempted.output()
    # Every rank exits 143 itself (a rank killed by its launcher would show -15), so each
    # launcher reports its worker as failed.
    assert preempted.worker_exit_codes() == {0: 143, 1: 143}, output
    assert preempted.codes == [1, 1], output
    # A step, a checkpoint and the interpreters exiting; a hang would last the 600 s timeout.
    assert preempted.took < 120, f"the ranks took {preempted.took:.1f}s to stop"
    # No traceback from a worker (each launcher then prints its own, of ChildFailedError).
    assert all("Traceback" not in log.read_text().split("] failed (exitcode: ")[0]
               for log in preempted.logs)
    assert f"SIGTERM reached another rank: stopping after step {HALF}" in output
    assert f"stopped by SIGTERM at step {HALF}" in output
    # One checkpoint, of the step both ranks stopped at, with each rank's own random state.
    checkpoints = step_checkpoints(preempted.run_dir / "checkpoints")
    assert [p.name for p in checkpoints] == [f"step_{HALF:08d}.pt"]
    saved = load_checkpoint(checkpoints[0])
    assert saved["train_state"]["step"] == HALF and saved["world_size"] == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])


def test_the_two_machine_run_resumes_on_one_machine_exactly(dropout_runs, preempted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(preempted.run_dir, run_dir)
    result = torchrun(2, dropout_runs.train_args(run_dir), script=dropout_runs.script)
    assert result.returncode == 0, ranks_output(result)
    assert f"resuming at step {HALF}" in result.stderr
    assert_same_run(run_dir, dropout_runs.straight)


def test_a_loss_that_is_not_finite_on_one_rank_is_skipped_by_every_rank(dropout_runs):
    # Its gradients reach every rank through the all-reduce: a rank that took the step while
    # the other skipped it would be left with NaN weights, and then both would.
    records = train_records(dropout_runs.straight)
    assert [r["skipped_steps"] for _, r in sorted(records.items())] == \
        [int(step >= NAN_STEP) for step in range(1, STEPS + 1)]
    assert all(math.isfinite(r["loss"]) for step, r in records.items() if step != NAN_STEP)
    assert all(torch.isfinite(w).all() for w in final_weights(dropout_runs.straight).values())


def test_resume_at_another_world_size_repeats_the_batches_not_the_dropout(
        dropout_runs, preempted, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(preempted.run_dir, run_dir)
    monkeypatch.setattr("traduire.training.peak_flops", lambda device: PEAK)
    state = run(load_config(dropout_runs.config), run_dir)  # one process
    straight = load_checkpoint(step_checkpoints(dropout_runs.straight / "checkpoints")[-1])
    assert state.step == STEPS
    assert (state.epoch, state.batch_in_epoch) == (straight["train_state"]["epoch"],
                                                   straight["train_state"]["batch_in_epoch"])
    got, want = train_records(run_dir), train_records(dropout_runs.straight)
    resumed = range(HALF + 1, STEPS + 1)
    # The same batches in the same order ...
    for step in resumed:
        assert (got[step]["src_tokens"], got[step]["tgt_tokens"]) == \
            (want[step]["src_tokens"], want[step]["tgt_tokens"]), step
    # ... but other dropout masks: one process draws them all from rank 0's stream.
    assert got[HALF + 1]["loss"] != want[HALF + 1]["loss"]
    weights = final_weights(run_dir)
    assert any(not torch.equal(weights[k], v) for k, v in straight["model"].items())
    # MFU over the peak of every device: for the same batches (the same FLOPs per token), two
    # devices at a given throughput report half the MFU of one.
    for step in resumed:
        one = got[step]["mfu"] / got[step]["tok_per_s"]
        two = want[step]["mfu"] / want[step]["tok_per_s"]
        assert one == pytest.approx(2 * two, rel=1e-9), step


def test_a_signal_repeated_at_once_is_one_request_and_a_later_ctrl_c_aborts(monkeypatch):
    from types import SimpleNamespace

    from traduire import distributed
    from traduire.distributed import StopRequest

    # A stopped clock: "at once" is then at once however long the machine takes between
    # two signals, and "later" is only when the test says so.
    monkeypatch.setattr(distributed, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    said: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(said.append) as request:
        signal.raise_signal(signal.SIGTERM)
        # The echo: torchrun passing the signal on, or Ctrl-C reaching every process.
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert request.signal_number == signal.SIGTERM and len(said) == 1
        request._first_at -= request.ABORT_AFTER  # a person pressing Ctrl-C again, later
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# --- One checkpoint for all, and a run directory every node sees -------------------------------

# `traduire` with rank READS_OTHER's reads of a checkpoint sent to the one before it: the view
# of a node whose cache still shows an older file under the newest name.
STALE_VIEW_SCRIPT = """
import os, sys
from traduire import checkpoint, cli, training

original = training.load_checkpoint

def stale_view(path, *args, **kwargs):
    if int(os.environ["RANK"]) == READS_OTHER:
        older = checkpoint.step_checkpoints(path.parent)
        path = older[older.index(path) - 1]
    return original(path, *args, **kwargs)

training.load_checkpoint = stale_view
sys.argv = ["traduire", *sys.argv[1:]]
cli.main()
"""


def test_three_ranks_resume_rank_0s_checkpoint_and_refuse_a_rank_that_read_another(
        tmp_path, corpus_dir):
    config_path = deterministic_config(tmp_path, corpus_dir, max_steps=6, save_every=2,
                                       valid_every=100)
    run(load_config(config_path), tmp_path / "straight")  # world size 1 throughout
    run_dir = tmp_path / "run"  # stopped at step 4, then resumed by three ranks
    run(load_config(config_path, ["train.max_steps=4"]), run_dir)
    script = tmp_path / "stale.py"
    script.write_text("READS_OTHER = 2\n" + STALE_VIEW_SCRIPT)
    # Every rank reading the file itself: rank 2 reads step 2's state under step 4's name.
    result = torchrun(3, ["train", "-c", str(config_path), "-r", str(run_dir)], script=script,
                      env={"TRADUIRE_RESUME_READ": "each"})
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "error: rank 2 differs from rank 0 in weights or step after loading " \
           "step_00000004.pt; every rank must train from the same checkpoint" in flat(
               result.stderr), result.stderr[-3000:]
    assert said and "Traceback" not in result.stderr.split("error: ")[0]
    assert step_checkpoints(run_dir / "checkpoints")[-1].name == "step_00000004.pt"
    # By default rank 0 reads and the others receive its state: rank 2's view never matters,
    # and the run continues as the one that never stopped.
    result = torchrun(3, ["train", "-c", str(config_path), "-r", str(run_dir)], script=script)
    assert result.returncode == 0, ranks_output(result)
    assert "resuming at step 4" in result.stderr
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run_dir))


def test_two_nodes_with_run_directories_of_their_own_both_stop_within_the_bound(
        tmp_path, corpus_dir):
    config = deterministic_config(tmp_path, corpus_dir, max_steps=2)
    flags = [flag.replace("HOST0:29500", f"127.0.0.1:{free_port()}")
             .replace("--nproc_per_node=8", "--nproc_per_node=1")
             for flag in readme_launcher_flags()]
    env = {**ENV, "TRADUIRE_RUN_DIR_TIMEOUT": "3"}
    launchers = [subprocess.Popen([*TORCHRUN, *flags, "-m", "traduire", "train", "-c",
                                   str(config), "-r", str(tmp_path / f"node{node}")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env) for node in (0, 1)]
    try:
        outputs = [launcher.communicate(timeout=200)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    message = ("rank 1 did not see, within 3 s, the file rank 0 wrote into the run directory "
               "{}: the run directory must be on a filesystem all nodes share")
    for node, output in enumerate(outputs):
        assert launchers[node].returncode != 0, output
        assert message.format(tmp_path / f"node{node}") in flat(output), output[-3000:]
    # Nothing was prepared, and nothing is left that would make the directory foreign.
    assert not (tmp_path / "node0" / "data").exists()
    assert [p.name for p in (tmp_path / "node0").iterdir()] == []


def test_waiting_for_rank_0_lasts_while_its_heartbeat_goes_on_and_ends_when_it_stops(
        tmp_path, monkeypatch):
    import threading

    from traduire import distributed
    from traduire.errors import TraduireError

    monkeypatch.setattr(distributed, "HEARTBEAT_S", 0.05)
    status, waiting = tmp_path / "status.json", distributed.Context(1, 2)
    # Rank 0 works for 8 times the stale bound, beating all along: the wait outlasts it.
    work_done = threading.Event()

    def rank_0() -> None:
        with distributed._Heartbeat(status, "launch"):
            time.sleep(2.0)
        work_done.set()

    threading.Thread(target=rank_0).start()
    distributed._wait_for_main(status, "launch", waiting, print, stale=0.25)
    assert work_done.wait(5) and json.loads(status.read_text())["state"] == "done"
    # A rank 0 that stops beating (killed, its node gone) ends the wait within the bound.
    distributed._write_status(status, "launch-2", "working", "", beat=7)
    started = time.monotonic()
    with pytest.raises(TraduireError, match="^rank 1: rank 0 stopped reporting: no word from "
                                            "it in .* for 0 s"):
        distributed._wait_for_main(status, "launch-2", waiting, print, stale=0.4)
    assert time.monotonic() - started < 5
    # So does one that never wrote a status for this launch.
    with pytest.raises(TraduireError, match="rank 0 stopped reporting"):
        distributed._wait_for_main(status, "launch-3", waiting, print, stale=0.4)


# --- DDP's settings and the stop agreement, in one process -------------------------------------


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_data_parallel_broadcasts_no_buffers_and_keeps_gradients_in_its_buckets(one_rank_group):
    from traduire import distributed

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ddp = distributed.data_parallel(model, "bf16")
    assert ddp.gradient_as_bucket_view
    assert not (getattr(ddp, "forward_sync_buffers", None) or ddp.broadcast_buffers)
    # gloo: no bf16 hook, whatever grad_reduce says; the gradients are summed as they are.
    assert not distributed.bf16_reduce_supported() and not ddp._comm_hooks
    x = torch.randn(3, 4)
    ddp(x).square().sum().backward()
    expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, want)


def test_the_stop_agreement_is_the_maximum_over_the_ranks_read_later(one_rank_group):
    from traduire import distributed

    pending = distributed.Agreement([0, 15])
    assert pending.result() == [0, 15]
    assert distributed.Agreement([1, 0]).result() == [1, 0]
