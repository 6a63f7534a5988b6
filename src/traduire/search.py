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

import numpy as np
import torch
from torch import Tensor

from traduire.batch import output_limits, source_batch
from traduire.errors import TraduireError
from traduire.kernels import top_per_row
from traduire.model import DecoderCache, Transformer, device_index

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
    active sentence, which the decoder lets its k hypotheses share.

    What decides the next step's shape (which sentences are done, the length limits, the
    tokens chosen) is kept on the host, in numpy arrays read from the device once per step, so
    that a step never waits on the device for more than that one read."""

    bos: int
    eos: int
    pad: int
    k: int  # rows per active sentence: the beam, or 1 when sampling
    memory: Tensor  # the encoder output, per active sentence
    src_mask: Tensor
    max_len: np.ndarray  # per active sentence, the most tokens its outputs have before EOS
    cache: DecoderCache
    sentences: list[int] = field(init=False)  # original index of each active sentence
    last: Tensor = field(init=False)  # (rows,): the token each row feeds next, BOS at first
    step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = len(self.max_len)
        self.sentences = list(range(n))
        self.last = torch.full((n * self.k,), self.bos, dtype=torch.long,
                               device=self.memory.device)
        # The cache holds BOS and at most max_len tokens per row: room for all at once.
        self.cache.capacity = max(self.cache.capacity, int(self.max_len.max(initial=0)) + 1)

    def keep_sentences(self, keep: np.ndarray) -> Tensor:
        """Keep only active sentences `keep` (increasing indices); returns them on the
        device."""
        index = device_index(keep, self.memory.device)
        self.sentences = [self.sentences[i] for i in keep.tolist()]
        self.memory, self.src_mask = self.memory[index], self.src_mask[index]
        self.max_len = self.max_len[keep]
        return index


@dataclass(kw_only=True)
class _Beams(_Search):
    """Beam search between two steps: also the live hypotheses' scores and, per sentence, its
    finished hypotheses and what decides when it is done.

    The live hypotheses' tokens are never gathered on the device: each step records, for every
    row of the next step, the row it extends (its parent) and the token and log-probability
    it adds (`history`), and a hypothesis's tokens are read back along its parents when it
    ends."""

    lenpen: float
    # Cumulative logprob of the live hypotheses (sentences, k). Only one row per sentence is
    # live at first: -inf on the copies keeps them from producing k identical hypotheses.
    lp: Tensor = field(init=False)
    # The largest penalty a hypothesis of each sentence can end with (at max_len + EOS).
    final_pen: np.ndarray = field(init=False)
    # Per active sentence, the score a hypothesis must beat to enter its k best finished ones.
    worst: np.ndarray = field(init=False)
    finished: list[list[Hypothesis]] = field(init=False)  # by original index; best first
    # Per step so far: (parent row, token, token logprob) of each row of the step after it.
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.sentences)
        # float32, as the scores compared with them are computed on the device.
        self.final_pen = np.array([length_penalty(m + 1, self.lenpen) for m in self.max_len],
                                  dtype=np.float32)
        self.finished = [[] for _ in range(n)]
        self.worst = np.full(n, -np.inf, dtype=np.float32)
        self.lp = torch.full((n, self.k), float("-inf"), device=self.memory.device)
        self.lp[:, 0] = 0.0
        self.history = []

    def prefix(self, row: int) -> tuple[list[int], list[float]]:
        """The tokens of the hypothesis in `row` of this step, and their logprobs."""
        tokens, logprobs = [], []
        for parent, token, token_lp in reversed(self.history):
            tokens.append(int(token[row]))
            logprobs.append(float(token_lp[row]))
            row = int(parent[row])
        return tokens[::-1], logprobs[::-1]


class _Extensions(NamedTuple):
    """One-token extensions of the live hypotheses, each (active sentences, candidates)."""

    lp: Tensor  # cumulative logprob
    row: Tensor  # the row (hypothesis) extended
    token: Tensor
    token_lp: Tensor  # the token's own logprob


def _next_token_logprobs(model: Transformer, state: _Search) -> Tensor:
    """Log-probabilities (rows, vocab) of the token after each row's `last`, the token at
    target position `step`.

    They are the model's own (log_softmax, one fused pass: 3x faster on CPU than logsumexp
    for the normaliser alone), with pad and BOS never allowed (-inf, after normalising); once
    a row has generated its sentence's max_len tokens, only EOS is. Which rows are at their
    limit is known on the host: no step waits to find out.
    """
    logits = model.decode(state.last[:, None], state.memory, state.src_mask, state.cache)
    logprobs = logits[:, -1].float().log_softmax(-1)
    logprobs[:, state.pad] = float("-inf")
    logprobs[:, state.bos] = float("-inf")
    at_limit = np.flatnonzero(np.repeat(state.max_len, state.k) <= state.step)
    if len(at_limit):  # rare: most steps build no mask
        rows = device_index(at_limit, logprobs.device)
        eos = logprobs[rows, state.eos]
        logprobs[rows] = float("-inf")
        logprobs[rows, state.eos] = eos
    return logprobs


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

    Each step reads from the device once: the step's candidates and next hypotheses, packed
    into one small tensor (`_step`).
    """
    if not 1 <= nbest <= beam:
        raise ValueError(f"need 1 <= nbest <= beam, got nbest={nbest}, beam={beam}")
    memory, src_mask = model.encode(src)
    limits = output_limits(src, pad, max_len_a, max_len_b, model.shape.max_positions)
    state = _Beams(bos=bos, eos=eos, pad=pad, k=beam, lenpen=lenpen, memory=memory,
                   src_mask=src_mask, cache=model.new_cache(),
                   max_len=limits.cpu().numpy().astype(np.int64))
    while state.sentences:
        _step(state, _next_token_logprobs(model, state))
        state.step += 1
    return [hyps[:nbest] for hyps in state.finished]


def _step(state: _Beams, logprobs: Tensor) -> None:
    """One step of beam search: collect the hypotheses that end, drop the sentences that are
    done, and make the k best continuations of the others the live hypotheses."""
    k, eos = state.k, state.eos
    candidates = _best_extensions(state, logprobs)
    live = _best_live(candidates, candidates.token == eos, k)
    # One read from the device. Token ids and row numbers are exact in float32 (below 2^24).
    width = candidates.lp.size(1)
    packed = torch.cat([candidates.lp, candidates.token_lp, candidates.row.float(),
                        candidates.token.float(), live.lp[:, :1], live.row.float(),
                        live.token.float(), live.token_lp], dim=1).cpu().numpy()
    cand_lp, cand_token_lp = packed[:, :width], packed[:, width:2 * width]
    cand_row = packed[:, 2 * width:3 * width].astype(np.int64)
    cand_token = packed[:, 3 * width:4 * width].astype(np.int64)
    best_live_lp = packed[:, 4 * width]
    live_row, live_token, live_token_lp = (packed[:, 4 * width + 1 + i * k:
                                                  4 * width + 1 + (i + 1) * k]
                                           for i in range(3))
    # As in classical beam search, only an EOS among the k best candidates ends a hypothesis:
    # one ranked lower would have fallen out of the beam (and with k = 1 this makes beam
    # search exactly greedy).
    ends = (cand_token == eos) & np.isfinite(cand_lp)
    ends[:, k:] = False
    for s, j in zip(*np.nonzero(ends)):
        _collect(state, s, int(cand_row[s, j]), float(cand_lp[s, j]),
                 float(cand_token_lp[s, j]))
    # Log-probabilities only fall, so a live hypothesis (now step + 1 tokens) ends with a
    # score of at most lp / (the largest penalty it can still reach). best_live_lp is the best
    # live one; -inf there means none is left (as at the length limit), and then done. In
    # float32, as the device computes it.
    best_pen = np.maximum(state.final_pen,
                          np.float32(length_penalty(state.step + 2, state.lenpen)))
    done = best_live_lp.astype(np.float32) / best_pen <= state.worst
    keep = np.flatnonzero(~done)
    if not len(keep):
        state.sentences = []
        return
    lp, token = live.lp, live.token
    kept = None
    if len(keep) < len(state.sentences):
        kept = keep
        index = state.keep_sentences(keep)
        state.final_pen, state.worst = state.final_pen[keep], state.worst[keep]
        lp, token = lp[index], token[index]
    # Each next row extends row `parents[r]` of this step. The cache moves only the rows whose
    # place changes; the cross-attention keys and values only when sentences leave.
    parents = live_row[keep].reshape(-1).astype(np.int64)
    state.cache.reorder(parents, kept)
    state.lp, state.last = lp, token.reshape(-1)
    state.history.append((parents, live_token[keep].reshape(-1).astype(np.int64),
                          live_token_lp[keep].reshape(-1)))


def _best_extensions(state: _Beams, logprobs: Tensor) -> _Extensions:
    """The 2k best extensions of each active sentence's live hypotheses, best first."""
    n, k = len(state.sentences), state.k
    # At most k of them end in EOS (one per row), so at least k remain to continue. They are
    # among the 2k best of each row.
    per_row = min(2 * k, logprobs.size(1))
    row_step_lp, row_tok = top_per_row(logprobs, per_row)
    top_lp, top_idx = (state.lp.view(-1, 1) + row_step_lp).view(n, k * per_row).topk(
        min(2 * k, k * per_row), dim=1)
    top_row = top_idx // per_row + torch.arange(n, device=top_idx.device)[:, None] * k
    return _Extensions(top_lp, top_row, row_tok.view(n, -1).gather(1, top_idx),
                       row_step_lp.view(n, -1).gather(1, top_idx))


def _collect(state: _Beams, s: int, row: int, logprob: float, eos_lp: float) -> None:
    """Add the hypothesis of row `row` ended by EOS (active sentence s) to the sentence's
    finished ones, keeping its k best, and update `worst` once it has k."""
    tokens, token_lps = state.prefix(row)
    hyps = state.finished[state.sentences[s]]
    hyps.append(Hypothesis(tokens, logprob,
                           logprob / length_penalty(len(tokens) + 1, state.lenpen),
                           token_lps + [eos_lp]))
    hyps.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
    del hyps[state.k:]
    if len(hyps) == state.k:
        state.worst[s] = hyps[-1].score


def _best_live(extensions: _Extensions, is_eos: Tensor, k: int) -> _Extensions:
    """The k best extensions of each sentence that do not end (dead ones keep -inf)."""
    lp, pick = extensions.lp.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
    return _Extensions(lp, *(t.gather(1, pick) for t in extensions[1:]))


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
    limits = output_limits(src, pad, max_len_a, max_len_b, model.shape.max_positions)
    state = _Search(bos=bos, eos=eos, pad=pad, k=1, memory=memory, src_mask=src_mask,
                    cache=model.new_cache(), max_len=limits.cpu().numpy().astype(np.int64))
    # Each active row's tokens and their logprobs so far, on the host.
    tokens: list[list[int]] = [[] for _ in state.sentences]
    token_lps: list[list[float]] = [[] for _ in state.sentences]
    results: dict[int, Hypothesis] = {}
    while state.sentences:
        logprobs = _next_token_logprobs(model, state)
        weights = _sampling_weights(logprobs, temperature, top_k, top_p)
        last = torch.multinomial(weights.softmax(-1), 1, generator=generator).squeeze(1)
        # One read from the device per step (token ids are exact in float32).
        drawn = torch.stack([last.float(), logprobs.gather(1, last[:, None]).squeeze(1)]
                            ).cpu().numpy()
        for row, (token, token_lp) in enumerate(zip(drawn[0].astype(np.int64).tolist(),
                                                    drawn[1].tolist())):
            tokens[row].append(token)
            token_lps[row].append(token_lp)
        ended = drawn[0] == eos
        for row in np.flatnonzero(ended).tolist():
            results[state.sentences[row]] = Hypothesis(tokens[row][:-1], sum(token_lps[row]),
                                                       sum(token_lps[row]), token_lps[row])
        if ended.any():  # ended rows leave the batch
            keep = np.flatnonzero(~ended)
            index = state.keep_sentences(keep)
            state.cache.reorder(keep, keep)
            tokens, token_lps = [tokens[i] for i in keep], [token_lps[i] for i in keep]
            last = last[index]
        state.last = last
        state.step += 1
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
