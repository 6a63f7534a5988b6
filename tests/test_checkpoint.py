"""Tests for traduire.checkpoint: safe loading, atomic saves, pruning and averaging."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from traduire import files
from traduire.checkpoint import (
    FORMAT_VERSION,
    average_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
)
from traduire.errors import CheckpointError


def sample_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.98)}]},
            "train_state": {"step": 7, "epoch": 1, "best_valid_loss": float("inf")},
            "rng": {"torch": torch.get_rng_state()},
            "config": {"model": {"layers": 2}, "train": {"adam_betas": (0.9, 0.98)}}}


def test_round_trip(tmp_path):
    state = sample_state()
    path = tmp_path / "ckpt" / "step_00000007.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    for key in ("w", "b"):
        assert torch.equal(loaded["model"][key], state["model"][key])
    assert loaded["train_state"] == state["train_state"]
    assert loaded["optimizer"] == state["optimizer"]
    assert loaded["config"] == state["config"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    # No temporary file is left beside the checkpoint.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, sample_state())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_and_garbage_files(tmp_path):
    for name, data in (("empty.pt", b""), ("garbage.pt", b"not a checkpoint at all")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(path)


def test_not_a_traduire_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a traduire checkpoint"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "model": {}}, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Opener:
    def __reduce__(self):
        return (io.open, ("/dev/null",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    # Both the torch zip format and a bare pickle stream; a global from a module torch blocks
    # outright (os) and one it merely does not allow (io.open): each named in the error.
    zipped = tmp_path / "zipped.pt"
    torch.save({"format_version": 1, "model": {}, "payload": _Exploit(marker)}, zipped)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format_version": 1, "model": _Exploit(marker)}, protocol=2))
    opener = tmp_path / "opener.pt"
    torch.save({"format_version": 1, "model": _Opener()}, opener)
    system = f"{os.system.__module__}.system"
    for path, name in ((zipped, system), (raw, system), (opener, "io.open")):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == (
            f"{path}: not a readable traduire checkpoint (it holds Python objects ({name}), "
            "not only tensors and plain data; they were not loaded, since unpickling them "
            "could run code)")
        assert not marker.exists()


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, sample_state(seed=1))
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, sample_state(seed=2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], sample_state(seed=1)["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone


def test_step_checkpoints_sorted_numerically_and_prune_keeps_last(tmp_path):
    for step in (30, 5, 100, 20, 1000):
        save_checkpoint(tmp_path / f"step_{step}.pt", sample_state())
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "step_12.pt.tmp").write_bytes(b"x")
    assert [p.name for p in step_checkpoints(tmp_path)] == [
        "step_5.pt", "step_20.pt", "step_30.pt", "step_100.pt", "step_1000.pt"]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_100.pt", "step_1000.pt"]
    assert (tmp_path / "best.pt").exists()
    prune_checkpoints(tmp_path, keep_last=5)
    assert len(step_checkpoints(tmp_path)) == 2


def test_average_of_two_is_the_mean(tmp_path):
    a, b = sample_state(seed=1), sample_state(seed=2)
    a["model"]["count"] = torch.tensor([2, 4])  # an integer buffer keeps its dtype
    b["model"]["count"] = torch.tensor([4, 8])
    save_checkpoint(tmp_path / "a.pt", a)
    save_checkpoint(tmp_path / "b.pt", b)
    averaged = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    for key in ("w", "b"):
        expected = (a["model"][key] + b["model"][key]) / 2
        torch.testing.assert_close(averaged["model"][key], expected, atol=1e-7, rtol=0)
        assert averaged["model"][key].dtype == torch.float32
    assert torch.equal(averaged["model"]["count"], torch.tensor([3, 6]))
    assert "optimizer" not in averaged and "rng" not in averaged
    assert averaged["train_state"] == a["train_state"]
    assert averaged["averaged_from"] == [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]


def test_average_refuses_different_parameters_and_empty_list(tmp_path):
    a, b = sample_state(), sample_state()
    del b["model"]["b"]
    save_checkpoint(tmp_path / "a.pt", a)
    save_checkpoint(tmp_path / "b.pt", b)
    with pytest.raises(CheckpointError, match="b.pt"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    with pytest.raises(CheckpointError):
        average_checkpoints([])
