"""How good a model is: sacreBLEU's BLEU, chrF (and optionally TER) with default settings on
detokenised text, each with its signature so a score can be reproduced and compared (Post,
2018, "A Call for Clarity in Reporting BLEU Scores"); and the validation figures of training,
loss and BLEU, as functions a notebook can call on any model and validation set."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from sacrebleu.metrics import BLEU, CHRF, TER

from traduire import distributed
from traduire.batch import EncodedCorpus, sentence_batches, token_batches
from traduire.device import AUTOCAST_DTYPES
from traduire.files import check_line_counts, read_text_lines
from traduire.loss import token_cross_entropy
from traduire.model import Transformer
from traduire.search import SearchOptions, decode
from traduire.tokenizer import Tokenizer


def score(hypotheses: list[str], references: list[str], ter: bool = False) -> dict[str, Any]:
    """Corpus-level scores of hypotheses against one reference each (lines aligned)."""
    check_line_counts("the hypothesis list", len(hypotheses), "the reference list",
                      len(references), "they must be line-aligned")
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


def score_files(hyp_path: Path, ref_path: Path, ter: bool = False) -> dict[str, Any]:
    """`traduire eval --hyp`: score a file of translations against a file of references."""
    hypotheses, references = read_text_lines(hyp_path), read_text_lines(ref_path)
    check_line_counts(hyp_path, len(hypotheses), ref_path, len(references),
                      "hypotheses and references must be line-aligned")
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


# --- Validation --------------------------------------------------------------------------------


@torch.inference_mode()
def validate_loss(model: Transformer, data: EncodedCorpus, tokenizer: Tokenizer,
                  batch_tokens: int, precision: str = "fp32",
                  device: torch.device | None = None) -> tuple[float, float]:
    """Mean per-token negative log-likelihood of the validation pairs (no label smoothing),
    and perplexity. Under torchrun each rank takes its share of the batches."""
    model.eval()
    device = device or next(model.parameters()).device
    ctx, tok = distributed.current(), tokenizer
    dtype = AUTOCAST_DTYPES.get(precision)
    nll, tokens = 0.0, 0
    batches = token_batches(data.src_lens, data.tgt_lens, data.usable, batch_tokens, 0, 0)
    for part in batches[ctx.rank::ctx.world_size]:
        batch = data.batch(part, pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch.src, batch.tgt_in)
        nll += token_cross_entropy(logits, batch.tgt_out, tok.pad_id).item()
        tokens += batch.num_tgt_tokens
    nll, tokens = distributed.all_reduce_sum([nll, tokens])
    loss = nll / max(tokens, 1)
    return loss, math.exp(min(loss, 100))


def validation_translations(model: Transformer, data: EncodedCorpus, tokenizer: Tokenizer,
                            sentences: int, beam: int = 1) -> list[str]:
    """Translations of the first `sentences` validation pairs: greedy search for beam 1
    (exactly search.greedy), else beam search with translate's defaults."""
    model.eval()
    options = SearchOptions(beam=1, lenpen=0.0) if beam == 1 else SearchOptions(beam=beam)
    src_ids = data.source_ids(data.usable[:sentences])
    texts: list[str] = [""] * len(src_ids)
    for part in sentence_batches([len(s) for s in src_ids], batch_tokens=1 << 30, batch_size=64):
        best = [hyps[0] for hyps in decode(model, tokenizer, [src_ids[i] for i in part], options)]
        for i, text in zip(part, tokenizer.decode_tgt([h.tokens for h in best])):
            texts[i] = text
    return texts


def validate_bleu(model: Transformer, data: EncodedCorpus, tokenizer: Tokenizer,
                  sentences: int, beam: int = 1) -> float:
    """BLEU of `validation_translations` against their references."""
    indices = data.usable[:sentences]
    hypotheses = validation_translations(model, data, tokenizer, sentences, beam)
    return score(hypotheses, data.texts(indices, "tgt"))["bleu"]
