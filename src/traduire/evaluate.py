"""Translation quality as the field reports it: sacreBLEU's BLEU, chrF (and optionally TER)
with default settings on detokenised text, each with its signature so a score can be
reproduced and compared (Post, 2018, "A Call for Clarity in Reporting BLEU Scores")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER

from traduire.errors import DataError
from traduire.files import read_text_lines


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


def check_aligned(hyp_path: Path | str, hyps: list[str], ref_path: Path, refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise DataError(f"{hyp_path} has {len(hyps)} lines but {ref_path} has {len(refs)}; "
                        "hypotheses and references must be line-aligned")


def score_files(hyp_path: Path, ref_path: Path, ter: bool = False) -> dict[str, Any]:
    """`traduire eval --hyp`: score a file of translations against a file of references."""
    hypotheses, references = read_text_lines(hyp_path), read_text_lines(ref_path)
    check_aligned(hyp_path, hypotheses, ref_path, references)
    return score(hypotheses, references, ter=ter)


def report_lines(result: dict[str, Any]) -> list[str]:
    """The scores as sacreBLEU prints them, their signatures, and the decoding speed."""
    lines = [result["bleu_detail"], f"chrF2 = {result['chrf']:.2f}"]
    if "ter" in result:
        lines.append(f"TER = {result['ter']:.2f}")
    lines += [f"{name} signature: {sig}" for name, sig in result["signature"].items()]
    speed = result.get("speed")
    if speed is not None:
        lines.append(f"decoding: {speed['sentences_per_s']:.1f} sentences/s, "
                     f"{speed['tokens_per_s']:.0f} target tokens/s ({speed['seconds']:.1f}s)")
    return lines
