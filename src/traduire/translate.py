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

The search runs in traduire's own decoder (search.decode) or, through `load_translator`, in
CTranslate2 on an exported model (ctranslate2_engine.py); tokenisation, batching and output
are the same either way. Translating files, with progress and atomic output, is
translate_files.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from traduire import analysis
from traduire.batch import sentence_batches
from traduire.checkpoint import default_checkpoint
from traduire.config import Config
from traduire.ctranslate2_engine import CTranslate2Engine
from traduire.device import decoding_precision, resolve_device
from traduire.errors import TraduireError
from traduire.loading import load_for_decoding
from traduire.model import Transformer
from traduire.search import Hypothesis, SearchOptions, decode
from traduire.tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodeOptions(SearchOptions):
    """The search's settings (SearchOptions: beam, nbest, lenpen, length limits, sampling),
    and how sentences are read and batched."""

    batch_tokens: int = 4000  # source tokens per batch (before expanding to beams)
    batch_size: int = 0  # sentences per batch; 0 = limited by batch_tokens only
    chunk_lines: int = 10_000  # lines read ahead and sorted together
    # Also fill Translation.confidence (one more forward pass per batch; see
    # analysis.confidence). On for --format jsonl and --flag-below only.
    confidence: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_tokens", "chunk_lines"):
            if getattr(self, name) < 1:
                raise TraduireError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size < 0:
            raise TraduireError("--batch-size must not be negative")


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


class SearchEngine(Protocol):
    """Decodes batches of encoded sentences: n-best lists in input order."""

    def decode(self, src_ids: list[list[int]], options: SearchOptions,
               generator: torch.Generator | None = None) -> list[list[Hypothesis]]: ...


class Translator:
    """A trained model with its tokenizer, ready to translate. The search runs in `engine` if
    one is given (CTranslate2), else in traduire's own decoder on `model`; scoring, attention
    and confidence always use `model`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: Config,
                 device: torch.device, checkpoint: Path, engine: SearchEngine | None = None,
                 precision: str = "fp32") -> None:
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.device, self.checkpoint, self.engine = device, checkpoint, engine
        self.precision = precision  # of the search: fp32, bf16, int8, or the engine's type

    @property
    def model_file(self) -> Path:
        """The file whose weights the search computes with: the checkpoint, or the engine's
        model."""
        return getattr(self.engine, "model_file", None) or self.checkpoint

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str | Path | None = None,
             device: str = "auto", precision: str = "auto") -> Translator:
        """The run's model (`default_checkpoint` unless `checkpoint` names another) on `device`,
        its weights in `precision`: fp32, bf16, int8 (CPU), or auto (bf16 where the device
        computes it natively, else fp32). A checkpoint trained with another vocabulary than the
        run's tokenizer is refused."""
        run_dir = Path(run_dir)
        if not (run_dir / "tokenizer").is_dir():
            raise TraduireError(f"{run_dir}: not a trained run directory (no tokenizer/)")
        checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(run_dir)
        torch_device = resolve_device(device)
        precision = decoding_precision(precision, torch_device)
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
        model, config = load_for_decoding(checkpoint, tokenizer, run_dir / "tokenizer",
                                          torch_device, precision)
        return cls(model, tokenizer, config, torch_device, checkpoint, precision=precision)

    # --- the Python API ------------------------------------------------------------------------

    def translate(self, sentences: str | Iterable[str], **options: Any
                  ) -> list[str] | list[list[Candidate]]:
        """Translations of `sentences`, one per sentence, in order. Keyword options are those
        of DecodeOptions (beam=5, nbest=1, lenpen=1.0, sample=..., ...). With nbest > 1, each
        sentence's n best Candidates (text, logprob, score, probability), best first."""
        lines = [sentences] if isinstance(sentences, str) else list(sentences)
        decode_options = DecodeOptions(**options)
        results = list(self.translate_lines(lines, decode_options))
        if decode_options.nbest == 1:
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
            ids, _ = self.encode([sentence])
            output = self.translate_ids(ids, SearchOptions(beam=beam))[0][0].tokens
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
        return self.tokenizer.encode_sources(sentences, self.model.shape.max_positions)

    def translate_ids(self, src_ids: list[list[int]], options: SearchOptions,
                      generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
        """Decode one batch of encoded sentences; n-best lists in input order."""
        if self.engine is not None:
            return self.engine.decode(src_ids, options, generator)
        return decode(self.model, self.tokenizer, src_ids, options, generator)

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


def load_translator(run_dir: Path, engine: str = "torch", engine_dir: Path | None = None,
                    checkpoint: Path | None = None, device: str = "auto",
                    precision: str = "auto", threads: int = 0) -> Translator:
    """A Translator of the run searching with `engine`: torch (traduire's own search), or
    ctranslate2 on the model `traduire export` wrote (in `engine_dir`, default RUN/ctranslate2;
    its differences from traduire's search are in ctranslate2_engine.py)."""
    if engine_dir is not None and engine != "ctranslate2":
        raise TraduireError("--engine-dir needs --engine ctranslate2")
    if engine == "torch":
        return Translator.load(run_dir, checkpoint, device, precision)
    if engine != "ctranslate2":
        raise TraduireError(f"--engine {engine!r}: expected torch or ctranslate2")
    if checkpoint is not None:
        raise TraduireError("--checkpoint does not apply to --engine ctranslate2: export that "
                            "checkpoint with 'traduire export --checkpoint FILE'")
    model_dir = Path(engine_dir) if engine_dir else Path(run_dir) / "ctranslate2"
    # traduire's model stays on the CPU in fp32 for what CTranslate2 does not do (scoring,
    # attention, confidence).
    base = Translator.load(run_dir, device="cpu", precision="fp32")
    base.engine = CTranslate2Engine.open(model_dir, run_dir, base.tokenizer,
                                         base.model.shape.max_positions,
                                         device=resolve_device(device).type, precision=precision,
                                         threads=threads)
    base.precision = f"ctranslate2 {base.engine.compute_type}"
    return base


def clean_line(line: str) -> str:
    """Control characters other than tab become spaces: they carry no meaning to translate."""
    return "".join(" " if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in line)


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(text: str) -> str:
    """Output text on one line, whatever the model produced."""
    return " ".join(text.split()) if _LINE_BREAKS.intersection(text) else text
