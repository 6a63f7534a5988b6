"""Translating files: one output line per input line, in input order, written atomically (a
temporary file renamed when complete, so an interrupted run never leaves a partial file that
looks complete), with a progress bar, warnings naming the line, and decoding speed; and
`traduire eval --src`, which translates a file and scores it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from traduire.errors import TraduireError
from traduire.evaluate import score
from traduire.files import check_line_counts, line_writer, open_input, read_lines, read_text_lines
from traduire.translate import DecodeOptions, Translator
from traduire.translate_output import (
    RunLog,
    format_probabilities,
    output_line,
)


def translate_file(translator: Translator, input: str, output: Path | None,
                   options: DecodeOptions, format: str = "text", show_probs: bool = False,
                   progress: bool = True, collect: list[str] | None = None,
                   flag_below: float | None = None, workers: int = 1,
                   load: Callable[[], Translator] | None = None, threads: int = 0,
                   overwrite: bool = False, rank: tuple[int, int] | None = None
                   ) -> dict[str, Any]:
    """Translate a file (or '-' for stdin) to `output` (or stdout; or only into `collect`),
    one line per input line. The output file is written atomically, so an interrupted run
    never leaves a partial file that looks complete. Returns decoding speed figures.

    A file translated to a file goes in chunks (translate_chunks.py): its progress is kept
    beside the output, so the same command run again after an interruption continues it (one
    run with other options, input or model is refused unless `overwrite`). `workers` > 1
    translates on that many processes (`load` gives each its Translator; `threads` threads
    each, default this process's divided among them); `rank` = (rank, world size) is this
    process's place in a torchrun launch. The output is the same for any number of processes.

    jsonl output carries each sentence's confidence; with `flag_below`, the numbers of the lines
    whose mean token log-probability is below it are printed on stderr at the end."""
    if format not in ("text", "jsonl"):
        raise TraduireError(f"--format {format!r}: expected text or jsonl")
    if format == "jsonl" or flag_below is not None:
        options = dataclasses.replace(options, confidence=True)
    if workers < 1:
        raise TraduireError("--workers must be at least 1")
    if workers > 1 and rank is not None:
        raise TraduireError("--workers starts processes itself: under torchrun, give "
                            "--nproc-per-node instead")
    if input == "-" and (workers > 1 or rank is not None):
        raise TraduireError("translating on several processes needs an input file, not stdin")
    if collect is None and input != "-" and (output is not None or workers > 1
                                             or rank is not None):
        return _translate_in_chunks(translator, Path(input), output, options, format,
                                    show_probs, progress, flag_below, workers, load, threads,
                                    overwrite, rank)
    log = RunLog(Console(stderr=True), input, translator.max_source_tokens, flag_below)
    source = sys.stdin.buffer if input == "-" else open_input(Path(input))
    try:
        with _progress_bar(log.console, progress) as (bar, task), \
                _sink(output, collect) as sink:
            results = translator.translate_lines(read_lines(source, log.invalid_utf8), options)
            for number, result in enumerate(results, 1):
                sink.write(output_line(result, format, options.nbest))
                if collect is not None:
                    collect.append(result.best)
                log.add(number, result)
                if show_probs and result.hypotheses:
                    log.console.print(format_probabilities(result), highlight=False)
                bar.update(task, completed=number,
                           rate=f"{log.speed.summary()['sentences_per_s']:.1f} sentences/s")
    finally:
        if input != "-":
            source.close()
    return log.summary()


@contextlib.contextmanager
def _progress_bar(console: Console, shown: bool) -> Iterator[tuple[Progress, Any]]:
    columns = (TextColumn("translating"), TextColumn("{task.completed} lines"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not shown, transient=True) as bar:
        yield bar, bar.add_task("translate", rate="")


def _translate_in_chunks(translator: Translator, input: Path, output: Path | None,
                         options: DecodeOptions, format: str, show_probs: bool, progress: bool,
                         flag_below: float | None, workers: int,
                         load: Callable[[], Translator] | None, threads: int, overwrite: bool,
                         rank: tuple[int, int] | None) -> dict[str, Any]:
    """translate_file for a file on one or more processes, resumable (translate_chunks.py)."""
    import torch

    from traduire import translate_chunks as chunked

    start = time.perf_counter()
    console = Console(stderr=True)
    me, world = rank if rank is not None else (0, workers)
    parts = None
    if output is None:  # to stdout: progress in a temporary directory, not resumable
        parts = chunked.stdout_parts(f"{input.resolve()} {options} {format}")
    prepare = dict(parts=parts, flag_below=flag_below, show_probs=show_probs)
    if rank is not None:  # rank 0 prepares the progress directory, the others then check it
        from traduire import distributed

        if me == 0:
            job = chunked.prepare(input, output, translator, options, format,
                                  overwrite or output is None, **prepare)
        distributed.barrier()
        if me != 0:
            job = chunked.prepare(input, output, translator, options, format, False, **prepare)
    else:
        job = chunked.prepare(input, output, translator, options, format,
                              overwrite or output is None, **prepare)
    done_before = sum(count for i, (_, count, _) in enumerate(job.chunks) if job.done(i))
    if done_before:
        console.print(f"{output}: continuing: {done_before:,} of "
                      f"{sum(c for _, c, _ in job.chunks):,} lines were translated before",
                      highlight=False, markup=False)
    with _progress_bar(console, progress and me == 0) as (bar, task):
        translated = [0]

        def on_line() -> None:
            translated[0] += 1
            seconds = max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done_before + translated[0] * world,
                       rate=f"{translated[0] * world / seconds:.1f} sentences/s")

        if workers > 1:
            if load is None:
                raise ValueError("workers > 1 needs `load`, to give each process its model")
            chunked.run_workers(job, translator, load, workers,
                                threads or max(1, torch.get_num_threads() // workers), on_line)
        else:
            chunked.translate_chunks(job, translator, me, world, on_line)
            if rank is not None and me != 0:
                return {"sentences": translated[0], "seconds": 0.0, "sentences_per_s": 0.0,
                        "tokens_per_s": 0.0, "truncated": 0, "rank": me}
            if rank is not None:
                chunked.wait_for_chunks(job)
    counts = chunked.join_output(job)
    seconds = max(time.perf_counter() - start, 1e-9)
    new_lines = counts["sentences"] - done_before
    summary: dict[str, Any] = {"sentences": counts["sentences"], "seconds": round(seconds, 3),
                               "sentences_per_s": round(new_lines / seconds, 2),
                               "tokens_per_s": round(counts["tokens"] / seconds, 1),
                               "truncated": counts["truncated"], "resumed_lines": done_before,
                               "processes": world}
    if flag_below is not None:
        flagged = counts["flagged"]
        console.print(f"{len(flagged)} lines with mean token log-probability below "
                      f"{flag_below}: {' '.join(map(str, flagged)) or '-'}",
                      highlight=False, markup=False, soft_wrap=True)
        summary["flagged"] = flagged
    return summary


def _sink(output: Path | None, collect: list[str] | None
          ) -> contextlib.AbstractContextManager[TextIO]:
    """Where translate_file writes: the output file (atomically), nowhere when the caller only
    collects the lines, or standard output."""
    if output is None and collect is not None:
        return contextlib.nullcontext(io.StringIO())
    return line_writer(output)


def translate_and_score(translator: Translator, src: Path, ref: Path, options: DecodeOptions,
                        output: Path | None = None, ter: bool = False, progress: bool = True
                        ) -> dict[str, Any]:
    """Translate `src` and score the translations against `ref` (`traduire eval --src`):
    sacreBLEU's figures with a `speed` entry."""
    references = read_text_lines(ref)
    check_line_counts(src, len(read_text_lines(src)), ref, len(references),
                      "sources and references must be line-aligned")
    hypotheses: list[str] = []
    speed = translate_file(translator, str(src), output, options, collect=hypotheses,
                           progress=progress)
    return {**score(hypotheses, references, ter=ter), "speed": speed}
