"""Translating a file in chunks: on many processes or GPUs at once, resumable, into one output.

The input is cut into chunks of `chunk_lines` lines (DecodeOptions.chunk_lines). A process
translates a chunk on its own and writes its lines to a part file in the progress directory
beside the output (OUTPUT.parts/), atomically, then a small record of what it found (line
count, target tokens, warnings): a chunk is done once its record exists. When every chunk is
done, one process joins the parts into the output (written atomically, as every output is)
and removes the progress directory.

So the output does not depend on how many processes translate: the chunks are fixed by the
input and the options, and a chunk is translated alike whoever translates it (the same lines
sorted and batched the same way). A rerun of the same command after Ctrl-C, SIGTERM, a crash
or SIGKILL finds the chunks already done and translates the others; the progress directory
records what it is a translation of (the input's and the model's SHA-256, the options), and a
rerun that differs is refused with one line naming what changed, unless `overwrite`.

Processes: `workers` processes started here (CPU; the threads split among them), or one per
rank under torchrun (RANK, WORLD_SIZE, LOCAL_RANK; a GPU each where there are GPUs). Chunk i
is translated by process i mod N; process 0 joins the output, after waiting for the others'
chunks under torchrun (a rank that fails stops the launch: torchrun ends the others).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from traduire.errors import TraduireError
from traduire.files import atomic_open, atomic_write_text, fsync_directory, open_input, read_lines
from traduire.runtime import configure_runtime, runtime_configured

if TYPE_CHECKING:  # translate.py imports torch, which a --help need not load
    from traduire.translate import DecodeOptions, Translator

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Job:
    """One translation of a file in chunks, as every process sees it (picklable)."""

    input: Path
    output: Path | None  # None: standard output
    parts: Path  # the progress directory
    chunks: list[tuple[int, int, int]]  # (first line, line count, byte offset) per chunk
    options: DecodeOptions
    format: str
    identity: dict[str, Any]  # what this is a translation of (the manifest's content)
    flag_below: float | None = None  # as translate_file's
    show_probs: bool = False

    def text_path(self, chunk: int) -> Path:
        return self.parts / f"{chunk:08d}.txt"

    def record_path(self, chunk: int) -> Path:
        return self.parts / f"{chunk:08d}.json"

    def done(self, chunk: int) -> bool:
        return self.record_path(chunk).exists()


def parts_directory(output: Path) -> Path:
    """The progress directory of a translation to `output`: OUTPUT.parts beside it."""
    return output.with_name(output.name + ".parts")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def split_input(path: Path, chunk_lines: int) -> tuple[list[tuple[int, int, int]], str]:
    """The chunks of a file, (first line, lines, byte offset) each, and its SHA-256: one pass.
    The last line counts whether or not it ends with a newline."""
    digest = hashlib.sha256()
    chunks: list[tuple[int, int, int]] = []
    lines = offset = 0
    start_line, start_offset = 0, 0
    pending = False  # bytes after the last newline seen
    with open_input(path) as f:
        while block := f.read(1 << 22):
            digest.update(block)
            position = 0
            while True:
                end = block.find(b"\n", position)
                if end < 0:
                    pending = pending or position < len(block)
                    break
                lines += 1
                pending = False
                position = end + 1
                if lines - start_line == chunk_lines:
                    chunks.append((start_line, chunk_lines, start_offset))
                    start_line, start_offset = lines, offset + position
            offset += len(block)
    if pending:
        lines += 1
    if lines > start_line:
        chunks.append((start_line, lines - start_line, start_offset))
    return chunks, digest.hexdigest()


def identity(input: Path, input_sha256: str, translator: Translator, options: DecodeOptions,
             format: str) -> dict[str, Any]:
    """What a translation is of: the input, the model (and how it computes), the options. The
    number of processes is not part of it: the output does not depend on it."""
    model_file = translator.model_file
    return {"version": FORMAT_VERSION,
            "input": {"path": str(input.resolve()), "sha256": input_sha256},
            "model": {"path": str(model_file.resolve()), "sha256": file_sha256(model_file),
                      "precision": translator.precision,
                      "device": translator.device.type},
            "options": {**dataclasses.asdict(options), "format": format}}


def changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words: 'input (its content)', 'beam 5 -> 4'."""
    found = []
    for part in ("input", "model"):
        old, new = before.get(part, {}), now[part]
        for key, words in (("path", "file"), ("sha256", "content"), ("precision", "precision"),
                           ("device", "device")):
            if old.get(key) != new.get(key):
                what = f"{part} {words}"
                if key in ("path", "precision", "device"):
                    what += f" {old.get(key)} -> {new.get(key)}"
                found.append(what)
    old_options, options = before.get("options", {}), now["options"]
    for key in options:
        if old_options.get(key) != options[key]:
            found.append(f"--{key.replace('_', '-')} {old_options.get(key)} -> {options[key]}")
    if before.get("version") != now["version"]:
        found.append("the progress format")
    return found


def prepare(input: Path, output: Path | None, translator: Translator, options: DecodeOptions,
            format: str, overwrite: bool, parts: Path | None = None,
            flag_below: float | None = None, show_probs: bool = False) -> Job:
    """The Job translating `input` to `output`, its progress directory ready: created, or
    found and checked against this translation (refused if it is of another, unless
    `overwrite`, which starts again)."""
    chunks, sha256 = split_input(input, options.chunk_lines)
    wanted = identity(input, sha256, translator, options, format)
    wanted["options"]["flag_below"] = flag_below
    if parts is None:
        if output is None:
            raise ValueError("a translation to standard output needs its own parts directory")
        parts = parts_directory(output)
    manifest = parts / MANIFEST
    if manifest.exists() and not overwrite:
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise TraduireError(f"{manifest}: unreadable ({error}); give --overwrite to start "
                                "again") from None
        different = changes(found, wanted)
        if different:
            where = output if output is not None else "this output"
            raise TraduireError(
                f"{parts}: an unfinished translation to {where} with another "
                f"{', '.join(different)}; rerun it as it was to finish it, or give "
                "--overwrite to start again")
    else:
        if parts.exists():
            shutil.rmtree(parts)
        parts.mkdir(parents=True)
        atomic_write_text(manifest, json.dumps(wanted, indent=1) + "\n")
    return Job(input, output, parts, chunks, options, format, wanted, flag_below, show_probs)


# --- Translating chunks ------------------------------------------------------------------------


def translate_chunks(job: Job, translator: Translator, rank: int, world: int,
                     on_line: Callable[[], None] | None = None) -> int:
    """Translate the chunks of `job` that process `rank` of `world` owns and that are not done
    yet; returns how many lines it translated. Warnings go to stderr as they are found."""
    console = Console(stderr=True)
    lines = 0
    for chunk in range(rank, len(job.chunks), world):
        if not job.done(chunk):
            lines += _translate_chunk(job, translator, chunk, console, on_line)
    return lines


def _translate_chunk(job: Job, translator: Translator, chunk: int, console: Console,
                     on_line: Callable[[], None] | None) -> int:
    """Translate one chunk into its part file, then write its record (the chunk is done)."""
    from traduire.translate_output import RunLog, format_probabilities, output_line

    first, count, offset = job.chunks[chunk]
    log = RunLog(console, str(job.input), translator.max_source_tokens, job.flag_below)
    invalid: list[list[int]] = []

    def on_invalid(number: int, position: int) -> None:
        invalid.append([first + number, offset + position])
        log.invalid_utf8(first + number, offset + position)

    with open_input(job.input) as source:
        source.seek(offset)
        lines = [line for _, line in zip(range(count), read_lines(source, on_invalid))]
    with atomic_open(job.text_path(chunk), "w") as out:
        for number, result in enumerate(translator.translate_lines(lines, job.options),
                                        first + 1):
            out.write(output_line(result, job.format, job.options.nbest))
            log.add(number, result)
            if job.show_probs and result.hypotheses:
                log.console.print(format_probabilities(result), highlight=False)
            if on_line is not None:
                on_line()
    record = {"lines": count, "tokens": log.speed.tokens, "truncated": log.truncated,
              "mean_logprob_below": log.flagged, "invalid_utf8": invalid}
    atomic_write_text(job.record_path(chunk), json.dumps(record) + "\n")
    return count


def wait_for_chunks(job: Job, alive: Callable[[], bool] = lambda: True,
                    poll_s: float = 0.2) -> None:
    """Until every chunk is done (other processes translate them), or stop with an error once
    `alive` says they are gone with chunks left."""
    while not all(job.done(i) for i in range(len(job.chunks))):
        if not alive() and not all(job.done(i) for i in range(len(job.chunks))):
            missing = [i for i in range(len(job.chunks)) if not job.done(i)]
            raise TraduireError(f"{len(missing)} chunk(s) of {job.input} were not translated "
                                "(a worker stopped); rerun the same command to finish them")
        time.sleep(poll_s)


def join_output(job: Job) -> dict[str, Any]:
    """Write the output from the parts, in input order (atomically, or to stdout), remove the
    progress directory, and return the run's counts from the chunks' records."""
    from traduire.files import line_writer

    records = [json.loads(job.record_path(i).read_text(encoding="utf-8"))
               for i in range(len(job.chunks))]
    with line_writer(job.output) as sink:
        for i in range(len(job.chunks)):
            with open(job.text_path(i), encoding="utf-8", newline="\n") as part:
                shutil.copyfileobj(part, sink)
    shutil.rmtree(job.parts, ignore_errors=True)
    if job.output is not None:
        fsync_directory(job.output.parent)
    return {"sentences": sum(r["lines"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "truncated": sum(r["truncated"] for r in records),
            "flagged": [n for r in records for n in r["mean_logprob_below"]]}


# --- Processes ---------------------------------------------------------------------------------


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) in a process torchrun started with more than one
    process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def stdout_parts(job_key: str) -> Path:
    """A progress directory for a translation to stdout: every rank of one launch finds the
    same one (named from what it translates and torchrun's launch), removed once joined."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
    name = hashlib.sha256((job_key + launch).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"traduire-translate-{name}"


def _worker(load: Callable[[], Translator], job: Job, rank: int, world: int,
            threads: int, runtime_configured: bool) -> None:
    """A process of `run_workers`: its own model, `threads` threads, its share of chunks, and
    the runtime settings of the process that started it. A spawned process starts without
    them, and without the allocator's a worker decoded 27% slower than its parent (beam 5,
    bf16, one thread: 109 against 150 sentences/s; --workers 2 was 1.46x one process on two
    cores, 1.83x with them)."""
    import torch

    if runtime_configured:
        configure_runtime()
    torch.set_num_threads(threads)
    try:
        translate_chunks(job, load(), rank, world)
    except KeyboardInterrupt:
        sys.exit(130)
    except TraduireError as error:
        print(f"error: worker {rank}: {error}", file=sys.stderr)
        sys.exit(1)


def run_workers(job: Job, translator: Translator, load: Callable[[], Translator], workers: int,
                threads: int, on_line: Callable[[], None] | None = None) -> None:
    """Translate `job` on `workers` processes: this one (with `translator`) and workers - 1
    started here (each loading its own with `load`), `threads` threads each."""
    import torch

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    others = [context.Process(target=_worker, daemon=True,
                              args=(load, job, rank, workers, threads, runtime_configured()))
              for rank in range(1, workers)]
    for process in others:
        process.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        translate_chunks(job, translator, 0, workers, on_line)
        wait_for_chunks(job, alive=lambda: any(p.is_alive() for p in others))
    finally:  # on an error here, the others stop too (their finished chunks are kept)
        torch.set_num_threads(before)
        for process in others:
            if process.is_alive() and not all(job.done(i) for i in range(len(job.chunks))):
                process.terminate()
            process.join()
