"""Fine-tuning (train.init_from): a run that starts from another's weights and tokenizer, keeps
its architecture, records where it came from, resumes exactly, and trains alike under torchrun."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, small_settings, write_config, write_corpus
from traduire.checkpoint import default_checkpoint, load_checkpoint, step_checkpoints
from traduire.cli import app
from traduire.config import ARCHITECTURE_KEYS, load_config
from traduire.pipeline import run


def fine_tune_config(tmp_path, source, name="ft.yaml", model=None, **train):
    """Another corpus, the architecture left out (it comes from the source)."""
    settings = small_settings(write_corpus(tmp_path / "new-data", seed=7))
    settings["model"] = {"dropout": 0.0, **(model or {})}
    settings["train"].update({"init_from": str(source), "adam_eps": 1e-3, **train})
    return write_config(tmp_path / name, settings)


def weights(path):
    return load_checkpoint(path)["model"]


def test_fine_tuning_starts_from_the_source_weights_and_tokenizer(tmp_path, small_run):
    _, source = small_run
    # A learning rate so small that one step cannot move a weight by 1e-6: what the run
    # saves after it is what it started from.
    config = load_config(fine_tune_config(tmp_path, source, lr=1e-9, warmup_steps=0,
                                          max_steps=1, save_every=1))
    source_config = load_config(source / "config.yaml")
    for key in ARCHITECTURE_KEYS:  # filled in from the source, not the defaults
        assert getattr(config.model, key) == getattr(source_config.model, key), key
    run(config, tmp_path / "ft")
    start = weights(default_checkpoint(source))
    after = weights(step_checkpoints(tmp_path / "ft" / "checkpoints")[-1])
    for name in start:
        torch.testing.assert_close(after[name], start[name], atol=1e-6, rtol=0, msg=name)
    for file in (source / "tokenizer").iterdir():  # no SentencePiece trained
        assert (tmp_path / "ft" / "tokenizer" / file.name).read_bytes() == file.read_bytes()
    record = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert record["checkpoint"] == str(default_checkpoint(source).resolve())
    assert record["step"] == load_checkpoint(default_checkpoint(source))["train_state"]["step"]
    info = CliRunner().invoke(app, ["info", "--run-dir", str(tmp_path / "ft")])
    assert f"weights: fine-tuned from {record['checkpoint']} (step {record['step']})" \
        in info.output
    # The optimizer and schedule are the new run's own: it counts its steps from 0.
    assert load_checkpoint(step_checkpoints(tmp_path / "ft" / "checkpoints")[-1])[
        "train_state"]["step"] == 1


def test_a_checkpoint_of_a_run_is_a_source_too(tmp_path, small_run):
    _, source = small_run
    step_2 = step_checkpoints(source / "checkpoints")[0]
    run(load_config(fine_tune_config(tmp_path, step_2, lr=1e-9, warmup_steps=0, max_steps=1,
                                     save_every=1)), tmp_path / "ft")
    after = weights(step_checkpoints(tmp_path / "ft" / "checkpoints")[-1])
    start = weights(step_2)
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(after[k], v, atol=1e-6)
                   for k, v in weights(default_checkpoint(source)).items())


def test_a_fine_tuned_run_resumes_exactly(tmp_path, small_run):
    _, source = small_run
    config_path = fine_tune_config(tmp_path, source, max_steps=4, save_every=2)
    run(load_config(config_path), tmp_path / "straight")
    run(load_config(config_path, ["train.max_steps=2"]), tmp_path / "stopped")
    run(load_config(config_path), tmp_path / "stopped")  # resumes from its own step 2
    straight = weights(step_checkpoints(tmp_path / "straight" / "checkpoints")[-1])
    resumed = weights(step_checkpoints(tmp_path / "stopped" / "checkpoints")[-1])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(straight[k], v) for k, v in
                   weights(default_checkpoint(source)).items())  # it trained


def test_fine_tuning_refuses_another_architecture_and_a_missing_source(tmp_path, small_run):
    _, source = small_run
    runner = CliRunner()
    config_path = fine_tune_config(tmp_path, source, model={"d_model": 32, "heads": 2})
    result = runner.invoke(app, ["train", "-c", str(config_path), "-r", str(tmp_path / "a")])
    one_line_error(result, "'model.d_model' is 32", "train.init_from")
    assert not (tmp_path / "a").exists()  # refused before any stage ran
    config_path = fine_tune_config(tmp_path, tmp_path / "nowhere")
    result = runner.invoke(app, ["train", "-c", str(config_path), "-r", str(tmp_path / "b")])
    one_line_error(result, "train.init_from", "not found")
    (tmp_path / "plain").mkdir()
    config_path = fine_tune_config(tmp_path, tmp_path / "plain")
    result = runner.invoke(app, ["train", "-c", str(config_path), "-r", str(tmp_path / "c")])
    one_line_error(result, "train.init_from", "neither a traduire run directory")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fine_tuning_under_torchrun_equals_one_process(tmp_path, small_run):
    from test_distributed import assert_same_weights, torchrun

    _, source = small_run
    config_path = fine_tune_config(tmp_path, source, max_steps=2, save_every=2, threads=1)
    run(load_config(config_path), tmp_path / "one")
    result = torchrun(2, ["train", "-c", str(config_path), "-r", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(weights(step_checkpoints(tmp_path / "one" / "checkpoints")[-1]),
                        weights(step_checkpoints(tmp_path / "two" / "checkpoints")[-1]))
