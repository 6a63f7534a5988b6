"""What a translation run shows and writes, whichever path translates the lines (one process,
or resumable chunks on many): output lines (text, n-best, JSON Lines), the table of candidate
probabilities, warnings naming the line, and the speed figures."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from traduire.translate import Translation


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


class RunLog:
    """What translate_file tells the user on stderr: warnings naming the line, the lines of low
    confidence, and the speed figures it returns."""

    def __init__(self, console: Console, input: str, max_source_tokens: int,
                 flag_below: float | None) -> None:
        self.console, self.input, self.flag_below = console, input, flag_below
        self.max_source_tokens = max_source_tokens
        self.speed, self.truncated, self.flagged = Throughput(), 0, []

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def invalid_utf8(self, number: int, offset: int) -> None:
        self.say(f"warning: {self.input}:{number}: invalid UTF-8 at byte {offset}; translated "
                 "with U+FFFD in its place")

    def add(self, number: int, result: Translation) -> None:
        self.speed.add(result)
        if result.truncated:
            self.truncated += 1
            self.say(f"warning: {self.input}:{number}: line longer than the model's "
                     f"{self.max_source_tokens} source tokens; translated its beginning only")
        if (self.flag_below is not None and result.confidence is not None
                and result.confidence["mean_logprob"] < self.flag_below):
            self.flagged.append(number)

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {**self.speed.summary(), "truncated": self.truncated}
        if self.flag_below is not None:
            self.say(f"{len(self.flagged)} lines with mean token log-probability below "
                     f"{self.flag_below}: {' '.join(map(str, self.flagged)) or '-'}")
            summary["flagged"] = self.flagged
        return summary


def output_line(result: Translation, format: str, nbest: int) -> str:
    if format == "jsonl":
        return json.dumps(_as_record(result), ensure_ascii=False) + "\n"
    return (" ||| ".join(result.texts) if nbest > 1 else result.best) + "\n"


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
