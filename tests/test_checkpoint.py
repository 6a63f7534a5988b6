"""Tests for traduire.checkpoint: safe loading, atomic saves, pruning and averaging."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import small_settings, write_config, write_corpus
from traduire import files
from traduire.checkpoint import (
    FORMAT_VERSION,
    CheckpointWriter,
    TrainState,
    average_checkpoints,
    average_last,
    check_vocabulary,
    for_translation,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    rank_seed,
    remove_leftovers,
    restore_training,
    rng_state,
    save_average,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    training_checkpoint,
)
from traduire.config import load_config
from traduire.errors import CheckpointError
from traduire.tokenizer import Tokenizer


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


# --- what an unreadable checkpoint is reported as ----------------------------------------------


def reason(path: Path) -> str:
    """The part of load_checkpoint's error in parentheses: why the file cannot be used."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    prefix = f"{path}: not a readable traduire checkpoint ("
    assert message.startswith(prefix) and message.endswith(")"), message
    assert "\n" not in message and "\x1b" not in message
    return message[len(prefix):-1]


def test_each_kind_of_unreadable_file_has_its_own_reason(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert reason(tmp_path / "empty.pt") == "the file is empty"
    (tmp_path / "notes.pt").write_bytes(b"just some notes")
    assert reason(tmp_path / "notes.pt") == \
        "not a torch checkpoint file; it starts with b'just'"
    save_checkpoint(tmp_path / "cut.pt", sample_state())
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    cut = reason(tmp_path / "cut.pt")
    assert cut.startswith("a truncated, damaged or foreign zip archive: ")
    assert "central directory" in cut  # torch's own words follow
    # A pickle stream (torch's format before its zip one) cut short.
    (tmp_path / "stream.pt").write_bytes(pickle.dumps({"model": [1, 2, 3]}, protocol=2)[:-6])
    assert reason(tmp_path / "stream.pt").startswith("a truncated or damaged pickle: ")
    # A pickle using what the weights-only unpickler does not read (protocol 4 opcodes).
    (tmp_path / "protocol4.pt").write_bytes(pickle.dumps({"model": {1, 2}}, protocol=4))
    with pytest.warns(UserWarning, match="protocol 4"):
        assert reason(tmp_path / "protocol4.pt") == (
            "not a pickle that is safe to load (Unsupported operand 149); it was not "
            "unpickled, since that could run code")


def test_torchs_error_is_put_on_one_line_without_terminal_codes(tmp_path, monkeypatch):
    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x02}q\x00.")

    def fails(*args, **kwargs):
        raise RuntimeError("first line\n\n\x1b[1msecond\x1b[0m   line " + "x" * 300)

    monkeypatch.setattr(torch, "load", fails)
    assert reason(path) == "a truncated or damaged pickle: " + \
        ("first line second line " + "x" * 300)[:120]
    zipped = tmp_path / "odd.zip.pt"
    zipped.write_bytes(b"PK\x03\x04")
    assert reason(zipped) == "a truncated, damaged or foreign zip archive: " + \
        ("first line second line " + "x" * 300)[:120]

    def refuses(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. Something new.")

    monkeypatch.setattr(torch, "load", refuses)
    assert reason(path) == ("not a pickle that is safe to load; it was not unpickled, since "
                            "that could run code")


def test_a_file_that_cannot_be_read_is_not_called_empty(tmp_path, monkeypatch):
    from traduire import checkpoint

    path = tmp_path / "locked.pt"
    save_checkpoint(path, sample_state())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)  # what a file without read permission gives
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    assert reason(path) == "Permission denied"


def test_load_checkpoint_refuses_directories_and_states_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)
    for name, state in (("list.pt", [1, 2]), ("no-version.pt", {"model": {}}),
                        ("no-model.pt", {"format_version": 1})):
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}: not a traduire checkpoint"):
            load_checkpoint(tmp_path / name)


def test_load_checkpoint_maps_tensors_where_asked(tmp_path):
    save_checkpoint(tmp_path / "a.pt", sample_state())
    assert load_checkpoint(tmp_path / "a.pt")["model"]["w"].device.type == "cpu"
    assert load_checkpoint(tmp_path / "a.pt", map_location="meta")["model"]["w"].is_meta


# --- training state: random states, resuming, falling back ---------------------------------------


def test_rng_state_round_trip_continues_the_same_random_stream():
    torch.manual_seed(5)
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}  # no GPU generator on a CPU run
    first = torch.rand(5)
    torch.manual_seed(6)
    set_rng_state({**state, "cuda": torch.zeros(3)}, torch.device("cpu"))  # cuda: ignored
    assert torch.equal(torch.rand(5), first)


def test_rank_seeds_differ_by_rank_and_step_and_are_reproducible():
    seeds = {(seed, rank, step): rank_seed(seed, rank, step)
             for seed in (1, 2) for rank in range(4) for step in (0, 10)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(isinstance(v, int) and 0 <= v < 2**32 for v in seeds.values())
    assert rank_seed(1, 3) == rank_seed(1, 3, 0) == seeds[(1, 3, 0)]


def training_objects(seed: int, scale: float = 65536.0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.amp.GradScaler("cpu", init_scale=scale)


def test_a_training_checkpoint_restores_model_optimizer_state_and_random_stream(tmp_path):
    config = load_config(None, ["data.dir=x", "train.seed=9"])
    model, optimizer, scaler = training_objects(0, scale=1024.0)
    state = TrainState(step=12, epoch=2, batch_in_epoch=3, best_valid_loss=1.5)
    torch.manual_seed(77)
    other_rank = rng_state(torch.device("cpu"))
    torch.manual_seed(123)
    saved = training_checkpoint(model, optimizer, scaler, state,
                                [rng_state(torch.device("cpu")), other_rank], config,
                                "0123456789abcdef")
    assert saved["world_size"] == 2 and saved["config"] == config.to_dict()
    assert saved["vocabulary"] == "0123456789abcdef"
    save_checkpoint(tmp_path / "step_12.pt", saved)
    expected_draw = torch.rand(3)

    loaded = load_checkpoint(tmp_path / "step_12.pt")
    fresh, fresh_optimizer, fresh_scaler = training_objects(1)
    restored = restore_training(loaded, fresh, fresh_optimizer, fresh_scaler, config, rank=0,
                                world_size=2, device=torch.device("cpu"))
    assert restored == state
    assert torch.equal(torch.rand(3), expected_draw)  # the saved random stream goes on
    assert fresh_scaler.get_scale() == 1024.0  # fp16's loss scale goes on too
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    # Rank 1 of the same world size continues its own stream.
    restore_training(loaded, fresh, fresh_optimizer, fresh_scaler, config, rank=1,
                     world_size=2, device=torch.device("cpu"))
    rank_one_draw = torch.rand(3)
    torch.manual_seed(77)  # the state rank 1 saved
    assert torch.equal(rank_one_draw, torch.rand(3))
    # A checkpoint of one process, from before random states were kept per rank.
    single = {**loaded, "rng": loaded["rng"][0], "world_size": 1}
    restore_training(single, fresh, fresh_optimizer, fresh_scaler, config, 0, 1,
                     torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draw)
    # At another world size, ranks other than 0 get a stream of their own.
    restore_training(loaded, fresh, fresh_optimizer, fresh_scaler, config, rank=1,
                     world_size=3, device=torch.device("cpu"))
    assert torch.initial_seed() == rank_seed(9, 1, 12)
    # A checkpoint of another model shape is refused.
    with pytest.raises(CheckpointError, match="^checkpoint model settings differ from the config$"):
        restore_training(loaded, fresh, fresh_optimizer, fresh_scaler,
                         load_config(None, ["data.dir=x", "model.layers=2"]), 0, 1,
                         torch.device("cpu"))


def test_load_latest_falls_back_past_damaged_checkpoints(tmp_path):
    warnings: list[str] = []
    assert load_latest(tmp_path, "cpu", warnings.append) is None
    for step in (2, 4, 6):
        state = sample_state(step)
        state["train_state"] = {"step": step}
        save_checkpoint(tmp_path / f"step_{step:08d}.pt", state)
    for step in (4, 6):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"damaged")
    assert load_latest(tmp_path, "cpu", warnings.append)["train_state"]["step"] == 2
    assert load_latest(tmp_path, "meta", warnings.append)["model"]["w"].is_meta
    warnings = warnings[:2]
    assert [w.split(":")[0] for w in warnings] == [str(tmp_path / f"step_{s:08d}.pt")
                                                   for s in (6, 4)]
    assert all(w.endswith("; falling back to an earlier checkpoint") for w in warnings)
    (tmp_path / "step_00000002.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_latest(tmp_path, "cpu", warnings.append)
    assert str(info.value) == (f"none of the 3 checkpoints in {tmp_path} can be read; move them "
                               "aside to start again, or train with --overwrite")


def test_remove_leftovers_removes_only_the_temporaries_of_killed_saves(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    leftovers = [checkpoints / ".step_00000004.pt.x1y2.tmp", tmp_path / ".best.pt.a7.tmp"]
    kept = [checkpoints / "step_00000004.pt", tmp_path / "best.pt", tmp_path / "notes.tmp",
            checkpoints / ".notes.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    remove_leftovers(tmp_path)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)


# --- averaging -----------------------------------------------------------------------------------


def test_average_names_the_first_checkpoint_and_averages_averages(tmp_path):
    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"{seed}.pt")
        save_checkpoint(paths[-1], sample_state(seed))
    different = sample_state(4)
    different["model"]["extra"] = torch.zeros(1)
    save_checkpoint(tmp_path / "4.pt", different)
    with pytest.raises(CheckpointError) as info:
        average_checkpoints(paths + [tmp_path / "4.pt"])
    assert str(info.value) == f"{tmp_path / '4.pt'}: different model parameters than {paths[0]}"
    with pytest.raises(CheckpointError, match="^no checkpoints to average$"):
        average_checkpoints([])
    # An average (no optimizer or random state left) can itself be averaged.
    save_checkpoint(tmp_path / "avg.pt", average_checkpoints(paths[:2]))
    again = average_checkpoints([tmp_path / "avg.pt", paths[2]])
    expected = ((sample_state(1)["model"]["w"] + sample_state(2)["model"]["w"]) / 2
                + sample_state(3)["model"]["w"]) / 2
    torch.testing.assert_close(again["model"]["w"], expected)


def test_average_last_writes_the_mean_of_the_newest_periodic_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=f"{checkpoints}: no checkpoints to average"):
        average_last(checkpoints, 2, tmp_path / "avg.pt")
    for step in (1, 2, 3):
        save_checkpoint(checkpoints / f"step_{step:08d}.pt", sample_state(step))
    with pytest.raises(CheckpointError, match="no checkpoints to average"):
        average_last(checkpoints, 0, tmp_path / "avg.pt")
    used = average_last(checkpoints, 2, tmp_path / "avg.pt")
    assert [p.name for p in used] == ["step_00000002.pt", "step_00000003.pt"]
    averaged = load_checkpoint(tmp_path / "avg.pt")
    assert averaged["format_version"] == FORMAT_VERSION
    assert averaged["averaged_from"] == [str(p) for p in used]
    torch.testing.assert_close(averaged["model"]["b"], (sample_state(2)["model"]["b"]
                                                        + sample_state(3)["model"]["b"]) / 2)
    assert len(average_last(checkpoints, 10, tmp_path / "all.pt")) == 3
    assert [p.name for p in average_last(checkpoints, 1, tmp_path / "one.pt")] == \
        ["step_00000003.pt"]
    # The average is written in this version's format, whatever the checkpoints' was.
    torch.save({**sample_state(4), "format_version": 0}, checkpoints / "step_00000004.pt")
    average_last(checkpoints, 1, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["format_version"] == FORMAT_VERSION


# --- the vocabulary a checkpoint was trained with ----------------------------------------------


def tokenizer_with(fingerprint: str) -> SimpleNamespace:
    return SimpleNamespace(fingerprint=lambda: fingerprint)


def test_check_vocabulary_refuses_another_vocabulary_in_one_line_naming_both(tmp_path):
    checkpoint, tokenizer_dir = tmp_path / "b" / "best.pt", tmp_path / "a" / "tokenizer"
    state = {**sample_state(), "vocabulary": "1a2b000000000000"}
    with pytest.raises(CheckpointError) as info:
        check_vocabulary(state, tokenizer_with("3c4d000000000000"), checkpoint, tokenizer_dir)
    assert str(info.value) == (
        f"{checkpoint}: trained with another vocabulary (fingerprint 1a2b000000000000) than "
        f"{tokenizer_dir} (3c4d000000000000); use it with the run that wrote it")


def test_check_vocabulary_accepts_the_same_vocabulary_and_older_checkpoints(tmp_path):
    tokenizer = tokenizer_with("1a2b000000000000")
    check_vocabulary({**sample_state(), "vocabulary": "1a2b000000000000"}, tokenizer,
                     tmp_path / "best.pt", tmp_path / "tokenizer")
    check_vocabulary(sample_state(), tokenizer, tmp_path / "best.pt", tmp_path / "tokenizer")


def test_an_average_keeps_the_vocabulary_and_refuses_to_mix_two(tmp_path):
    paths = {}
    for name, vocabulary in (("a", "aaaa"), ("b", "aaaa"), ("old", None), ("other", "bbbb")):
        state = sample_state(len(paths))
        if vocabulary:
            state["vocabulary"] = vocabulary
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(paths[name], state)
    save_average(tmp_path / "avg.pt", average_checkpoints([paths["a"], paths["b"]]))
    assert load_checkpoint(tmp_path / "avg.pt")["vocabulary"] == "aaaa"
    # One written before checkpoints carried it goes with any (first or not).
    assert average_checkpoints([paths["old"], paths["a"]])["vocabulary"] == "aaaa"
    assert average_checkpoints([paths["a"], paths["old"]])["vocabulary"] == "aaaa"
    assert "vocabulary" not in average_checkpoints([paths["old"], paths["old"]])
    with pytest.raises(CheckpointError) as info:
        average_checkpoints([paths["old"], paths["a"], paths["other"]])
    assert str(info.value) == (f"{paths['other']}: trained with another vocabulary (fingerprint "
                               f"bbbb) than {paths['a']} (aaaa); average checkpoints of one run")


@pytest.fixture(scope="module")
def capitals_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, run dir) of a run trained for 2 steps on the toy corpus in capitals: a
    tokenizer of as many pieces as the small run's (40), other pieces."""
    from traduire.pipeline import run

    root = tmp_path_factory.mktemp("capitals")
    data = write_corpus(root / "data")
    for path in data.iterdir():
        path.write_text(path.read_text("utf-8").upper(), "utf-8")
    config_path = write_config(root / "capitals.yaml", small_settings(
        data, train={"max_steps": 2, "save_every": 2}))
    run(load_config(config_path), root / "run")
    return config_path, root / "run"


def test_a_checkpoint_of_another_vocabulary_of_the_same_size_is_refused(small_run,
                                                                        capitals_run):
    from traduire.translate import Translator

    run_a, run_b = small_run[1], capitals_run[1]
    ours, theirs = Tokenizer.load(run_a / "tokenizer"), Tokenizer.load(run_b / "tokenizer")
    assert ours.src_vocab_size == theirs.src_vocab_size
    assert ours.fingerprint() != theirs.fingerprint()
    foreign = step_checkpoints(run_b / "checkpoints")[-1]
    assert load_checkpoint(foreign)["vocabulary"] == theirs.fingerprint()
    for checkpoint in (run_a / "best.pt", run_a / "checkpoints" / "step_00000006.pt"):
        assert load_checkpoint(checkpoint)["vocabulary"] == ours.fingerprint()
    with pytest.raises(CheckpointError) as info:
        Translator.load(run_a, checkpoint=foreign, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{foreign}: trained with another vocabulary")
    assert f"than {run_a / 'tokenizer'} ({ours.fingerprint()})" in message
    assert theirs.fingerprint() in message


def test_resuming_with_another_tokenizer_is_refused(small_run, capitals_run, tmp_path):
    from traduire.pipeline import run

    config_path, base = small_run
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    shutil.rmtree(run_dir / "tokenizer")
    shutil.copytree(capitals_run[1] / "tokenizer", run_dir / "tokenizer")
    before = (run_dir / "checkpoints" / "step_00000006.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        run(load_config(config_path), run_dir)
    assert str(info.value).startswith(f"{run_dir / 'checkpoints'}: trained with another "
                                      f"vocabulary (fingerprint ")
    assert f"than {run_dir / 'tokenizer'} (" in str(info.value)
    assert (run_dir / "checkpoints" / "step_00000006.pt").read_bytes() == before


# --- checkpoints written in the background; what best.pt holds -------------------------------


def test_a_background_write_saves_the_state_of_its_step_and_one_write_waits_for_another(
        tmp_path, monkeypatch):
    import threading

    from traduire import checkpoint

    release, started, order = threading.Event(), threading.Event(), []
    original = checkpoint.save_checkpoint

    def slow_save(path, state):
        order.append(f"start {path.name}")
        started.set()
        release.wait(10)
        original(path, state)
        order.append(f"end {path.name}")

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    writer = CheckpointWriter()
    state = sample_state(1)
    expected = state["model"]["w"].clone()
    writer.save(tmp_path / "step_00000001.pt", state,
                then=lambda: order.append("then"))
    assert started.wait(10)  # the write began and save() has returned before it ended
    state["model"]["w"].add_(1.0)  # training goes on and changes the weights in place
    threading.Timer(0.2, release.set).start()
    writer.save(tmp_path / "step_00000002.pt", state)  # waits for the first write to end
    writer.close()
    assert order == ["start step_00000001.pt", "end step_00000001.pt", "then",
                     "start step_00000002.pt", "end step_00000002.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "step_00000001.pt")["model"]["w"], expected)
    assert torch.equal(load_checkpoint(tmp_path / "step_00000002.pt")["model"]["w"],
                       expected + 1.0)
    assert writer.pause_s >= 0 and writer.write_s > 0


def test_a_background_write_that_fails_keeps_the_previous_checkpoint_and_is_raised(
        tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    writer = CheckpointWriter()
    writer.save(path, sample_state(1))
    writer.wait()
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    writer.save(path, sample_state(2))
    with pytest.raises(OSError, match="No space left on device"):
        writer.wait()
    monkeypatch.undo()
    writer.wait()  # raised once
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_best_pt_and_an_average_hold_what_translating_needs_and_no_optimizer(small_run):
    _, run_dir = small_run
    best = load_checkpoint(run_dir / "best.pt")
    assert {"model", "config", "vocabulary", "train_state"} <= best.keys()
    assert not {"optimizer", "scaler", "rng"} & best.keys()
    periodic = load_checkpoint(step_checkpoints(run_dir / "checkpoints")[-1])
    assert {"optimizer", "scaler", "rng"} <= periodic.keys()  # resuming needs them
    assert for_translation(periodic).keys() == periodic.keys() - {"optimizer", "scaler", "rng"}


def test_an_average_maps_its_checkpoints_and_reads_their_weights_only(tmp_path, monkeypatch):
    from traduire import checkpoint

    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"{seed}.pt")
        save_checkpoint(paths[-1], sample_state(seed))
    loads = []
    original = torch.load
    monkeypatch.setattr(checkpoint.torch, "load",
                        lambda *a, **k: loads.append(k.get("mmap")) or original(*a, **k))
    averaged = average_checkpoints(paths)
    assert loads == [True, True, True]
    expected = sum(sample_state(s)["model"]["w"] for s in (1, 2, 3)) / 3
    torch.testing.assert_close(averaged["model"]["w"], expected)
    assert not averaged["model"]["w"].is_shared()  # in memory, not a view of a mapped file


def test_a_background_write_keeps_tied_weights_tied(tmp_path):
    shared = torch.randn(5, 3)
    state = {"model": {"encoder.embed": shared, "decoder.embed": shared.detach(),
                       "output": shared.view(5, 3)}, "train_state": {"step": 1}}
    writer = CheckpointWriter()
    writer.save(tmp_path / "step_00000001.pt", state)
    writer.close()
    loaded = load_checkpoint(tmp_path / "step_00000001.pt")["model"]
    assert len({t.data_ptr() for t in loaded.values()}) == 1
    assert all(torch.equal(t, shared) for t in loaded.values())
