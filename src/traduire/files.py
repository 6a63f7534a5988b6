"""Reading and writing the user's files safely: the one line reader and every atomic writer.

Reading. Text is UTF-8 split on '\\n' only ('\\r\\n' is accepted; a lone '\\r', a form feed or
a Unicode line separator is part of the line), the way `wc -l` and corpus tools count lines.
Invalid UTF-8 is never changed silently: `read_lines` decodes it as U+FFFD and reports the
line and byte offset, and each caller states what it does with that report. Training data
and scored files refuse such a line with an error naming file:line:byte (`data.
skip_invalid_utf8` skips and counts it instead); `translate` translates it with U+FFFD and a
warning, since it promises one output line per input line.

Writing. Every file is written under a temporary name in its own directory, fsynced, then
renamed over the target, and the directory is fsynced, so a crash or a full disk leaves the
old version or the new one, never a torn one. Directories are replaced the same way
(`replace_directory`): the new one is written beside, the old one renamed aside, the new one
renamed in, and only then is the old one removed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from traduire.errors import DataError, TraduireError

# --- Reading -----------------------------------------------------------------------------------


def read_lines(stream: Iterable[bytes],
               on_invalid: Callable[[int, int], None] | None = None) -> Iterator[str]:
    """Lines of a binary stream without their line ends. A line that is not UTF-8 comes out
    with U+FFFD in place of its bad bytes, after `on_invalid(line_number, byte_offset)` is
    called (1-based line; offset of the first bad byte in the stream), which may raise."""
    offset = 0
    for number, raw in enumerate(stream, 1):
        line = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_invalid is not None:
                on_invalid(number, offset + e.start)
            text = line.decode("utf-8", errors="replace")
        offset += len(raw)
        yield text


def read_text_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 text file; invalid UTF-8 is a DataError naming file:line:byte."""
    path = Path(path)

    def refuse(number: int, offset: int) -> None:
        raise DataError(f"{path}:{number}: invalid UTF-8 at byte {offset}")

    with open_input(path) as stream:
        return list(read_lines(stream, on_invalid=refuse))


def check_line_counts(first: Path | str, first_lines: int, second: Path | str,
                      second_lines: int, hint: str) -> None:
    """Raise DataError if two things that must be line-aligned (files, or lists of lines named
    like "the source list") have different line counts, naming both and their counts."""
    if first_lines != second_lines:
        raise DataError(f"{first} has {first_lines} lines but {second} has {second_lines}; "
                        f"{hint}")


def open_input(path: Path) -> BinaryIO:
    """A file opened for reading in binary, or a DataError naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None


# --- Atomic files ------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temporary file, fsync, rename, fsync dir)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[TextIO | BinaryIO]:
    """Open a temporary file beside `path` for writing; when the block ends without an error
    it is fsynced and renamed to `path`. On an error (or Ctrl-C) `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make it private
    text = "b" not in mode
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if text else {})
                       ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(Path(tmp))
        if isinstance(e, OSError) and e.filename is None:  # name the file: "disk full" where?
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    fsync_directory(path.parent)


@contextmanager
def line_writer(path: Path | None) -> Iterator[TextIO]:
    """Where output lines go: `path` written atomically (a run cut short leaves no partial file
    that looks complete), or standard output when `path` is None."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_open(path, "w") as f:
        yield f  # type: ignore[misc]


class AppendLog:
    """A JSON-lines file that is appended to (the metrics log): each line is flushed as it is
    written and the file is fsynced on `sync()`, at validations and checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        assert self._file is not None
        self._file.write(line.rstrip("\n") + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


@contextmanager
def replace_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; when the block succeeds it
    takes `path`'s place. On an error `path` is untouched.

    On Linux the two directories are exchanged in one atomic rename (renameat2 with
    RENAME_EXCHANGE), so `path` always holds the complete old or the complete new one.
    Elsewhere the old one is renamed aside first, then the new one in; a crash between the two
    renames leaves both beside `path`, as hidden .<name>.*.old and .<name>.*.tmp. The old one
    is removed only once the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(new, 0o777 & ~_umask())  # mkdtemp's 0700 would make it private
    try:
        yield new
        _fsync_tree(new)
        if not (path.exists() or path.is_symlink()):
            os.replace(new, path)
        elif path.is_dir() and not path.is_symlink() and _exchange(new, path):
            shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old directory
        else:
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.",
                                          suffix=".old"))
            os.replace(path, aside / path.name)
            os.replace(new, path)
            shutil.rmtree(aside, ignore_errors=True)
        fsync_directory(path.parent)
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def check_export_dir(out_dir: Path, marker: str, kind: str, force: bool) -> None:
    """Refuse to write an export into a file, into a non-empty directory that holds no
    `marker` (it is not a `kind` model: someone else's files), or over an earlier export
    unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TraduireError(f"{out_dir}: is a file, not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / marker).is_file():
            raise TraduireError(f"{out_dir}: a non-empty directory that is not a {kind} "
                                "model; not replacing it")
        if not force:
            raise TraduireError(f"{out_dir}: already exists (use --force to replace it)")


def run_dir_of(path: Path) -> Path | None:
    """The traduire run directory `path` is, or holds it as a checkpoint (RUN/best.pt,
    RUN/checkpoints/step_N.pt); None if neither."""
    for candidate in ([path] if path.is_dir() else list(path.parents)[:2]):
        if (candidate / "run.json").is_file():
            return candidate
    return None


def move_aside(paths: list[Path], run_dir: Path) -> Path | None:
    """Move existing outputs into run_dir/old/<timestamp>/ instead of deleting them."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return None
    (run_dir / "old").mkdir(parents=True, exist_ok=True)
    # A fresh directory each time, even twice in one second: nothing moved aside is replaced.
    target = Path(tempfile.mkdtemp(dir=run_dir / "old", prefix=time.strftime("%Y%m%d-%H%M%S-")))
    for p in existing:
        os.replace(p, target / p.name)
    fsync_directory(run_dir)
    return target


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable: without it, a power cut can undo the rename."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (what `datasets` or a converter wrote)."""
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        fsync_directory(Path(directory))


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
