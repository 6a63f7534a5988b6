"""Looking inside a trained model: attention between words, forced-decoding scores, and the
confidence of a translation. Tables and plots of these are in report.py.

Words and subwords. The model sees SentencePiece pieces; people read words. A word here is a
piece that starts with "▁" (SentencePiece's mark for "a space came before this") together with
the pieces after it up to the next such piece, so words are the whitespace-separated tokens of
the sentence and punctuation attached to a word stays with it ("tired." is one word). The
end-of-sentence token the model appends is a word of its own, "</s>": attention may land on
it, and keeping it makes every row of weights still sum to 1.

Merging attention from pieces to words (`merge_attention`):
  * attention *to* a word is the SUM of the weights to its pieces (the share of attention the
    word received as a whole);
  * attention *from* a word is the MEAN of the rows of its pieces (each piece's row sums to 1,
    so their mean does too).
Hence each word's row of merged weights still sums to 1.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from traduire.batch import collate
from traduire.errors import TraduireError
from traduire.files import check_line_counts
from traduire.model import AttentionWeights, Transformer
from traduire.search import Hypothesis
from traduire.tokenizer import Tokenizer

WORD_START = "▁"  # U+2581, SentencePiece's word-start mark
EOS_WORD = "</s>"
# A source word whose attention received, summed over all target steps and averaged over
# layers and heads, is below this counts as "barely looked at" (see `confidence`).
LOW_ATTENTION_THRESHOLD = 0.1


# --- Words from pieces -------------------------------------------------------------------------


def group_pieces(pieces: list[str]) -> list[list[int]]:
    """Indices of the pieces of each word: a new word starts at the first piece, at every
    piece beginning with "▁", and at (and after) an "</s>" piece."""
    words: list[list[int]] = []
    for i, piece in enumerate(pieces):
        starts = (not words or piece.startswith(WORD_START) or piece == EOS_WORD
                  or pieces[i - 1] == EOS_WORD)
        if starts:
            words.append([i])
        else:
            words[-1].append(i)
    return words


def word_labels(pieces: list[str], spans: list[list[int]], text: str | None = None
                ) -> list[str]:
    """A label per word: the sentence's own whitespace-separated words when they line up with
    the pieces (so normalisation and unknown pieces do not show), else the joined pieces."""
    from_pieces = ["".join(pieces[i] for i in span).replace(WORD_START, " ").strip() or WORD_START
                   for span in spans]
    if text is not None:
        real = [s for s in spans if pieces[s[0]] != EOS_WORD]
        words = text.split()
        if len(words) == len(real):
            return words + [EOS_WORD] * (len(spans) - len(real))
    return from_pieces


def merge_attention(weights: Tensor, query_spans: list[list[int]], key_spans: list[list[int]]
                    ) -> Tensor:
    """Piece-level weights (..., queries, keys) to word level (..., query words, key words):
    attention to a word sums over its pieces, attention from a word averages over its pieces."""
    q_len, k_len = weights.shape[-2:]
    to_word = torch.zeros(k_len, len(key_spans), dtype=weights.dtype)
    for w, span in enumerate(key_spans):
        to_word[span, w] = 1.0
    from_word = torch.zeros(len(query_spans), q_len, dtype=weights.dtype)
    for w, span in enumerate(query_spans):
        from_word[w, span] = 1.0 / len(span)
    return from_word @ weights @ to_word


def normalise_word(word: str) -> str:
    """Lower case, punctuation removed: how --token is matched against the words."""
    return "".join(c for c in word.casefold() if not unicodedata.category(c).startswith("P"))


def find_word(words: list[str], token: str | None = None, index: int | None = None) -> int:
    """The position of the word named by `token` (first match, case and punctuation ignored)
    or by `index` (0-based). Raises TraduireError listing the words when there is none."""
    listing = " ".join(f"{i}:{w}" for i, w in enumerate(words))
    if index is not None:
        if not 0 <= index < len(words):
            raise TraduireError(f"--index {index} is out of range; words: {listing}")
        return index
    wanted = normalise_word(token or "")
    for i, word in enumerate(words):
        if normalise_word(word) == wanted:
            return i
    raise TraduireError(f"--token {token!r} is not a word of the sentence; words: {listing}")


# --- Attention maps ----------------------------------------------------------------------------


@dataclass
class AttentionMap:
    """Word-level attention of one sentence: weights (layers, heads, rows, cols), each row a
    query word's distribution over the key words (rows sum to 1)."""

    kind: str  # "encoder" (source -> source) or "cross" (output word -> source)
    rows: list[str]
    cols: list[str]
    weights: Tensor
    translation: str | None = None  # the model's own translation, for "cross"

    @property
    def average(self) -> Tensor:
        """(rows, cols): averaged over layers and heads."""
        return self.weights.mean(dim=(0, 1))

    def row_record(self, row: int) -> dict[str, Any]:
        """JSON-ready detail of one query word: average, per layer and per head."""
        def pairs(values: Tensor) -> list[list[Any]]:
            return [[w, round(float(v), 6)] for w, v in zip(self.cols, values)]

        layers = [{"layer": layer + 1, "average": pairs(self.weights[layer, :, row].mean(0)),
                   "heads": [pairs(self.weights[layer, h, row])
                             for h in range(self.weights.size(1))]}
                  for layer in range(self.weights.size(0))]
        return {"word": self.rows[row], "index": row, "average": pairs(self.average[row]),
                "layers": layers}


def source_ids(model: Transformer, tokenizer: Tokenizer, sentence: str) -> list[int]:
    """A sentence's token ids, cut to what the model accepts (room left for EOS)."""
    return tokenizer.encode_sources([sentence], model.shape.max_positions)[0][0]


@torch.inference_mode()
def attention_map(model: Transformer, tokenizer: Tokenizer, sentence: str,
                  output: list[int] | None = None) -> AttentionMap:
    """Encoder self-attention among the words of `sentence` or, given `output` (the token ids
    of a translation of it, e.g. the model's own), the decoder's cross-attention from each word
    of the output to the source words. In the cross map the row of an output word is the
    attention of the decoder step that *predicted* it; the last row, "</s>", is the step that
    ended the sentence."""
    if not sentence.strip():
        raise TraduireError("the sentence is empty")
    src_ids = source_ids(model, tokenizer, sentence)
    src_pieces = tokenizer.src_pieces(src_ids) + [EOS_WORD]
    src_spans = group_pieces(src_pieces)
    src_words = word_labels(src_pieces, src_spans, sentence)
    if output is None:
        weights = forward_attention(model, tokenizer, [src_ids], [[]]).encoder
        stacked = torch.stack([w[0] for w in weights]).float().cpu()
        return AttentionMap("encoder", src_words, src_words,
                            merge_attention(stacked, src_spans, src_spans))
    tgt_pieces = tokenizer.tgt_pieces(output) + [EOS_WORD]
    tgt_spans = group_pieces(tgt_pieces)
    text = tokenizer.decode_tgt([output])[0]
    weights = forward_attention(model, tokenizer, [src_ids], [output]).decoder_cross
    stacked = torch.stack([w[0] for w in weights]).float().cpu()
    return AttentionMap("cross", word_labels(tgt_pieces, tgt_spans, text), src_words,
                        merge_attention(stacked, tgt_spans, src_spans), translation=text)


def forward_attention(model: Transformer, tokenizer: Tokenizer, src_ids: list[list[int]],
                      tgt_ids: list[list[int]]) -> AttentionWeights:
    """One teacher-forced forward pass that keeps every attention weight."""
    tok = tokenizer
    batch = collate(src_ids, tgt_ids, pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id)
    batch = batch.to(next(model.parameters()).device)
    attention = AttentionWeights([], [], [])
    model(batch.src, batch.tgt_in, attention=attention)
    return attention


# --- Forced decoding ---------------------------------------------------------------------------


@dataclass
class ScoredPair:
    """How probable the model finds `target` as a translation of `source`."""

    source: str
    target: str
    pieces: list[str]  # target pieces, then "</s>"
    token_logprobs: list[float]  # one per piece

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / len(self.token_logprobs))

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)

    def as_record(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target,
                "logprob": round(self.logprob, 6), "perplexity": round(self.perplexity, 6),
                "probability": self.probability,
                "tokens": [[p, round(lp, 6)] for p, lp in zip(self.pieces,
                                                               self.token_logprobs)]}


def score_pairs(model: Transformer, tokenizer: Tokenizer, sources: list[str],
                targets: list[str], batch_size: int = 64) -> list[ScoredPair]:
    """Forced decoding: the log-probability of each target token (and of EOS) given the source
    and the target prefix, from batched teacher-forced forward passes. The figures are those
    beam search computes for the same output: log_softmax of the logits, nothing renormalised."""
    check_line_counts("the source list", len(sources), "the target list", len(targets),
                      "each source needs its target")
    tok = tokenizer
    limit = model.shape.max_positions
    src_ids, _ = tok.encode_sources(sources, limit)
    tgt_ids = tok.encode_tgt(targets)
    for number, ids in enumerate(tgt_ids, 1):
        if len(ids) + 1 > limit:
            raise TraduireError(f"target line {number} has {len(ids)} tokens; the model takes "
                                f"at most {limit - 1}")
    scores = score_ids(model, tokenizer, src_ids, tgt_ids, batch_size)
    return [ScoredPair(s, t, tok.tgt_pieces(ids) + [EOS_WORD], lps)
            for s, t, ids, lps in zip(sources, targets, tgt_ids, scores)]


@torch.inference_mode()
def score_ids(model: Transformer, tokenizer: Tokenizer, src_ids: list[list[int]],
              tgt_ids: list[list[int]], batch_size: int = 64) -> list[list[float]]:
    """Per pair of token-id lists, the log-probability of each target token and then of EOS;
    pairs are batched by length."""
    tok, device = tokenizer, next(model.parameters()).device
    results: list[list[float]] = [[] for _ in src_ids]
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]) + len(tgt_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([src_ids[i] for i in chunk], [tgt_ids[i] for i in chunk],
                        pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id).to(device)
        logprobs = model(batch.src, batch.tgt_in).float().log_softmax(-1)
        picked = logprobs.gather(2, batch.tgt_out[..., None]).squeeze(2).cpu()
        for row, i in enumerate(chunk):
            results[i] = picked[row, :len(tgt_ids[i]) + 1].tolist()
    return results


# --- Confidence --------------------------------------------------------------------------------


@torch.inference_mode()
def confidence(model: Transformer, tokenizer: Tokenizer, src_ids: list[list[int]],
               best: list[Hypothesis], threshold: float = LOW_ATTENTION_THRESHOLD
               ) -> list[dict[str, float]]:
    """Two cheap signals of a doubtful translation, per sentence:

    mean_logprob: the mean log-probability of the best hypothesis's tokens (EOS included).
    low_attention_share: the share of source words (EOS excluded) whose *coverage* is below
      `threshold`, where a word's coverage is the cross-attention it received summed over every
      target step (the EOS step included) and averaged over layers and heads (Tu et al., 2016).
      A word every step ignores may have been left untranslated. Each target step hands out
      1 in total, so an output of T steps spreads T over the source words.
    """
    attention = forward_attention(model, tokenizer, src_ids, [h.tokens for h in best])
    # (batch, layers, heads, tgt, src) -> summed over target steps -> averaged: (batch, src).
    cross = torch.stack(attention.decoder_cross, dim=1).float()
    tgt_lengths = [len(h.tokens) + 1 for h in best]
    out = []
    for row, (ids, hyp) in enumerate(zip(src_ids, best)):
        per_piece = cross[row, :, :, :tgt_lengths[row], :len(ids)].sum(2).mean((0, 1)).cpu()
        pieces = tokenizer.src_pieces(ids)
        spans = group_pieces(pieces)
        coverage = [float(per_piece[span].sum()) for span in spans]
        low = sum(c < threshold for c in coverage) / max(len(coverage), 1)
        # logprob / (tokens + EOS): per-token log-probabilities need not be known (an engine
        # such as CTranslate2 reports only the total).
        out.append({"mean_logprob": round(hyp.logprob / (len(hyp.tokens) + 1), 6),
                    "low_attention_share": round(low, 6)})
    return out
