"""Translating text with a trained run: load the model, batch sentences by length, decode.

`translate_lines` streams: it reads a bounded chunk of lines at a time, sorts the chunk by
length so batches hold similar lengths, and yields results in input order, exactly one per
input line (an empty or blank line gives an empty translation without touching the model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import Config, config_from_dict
from traduire.errors import CheckpointError, TraduireError
from traduire.model import Transformer
from traduire.runtime import native_bf16
from traduire.search import Hypothesis, beam_search, sample
from traduire.tokenizer import Tokenizer
from traduire.train import build_model, resolve_device


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = 5
    nbest: int = 1
    lenpen: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    batch_tokens: int = 4000  # source tokens per batch (before expanding to beams)
    batch_size: int = 0  # sentences per batch; 0 = limited by batch_tokens only
    sample: str | None = None  # "topk:K" or "topp:P"
    temperature: float = 1.0
    seed: int = 0
    chunk_lines: int = 10_000  # lines read ahead and sorted together
    # Also fill Translation.confidence (one more forward pass per batch; see
    # inspect_model.confidence). On for --format jsonl and --flag-below only.
    confidence: bool = False

    def __post_init__(self) -> None:
        for name in ("beam", "nbest", "batch_tokens", "chunk_lines"):
            if getattr(self, name) < 1:
                raise TraduireError(f"--{name.replace('_', '-')} must be at least 1")
        if self.nbest > self.beam and self.sample is None:
            raise TraduireError(f"--nbest {self.nbest} cannot exceed --beam {self.beam}")
        if self.sample is not None:
            parse_sampling(self.sample)


def parse_sampling(spec: str) -> tuple[int | None, float | None]:
    """'topk:K' -> (K, None); 'topp:P' -> (None, P)."""
    kind, _, value = spec.partition(":")
    try:
        if kind == "topk" and int(value) >= 1:
            return int(value), None
        if kind == "topp" and 0.0 < float(value) <= 1.0:
            return None, float(value)
    except ValueError:
        pass
    raise TraduireError(f"--sample {spec!r}: expected topk:K (K >= 1) or topp:P (0 < P <= 1)")


@dataclass
class Translation:
    source: str
    hypotheses: list[Hypothesis]  # best first; empty for an empty input line
    texts: list[str]  # detokenised hypotheses
    truncated: bool = False  # the source was longer than the model accepts and was cut
    # With DecodeOptions.confidence: mean_logprob and low_attention_share of the best output.
    confidence: dict[str, float] | None = None

    @property
    def best(self) -> str:
        return self.texts[0] if self.texts else ""


class Translator:
    """A trained model with its tokenizer, ready to translate."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: Config,
                 device: torch.device, checkpoint: Path) -> None:
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.device, self.checkpoint = device, checkpoint

    @classmethod
    def load(cls, run_dir: Path, checkpoint: Path | None = None, device: str = "auto",
             precision: str = "auto") -> Translator:
        """The run's model on `device`, its weights in `precision` (see `decode_dtype`)."""
        run_dir = Path(run_dir)
        if not (run_dir / "tokenizer").is_dir():
            raise TraduireError(f"{run_dir}: not a trained run directory (no tokenizer/)")
        checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(run_dir)
        torch_device = resolve_device(device)
        state = load_checkpoint(checkpoint, map_location="cpu")
        config = config_from_dict(state["config"], origin=str(checkpoint))
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
        model = build_model(config, tokenizer)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"{checkpoint}: weights do not fit the model of {run_dir} "
                                  "(different architecture or vocabulary)") from None
        model = model.to(torch_device, decode_dtype(precision, torch_device))
        return cls(model, tokenizer, config, torch_device, checkpoint)

    @property
    def max_source_tokens(self) -> int:
        return self.model.shape.max_positions - 1  # room for EOS

    def encode(self, sentences: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each sentence, cut to what the model accepts; and which were cut."""
        ids = self.tokenizer.encode_src(sentences)
        limit = self.max_source_tokens
        return [s[:limit] for s in ids], [len(s) > limit for s in ids]

    @torch.inference_mode()
    def translate_ids(self, src_ids: list[list[int]], options: DecodeOptions,
                      generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
        """Decode one batch of encoded sentences; n-best lists in input order."""
        tok = self.tokenizer
        eos = tok.eos_id
        longest = max(len(s) for s in src_ids) + 1
        src = torch.full((len(src_ids), longest), tok.pad_id, dtype=torch.long)
        for row, ids in enumerate(src_ids):
            src[row, :len(ids) + 1] = torch.tensor(ids + [eos])
        src = src.to(self.device)
        # Never ask for more target positions than the model has encodings for.
        max_len_b = min(options.max_len_b, self.model.shape.max_positions - 1)
        max_len_a = options.max_len_a
        if max_len_a * longest + max_len_b > self.model.shape.max_positions - 1:
            max_len_a = max(0.0, (self.model.shape.max_positions - 1 - max_len_b) / longest)
        common = dict(bos=tok.bos_id, eos=eos, pad=tok.pad_id, max_len_a=max_len_a,
                      max_len_b=max_len_b)
        if options.sample is not None:
            top_k, top_p = parse_sampling(options.sample)
            return [[h] for h in sample(self.model, src, top_k=top_k, top_p=top_p,
                                        temperature=options.temperature, generator=generator,
                                        **common)]
        return beam_search(self.model, src, beam=options.beam, lenpen=options.lenpen,
                           nbest=options.nbest, **common)

    def translate_lines(self, lines: Iterable[str], options: DecodeOptions
                        ) -> Iterator[Translation]:
        """Translate an iterable of lines, yielding one Translation per line, in order."""
        generator = None
        if options.sample is not None:
            generator = torch.Generator(device=self.device).manual_seed(options.seed)
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= options.chunk_lines:
                yield from self._translate_chunk(chunk, options, generator)
                chunk = []
        if chunk:
            yield from self._translate_chunk(chunk, options, generator)

    def _translate_chunk(self, lines: list[str], options: DecodeOptions,
                         generator: torch.Generator | None) -> Iterator[Translation]:
        sources = [clean_line(line) for line in lines]
        results = [Translation(s, [], []) for s in sources]
        todo = [i for i, s in enumerate(sources) if s.strip()]
        ids, cut = self.encode([sources[i] for i in todo]) if todo else ([], [])
        encoded = dict(zip(todo, ids))
        for i, was_cut in zip(todo, cut):
            results[i].truncated = was_cut
        for batch in length_batches(encoded, options.batch_tokens, options.batch_size):
            nbests = self.translate_ids([encoded[i] for i in batch], options, generator)
            for i, hyps in zip(batch, nbests):
                results[i].hypotheses = hyps
                results[i].texts = [one_line(t) for t in
                                    self.tokenizer.decode_tgt([h.tokens for h in hyps])]
            if options.confidence:
                from traduire.inspect_model import confidence

                scores = confidence(self, [encoded[i] for i in batch],
                                    [results[i].hypotheses[0] for i in batch])
                for i, score in zip(batch, scores):
                    results[i].confidence = score
        yield from results


def length_batches(encoded: dict[int, list[int]], batch_tokens: int, batch_size: int
                   ) -> Iterator[list[int]]:
    """Group line numbers by source length so little of each batch is padding."""
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    batch: list[int] = []
    longest = 0
    for i in order:
        size = len(encoded[i]) + 1
        too_many = batch_size and len(batch) >= batch_size
        if batch and (too_many or max(longest, size) * (len(batch) + 1) > batch_tokens):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, size)
    if batch:
        yield batch


PRECISIONS = ("auto", "fp32", "bf16")


def decode_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype to decode in: fp32, bf16, or auto = bf16 where the hardware multiplies bf16
    natively (`runtime.native_bf16`), else fp32.

    bf16 weights make decoding 1.5x faster on such a CPU with the same BLEU (Multi30k test_2016:
    51.9 either way); search scores stay in fp32 (see search.py).
    """
    if precision not in PRECISIONS:
        raise TraduireError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def default_checkpoint(run_dir: Path) -> Path:
    """best.pt if the run has one, else its newest periodic checkpoint."""
    best = run_dir / "best.pt"
    if best.exists():
        return best
    periodic = step_checkpoints(run_dir / "checkpoints")
    if not periodic:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (train first)")
    return periodic[-1]


def read_lines(stream, on_invalid=None) -> Iterator[str]:
    """Lines of a binary stream split on '\\n' only (so '\\r', form feeds and Unicode line
    separators inside a sentence never make extra lines); invalid UTF-8 becomes U+FFFD, and
    `on_invalid(line_number, byte_offset)` (1-based line, offset in the stream) is called."""
    offset = 0
    for number, raw in enumerate(stream, 1):
        line = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_invalid is not None:
                on_invalid(number, offset + e.start)
            yield line.decode("utf-8", errors="replace")
        offset += len(raw)


def clean_line(line: str) -> str:
    """Control characters other than tab become spaces: they carry no meaning to translate."""
    return "".join(" " if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in line)


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(text: str) -> str:
    """Output text on one line, whatever the model produced."""
    return " ".join(text.split()) if _LINE_BREAKS.intersection(text) else text


class Throughput:
    """Sentences and target tokens per second over a translation run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sentences = self.tokens = 0

    def add(self, translation: Translation) -> None:
        self.sentences += 1
        if translation.hypotheses:
            self.tokens += len(translation.hypotheses[0].tokens) + 1

    def summary(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"sentences": self.sentences, "seconds": round(seconds, 3),
                "sentences_per_s": round(self.sentences / seconds, 2),
                "tokens_per_s": round(self.tokens / seconds, 1)}


def probability_percent(logprob: float) -> float:
    return 100.0 * math.exp(logprob)


# --- files -------------------------------------------------------------------------------------


def translate_file(translator: Translator, input: str, output: Path | None,
                   options: DecodeOptions, format: str = "text", show_probs: bool = False,
                   progress: bool = True, collect: list[str] | None = None,
                   flag_below: float | None = None) -> dict[str, float]:
    """Translate a file (or '-' for stdin) to `output` (or stdout). The output file is written
    to a temporary name and renamed at the end, so an interrupted run never leaves a partial
    file that looks complete. Returns decoding speed figures.

    jsonl output carries each sentence's confidence; with `flag_below`, the numbers of the lines
    whose mean token log-probability is below it are printed on stderr at the end."""
    import dataclasses
    import json
    import os
    import sys
    import tempfile

    from rich.console import Console
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if format == "jsonl" or flag_below is not None:
        options = dataclasses.replace(options, confidence=True)
    flagged: list[int] = []
    source = sys.stdin.buffer if input == "-" else _open_input(Path(input))
    tmp = None
    if output is None and collect is not None:
        sink = open(os.devnull, "w", encoding="utf-8")  # the caller takes the lines itself
    elif output is None:
        sink = sys.stdout
    else:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
        sink = open(fd, "w", encoding="utf-8", newline="\n")
    speed = Throughput()
    truncated = 0
    columns = (TextColumn("translating"), TextColumn("{task.completed} lines"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task("translate", rate="")

            def invalid(number: int, offset: int) -> None:
                console.print(f"warning: {input}:{number}: invalid UTF-8 at byte {offset}; "
                              "translated with U+FFFD in its place", highlight=False,
                              markup=False, soft_wrap=True)

            lines = read_lines(source, on_invalid=invalid)
            for number, result in enumerate(translator.translate_lines(lines, options), 1):
                speed.add(result)
                if result.truncated:
                    truncated += 1
                    console.print(f"warning: {input}:{number}: line longer than the model's "
                                  f"{translator.max_source_tokens} source tokens; translated "
                                  "its beginning only", highlight=False, markup=False,
                                  soft_wrap=True)
                if format == "jsonl":
                    sink.write(json.dumps(_as_record(result), ensure_ascii=False) + "\n")
                elif options.nbest > 1:
                    sink.write(" ||| ".join(result.texts) + "\n")
                else:
                    sink.write(result.best + "\n")
                if collect is not None:
                    collect.append(result.best)
                if (flag_below is not None and result.confidence is not None
                        and result.confidence["mean_logprob"] < flag_below):
                    flagged.append(number)
                if show_probs and result.hypotheses:
                    console.print(format_probabilities(result), highlight=False)
                rate = speed.summary()["sentences_per_s"]
                bar.update(task, completed=number, rate=f"{rate:.1f} sentences/s")
        if tmp is not None:
            sink.close()
            os.replace(tmp, output)
            tmp = None
        elif sink is sys.stdout:
            sink.flush()
        else:
            sink.close()
    finally:
        if tmp is not None:
            sink.close()
            Path(tmp).unlink(missing_ok=True)
        if input != "-":
            source.close()
    summary = speed.summary()
    summary["truncated"] = truncated
    if flag_below is not None:
        console.print(f"{len(flagged)} lines with mean token log-probability below "
                      f"{flag_below}: {' '.join(map(str, flagged)) or '-'}", highlight=False)
        summary["flagged"] = flagged
    return summary


def _open_input(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise TraduireError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise TraduireError(f"{path}: is a directory, not a text file") from None


def _as_record(result: Translation) -> dict:
    return {"source": result.source, "translation": result.best,
            "truncated": result.truncated,
            **({"confidence": result.confidence} if result.confidence is not None else {}),
            "nbest": [{"translation": text, "logprob": round(h.logprob, 4),
                       "score": round(h.score, 4),
                       "probability": round(probability_percent(h.logprob), 6),
                       "tokens": len(h.tokens) + 1}
                      for text, h in zip(result.texts, result.hypotheses)]}


def format_probabilities(result: Translation) -> str:
    """The 'probability · candidate' table of a textbook's list of completions: the source,
    then one line per candidate, e.g. '  3.1%  Je suis un bon chien.' (percent with one
    decimal, right-aligned; two significant digits below 0.05%, e.g. '1.0e-02%', so unlikely
    candidates can still be compared)."""
    lines = [f"  {result.source}"]
    for text, h in zip(result.texts, result.hypotheses):
        percent = probability_percent(h.logprob)
        shown = f"{percent:.1f}%" if percent >= 0.05 else f"{percent:.1e}%"
        lines.append(f"{shown:>8}  {text}")  # "    3.1%  ...", "  100.0%  ...", "1.0e-02%  ..."
    return "\n".join(lines)
