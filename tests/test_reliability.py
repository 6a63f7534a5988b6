"""Faults during training: SIGKILL at random moments, SIGINT/SIGTERM, a full disk while a
checkpoint is written, corrupt checkpoints, and non-finite losses.

The promise under test: an interrupted job loses at most the work since its last checkpoint,
and resuming gives the same weights as never having been interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import write_config
from traduire import files
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.cli import app
from traduire.config import load_config
from traduire.training import Trainer

runner = CliRunner()

def steps(run_dir: Path) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in step_checkpoints(run_dir / "checkpoints")]


def flat(text: str) -> str:
    """Output with line breaks removed: rich may wrap long lines (paths) in a non-terminal."""
    return text.replace("\n", "")


@pytest.fixture(scope="module")
def base_run(small_run) -> tuple[Path, Path]:
    return small_run


@pytest.fixture
def run_copy(base_run, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("COLUMNS", "400")
    return Path(shutil.copytree(base_run[1], tmp_path / "run"))


@pytest.fixture
def prepared(base_run, tmp_path) -> tuple[Path, Path]:
    """The shared run's data and tokenizer stages, without any training: a process started
    on it goes straight to training (saves the data stage's seconds at every start)."""
    config_path, run_dir = base_run
    untrained = {"checkpoints", "best.pt", "metrics.jsonl"}
    shutil.copytree(run_dir, tmp_path / "run", ignore=lambda d, names: [
        n for n in names if Path(d) == run_dir and n in untrained])
    return config_path, tmp_path / "run"


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# --- signals (real processes) --------------------------------------------------------------------


def start_training(config_path: Path, run_dir: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "traduire", "train", "-c", str(config_path), "-r",
             str(run_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for_checkpoint_after(proc: subprocess.Popen, run_dir: Path, step: int,
                              timeout: float = 300.0) -> None:
    """Wait until a checkpoint newer than `step` exists (the process is making progress).
    The timeout only ends a hung wait: a slow machine takes as long as it takes."""
    deadline = time.monotonic() + timeout
    while max(steps(run_dir), default=0) <= step:
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "no new checkpoint in time"
        time.sleep(0.05)


def assert_all_checkpoints_loadable(run_dir: Path) -> None:
    for path in step_checkpoints(run_dir / "checkpoints"):
        state = load_checkpoint(path)
        assert state["train_state"]["step"] == int(path.stem.split("_")[1])


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_weights(prepared, tmp_path):
    from traduire.pipeline import run

    base_config, run_dir = prepared
    straight_dir = Path(shutil.copytree(run_dir, tmp_path / "straight"))
    config = yaml.safe_load(base_config.read_text())
    # The processes to kill have no step limit, so none can finish before its kill however
    # fast the machine; only the last is given one, a few steps past where the kills left
    # off. The limit is a bound that may change between runs of one directory, and under the
    # inverse_sqrt schedule no step computes anything differently for it.
    config["train"]["schedule"] = "inverse_sqrt"
    config["train"]["max_steps"] = 0
    unbounded = write_config(tmp_path / "unbounded.yaml", config)
    rng = random.Random(20261128)
    last = 0  # the newest checkpoint when the previous process died
    killed_at: list[int] = []
    for attempt in range(5):
        log = tmp_path / f"attempt{attempt}.log"
        proc = start_training(unbounded, run_dir, log)
        try:
            # Kill only after this process has saved its first, second or third checkpoint:
            # every kill then interrupts real progress, on a slow machine as on a fast one.
            wait_for_checkpoint_after(proc, run_dir, last + 2 * rng.randint(0, 2))
            time.sleep(rng.uniform(0.0, 0.05))  # the kill lands mid-step, mid-save, wherever
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        if attempt:  # every restart continued from the newest checkpoint, not from scratch
            assert f"resuming at step {last}" in log.read_text(), log.read_text()
        assert_all_checkpoints_loadable(run_dir)
        assert max(steps(run_dir)) > last  # each process got further; none went backwards
        last = max(steps(run_dir))
        killed_at.append(last)
    assert len(killed_at) == 5, killed_at
    end = last + 4  # two more checkpoints' worth of steps after the last kill
    config["train"]["max_steps"] = end
    config_path = write_config(tmp_path / "bounded.yaml", config)
    log = tmp_path / "final.log"
    proc = start_training(config_path, run_dir, log)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text()  # a safety net, not a measure
    finally:
        proc.kill()
        proc.wait()
    assert f"resuming at step {last}" in log.read_text()
    assert f"done: step {end}" in log.read_text()
    assert_all_checkpoints_loadable(run_dir)

    run(load_config(config_path), straight_dir)  # the same config, never interrupted
    final = f"step_{end:08d}.pt"
    killed = load_checkpoint(run_dir / "checkpoints" / final)
    straight = load_checkpoint(straight_dir / "checkpoints" / final)
    assert killed["model"].keys() == straight["model"].keys()
    for name, weight in straight["model"].items():
        torch.testing.assert_close(killed["model"][name], weight, atol=1e-6, rtol=0)
    assert killed["train_state"]["step"] == straight["train_state"]["step"] == end
    assert killed["train_state"]["epoch"] == straight["train_state"]["epoch"]
    assert killed["train_state"]["batch_in_epoch"] == straight["train_state"]["batch_in_epoch"]


@pytest.mark.slow
def test_sigint_and_sigterm_save_then_resume(prepared, tmp_path, monkeypatch):
    base_config, run_dir = prepared
    config = yaml.safe_load(base_config.read_text())
    # No step limit: only the signal can end these processes, however fast the machine.
    config["train"]["max_steps"] = 0
    config_path = write_config(tmp_path / "unbounded.yaml", config)
    last = 0
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        log = tmp_path / f"{sig.name}.log"
        proc = start_training(config_path, run_dir, log)
        try:
            wait_for_checkpoint_after(proc, run_dir, last)
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == code, log.read_text()
        finally:
            proc.kill()
            proc.wait()
        text = flat(log.read_text())
        assert "Traceback" not in text
        found = re.search(rf"stopped by {sig.name} at step (\d+); checkpoint (\S+)\.", text)
        assert found, text
        assert "resume" in text
        stopped_at = int(found.group(1))
        # The checkpoint is the step it stopped at, not an older periodic one.
        assert Path(found.group(2)).name == f"step_{stopped_at:08d}.pt"
        assert max(steps(run_dir)) == stopped_at
        assert load_checkpoint(found.group(2))["train_state"]["step"] == stopped_at
        last = stopped_at
    monkeypatch.setenv("COLUMNS", "400")
    result = cli("train", "-r", run_dir, "--set", f"train.max_steps={last + 2}")
    assert result.exit_code == 0, result.output
    assert f"resuming at step {last}" in result.stderr
    assert f"done: step {last + 2}" in result.stderr


# --- disk full, corrupt checkpoints (in-process) ---------------------------------------------


class FullDisk:
    """A file whose write stores half the bytes and then fails as a full disk does."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def fill_disk_for_checkpoints(monkeypatch) -> None:
    """Make atomic_write_bytes' write fail with ENOSPC, for step_*.pt files only."""
    real_mkstemp, real_fdopen = files.tempfile.mkstemp, files.os.fdopen
    names: dict[int, str] = {}

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        names[fd] = Path(name).name
        return fd, name

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        return FullDisk(file) if names.get(fd, "").startswith(".step_") else file

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(files.os, "fdopen", fdopen)


def test_disk_full_during_checkpoint_keeps_the_previous_one(run_copy, monkeypatch):
    checkpoints = run_copy / "checkpoints"
    before = (checkpoints / "step_00000006.pt").read_bytes()
    fill_disk_for_checkpoints(monkeypatch)
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=8")
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert "step_00000008.pt" in lines[0]  # the message names the file
    print(f"MESSAGE disk full -> {lines[0]}")
    assert (checkpoints / "step_00000006.pt").read_bytes() == before
    assert load_checkpoint(checkpoints / "step_00000006.pt")["train_state"]["step"] == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]  # no temporary file left
    # With space again, the run continues from the last checkpoint: 2 steps lost at most.
    monkeypatch.setenv("COLUMNS", "400")
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert "resuming at step 6" in result.stderr


def test_corrupt_and_truncated_newest_checkpoints_fall_back(run_copy):
    checkpoints = run_copy / "checkpoints"
    newest = checkpoints / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    (checkpoints / "step_00000004.pt").write_bytes(b"\x00garbage" * 100)  # corrupt
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=8")
    assert result.exit_code == 0, result.output
    err = flat(result.stderr)
    for bad in ("step_00000006.pt", "step_00000004.pt"):
        assert re.search(rf"warning:.*{bad}", err), err
    for line in result.stderr.splitlines():
        if line.startswith("warning:"):
            print(f"MESSAGE corrupt checkpoint -> {line}")
    assert "resuming at step 2" in err
    assert "done: step 8" in err
    assert load_checkpoint(checkpoints / "step_00000008.pt")["train_state"]["step"] == 8


def test_no_readable_checkpoint_at_all_is_an_error_not_a_fresh_start(run_copy):
    for path in (run_copy / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"garbage")
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=8")
    assert result.exit_code == 1
    assert "none of the 3 checkpoints" in flat(result.stderr)
    assert "Traceback" not in result.output


def test_fallback_warning_names_a_checkpoint_whose_path_has_brackets(run_copy):
    run_dir = Path(shutil.move(run_copy, run_copy.parent / "run[x]"))
    newest = run_dir / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(b"garbage")
    result = cli("train", "-r", run_dir, "--set", "train.max_steps=7")
    assert result.exit_code == 0, result.output
    assert str(newest) in flat(result.stderr)


def test_resume_removes_temporary_files_left_by_a_killed_save(run_copy):
    stale = run_copy / "checkpoints" / ".step_00000008.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=7")
    assert result.exit_code == 0, result.output
    assert not stale.exists()


# --- non-finite losses ----------------------------------------------------------------------


def nan_on_steps(monkeypatch, bad_steps) -> None:
    real_loss = Trainer._loss

    def loss(self, batch, label_smoothing):
        value = real_loss(self, batch, label_smoothing)
        return value * float("nan") if bad_steps(self.state.step + 1) else value

    monkeypatch.setattr(Trainer, "_loss", loss)


def test_nan_steps_are_skipped_and_counted(run_copy, monkeypatch):
    nan_on_steps(monkeypatch, lambda step: step in (7, 8))
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=10",
                 "--set", "train.log_every=1")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in
               (run_copy / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "skipped_steps" in r]
    assert train_records[-1]["step"] == 10 and train_records[-1]["skipped_steps"] == 2
    state = load_checkpoint(run_copy / "checkpoints" / "step_00000010.pt")
    assert state["train_state"]["skipped_steps"] == 2
    assert state["train_state"]["bad_steps_in_a_row"] == 0
    assert all(torch.isfinite(w).all() for w in state["model"].values())


def test_many_nan_steps_in_a_row_stop_the_run(run_copy, monkeypatch):
    nan_on_steps(monkeypatch, lambda step: step > 6)
    result = cli("train", "-r", run_copy, "--set", "train.max_steps=20",
                 "--set", "train.max_bad_steps=3")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: the loss was not finite for 3 steps in a row"), lines
    assert "(step 9)" in lines[-1] and "train.lr" in lines[-1]
    print(f"MESSAGE NaN x3 -> {lines[-1]}")
    assert "step_00000008.pt" in lines[-1]  # the newest checkpoint, named as the last good one
    # Skipped steps never touched the weights: step 8 holds step 6's weights, all finite.
    at_6, at_8 = (load_checkpoint(run_copy / "checkpoints" / f"step_0000000{n}.pt")
                  for n in (6, 8))
    for name, weight in at_8["model"].items():
        assert torch.isfinite(weight).all()
        assert torch.equal(weight, at_6["model"][name])
    assert at_8["train_state"]["skipped_steps"] == 2
