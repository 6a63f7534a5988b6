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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

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


@dataclass(kw_only=True)
class _Search:
    """A search between two steps. Its rows are the live hypotheses, `k` per active sentence
    (rows s*k .. s*k+k-1 for active sentence s); the per-sentence tensors have one row per
    active sentence, which the decoder lets its k hypotheses share."""

    bos: int
    eos: int
    pad: int
    k: int  # rows per active sentence: the beam, or 1 when sampling
    memory: Tensor  # the encoder output, per active sentence
    src_mask: Tensor
    max_len: Tensor  # per active sentence, the most tokens its outputs have before EOS
    cache: DecoderCache
    sentences: list[int] = field(init=False)  # original index of each active sentence
    tokens: Tensor = field(init=False)  # (rows, step): the tokens generated so far
    token_lps: Tensor = field(init=False)  # (rows, step): their log-probabilities
    last: Tensor = field(init=False)  # (rows,): the token each row feeds next, BOS at first
    step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n, device = self.max_len.size(0), self.max_len.device
        self.sentences = list(range(n))
        self.tokens = torch.empty((n * self.k, 0), dtype=torch.long, device=device)
        self.token_lps = torch.empty((n * self.k, 0), device=device)
        self.last = torch.full((n * self.k,), self.bos, dtype=torch.long, device=device)


@dataclass(kw_only=True)
class _Beams(_Search):
    """Beam search between two steps: also the live hypotheses' scores and, per sentence, its
    finished hypotheses and what decides when it is done."""

    lenpen: float
    # Cumulative logprob of the live hypotheses (sentences, k). Only one row per sentence is
    # live at first: -inf on the copies keeps them from producing k identical hypotheses.
    lp: Tensor = field(init=False)
    # The largest penalty a hypothesis of each sentence can end with (at max_len + EOS).
    final_pen: Tensor = field(init=False)
    # Per active sentence, the score a hypothesis must beat to enter its k best finished ones.
    worst: Tensor = field(init=False)
    finished: list[list[Hypothesis]] = field(init=False)  # by original index; best first

    def __post_init__(self) -> None:
        super().__post_init__()
        n, device = len(self.sentences), self.max_len.device
        self.final_pen = torch.tensor([length_penalty(m + 1, self.lenpen)
                                       for m in self.max_len.tolist()], device=device)
        self.finished = [[] for _ in range(n)]
        self.worst = torch.full((n,), float("-inf"), device=device)
        self.lp = torch.full((n, self.k), float("-inf"), device=device)
        self.lp[:, 0] = 0.0


class _Extensions(NamedTuple):
    """One-token extensions of the live hypotheses, each (active sentences, candidates)."""

    lp: Tensor  # cumulative logprob
    row: Tensor  # the row (hypothesis) extended
    token: Tensor
    token_lp: Tensor  # the token's own logprob


def _next_token_logits(model: Transformer, state: _Search) -> tuple[Tensor, Tensor]:
    """Scores of the token after each row's `last`, the token at target position `step`.

    Returns logits (rows, vocab) and each row's log normaliser (rows, 1): a token's
    log-probability is its logit minus the normaliser. Pad and BOS are never allowed (their
    logits are -inf, after normalising); once a row has generated its sentence's max_len
    tokens, only EOS is. Beam search needs the log-probabilities of a few tokens per row only,
    so the full (rows, vocab) log-softmax is never built.
    """
    logits = model.decode(state.last[:, None], state.memory, state.src_mask,
                          state.cache)[:, -1].float()
    log_norm = logits.logsumexp(-1, keepdim=True)
    logits[:, state.pad] = float("-inf")
    logits[:, state.bos] = float("-inf")
    # Each row's limit is its sentence's (with one row per sentence, no copy is needed).
    max_len = state.max_len if state.k == 1 else state.max_len.repeat_interleave(state.k)
    at_limit = max_len <= state.step
    if at_limit.any():  # rare: skip building a (rows, vocab) mask on every other step
        not_eos = torch.arange(logits.size(1), device=logits.device) != state.eos
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
    memory, src_mask = model.encode(src)
    state = _Beams(bos=bos, eos=eos, pad=pad, k=beam, lenpen=lenpen, memory=memory,
                   src_mask=src_mask, cache=model.new_cache(), max_len=output_limits(
                       src, pad, max_len_a, max_len_b, model.shape.max_positions))
    while state.sentences:
        extensions = _best_extensions(state, *_next_token_logits(model, state))
        is_eos = extensions.token == eos
        # As in classical beam search, only an EOS among the k best candidates ends a
        # hypothesis: one ranked lower would have fallen out of the beam (and with k = 1 this
        # makes beam search exactly greedy).
        ends = is_eos & extensions.lp.isfinite()
        ends[:, beam:] = False
        if ends.any():
            _collect(state, extensions, ends)
        live, kept = _drop_finished(state, _best_live(extensions, is_eos, beam))
        if state.sentences:
            _extend(state, live, kept)
        state.step += 1
    return [hyps[:nbest] for hyps in state.finished]


def _best_extensions(state: _Beams, logits: Tensor, log_norm: Tensor) -> _Extensions:
    """The 2k best extensions of each active sentence's live hypotheses, best first."""
    n, k = len(state.sentences), state.k
    # At most k of them end in EOS (one per row), so at least k remain to continue. They are
    # among the 2k best of each row.
    per_row = min(2 * k, logits.size(1))
    row_logits, row_tok = top_per_row(logits, per_row)
    row_step_lp = row_logits - log_norm
    top_lp, top_idx = (state.lp.view(-1, 1) + row_step_lp).view(n, k * per_row).topk(
        min(2 * k, k * per_row), dim=1)
    top_row = top_idx // per_row + torch.arange(n, device=top_idx.device)[:, None] * k
    return _Extensions(top_lp, top_row, row_tok.view(n, -1).gather(1, top_idx),
                       row_step_lp.view(n, -1).gather(1, top_idx))


def _collect(state: _Beams, extensions: _Extensions, ends: Tensor) -> None:
    """Add the extensions marked in `ends` (active sentence, candidate) to the finished
    hypotheses, keeping each sentence's k best, and update `worst` for those that now have k."""
    rows, lps, step_lps = (t.tolist() for t in (extensions.row, extensions.lp,
                                                extensions.token_lp))
    for s, j in ends.nonzero().tolist():
        row, logprob = rows[s][j], lps[s][j]
        tokens = state.tokens[row].tolist()
        hyps = state.finished[state.sentences[s]]
        hyps.append(Hypothesis(tokens, logprob,
                               logprob / length_penalty(len(tokens) + 1, state.lenpen),
                               state.token_lps[row].tolist() + [step_lps[s][j]]))
        hyps.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
        del hyps[state.k:]
        if len(hyps) == state.k:
            state.worst[s] = hyps[-1].score


def _best_live(extensions: _Extensions, is_eos: Tensor, k: int) -> _Extensions:
    """The k best extensions of each sentence that do not end (dead ones keep -inf)."""
    lp, pick = extensions.lp.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
    return _Extensions(lp, *(t.gather(1, pick) for t in extensions[1:]))


def _drop_finished(state: _Beams, live: _Extensions) -> tuple[_Extensions, Tensor | None]:
    """Remove the sentences that are done from `state` and from its next hypotheses `live`.
    Returns `live` and the indices of the sentences kept, or None if none was done."""
    # Log-probabilities only fall, so a live hypothesis (now step + 1 tokens) ends with a
    # score of at most lp / (the largest penalty it can still reach). lp[:, 0] is the best
    # live one; -inf there means none is left (as at the length limit), and then done.
    best_pen = state.final_pen.clamp(min=length_penalty(state.step + 2, state.lenpen))
    done = live.lp[:, 0] / best_pen <= state.worst
    keep = (~done).nonzero().squeeze(1)
    if len(keep) == len(state.sentences):
        return live, None
    state.sentences = [state.sentences[i] for i in keep.tolist()]
    if not state.sentences:
        return live, keep
    state.memory, state.src_mask = state.memory[keep], state.src_mask[keep]
    state.max_len, state.final_pen = state.max_len[keep], state.final_pen[keep]
    state.worst = state.worst[keep]
    return _Extensions(*(t[keep] for t in live)), keep


def _extend(state: _Beams, live: _Extensions, kept: Tensor | None) -> None:
    """Make `live` the live hypotheses: each is the row it extends plus its token."""
    index = live.row.view(-1)
    # The cross-attention keys and values (one row per sentence) move only when sentences
    # leave.
    state.cache.reorder(index, kept)
    state.lp, state.last = live.lp, live.token.view(-1)
    state.tokens = torch.cat([state.tokens[index], state.last[:, None]], dim=1)
    state.token_lps = torch.cat([state.token_lps[index], live.token_lp.view(-1, 1)], dim=1)


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
    memory, src_mask = model.encode(src)
    state = _Search(bos=bos, eos=eos, pad=pad, k=1, memory=memory, src_mask=src_mask,
                    cache=model.new_cache(), max_len=output_limits(
                        src, pad, max_len_a, max_len_b, model.shape.max_positions))
    results: dict[int, Hypothesis] = {}
    while state.sentences:
        logits, log_norm = _next_token_logits(model, state)
        logprobs = logits - log_norm
        weights = _sampling_weights(logprobs, temperature, top_k, top_p)
        last = torch.multinomial(weights.softmax(-1), 1, generator=generator).squeeze(1)
        state.last, state.tokens = last, torch.cat([state.tokens, last[:, None]], dim=1)
        state.token_lps = torch.cat([state.token_lps, logprobs.gather(1, last[:, None])], dim=1)
        _finish_ended(state, results)
        state.step += 1
    return [results[i] for i in range(src.size(0))]  # each one ends, at its length limit


def _finish_ended(state: _Search, results: dict[int, Hypothesis]) -> None:
    """Move the rows whose last token is EOS from `state` into `results`, by original index."""
    ended = state.last == state.eos
    for row in ended.nonzero().squeeze(1).tolist():
        row_lps = state.token_lps[row].tolist()
        results[state.sentences[row]] = Hypothesis(state.tokens[row, :-1].tolist(),
                                                   sum(row_lps), sum(row_lps), row_lps)
    if ended.any():  # ended rows leave the batch
        keep = (~ended).nonzero().squeeze(1)
        state.sentences = [state.sentences[i] for i in keep.tolist()]
        state.cache.reorder(keep, keep)
        state.memory, state.src_mask = state.memory[keep], state.src_mask[keep]
        state.max_len, state.tokens = state.max_len[keep], state.tokens[keep]
        state.token_lps, state.last = state.token_lps[keep], state.last[keep]


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
