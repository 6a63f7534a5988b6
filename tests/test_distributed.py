"""Data parallelism on CPU with gloo: the same result whatever the number of ranks, resumable
at another world size, and a failing rank ends the whole job quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_settings, write_config
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import load_config
from traduire.pipeline import run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed unavailable")


def torchrun(nproc: int, args: list[str], timeout: float = 240, script: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run `traduire` (or a script) under torchrun with `nproc` CPU ranks."""
    target = [str(script)] if script else ["-m", "traduire"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRADUIRE_DIST_TIMEOUT": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


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
    assert result.returncode == 0, result.stderr[-2000:]
    single, double = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_weights(single, double)
    # The second step really moved the weights, so the comparison is not vacuous.
    after_one_step = load_checkpoint(step_checkpoints(tmp_path / "one" / "checkpoints")[0])
    assert any(not torch.equal(single[k], v) for k, v in after_one_step["model"].items())


def test_resume_at_another_world_size_continues_the_same_run(tmp_path, corpus_dir):
    config_path = deterministic_config(tmp_path, corpus_dir, max_steps=6, save_every=3,
                                       valid_every=3)
    run(load_config(config_path), tmp_path / "straight")  # world size 1 throughout

    # World size 2 stops at step 3 (as if killed after its checkpoint) ...
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "moved"),
                          "--set", "train.max_steps=3"])
    assert result.returncode == 0, result.stderr[-2000:]
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
    script.write_text(textwrap.dedent("""
        import os, sys
        from traduire import cli, training

        original = training.Trainer._train_step

        def failing_step(self, *args):
            if self.dist.rank == 1 and self.state.step == 2:
                raise RuntimeError("injected failure on rank 1")
            return original(self, *args)

        training.Trainer._train_step = failing_step
        sys.argv = ["traduire", *sys.argv[1:]]
        cli.main()
    """))
    started = time.monotonic()
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "run")],
                      script=script, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    # The bystander says why it stops in one line instead of a second traceback.
    assert "rank 0: stopping because another rank failed" in result.stderr
    # Start-up (two interpreters importing torch) takes most of this; a hang would take the
    # whole distributed timeout.
    assert elapsed < 50, f"job took {elapsed:.0f}s to end"
