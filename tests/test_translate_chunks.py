"""Tests for translate_chunks: translating a file on several processes into one output, and
continuing an interrupted translation."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, toy_sentences
from traduire import translate_chunks
from traduire.cli import app
from traduire.translate import DecodeOptions, Translator, load_translator
from traduire.translate_files import translate_file

runner = CliRunner()
# Short outputs (the small model rarely ends a sentence): every test translates quickly.
OPTIONS = DecodeOptions(beam=3, chunk_lines=16, max_len_a=1.0, max_len_b=2)
SEARCH = ["--beam", "3", "--chunk-lines", "16", "--max-len-a", "1.0", "--max-len-b", "2"]


def write_input(path: Path, repeats: int = 1) -> Path:
    lines = toy_sentences() * repeats
    lines[7] = ""  # an empty line translates to an empty line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fp32(run_dir: Path) -> Translator:
    return Translator.load(run_dir, device="cpu", precision="fp32")


def reference(translator: Translator, source: Path) -> list[str]:
    """The translations of one process reading the file in one stream, without chunks."""
    lines = source.read_text(encoding="utf-8").splitlines()
    return [r.best for r in translator.translate_lines(lines, OPTIONS)]


def test_chunks_cover_the_file_at_line_boundaries(tmp_path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\nbb\n\nccc\nd")  # no newline at the end
    chunks, sha = translate_chunks.split_input(path, 2)
    assert chunks == [(0, 2, 0), (2, 2, 5), (4, 1, 10)]
    assert sha == translate_chunks.file_sha256(path)
    path.write_bytes(b"a\nbb\n")
    assert translate_chunks.split_input(path, 2)[0] == [(0, 2, 0)]
    path.write_bytes(b"")
    assert translate_chunks.split_input(path, 2)[0] == []


def test_one_and_two_processes_write_the_same_file(small_run, tmp_path) -> None:
    """fp32: whatever the number of processes, the file one stream of translation gives."""
    run_dir = small_run[1]
    source = write_input(tmp_path / "in.en")
    translator = fp32(run_dir)
    expected = reference(translator, source)
    load = functools.partial(load_translator, run_dir, device="cpu", precision="fp32")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.fr"
        stats = translate_file(translator, str(source), out, OPTIONS, progress=False,
                               workers=workers, load=load, threads=1)
        outputs[workers] = out.read_text(encoding="utf-8")
        assert stats["sentences"] == len(expected) and stats["processes"] == workers
        assert not translate_chunks.parts_directory(out).exists()
    assert outputs[1].splitlines() == expected
    assert outputs[2] == outputs[1]


def load_and_record(run_dir: Path, record: Path) -> Translator:
    """A worker's `load` that notes whether the worker runs with the runtime settings."""
    from traduire import runtime

    record.write_text(f"{runtime.runtime_configured()} {runtime._allocator_tuned}")
    return load_translator(run_dir, device="cpu", precision="fp32")


@pytest.mark.parametrize("configured", [True, False])
def test_workers_take_the_runtime_settings_of_the_process_that_starts_them(
        small_run, tmp_path, monkeypatch, configured) -> None:
    """A spawned process inherits the environment, not glibc's allocator settings: without
    them a worker decodes a quarter slower than its parent."""
    from traduire.runtime import configure_runtime

    configure_runtime()
    monkeypatch.setattr(translate_chunks, "runtime_configured", lambda: configured)
    monkeypatch.delenv("TRADUIRE_SYSTEM_MALLOC", raising=False)
    run_dir, record = small_run[1], tmp_path / "record"
    source = tmp_path / "in.en"
    source.write_text("\n".join(toy_sentences()[:40]) + "\n", encoding="utf-8")
    translate_file(fp32(run_dir), str(source), tmp_path / "out.fr", OPTIONS, progress=False,
                   workers=2, load=functools.partial(load_and_record, run_dir, record),
                   threads=1)
    assert record.read_text() == f"{configured} {configured}"


def test_two_torchrun_ranks_write_the_file_one_process_writes(small_run, tmp_path) -> None:
    run_dir = small_run[1]
    source = write_input(tmp_path / "in.en")
    expected = reference(fp32(run_dir), source)
    out = tmp_path / "out.fr"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "traduire", "translate", str(source), "-r", str(run_dir), "-o", str(out),
         *SEARCH, "--precision", "fp32", "--device", "cpu", "-q"], capture_output=True,
        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8").splitlines() == expected
    assert result.stderr.count("translated ") == 1  # rank 0 reports


def test_a_killed_translation_continues_to_the_same_file(small_run, tmp_path) -> None:
    """SIGKILL once some chunks are done: no output file yet; the same command again says it
    continues, and writes the file an uninterrupted run writes."""
    run_dir = small_run[1]
    source = write_input(tmp_path / "in.en", repeats=4)
    out = tmp_path / "out.fr"
    command = [sys.executable, "-m", "traduire", "translate", str(source), "-r", str(run_dir),
               "-o", str(out), *SEARCH, "--precision", "fp32", "--threads", "1", "-q"]
    parts = translate_chunks.parts_directory(out)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(parts.glob("*.json"))) >= 3:  # the manifest and two chunks
            break
        time.sleep(0.01)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    done = len(list(parts.glob("0*.json")))
    assert 2 <= done < 30
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "continuing:" in again.stderr and f"{done * 16:,} of 480 lines" in again.stderr
    assert out.read_text(encoding="utf-8").splitlines() == reference(fp32(run_dir), source)
    assert not parts.exists()


class Interrupted(Translator):
    """A translator that stops (as Ctrl-C does) after `lines` lines."""

    def __init__(self, base: Translator, lines: int) -> None:
        self.__dict__.update(base.__dict__)
        self.left = lines

    def translate_lines(self, lines, options):
        for result in super().translate_lines(lines, options):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield result


def test_a_rerun_with_other_options_input_or_model_is_refused_naming_it(small_run,
                                                                        tmp_path) -> None:
    run_dir = small_run[1]
    source = write_input(tmp_path / "in.en")
    out = tmp_path / "out.fr"
    translator = fp32(run_dir)
    with pytest.raises(KeyboardInterrupt):
        translate_file(Interrupted(translator, 40), str(source), out, OPTIONS, progress=False)
    parts = translate_chunks.parts_directory(out)
    assert not out.exists() and len(list(parts.glob("0*.json"))) == 2
    args = ["translate", str(source), "-r", str(run_dir), "-o", str(out), *SEARCH,
            "--precision", "fp32", "-q"]
    one_line_error(runner.invoke(app, [*args[:-1], "--beam", "4", "-q"]), "--beam 3 -> 4",
                   "--overwrite")
    one_line_error(runner.invoke(app, [*args[:-1], "--precision", "bf16", "-q"]),
                   "model precision fp32 -> bf16")
    one_line_error(runner.invoke(app, [*args, "--checkpoint",
                                       str(run_dir / "checkpoints" / "step_00000002.pt")]),
                   "model file", "model content")
    changed = source.read_text(encoding="utf-8").replace("dog", "cat")
    original = source.read_text(encoding="utf-8")
    source.write_text(changed, encoding="utf-8")
    one_line_error(runner.invoke(app, args), "input content")
    source.write_text(original, encoding="utf-8")
    result = runner.invoke(app, args)  # as it was: it continues
    assert result.exit_code == 0, result.output
    assert "continuing: 32 of 120 lines" in " ".join(result.stderr.split())  # wrapped or not
    expected = reference(translator, source)
    assert out.read_text(encoding="utf-8").splitlines() == expected
    # --overwrite starts again, over unfinished progress of another translation.
    with pytest.raises(KeyboardInterrupt):
        translate_file(Interrupted(translator, 20), str(source), out,
                       DecodeOptions(beam=2, chunk_lines=16, max_len_b=2), progress=False)
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "continuing" not in result.stderr
    assert out.read_text(encoding="utf-8").splitlines() == expected
