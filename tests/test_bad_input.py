"""Bad input never crashes with a traceback: each case gives one clear line naming the file and
line or key, and a non-zero exit (a full traceback only with `traduire --debug`). Files from
others (checkpoints, configs) are data: opening one never runs code.

Run with `-s` to see every case's message (lines starting with MESSAGE).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import one_line_error, small_settings, write_config
from traduire.checkpoint import load_checkpoint
from traduire.cli import app
from traduire.config import load_config
from traduire.errors import CheckpointError, ConfigError

runner = CliRunner()

@pytest.fixture
def trained(small_run) -> tuple[Path, Path]:
    return small_run


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps long lines at 80 columns otherwise


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def python_m(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "traduire", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


# --- corpora -----------------------------------------------------------------------------------


def train_on(tmp_path: Path, corpus_dir: Path, **sections: dict):
    path = write_config(tmp_path / "c.yaml", small_settings(corpus_dir, **sections))
    return cli("train", "-c", path, "-r", tmp_path / "run")


def test_parallel_files_with_different_line_counts(corpus_dir, tmp_path):
    with open(corpus_dir / "train.fr", "a", encoding="utf-8") as f:
        f.write("une ligne de trop\n")
    result = train_on(tmp_path, corpus_dir)
    one_line_error(result, "train.en", "train.fr", "200", "201", after_progress=True,
                   case="train.en 200 lines, train.fr 201")


def test_missing_corpus_file(corpus_dir, tmp_path):
    (corpus_dir / "val.fr").unlink()
    result = train_on(tmp_path, corpus_dir)
    one_line_error(result, str(corpus_dir / "val.fr"), "not found", after_progress=True,
                   case="missing val.fr")


def test_corpus_empty_after_cleaning(corpus_dir, tmp_path):
    (corpus_dir / "train.en").write_text("   \n" * 200, encoding="utf-8")
    result = train_on(tmp_path, corpus_dir)
    one_line_error(result, f"{corpus_dir / 'train'}.{{en,fr}}", "empty after cleaning",
                   "200 empty", after_progress=True, case="train.en all blank")


def break_utf8(path: Path, line: int) -> int:
    """Put an invalid byte into 1-based `line`; return its byte offset in the file."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:3] + b"\xff" + lines[line - 1][3:]
    path.write_bytes(b"\n".join(lines))
    return sum(len(x) + 1 for x in lines[:line - 1]) + 3


def test_invalid_utf8_in_corpus_names_file_line_and_byte(corpus_dir, tmp_path):
    offset = break_utf8(corpus_dir / "train.en", 7)
    result = train_on(tmp_path, corpus_dir)
    one_line_error(result, f"{corpus_dir / 'train.en'}:7:", f"byte {offset}",
                   "data.skip_invalid_utf8", after_progress=True,
                   case="invalid UTF-8 in train.en")


def test_invalid_utf8_lines_skipped_and_counted_on_request(corpus_dir, tmp_path, capsys):
    from traduire.pipeline import prepare_data

    break_utf8(corpus_dir / "train.en", 7)
    break_utf8(corpus_dir / "train.fr", 9)
    config = load_config(write_config(tmp_path / "c.yaml", small_settings(
        corpus_dir, data={"skip_invalid_utf8": True})))
    prepare_data(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    assert report["train"]["read"] == 200
    assert report["train"]["dropped"]["invalid_utf8"] == 2
    assert report["train"]["kept"] == 200 - sum(report["train"]["dropped"].values())
    assert "2 invalid_utf8" in capsys.readouterr().err


# --- configs -----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown key": ({"model": {"layerz": 2}}, ["'model.layerz'", "did you mean 'layers'"]),
    "unknown section": ({"optim": {"lr": 1}}, ["unknown section 'optim'"]),
    "wrong type": ({"train": {"batch_tokens": "many"}}, ["'train.batch_tokens'", "integer"]),
    "zero size": ({"model": {"d_model": 0}}, ["'model.d_model'", "positive"]),
    "negative size": ({"train": {"batch_tokens": -5}}, ["'train.batch_tokens'", "positive"]),
    "negative layers": ({"model": {"layers": -1}}, ["'model.layers'", "positive"]),
    "d_model % heads": ({"model": {"d_model": 30, "heads": 4}},
                        ["'model.d_model' (30)", "'model.heads' (4)"]),
    "bad choice": ({"model": {"norm": "middle"}}, ["'model.norm'", "pre, post"]),
    "negative max_steps": ({"train": {"max_steps": -1}}, ["'train.max_steps'", "negative"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_the_file_and_key(case, tmp_path, corpus_dir):
    change, expected = BAD_CONFIGS[case]
    settings = small_settings(corpus_dir)
    for section, values in change.items():
        settings.setdefault(section, {}).update(values)
    path = write_config(tmp_path / "bad.yaml", settings)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for text in expected:
        assert text in message, message
    print(f"MESSAGE config {case} -> error: {message}")


def test_bad_config_through_the_command_line(tmp_path, corpus_dir):
    path = write_config(tmp_path / "bad.yaml", small_settings(corpus_dir, model={"heads": 5}))
    result = cli("train", "-c", path, "-r", tmp_path / "run")
    one_line_error(result, str(path), "'model.heads' (5)", case="config d_model 16 heads 5")
    assert not (tmp_path / "run").exists()  # nothing started


def test_vocab_size_larger_than_the_text_allows(corpus_dir, tmp_path):
    result = train_on(tmp_path, corpus_dir, tokenizer={"vocab_size": 5000})
    one_line_error(result, "'tokenizer.vocab_size'", "too large", after_progress=True,
                   case="vocab_size 5000 on a toy corpus")


def test_yaml_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    result = cli("train", "-c", path, "-r", tmp_path / "run")
    one_line_error(result, str(path), "invalid YAML",
                   case="YAML with !!python/object/apply:os.system")
    assert not marker.exists()


# --- run directories ---------------------------------------------------------------------------


def test_run_dir_from_a_different_config_names_the_changed_keys(trained, tmp_path):
    config_path, run_dir = trained
    settings = yaml.safe_load(config_path.read_text())
    settings["model"]["layers"] = 2
    settings["train"]["lr"] = 0.01
    path = write_config(tmp_path / "changed.yaml", settings)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = cli("train", "-c", path, "-r", run_dir)
    one_line_error(result, "model.layers", "train.lr", "--overwrite",
                   case="run dir trained with other settings")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_run_dir_from_a_newer_version(tmp_path, corpus_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"format_version": 99}))
    result = train_on(tmp_path, corpus_dir)
    one_line_error(result, str(run_dir), "newer traduire", "99",
                   case="run.json format_version 99")


# --- translate: odd input ----------------------------------------------------------------------

LONG = " ".join(["the big red dog runs here now"] * 20)  # far beyond max_positions (32)
ODD_INPUTS = {
    "long line": (f"the cat\n{LONG}\na dog\n".encode(), 3, "line longer than the model"),
    "control chars": (b"the\x00cat\x07 runs\x1b[31m\rnow\x0b\x0c\x1f\x7f\n\tdog\n", 2, None),
    "empty lines": (b"\n\nthe cat\n\n   \n", 5, None),
    "no trailing newline": (b"the cat\na dog runs", 2, None),
    "only empty line": (b"\n", 1, None),
    "empty file": (b"", 0, None),
    "CRLF and U+2028": ("the cat\r\na\u2028dog\u0085runs\r\n".encode(), 2, None),
    "invalid UTF-8": (b"the cat\nthe \xff\xfe dog\n\xc3\n", 3, "invalid UTF-8 at byte 12"),
}


@pytest.mark.parametrize("case", list(ODD_INPUTS))
def test_translate_odd_input_gives_one_line_per_line(case, trained, tmp_path):
    data, lines, warning = ODD_INPUTS[case]
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(data)
    result = cli("translate", source, "-r", trained[1], "-o", out, "--beam", "1", "--quiet",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    text = out.read_bytes().decode("utf-8")  # valid UTF-8
    assert text.count("\n") == lines and (text.endswith("\n") or not lines)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if warning is None:
        assert not warnings, warnings
    else:
        assert warnings and all(str(source) in w for w in warnings)
        assert warning in warnings[0]
        print(f"MESSAGE translate {case} -> {warnings[0]}")
    if case == "long line":
        assert len(warnings) == 1 and f"{source}:2:" in warnings[0]
    if case == "invalid UTF-8":
        assert f"{source}:2: invalid UTF-8 at byte 12" in warnings[0]
        assert f"{source}:3: invalid UTF-8 at byte 19" in warnings[1]


def test_translate_missing_input_file(trained, tmp_path):
    result = cli("translate", tmp_path / "nope.txt", "-r", trained[1], "--quiet")
    one_line_error(result, str(tmp_path / "nope.txt"), "not found",
                   case="translate a missing file")


def test_translate_without_a_trained_run(tmp_path):
    (tmp_path / "in.txt").write_text("the cat\n")
    result = cli("translate", tmp_path / "in.txt", "-r", tmp_path / "empty")
    one_line_error(result, str(tmp_path / "empty"), "not a trained run directory",
                   case="translate -r on an empty directory")


# --- --checkpoint: files that are not checkpoints, and files that attack ------------------------


def not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {"text file": tmp_path / "notes.txt", "YAML file": tmp_path / "config.yaml",
             "zip file": tmp_path / "archive.zip", "empty file": tmp_path / "empty.pt",
             "tensor dict": tmp_path / "weights.pt", "directory": tmp_path / "adir"}
    files["text file"].write_text("just some words\n")
    files["YAML file"].write_text("model:\n  layers: 2\n")
    with zipfile.ZipFile(files["zip file"], "w") as z:
        z.writestr("data.pkl", b"not a pickle")
        z.writestr("readme.txt", "hello")
    files["empty file"].write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, files["tensor dict"])  # a checkpoint, but not ours
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("case", ["text file", "YAML file", "zip file", "empty file",
                                  "tensor dict", "directory"])
def test_checkpoint_option_pointing_to_a_non_checkpoint(case, trained, tmp_path):
    path = not_checkpoints(tmp_path)[case]
    (tmp_path / "in.txt").write_text("the cat\n")
    result = cli("translate", tmp_path / "in.txt", "-r", trained[1], "--checkpoint", path,
                 "--quiet")
    one_line_error(result, str(path), case=f"--checkpoint {case}")


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_checkpoint_cannot_run_code(trained, tmp_path):
    marker = tmp_path / "pwned"
    zipped, raw = tmp_path / "evil.pt", tmp_path / "evil_raw.pt"
    state = {"format_version": 1, "model": Payload(marker), "config": {}}
    torch.save(state, zipped)  # torch's zip format, a pickle inside
    raw.write_bytes(pickle.dumps(state))  # a bare pickle (torch's legacy format)
    assert not marker.exists()
    (tmp_path / "in.txt").write_text("the cat\n")
    for path in (zipped, raw):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
        result = cli("translate", tmp_path / "in.txt", "-r", trained[1], "--checkpoint", path,
                     "--quiet")
        one_line_error(result, str(path), "not a readable traduire checkpoint",
                       case=f"--checkpoint {path.name} with a code-running pickle")
        assert not marker.exists()
    # The unsafe way would have run it: the payload is real.
    pickle.loads(raw.read_bytes())
    assert marker.exists()


# --- real processes: exit codes, one line on stderr, --debug ----------------------------------


def test_command_line_processes_exit_with_one_line(trained, tmp_path, corpus_dir):
    bad = write_config(tmp_path / "bad.yaml", small_settings(corpus_dir, model={"layerz": 2}))
    done = python_m("train", "-c", bad, "-r", tmp_path / "run")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error:") and "'model.layerz'" in done.stderr
    print(f"MESSAGE process train unknown key -> {done.stderr.strip()}")

    (tmp_path / "in.txt").write_text("the cat\n")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    done = python_m("translate", tmp_path / "in.txt", "-r", trained[1], "--checkpoint",
                    tmp_path / "notes.txt", "--quiet")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"error: {tmp_path / 'notes.txt'}: not a readable traduire checkpoint" in done.stderr
    assert done.stdout == ""

    done = python_m("--debug", "train", "-c", bad, "-r", tmp_path / "run")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
