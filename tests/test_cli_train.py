"""End-to-end tests of `traduire train` through the command line (typer's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_settings, write_config
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.cli import app
from traduire.errors import ConfigError

runner = CliRunner()


def train(*args: str):
    return runner.invoke(app, ["train", *map(str, args)])


def test_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.stdout
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--run-dir", "--set", "--overwrite"):
        assert option in result.stdout


def test_train_end_to_end(tiny_config_path, tmp_path):
    run_dir = tmp_path / "run"
    result = train("-c", tiny_config_path, "-r", run_dir)
    assert result.exit_code == 0, result.output
    assert "done: step 20" in result.stderr
    assert [p.name for p in step_checkpoints(run_dir / "checkpoints")] == [
        "step_00000010.pt", "step_00000020.pt"]
    assert (run_dir / "best.pt").is_file()
    assert load_checkpoint(run_dir / "best.pt")["train_state"]["step"] in (10, 20)
    assert (run_dir / "tokenizer" / "spm.model").is_file()

    # Resuming needs no --config: the run directory's config.yaml is used.
    result = train("-r", run_dir, "--set", "train.max_steps=25")
    assert result.exit_code == 0, result.output
    assert "resuming at step 20" in result.stderr
    assert "done: step 25" in result.stderr
    assert step_checkpoints(run_dir / "checkpoints")[-1].name == "step_00000025.pt"


def test_unknown_key_is_a_one_line_error(tmp_path, corpus_dir):
    path = write_config(tmp_path / "bad.yaml", tiny_settings(corpus_dir, model={"layerz": 2}))
    result = train("-c", path, "-r", tmp_path / "run")
    one_line_error(result, "model.layerz", str(path), "layers")
    assert not (tmp_path / "run").exists()


def test_bad_override_is_a_one_line_error(tiny_config_path, tmp_path):
    result = train("-c", tiny_config_path, "-r", tmp_path / "run", "--set", "model.layers=abc")
    one_line_error(result, "model.layers")


def test_missing_config_is_a_one_line_error(tmp_path):
    result = train("-r", tmp_path / "run")
    one_line_error(result, "--config")
    result = train("-c", tmp_path / "nope.yaml", "-r", tmp_path / "run")
    one_line_error(result, "nope.yaml", "not found")


def test_missing_corpus_is_a_one_line_error(tiny_config_path, corpus_dir, tmp_path):
    (corpus_dir / "train.fr").unlink()
    result = train("-c", tiny_config_path, "-r", tmp_path / "run")
    one_line_error(result, str(corpus_dir / "train.fr"), "not found", after_progress=True)


def test_changed_settings_need_overwrite(tiny_config_path, tmp_path):
    run_dir = tmp_path / "run"
    assert train("-c", tiny_config_path, "-r", run_dir, "--set",
                 "train.max_steps=5").exit_code == 0
    result = train("-c", tiny_config_path, "-r", run_dir, "--set", "train.max_steps=5",
                   "--set", "tokenizer.vocab_size=44")
    one_line_error(result, "tokenizer.vocab_size", "--overwrite")
    result = train("-c", tiny_config_path, "-r", run_dir, "--set", "train.max_steps=5",
                   "--set", "tokenizer.vocab_size=44", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (run_dir / "old").is_dir()


def test_debug_shows_the_exception(tmp_path, corpus_dir):
    path = write_config(tmp_path / "bad.yaml", tiny_settings(corpus_dir, model={"layerz": 2}))
    result = runner.invoke(app, ["--debug", "train", "-c", str(path), "-r",
                                 str(tmp_path / "run")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


@pytest.mark.parametrize("args", [["train"], ["nonsense"]])
def test_usage_errors(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2


def test_no_arguments_shows_help_and_is_a_usage_error():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"train", "translate", "eval", "export"} <= set(commands)
    for args in ([], ["--debug"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2  # as for any other usage error
        listed = result.stdout.split("Commands")[-1]
        assert all(f" {name} " in listed for name in commands), result.stdout


def test_run_dir_paths_with_spaces(tiny_config_path, tmp_path):
    run_dir = Path(tmp_path) / "my run"
    result = train("-c", tiny_config_path, "-r", run_dir, "--set", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert step_checkpoints(run_dir / "checkpoints")[-1].name == "step_00000003.pt"
