"""Translating with a trained run: load the model, batch sentences by length, decode.

`Translator` is the Python API:

    from traduire import Translator
    t = Translator.load("runs/m30k")            # average.pt or best.pt; device, precision auto
    t.translate(["A dog runs on the beach."])   # ['Un chien court sur la plage.']
    t.translate(lines, beam=5, nbest=3)         # n-best Candidates with probabilities
    t.score(["A dog runs."], ["Un chien court."])
    t.attention("... because it was too tired.", token="it")

`translate_lines` streams: it reads a bounded chunk of lines at a time, sorts the chunk by
length so batches hold similar lengths, and yields results in input order, exactly one per
input line (an empty or blank line gives an empty translation without touching the model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from traduire import analysis
from traduire.batch import sentence_batches, source_batch
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import Config, config_from_dict
from traduire.device import decoding_precision, resolve_device
from traduire.errors import CheckpointError, TraduireError
from traduire.evaluate import check_aligned, score
from traduire.files import line_writer, open_input, read_lines, read_text_lines
from traduire.kernels import quantize_int8
from traduire.model import Transformer, TransformerShape
from traduire.search import Hypothesis, beam_search, sample
from traduire.tokenizer import Tokenizer


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
    # analysis.confidence). On for --format jsonl and --flag-below only.
    confidence: bool = False

    def __post_init__(self) -> None:
        for name in ("beam", "nbest", "batch_tokens", "chunk_lines"):
            if getattr(self, name) < 1:
                raise TraduireError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size < 0:
            raise TraduireError("--batch-size must not be negative")
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


@dataclass(frozen=True)
class Candidate:
    """One translation of a sentence and how probable the model finds it."""

    text: str
    logprob: float  # total log-probability of its tokens and EOS
    score: float  # logprob / length penalty: what ranks the candidates

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)


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

    @property
    def candidates(self) -> list[Candidate]:
        return [Candidate(t, h.logprob, h.score) for t, h in zip(self.texts, self.hypotheses)]


class Translator:
    """A trained model with its tokenizer, ready to translate."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: Config,
                 device: torch.device, checkpoint: Path) -> None:
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.device, self.checkpoint = device, checkpoint

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str | Path | None = None,
             device: str = "auto", precision: str = "auto") -> Translator:
        """The run's model (`default_checkpoint` unless `checkpoint` names another) on `device`,
        its weights in `precision`: fp32, bf16, int8 (CPU), or auto (bf16 where the device
        computes it natively, else fp32)."""
        run_dir = Path(run_dir)
        if not (run_dir / "tokenizer").is_dir():
            raise TraduireError(f"{run_dir}: not a trained run directory (no tokenizer/)")
        checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(run_dir)
        torch_device = resolve_device(device)
        precision = decoding_precision(precision, torch_device)
        state = load_checkpoint(checkpoint, map_location="cpu")
        config = config_from_dict(state["config"], origin=str(checkpoint))
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
        model = Transformer(TransformerShape.from_config(
            config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.pad_id))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"{checkpoint}: weights do not fit the model of {run_dir} "
                                  "(different architecture or vocabulary)") from None
        if precision == "int8":
            model = quantize_int8(model.eval())
        elif precision == "bf16":
            model = model.to(torch.bfloat16)
        return cls(model.to(torch_device), tokenizer, config, torch_device, checkpoint)

    # --- the Python API ------------------------------------------------------------------------

    def translate(self, sentences: str | Iterable[str], **options: Any
                  ) -> list[str] | list[list[Candidate]]:
        """Translations of `sentences`, one per sentence, in order. Keyword options are those
        of DecodeOptions (beam=5, nbest=1, lenpen=1.0, sample=..., ...). With nbest > 1, each
        sentence's n best Candidates (text, logprob, score, probability), best first."""
        lines = [sentences] if isinstance(sentences, str) else list(sentences)
        decode = DecodeOptions(**options)
        results = list(self.translate_lines(lines, decode))
        if decode.nbest == 1:
            return [r.best for r in results]
        return [r.candidates for r in results]

    def score(self, sources: list[str], targets: list[str]) -> list[analysis.ScoredPair]:
        """Forced decoding: how probable the model finds each target as a translation of its
        source, in total and token by token."""
        return analysis.score_pairs(self.model, self.tokenizer, sources, targets)

    def attention(self, sentence: str, token: str | None = None, index: int | None = None,
                  cross: bool = False, beam: int = 5) -> analysis.AttentionMap | dict[str, Any]:
        """Encoder self-attention between the words of `sentence` (an AttentionMap), or, with
        `token` or `index`, the weights from that one word: {"word", "index", "average":
        [[word, weight], ...] in source order, "layers": per layer and head}. cross=True gives
        the cross-attention from each word of the model's own translation (beam search)."""
        output = None
        if cross:
            output = self.translate_ids(self.encode([sentence])[0], DecodeOptions(beam=beam)
                                        )[0][0].tokens
        amap = analysis.attention_map(self.model, self.tokenizer, sentence, output)
        if token is None and index is None:
            return amap
        return amap.row_record(analysis.find_word(amap.rows, token, index))

    # --- batches and streams -------------------------------------------------------------------

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
        src = source_batch(src_ids, pad=tok.pad_id, eos=tok.eos_id).to(self.device)
        common = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                      max_len_a=options.max_len_a, max_len_b=options.max_len_b)
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
        for i, was_cut in zip(todo, cut):
            results[i].truncated = was_cut
        for batch in sentence_batches([len(s) for s in ids], options.batch_tokens,
                                      options.batch_size):
            nbests = self.translate_ids([ids[j] for j in batch], options, generator)
            for j, hyps in zip(batch, nbests):
                result = results[todo[j]]
                result.hypotheses = hyps
                result.texts = [one_line(t) for t in
                                self.tokenizer.decode_tgt([h.tokens for h in hyps])]
            if options.confidence:
                scores = analysis.confidence(self.model, self.tokenizer,
                                             [ids[j] for j in batch],
                                             [results[todo[j]].hypotheses[0] for j in batch])
                for j, confidence in zip(batch, scores):
                    results[todo[j]].confidence = confidence
        yield from results


def default_checkpoint(run_dir: Path) -> Path:
    """average.pt if the run wrote one (train.average_last), else best.pt, else the newest
    periodic checkpoint."""
    for name in ("average.pt", "best.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    periodic = step_checkpoints(run_dir / "checkpoints")
    if not periodic:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (train first)")
    return periodic[-1]


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


# --- files -------------------------------------------------------------------------------------


def translate_file(translator: Translator, input: str, output: Path | None,
                   options: DecodeOptions, format: str = "text", show_probs: bool = False,
                   progress: bool = True, collect: list[str] | None = None,
                   flag_below: float | None = None) -> dict[str, Any]:
    """Translate a file (or '-' for stdin) to `output` (or stdout; or only into `collect`).
    The output file is written atomically, so an interrupted run never leaves a partial file
    that looks complete. Returns decoding speed figures.

    jsonl output carries each sentence's confidence; with `flag_below`, the numbers of the lines
    whose mean token log-probability is below it are printed on stderr at the end."""
    if format not in ("text", "jsonl"):
        raise TraduireError(f"--format {format!r}: expected text or jsonl")
    console = Console(stderr=True)
    if format == "jsonl" or flag_below is not None:
        options = dataclasses.replace(options, confidence=True)

    def say(message: str) -> None:
        console.print(message, highlight=False, markup=False, soft_wrap=True)

    def invalid(number: int, offset: int) -> None:
        say(f"warning: {input}:{number}: invalid UTF-8 at byte {offset}; translated with "
            "U+FFFD in its place")

    import sys

    source = sys.stdin.buffer if input == "-" else open_input(Path(input))
    flagged: list[int] = []
    speed, truncated = Throughput(), 0
    columns = (TextColumn("translating"), TextColumn("{task.completed} lines"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not progress, transient=True) as bar, \
                _sink(output, collect) as sink:
            task = bar.add_task("translate", rate="")
            results = translator.translate_lines(read_lines(source, invalid), options)
            for number, result in enumerate(results, 1):
                speed.add(result)
                if result.truncated:
                    truncated += 1
                    say(f"warning: {input}:{number}: line longer than the model's "
                        f"{translator.max_source_tokens} source tokens; translated its "
                        "beginning only")
                if format == "jsonl":
                    sink.write(json.dumps(_as_record(result), ensure_ascii=False) + "\n")
                else:
                    sink.write(" ||| ".join(result.texts) if options.nbest > 1 else result.best)
                    sink.write("\n")
                if collect is not None:
                    collect.append(result.best)
                if (flag_below is not None and result.confidence is not None
                        and result.confidence["mean_logprob"] < flag_below):
                    flagged.append(number)
                if show_probs and result.hypotheses:
                    console.print(format_probabilities(result), highlight=False)
                rate = speed.summary()["sentences_per_s"]
                bar.update(task, completed=number, rate=f"{rate:.1f} sentences/s")
    finally:
        if input != "-":
            source.close()
    summary: dict[str, Any] = {**speed.summary(), "truncated": truncated}
    if flag_below is not None:
        say(f"{len(flagged)} lines with mean token log-probability below {flag_below}: "
            f"{' '.join(map(str, flagged)) or '-'}")
        summary["flagged"] = flagged
    return summary


def _sink(output: Path | None, collect: list[str] | None):
    """Where translate_file writes: the output file (atomically), nowhere when the caller only
    collects the lines, or standard output."""
    import contextlib
    import io

    if output is None and collect is not None:
        return contextlib.nullcontext(io.StringIO())
    return line_writer(output)


def translate_and_score(translator: Translator, src: Path, ref: Path, options: DecodeOptions,
                        output: Path | None = None, ter: bool = False, progress: bool = True
                        ) -> dict[str, Any]:
    """Translate `src` and score the translations against `ref` (`traduire eval --src`):
    sacreBLEU's figures with a `speed` entry."""
    references = read_text_lines(ref)
    check_aligned(src, read_text_lines(src), ref, references)
    hypotheses: list[str] = []
    speed = translate_file(translator, str(src), output, options, collect=hypotheses,
                           progress=progress)
    return {**score(hypotheses, references, ter=ter), "speed": speed}


def _as_record(result: Translation) -> dict:
    return {"source": result.source, "translation": result.best,
            "truncated": result.truncated,
            **({"confidence": result.confidence} if result.confidence is not None else {}),
            "nbest": [{"translation": c.text, "logprob": round(c.logprob, 4),
                       "score": round(c.score, 4),
                       "probability": round(100 * c.probability, 6),
                       "tokens": len(h.tokens) + 1}
                      for c, h in zip(result.candidates, result.hypotheses)]}


def format_probabilities(result: Translation) -> str:
    """The 'probability · candidate' table of a textbook's list of completions: the source,
    then one line per candidate, e.g. '  3.1%  Je suis un bon chien.' (percent with one
    decimal, right-aligned; two significant digits below 0.05%, e.g. '1.0e-02%', so unlikely
    candidates can still be compared)."""
    lines = [f"  {result.source}"]
    for candidate in result.candidates:
        percent = 100 * candidate.probability
        shown = f"{percent:.1f}%" if percent >= 0.05 else f"{percent:.1e}%"
        lines.append(f"{shown:>8}  {candidate.text}")
    return "\n".join(lines)
