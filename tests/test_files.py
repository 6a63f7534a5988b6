"""Tests for traduire.files: the line reader, atomic files and directories, moving aside."""

from __future__ import annotations

import io
import os

import pytest

from traduire import files
from traduire.errors import DataError
from traduire.files import (
    AppendLog,
    atomic_write_bytes,
    atomic_write_text,
    line_writer,
    move_aside,
    read_lines,
    read_text_lines,
    replace_directory,
)


def test_failed_fsync_mid_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new and longer")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_replaces(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text(encoding="utf-8") == "two"


def test_replace_directory(tmp_path):
    target = tmp_path / "out"
    with replace_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1"
    # A failure inside the block leaves the previous directory and no temporary one.
    with pytest.raises(RuntimeError):
        with replace_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_move_aside(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_1.pt").write_text("c")
    (run_dir / "metrics.jsonl").write_text("m")
    target = move_aside([run_dir / "checkpoints", run_dir / "metrics.jsonl",
                         run_dir / "best.pt"], run_dir)
    assert target is not None and target.parent == run_dir / "old"
    assert (target / "checkpoints" / "step_1.pt").read_text() == "c"
    assert (target / "metrics.jsonl").read_text() == "m"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert move_aside([run_dir / "nothing"], run_dir) is None


def test_move_aside_twice_in_one_second_keeps_both(tmp_path, monkeypatch):
    monkeypatch.setattr(files.time, "strftime", lambda fmt: "20250101-000000")
    run_dir = tmp_path / "run"
    targets = []
    for attempt in ("first", "second"):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{len(targets)}.pt").write_text(attempt)
        (run_dir / "best.pt").write_text(attempt)
        targets.append(move_aside([run_dir / "best.pt", run_dir / "checkpoints"], run_dir))
    assert targets[0] != targets[1]
    assert (targets[0] / "best.pt").read_text() == "first"
    assert (targets[1] / "best.pt").read_text() == "second"


# --- reading -----------------------------------------------------------------------------------


def test_lines_end_at_newline_only_and_invalid_bytes_are_reported():
    raw = b"one\r\ntwo\rstill two\xe2\x80\xa8too\n\xff bad\nlast"
    seen = []
    lines = list(read_lines(io.BytesIO(raw), lambda line, at: seen.append((line, at))))
    assert lines == ["one", "two\rstill two\u2028too", "\ufffd bad", "last"]
    assert seen == [(3, raw.index(b"\xff"))]


def test_a_text_file_with_invalid_utf8_is_an_error_naming_line_and_byte(tmp_path):
    path = tmp_path / "ref.fr"
    path.write_bytes(b"bon\nmal \xc3\x28\n")
    with pytest.raises(DataError, match=r"ref.fr:2: invalid UTF-8 at byte 8"):
        read_text_lines(path)
    path.write_bytes(b"a\nb\n")
    assert read_text_lines(path) == ["a", "b"]
    with pytest.raises(DataError, match="file not found"):
        read_text_lines(tmp_path / "missing")


# --- writing -----------------------------------------------------------------------------------


def record_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace",
                        lambda a, b: (calls.append("replace"), real_replace(a, b)))
    return calls


def test_line_writer_fsyncs_before_it_renames(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch)
    out = tmp_path / "out.fr"
    with line_writer(out) as f:
        f.write("une ligne\n")
        assert not out.exists()  # nothing under the final name until the end
    assert out.read_text() == "une ligne\n"
    assert calls.index("fsync") < calls.index("replace")


def test_line_writer_cut_short_leaves_the_previous_file(tmp_path):
    out = tmp_path / "out.fr"
    out.write_text("before\n")
    with pytest.raises(KeyboardInterrupt):
        with line_writer(out) as f:
            f.write("half")
            raise KeyboardInterrupt
    assert out.read_text() == "before\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.fr"]


def test_append_log_is_fsynced_on_sync_and_close(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch)
    log = AppendLog(tmp_path / "metrics.jsonl")
    log.write('{"step": 1}')
    assert calls == []  # written and flushed, not yet fsynced
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    log.sync()
    assert calls == ["fsync"]
    log.write('{"step": 2}')
    log.close()
    assert calls == ["fsync", "fsync"]


def test_replace_directory_never_leaves_the_target_missing(tmp_path, monkeypatch):
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.txt").write_text("old")
    seen_missing = []
    real_replace = os.replace

    def watching_replace(a, b):  # the fallback path renames; the target must come back
        real_replace(a, b)
        seen_missing.append(not target.exists())

    monkeypatch.setattr(files.os, "replace", watching_replace)
    with replace_directory(target) as new:
        (new / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing left beside it
    # Where the directories are exchanged in one step, no rename ever leaves it missing.
    if files._exchange(tmp_path, tmp_path):
        assert seen_missing == []


def test_replace_directory_fallback_keeps_the_old_one_until_the_new_one_is_in(tmp_path,
                                                                             monkeypatch):
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_replace = os.replace
    moves = []

    def crash_on_second(a, b):
        moves.append(b)
        if len(moves) == 2:
            raise OSError(5, "Input/output error")  # the machine dies between the renames
        real_replace(a, b)

    monkeypatch.setattr(files.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        with replace_directory(target) as new:
            (new / "new.txt").write_text("new")
    # The old directory was moved aside, not deleted: it is still on disk, complete.
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(aside) == 1 and (aside[0] / "data" / "old.txt").read_text() == "old"


def test_written_files_and_directories_get_the_usual_permissions(tmp_path):
    """Temporary names must not leave outputs private (mkstemp and mkdtemp make 0600/0700)."""
    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with replace_directory(tmp_path / "d") as new:
            (new / "f").write_text("y")
    finally:
        os.umask(before)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
