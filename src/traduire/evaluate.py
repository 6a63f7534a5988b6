"""Translation quality as the field reports it: sacreBLEU's BLEU, chrF (and optionally TER)
with default settings on detokenised text, each with its signature so a score can be
reproduced and compared (Post, 2018, "A Call for Clarity in Reporting BLEU Scores")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER

from traduire.errors import DataError


def score(hypotheses: list[str], references: list[str], ter: bool = False) -> dict[str, Any]:
    """Corpus-level scores of hypotheses against one reference each (lines aligned)."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                        "they must be line-aligned")
    metrics: dict[str, Any] = {}
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    metrics["bleu"] = round(bleu_score.score, 2)
    metrics["chrf"] = round(chrf_score.score, 2)
    metrics["bleu_detail"] = str(bleu_score)
    signatures = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
    if ter:
        ter_metric = TER()
        metrics["ter"] = round(ter_metric.corpus_score(hypotheses, [references]).score, 2)
        signatures["ter"] = str(ter_metric.get_signature())
    metrics["signature"] = signatures
    return metrics


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return CHRF().sentence_score(hypothesis, [reference]).score


def read_text(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, split on '\\n' only."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line.rstrip("\r") for line in lines]


def check_aligned(hyp_path: Path | str, hyps: list[str], ref_path: Path, refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise DataError(f"{hyp_path} has {len(hyps)} lines but {ref_path} has {len(refs)}; "
                        "hypotheses and references must be line-aligned")
