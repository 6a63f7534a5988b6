"""Decoding for the encoder-decoder Transformer: beam search, greedy search and sampling, and
`decode`, the one batch decoder translation and validation call with their `SearchOptions`.

All three encode the source batch once and then extend every live hypothesis by one token per
step, feeding only that token through the decoder's key/value cache. Hypotheses that end leave
the batch (the cache is reordered to the remaining rows), so the work shrinks as they finish.

Log-probabilities are always the model's own: pad and BOS are forbidden by setting their
log-probabilities to -inf, *without* renormalising, so a hypothesis's logprob is exactly what a
teacher-forced forward pass assigns to its tokens followed by EOS.

Call `model.eval()` first: these functions do not change the model's mode, and dropout would
make decoding random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from traduire.batch import output_limits, source_batch
from traduire.errors import TraduireError
from traduire.kernels import top_per_row
from traduire.model import DecoderCache, Transformer

if TYPE_CHECKING:  # the tokenizer module loads `datasets`, which is slow to import
    from traduire.tokenizer import Tokenizer


@dataclass
class Hypothesis:
    """One finished translation."""

    tokens: list[int]  # generated ids, without BOS and EOS
    logprob: float  # total log-probability, EOS included
    score: float  # logprob / length penalty: the ranking key
    token_logprobs: list[float]  # one per token, then one for EOS

    @property
    def probability(self) -> float:
        """The sentence probability exp(logprob)."""
        return math.exp(self.logprob)


@dataclass(frozen=True)
class SearchOptions:
    """How to search: beam search with `beam`, `lenpen` and `nbest`, or sampling with `sample`
    ("topk:K" or "topp:P") and `temperature`; outputs have at most int(max_len_a * source
    length + max_len_b) tokens. Checked on creation (errors name the CLI flags); every field
    has a default, so a frozen subclass can add its own."""

    beam: int = 5
    nbest: int = 1
    lenpen: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    sample: str | None = None  # "topk:K" or "topp:P"
    temperature: float = 1.0
    seed: int = 0  # seeds the generator of a sampled stream (translate_lines)

    def __post_init__(self) -> None:
        for name in ("beam", "nbest"):
            if getattr(self, name) < 1:
                raise TraduireError(f"--{name} must be at least 1")
        if self.nbest > self.beam and self.sample is None:
            raise TraduireError(f"--nbest {self.nbest} cannot exceed --beam {self.beam}")
        if self.sample is not None:
            parse_sampling(self.sample)
        if not self.temperature > 0:  # NaN fails too
            raise TraduireError(f"temperature must be positive, got {self.temperature}")


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


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty (Wu et al., 2016): ((5 + length) / 6) ** alpha.

    `length` counts EOS. alpha=0 gives 1 (rank by raw log-probability); larger alpha favours
    longer outputs, since dividing a negative logprob by a larger penalty raises the score.
    """
    return ((5 + length) / 6) ** alpha


def _next_token_logits(model: Transformer, last: Tensor, memory: Tensor, src_mask: Tensor,
                       cache: DecoderCache, step: int, max_len: Tensor, bos: int, eos: int,
                       pad: int) -> tuple[Tensor, Tensor]:
    """Scores of the token after `last` (rows,), which is the token at target position `step`.

    Returns logits (rows, vocab) and each row's log normaliser (rows, 1): a token's
    log-probability is its logit minus the normaliser. Pad and BOS are never allowed (their
    logits are -inf, after normalising); once a row has generated its max_len (rows,) tokens,
    only EOS is. Beam search needs the log-probabilities of a few tokens per row only, so the
    full (rows, vocab) log-softmax is never built.
    """
    logits = model.decode(last[:, None], memory, src_mask, cache)[:, -1].float()
    log_norm = logits.logsumexp(-1, keepdim=True)
    logits[:, pad] = float("-inf")
    logits[:, bos] = float("-inf")
    at_limit = max_len <= step
    if at_limit.any():  # rare: skip building a (rows, vocab) mask on every other step
        not_eos = torch.arange(logits.size(1), device=logits.device) != eos
        logits.masked_fill_(at_limit[:, None] & not_eos, float("-inf"))
    return logits, log_norm


@torch.inference_mode()
def beam_search(model: Transformer, src: Tensor, *, beam: int, bos: int, eos: int, pad: int,
                lenpen: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                nbest: int = 1) -> list[list[Hypothesis]]:
    """Beam search over a batch of sources (batch, src_len), right-padded with `pad`.

    Returns, per sentence in input order, its `nbest` best finished hypotheses, best score
    first. Scores are logprob / length_penalty(len(tokens) + 1, lenpen). A sentence stops when
    no live hypothesis can still enter its `beam` best finished ones, so with a beam as large
    as the search space the result is the exact best output. Every hypothesis has at most
    int(max_len_a * src_len + max_len_b) tokens before EOS.
    """
    if not 1 <= nbest <= beam:
        raise ValueError(f"need 1 <= nbest <= beam, got nbest={nbest}, beam={beam}")
    k, device = beam, src.device
    # The encoder output stays one row per sentence: the decoder lets the k hypotheses of a
    # sentence (rows s*k .. s*k+k-1, for active sentence s) share it.
    memory, src_mask = model.encode(src)
    cache = model.new_cache()

    max_len = output_limits(src, pad, max_len_a, max_len_b, model.shape.max_positions)
    # The largest penalty a hypothesis of each sentence can end with (at max_len + EOS).
    final_pen = torch.tensor([length_penalty(m + 1, lenpen) for m in max_len.tolist()],
                             device=device)
    sentences = list(range(src.size(0)))  # original index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in sentences]  # best first, at most k each
    # Per active sentence, the score a hypothesis must beat to enter its k best finished ones.
    worst = torch.full((len(sentences),), float("-inf"), device=device)
    # Live hypotheses: cumulative logprob (sentences, k); generated tokens and their logprobs
    # (rows, step). Only one row per sentence is live at first: -inf on the copies keeps them
    # from producing k identical hypotheses.
    lp = torch.full((len(sentences), k), float("-inf"), device=device)
    lp[:, 0] = 0.0
    rows = len(sentences) * k
    tokens = torch.empty((rows, 0), dtype=torch.long, device=device)
    token_lps = torch.empty((rows, 0), device=device)
    last = torch.full((rows,), bos, dtype=torch.long, device=device)

    step = 0
    while sentences:
        n = len(sentences)
        logits, log_norm = _next_token_logits(model, last, memory, src_mask, cache, step,
                                              max_len.repeat_interleave(k), bos, eos, pad)
        # The 2k best extensions of each sentence: at most k of them end in EOS (one per
        # row), so at least k remain to continue. They are among the 2k best of each row.
        per_row = min(2 * k, logits.size(1))
        row_logits, row_tok = top_per_row(logits, per_row)
        row_step_lp = row_logits - log_norm
        top_lp, top_idx = (lp.view(-1, 1) + row_step_lp).view(n, k * per_row).topk(
            min(2 * k, k * per_row), dim=1)
        top_row = top_idx // per_row + torch.arange(n, device=device)[:, None] * k
        top_tok = row_tok.view(n, -1).gather(1, top_idx)
        top_step_lp = row_step_lp.view(n, -1).gather(1, top_idx)
        is_eos = top_tok == eos
        # As in classical beam search, only an EOS among the k best candidates ends a
        # hypothesis: one ranked lower would have fallen out of the beam (and with k = 1 this
        # makes beam search exactly greedy).
        ends = is_eos & top_lp.isfinite()
        ends[:, k:] = False
        if ends.any():
            _collect(ends, top_row, top_lp, top_step_lp, tokens, token_lps, sentences, finished,
                     worst, k, lenpen)

        # The k best extensions that do not end continue (dead ones keep -inf).
        lp, pick = top_lp.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
        src_rows, new_tok = top_row.gather(1, pick), top_tok.gather(1, pick)
        new_tok_lp = top_step_lp.gather(1, pick)

        # Log-probabilities only fall, so a live hypothesis (now step + 1 tokens) ends with a
        # score of at most lp / (the largest penalty it can still reach). lp[:, 0] is the best
        # live one; -inf there means none is left (as at the length limit), and then done.
        best_pen = final_pen.clamp(min=length_penalty(step + 2, lenpen))
        done = lp[:, 0] / best_pen <= worst
        keep = (~done).nonzero().squeeze(1)
        sentences_left = len(keep) < n
        if sentences_left:  # finished sentences leave the batch
            kept = keep.tolist()
            sentences = [sentences[i] for i in kept]
            if not sentences:
                break
            memory, src_mask = memory[keep], src_mask[keep]
            max_len, final_pen, worst = max_len[keep], final_pen[keep], worst[keep]
            lp, src_rows, new_tok, new_tok_lp = lp[keep], src_rows[keep], new_tok[keep], \
                new_tok_lp[keep]
        index = src_rows.view(-1)
        # The cross-attention keys and values (one row per sentence) move only when sentences
        # leave.
        cache.reorder(index, keep if sentences_left else None)
        last = new_tok.view(-1)
        tokens = torch.cat([tokens[index], last[:, None]], dim=1)
        token_lps = torch.cat([token_lps[index], new_tok_lp.view(-1, 1)], dim=1)
        step += 1
    return [hyps[:nbest] for hyps in finished]


def _collect(ends: Tensor, top_row: Tensor, top_lp: Tensor, top_step_lp: Tensor,
             tokens: Tensor, token_lps: Tensor, sentences: list[int],
             finished: list[list[Hypothesis]], worst: Tensor, k: int, lenpen: float) -> None:
    """Add the candidates marked in `ends` (active sentence, candidate) as finished hypotheses,
    keeping each sentence's k best, and update `worst` for the sentences that now have k."""
    top_row_l, top_lp_l, step_lp_l = top_row.tolist(), top_lp.tolist(), top_step_lp.tolist()
    for s, j in ends.nonzero().tolist():
        row, logprob = top_row_l[s][j], top_lp_l[s][j]
        hyp_tokens = tokens[row].tolist()
        hyps = finished[sentences[s]]
        hyps.append(Hypothesis(hyp_tokens, logprob,
                               logprob / length_penalty(len(hyp_tokens) + 1, lenpen),
                               token_lps[row].tolist() + [step_lp_l[s][j]]))
        hyps.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
        del hyps[k:]
        if len(hyps) == k:
            worst[s] = hyps[-1].score


def greedy(model: Transformer, src: Tensor, *, bos: int, eos: int, pad: int,
           max_len_a: float = 1.2, max_len_b: int = 10) -> list[Hypothesis]:
    """Greedy search: at each step the most probable token. One hypothesis per sentence;
    its score is its logprob. (Beam search with one beam and no length penalty.)"""
    return [hyps[0] for hyps in beam_search(model, src, beam=1, bos=bos, eos=eos, pad=pad,
                                            lenpen=0.0, max_len_a=max_len_a,
                                            max_len_b=max_len_b)]


def _sampling_weights(logprobs: Tensor, temperature: float, top_k: int | None,
                      top_p: float | None) -> Tensor:
    """Unnormalised log-weights of the sampling distribution: tempered, then cut to the top_k
    most probable tokens and/or the smallest set holding top_p of the probability mass."""
    weights = logprobs / temperature
    if top_k is not None:
        kth_best = weights.topk(min(top_k, weights.size(1)), dim=1).values[:, -1:]
        weights = weights.masked_fill(weights < kth_best, float("-inf"))
    if top_p is not None:
        probs, order = weights.softmax(-1).sort(dim=1, descending=True)
        # Drop a token once the more probable ones already hold top_p: the most probable
        # token always stays.
        drop_sorted = probs.cumsum(1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        weights = weights.masked_fill(drop, float("-inf"))
    return weights


@torch.inference_mode()
def sample(model: Transformer, src: Tensor, *, bos: int, eos: int, pad: int,
           top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
           generator: torch.Generator | None = None, max_len_a: float = 1.2,
           max_len_b: int = 10) -> list[Hypothesis]:
    """Sample one translation per sentence, token by token, from the model's distribution
    tempered by `temperature` and restricted to the top_k tokens and/or the top_p nucleus.

    Reproducible given the same `generator` state. Each hypothesis's logprob (and score) is
    under the model itself, not under the tempered, truncated sampling distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = src.device
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    max_len = output_limits(src, pad, max_len_a, max_len_b, model.shape.max_positions)
    sentences = list(range(src.size(0)))  # original index of each live row
    results: dict[int, Hypothesis] = {}
    tokens = torch.empty((len(sentences), 0), dtype=torch.long, device=device)
    token_lps = torch.empty((len(sentences), 0), device=device)
    last = torch.full((len(sentences),), bos, dtype=torch.long, device=device)

    step = 0
    while sentences:
        logits, log_norm = _next_token_logits(model, last, memory, src_mask, cache, step,
                                              max_len, bos, eos, pad)
        logprobs = logits - log_norm
        weights = _sampling_weights(logprobs, temperature, top_k, top_p)
        last = torch.multinomial(weights.softmax(-1), 1, generator=generator).squeeze(1)
        tokens = torch.cat([tokens, last[:, None]], dim=1)
        token_lps = torch.cat([token_lps, logprobs.gather(1, last[:, None])], dim=1)
        ended = last == eos
        for row in ended.nonzero().squeeze(1).tolist():
            row_lps = token_lps[row].tolist()
            results[sentences[row]] = Hypothesis(tokens[row, :-1].tolist(), sum(row_lps),
                                                 sum(row_lps), row_lps)
        if ended.any():  # ended rows leave the batch
            keep = (~ended).nonzero().squeeze(1)
            sentences = [sentences[i] for i in keep.tolist()]
            cache.reorder(keep, keep)
            memory, src_mask, max_len = memory[keep], src_mask[keep], max_len[keep]
            tokens, token_lps, last = tokens[keep], token_lps[keep], last[keep]
        step += 1
    return [results[i] for i in range(src.size(0))]  # each one ends, at its length limit


@torch.inference_mode()
def decode(model: Transformer, tokenizer: Tokenizer, src_ids: list[list[int]],
           options: SearchOptions, generator: torch.Generator | None = None
           ) -> list[list[Hypothesis]]:
    """Translate one batch of encoded sources (ids without EOS) as `options` say: per sentence,
    in input order, its `nbest` best hypotheses by beam search, or one sampled hypothesis
    (drawn with `generator`; None draws from torch's global one). For greedy search use
    SearchOptions(beam=1, lenpen=0.0)."""
    tok = tokenizer
    src = source_batch(src_ids, pad=tok.pad_id, eos=tok.eos_id).to(
        next(model.parameters()).device)
    common = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                  max_len_a=options.max_len_a, max_len_b=options.max_len_b)
    if options.sample is not None:
        top_k, top_p = parse_sampling(options.sample)
        return [[h] for h in sample(model, src, top_k=top_k, top_p=top_p,
                                    temperature=options.temperature, generator=generator,
                                    **common)]
    return beam_search(model, src, beam=options.beam, lenpen=options.lenpen,
                       nbest=options.nbest, **common)
