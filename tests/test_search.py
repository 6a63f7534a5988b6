"""Tests for traduire.search against straightforward, cache-free reference computations."""

from __future__ import annotations

import dataclasses
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from traduire import search
from traduire.errors import TraduireError
from traduire.model import DecoderCache, Transformer, TransformerShape
from traduire.search import (
    SearchOptions,
    beam_search,
    decode,
    greedy,
    length_penalty,
    parse_sampling,
    sample,
)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL = dict(bos=BOS, eos=EOS, pad=PAD)


def tiny_model(vocab: int, seed: int, peak: float = 3.0) -> Transformer:
    """A random model; scaling the (shared) embedding makes its distributions peaky, so
    searches differ from one another and near-ties are rare."""
    torch.manual_seed(seed)
    model = Transformer(TransformerShape(src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=16,
                                         heads=2, ffn_dim=32, encoder_layers=1,
                                         decoder_layers=1, dropout=0.0))
    with torch.no_grad():
        model.decoder.embedding.weight.mul_(peak)
    return model.eval()


def random_sources(vocab: int, lengths: list[int], seed: int) -> torch.Tensor:
    """Right-padded sources: random words (ids >= 4) then EOS."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths) + 1), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, vocab, (n,), generator=gen)
        src[i, n] = EOS
    return src


@torch.no_grad()
def teacher_forced(model: Transformer, src: torch.Tensor, tokens: list[int]) -> list[float]:
    """Log-probabilities of tokens + EOS for one source (1, src_len), by one full forward."""
    tgt_in = torch.tensor([[BOS] + tokens])
    logprobs = model(src, tgt_in).log_softmax(-1)[0]
    return logprobs.gather(1, torch.tensor([tokens + [EOS]]).T).squeeze(1).tolist()


@torch.no_grad()
def reference_greedy(model: Transformer, src: torch.Tensor, max_len: int
                     ) -> tuple[list[int], list[float]]:
    """Greedy decoding recomputing the whole forward pass at every step, no cache."""
    tokens: list[int] = []
    lps: list[float] = []
    while True:
        logprobs = model(src, torch.tensor([[BOS] + tokens])).log_softmax(-1)[0, -1]
        allowed = logprobs.clone()
        allowed[[PAD, BOS]] = float("-inf")
        if len(tokens) == max_len:
            allowed[:] = float("-inf")
            allowed[EOS] = 0.0
        token = int(allowed.argmax())
        lps.append(float(logprobs[token]))
        if token == EOS:
            return tokens, lps
        tokens.append(token)


def max_len_of(src_row: torch.Tensor, a: float = 1.2, b: int = 10) -> int:
    return int(a * int((src_row != PAD).sum()) + b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy(seed: int) -> None:
    model = tiny_model(12, seed)
    src = random_sources(12, [3, 5, 1, 4], seed)
    for hyps, bgreedy in zip(beam_search(model, src, beam=1, lenpen=0.0, **SPECIAL),
                             greedy(model, src, **SPECIAL), strict=True):
        assert hyps[0] == bgreedy
    for i, hyp in enumerate(greedy(model, src, **SPECIAL)):
        row = src[i:i + 1, :int((src[i] != PAD).sum())]
        tokens, lps = reference_greedy(model, row, max_len_of(src[i]))
        assert hyp.tokens == tokens
        assert hyp.token_logprobs == pytest.approx(lps, abs=1e-5)
        assert hyp.logprob == pytest.approx(sum(lps), abs=1e-5)
        assert hyp.score == hyp.logprob


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("lenpen", [0.0, 1.0, 2.0])
def test_exhaustive(seed: int, lenpen: float) -> None:
    """With a beam as large as the search space, beam search finds the exact best output."""
    vocab, max_len = 6, 3
    words = [UNK, 4, 5]  # every id but pad, BOS and EOS
    model = tiny_model(vocab, seed, peak=2.0)
    src = random_sources(vocab, [1 + seed % 3], seed)
    space = []
    for n in range(max_len + 1):
        for tokens in itertools.product(words, repeat=n):
            logprob = sum(teacher_forced(model, src, list(tokens)))
            space.append((logprob / length_penalty(n + 1, lenpen), list(tokens)))
    space.sort(key=lambda s: s[0], reverse=True)
    beam = len(space)

    hyps = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=0.0, max_len_b=max_len,
                       nbest=beam, **SPECIAL)[0]
    assert hyps[0].tokens == space[0][1]
    assert hyps[0].score == pytest.approx(space[0][0], abs=1e-5)
    # Everything is reachable, so the full ranking comes back.
    assert [h.score for h in hyps] == pytest.approx([s for s, _ in space], abs=1e-5)


def classical_beam(next_logprobs, beam: int, lenpen: float, max_len: int
                   ) -> list[tuple[float, list[int]]]:
    """Classical beam search without early stopping: every hypothesis is run to the length
    limit. `next_logprobs(tokens)` gives the log-probabilities of the next token after the
    target prefix `tokens`. Returns the `beam` best finished (score, tokens)."""
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_len + 1):
        candidates = []
        for logprob, tokens in live:
            for token, lp in enumerate(next_logprobs(tokens)):
                if token not in (PAD, BOS) and (step < max_len or token == EOS):
                    candidates.append((logprob + lp, tokens + [token]))
        candidates.sort(key=lambda c: c[0], reverse=True)
        candidates = candidates[:2 * beam]
        for logprob, tokens in candidates[:beam]:
            if tokens[-1] == EOS:
                finished.append((logprob / length_penalty(len(tokens), lenpen), tokens[:-1]))
        live = [c for c in candidates if c[1][-1] != EOS][:beam]
    finished.sort(key=lambda c: c[0], reverse=True)
    return finished[:beam]


@torch.no_grad()
def reference_beam(model: Transformer, src: torch.Tensor, beam: int, lenpen: float,
                   max_len: int) -> list[tuple[float, list[int]]]:
    """classical_beam on the Transformer, recomputing every hypothesis from scratch."""
    return classical_beam(
        lambda tokens: model(src, torch.tensor([[BOS] + tokens])).log_softmax(-1)[0, -1].tolist(),
        beam, lenpen, max_len)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lenpen", [0.0, 1.0, 2.0])
def test_early_stopping_changes_nothing(seed: int, lenpen: float) -> None:
    """Stopping a sentence once no live hypothesis can enter its beam best finished ones gives
    the same beam best as running every hypothesis to the length limit."""
    model = tiny_model(8, seed, peak=2.0)
    lengths = [2, 4, 1]
    src = random_sources(8, lengths, seed)
    beam = 3
    for i, hyps in enumerate(beam_search(model, src, beam=beam, lenpen=lenpen, nbest=beam,
                                         max_len_a=1.0, max_len_b=3, **SPECIAL)):
        row = src[i:i + 1, :lengths[i] + 1]
        expected = reference_beam(model, row, beam, lenpen, lengths[i] + 1 + 3)
        assert [h.tokens for h in hyps] == [t for _, t in expected]
        assert [h.score for h in hyps] == pytest.approx([s for s, _ in expected], abs=1e-5)


class BigramModel:
    """A scripted stand-in for the Transformer: the next token depends only on the last one,
    through the table `probs` {last: {next: probability}}, the rest spread evenly."""

    def __init__(self, vocab: int, probs: dict[int, dict[int, float]],
                 max_positions: int = 1024) -> None:
        self.shape = TransformerShape(src_vocab_size=vocab, tgt_vocab_size=vocab,
                                      max_positions=max_positions)
        table = torch.empty(vocab, vocab)
        for last in range(vocab):
            given = probs.get(last, {})
            rest = (1.0 - sum(given.values())) / (vocab - len(given))
            table[last] = torch.tensor([given.get(t, rest) for t in range(vocab)])
        self.logits = table.log()

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(src.size(0), src.size(1), 1), (src != PAD)[:, None, None, :]

    def new_cache(self) -> DecoderCache:
        return DecoderCache(0)

    def decode(self, tgt, memory, src_mask, cache) -> torch.Tensor:
        return self.logits[tgt]


@pytest.mark.parametrize(("lenpen", "expected"), [(0.0, [4]), (1.0, [4, 5, 6, 7, 8]),
                                                  (2.0, [4, 5, 6, 7, 8])])
def test_a_live_hypothesis_behind_the_finished_can_still_win(lenpen: float,
                                                             expected: list[int]) -> None:
    """After "A EOS" finishes, the live "A B" scores worse than it if ended now, but the
    length penalty lets the nearly free "A B C D E EOS" overtake it: the bound on a live
    hypothesis must use the largest penalty it can still reach, not its current one."""
    a, b, c, d, e = 4, 5, 6, 7, 8
    model = BigramModel(9, {BOS: {a: 0.6, EOS: 0.1}, a: {EOS: 0.5, b: 0.3},
                            b: {c: 0.99}, c: {d: 0.99}, d: {e: 0.99}, e: {EOS: 0.99}})
    src = torch.tensor([[4, 4, EOS]])
    for beam in (1, 2):
        best = beam_search(model, src, beam=beam, lenpen=lenpen, **SPECIAL)[0][0]
        assert best.tokens == expected
    assert greedy(model, src, **SPECIAL)[0].tokens == [a]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lenpen", [0.0, 1.0])
def test_batching_invariance(seed: int, lenpen: float) -> None:
    model = tiny_model(14, seed)
    lengths = [5, 1, 3, 7, 2]
    src = random_sources(14, lengths, seed)
    batched = beam_search(model, src, beam=4, lenpen=lenpen, nbest=3, **SPECIAL)
    for i, n in enumerate(lengths):
        alone = beam_search(model, src[i:i + 1, :n + 1], beam=4, lenpen=lenpen, nbest=3,
                            **SPECIAL)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone],
                                                              abs=1e-5)
        assert [h.logprob for h in batched[i]] == pytest.approx([h.logprob for h in alone],
                                                                abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_logprobs_match_a_full_forward(seed: int) -> None:
    model = tiny_model(12, seed)
    lengths = [4, 2, 6]
    src = random_sources(12, lengths, seed)
    for i, hyps in enumerate(beam_search(model, src, beam=5, nbest=5, **SPECIAL)):
        row = src[i:i + 1, :lengths[i] + 1]
        for hyp in hyps:
            lps = teacher_forced(model, row, hyp.tokens)
            assert hyp.token_logprobs == pytest.approx(lps, abs=1e-5)
            assert hyp.logprob == pytest.approx(sum(lps), abs=1e-5)
            assert hyp.score == pytest.approx(
                hyp.logprob / length_penalty(len(hyp.tokens) + 1, 1.0), abs=1e-6)


def test_nbest_sorted_distinct_and_within_limits() -> None:
    model = tiny_model(12, 0)
    src = random_sources(12, [4, 2, 6], 0)
    for i, hyps in enumerate(beam_search(model, src, beam=6, nbest=6, **SPECIAL)):
        assert len(hyps) == 6
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
        for h in hyps:
            assert h.probability == pytest.approx(math.exp(h.logprob))
            assert len(h.token_logprobs) == len(h.tokens) + 1
            assert len(h.tokens) <= max_len_of(src[i])
            assert not {PAD, BOS, EOS} & set(h.tokens)


def test_length_limit_forces_eos() -> None:
    model = tiny_model(12, 0)
    src = random_sources(12, [3, 5], 0)
    for hyps in beam_search(model, src, beam=3, nbest=3, max_len_a=0.0, max_len_b=2,
                            **SPECIAL):
        assert all(len(h.tokens) <= 2 for h in hyps)
    assert all(h.tokens == [] for h in greedy(model, src, max_len_a=0.0, max_len_b=0,
                                               **SPECIAL))


def test_nbest_larger_than_beam_is_rejected() -> None:
    model = tiny_model(8, 0)
    with pytest.raises(ValueError, match=r"^need 1 <= nbest <= beam, got nbest=3, beam=2$"):
        beam_search(model, random_sources(8, [2], 0), beam=2, nbest=3, **SPECIAL)
    with pytest.raises(ValueError, match="got nbest=0, beam=2"):
        beam_search(model, random_sources(8, [2], 0), beam=2, nbest=0, **SPECIAL)


def test_one_token_per_step_and_the_batch_shrinks() -> None:
    """Each decoder call feeds one token per live hypothesis; rows only ever leave."""
    model = tiny_model(12, 1)
    src = random_sources(12, [1, 6, 3], 1)
    shapes: list[tuple[int, ...]] = []
    decode = model.decode

    def spy(tgt, *args, **kwargs):
        shapes.append(tuple(tgt.shape))
        return decode(tgt, *args, **kwargs)

    model.decode = spy  # type: ignore[method-assign]
    beam_search(model, src, beam=4, **SPECIAL)
    assert all(length == 1 for _, length in shapes)
    rows = [r for r, _ in shapes]
    assert rows[0] == 3 * 4 and all(r % 4 == 0 for r in rows)
    assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]


def test_blockwise_top_k_changes_no_translation(monkeypatch) -> None:
    """A vocabulary wide enough for top_per_row's block path: same hypotheses as plain topk."""
    model, src = tiny_model(3000, 5, peak=1.5), random_sources(3000, [3, 6, 2, 5], 5)
    fast = beam_search(model, src, beam=5, nbest=3, **SPECIAL)
    monkeypatch.setattr(search, "top_per_row", lambda scores, k: scores.topk(k, dim=1))
    plain = beam_search(model, src, beam=5, nbest=3, **SPECIAL)
    assert [[h.tokens for h in hyps] for hyps in fast] == [[h.tokens for h in hyps]
                                                           for hyps in plain]
    assert [[h.logprob for h in hyps] for hyps in fast] == [[h.logprob for h in hyps]
                                                            for hyps in plain]


def test_sampling_is_reproducible() -> None:
    model = tiny_model(12, 0, peak=1.0)
    src = random_sources(12, [3, 5, 2, 4], 0)
    for kwargs in ({}, {"top_k": 3}, {"top_p": 0.8}, {"top_k": 4, "top_p": 0.9,
                                                      "temperature": 1.5}):
        first = sample(model, src, generator=torch.Generator().manual_seed(7), **kwargs,
                       **SPECIAL)
        second = sample(model, src, generator=torch.Generator().manual_seed(7), **kwargs,
                        **SPECIAL)
        assert first == second
    draws = {tuple(tuple(h.tokens) for h in sample(model, src, generator=torch.Generator()
                                            .manual_seed(seed), **SPECIAL))
             for seed in range(5)}
    assert len(draws) > 1  # it does sample


def test_sampling_logprobs_and_limits() -> None:
    model = tiny_model(12, 2, peak=1.0)
    lengths = [3, 1, 4]
    src = random_sources(12, lengths, 2)
    hyps = sample(model, src, generator=torch.Generator().manual_seed(0), **SPECIAL)
    for i, hyp in enumerate(hyps):
        lps = teacher_forced(model, src[i:i + 1, :lengths[i] + 1], hyp.tokens)
        assert hyp.token_logprobs == pytest.approx(lps, abs=1e-5)
        assert hyp.logprob == pytest.approx(sum(lps), abs=1e-5)
        assert len(hyp.tokens) <= max_len_of(src[i])
        assert not {PAD, BOS, EOS} & set(hyp.tokens)


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_one_sampling_is_greedy(kwargs: dict) -> None:
    model = tiny_model(12, 3, peak=1.0)
    src = random_sources(12, [3, 5, 2], 3)
    sampled = sample(model, src, generator=torch.Generator().manual_seed(1), **kwargs,
                     **SPECIAL)
    expected = greedy(model, src, **SPECIAL)
    for s, g in zip(sampled, expected, strict=True):
        assert s.tokens == g.tokens
        assert s.logprob == pytest.approx(g.logprob, abs=1e-5)


def test_length_penalty_is_gnmt_and_probability_is_the_product_of_token_probabilities(
        ) -> None:
    # Wu et al. (2016), eq. 14: lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha.
    for length in range(1, 12):
        for alpha in (0.0, 0.6, 1.0, 2.0):
            assert length_penalty(length, alpha) == pytest.approx(
                math.pow(5 + length, alpha) / math.pow(6, alpha), rel=1e-12)
    model = tiny_model(12, 4, peak=1.0)
    src = random_sources(12, [3, 5], 4)
    for i, hyps in enumerate(beam_search(model, src, beam=3, nbest=3, lenpen=0.6, **SPECIAL)):
        row = src[i:i + 1, :int((src[i] != PAD).sum())]
        for hyp in hyps:
            per_token = [math.exp(lp) for lp in teacher_forced(model, row, hyp.tokens)]
            assert hyp.probability == pytest.approx(math.prod(per_token), rel=1e-4)
            assert hyp.score == pytest.approx(
                hyp.logprob * 6 ** 0.6 / (6 + len(hyp.tokens)) ** 0.6, rel=1e-5)


# --- bounds, limits and sampling, exactly ---------------------------------------------------------


def random_bigram(vocab: int, seed: int) -> BigramModel:
    gen = torch.Generator().manual_seed(seed)
    model = BigramModel(vocab, {})
    model.logits = (torch.randn(vocab, vocab, generator=gen) * 2.5).log_softmax(-1)
    return model


def bigram_reference_beam(model: BigramModel, beam: int, lenpen: float, max_len: int
                          ) -> list[tuple[float, list[int]]]:
    """classical_beam on a bigram model."""
    return classical_beam(lambda tokens: model.logits[tokens[-1] if tokens else BOS].tolist(),
                          beam, lenpen, max_len)


@pytest.mark.parametrize("lenpen", [-1.0, -0.3, 0.6, 2.0, 4.0])
def test_early_stopping_is_exact_for_any_length_penalty(lenpen: float) -> None:
    """On many small bigram models, with limits short enough that the best hypothesis often
    ends at the limit, and negative penalties (which favour short outputs): stopping early
    changes nothing."""
    src = torch.tensor([[4, EOS]])
    for seed in range(40):
        model = random_bigram(7, seed)
        for max_len in (2, 5):
            hyps = beam_search(model, src, beam=3, nbest=3, lenpen=lenpen, max_len_a=0.0,
                               max_len_b=max_len, **SPECIAL)[0]
            expected = bigram_reference_beam(model, 3, lenpen, max_len)
            assert [h.tokens for h in hyps] == [t for _, t in expected], (seed, max_len)
            assert [h.score for h in hyps] == pytest.approx([s for s, _ in expected],
                                                            abs=1e-5)


NEVER_ENDS = {t: {EOS: 1e-12} for t in range(9)}  # EOS almost impossible after any token


@pytest.mark.parametrize(("a", "b", "max_positions", "expected"), [
    (0.0, 3, 1024, [3, 3]), (1.0, 2, 1024, [5, 4]), (2.0, 10, 8, [7, 7])])
def test_every_search_runs_to_the_length_limit_exactly(a, b, max_positions, expected) -> None:
    """A model that (almost) never ends: greedy, beam and sampled outputs all have exactly
    int(a * source length + b) tokens, EOS included in the length, never more than the
    model's positions hold."""
    model = BigramModel(9, NEVER_ENDS, max_positions)
    src = torch.tensor([[5, 6, EOS], [5, EOS, PAD]])
    limits = dict(max_len_a=a, max_len_b=b)
    assert [len(h.tokens) for h in greedy(model, src, **limits, **SPECIAL)] == expected
    assert [len(h[0].tokens) for h in beam_search(model, src, beam=2, **limits,
                                                  **SPECIAL)] == expected
    sampled = sample(model, src, generator=torch.Generator().manual_seed(0), **limits,
                     **SPECIAL)
    assert [len(h.tokens) for h in sampled] == expected
    for hyp in sampled:
        assert hyp.score == hyp.logprob == pytest.approx(sum(hyp.token_logprobs))
        assert hyp.token_logprobs[-1] == pytest.approx(math.log(1e-12), rel=1e-4)  # the EOS


def first_tokens(model, n: int, **options) -> torch.Tensor:
    """The first sampled token of n sentences, as counts per token."""
    src = torch.tensor([[4, EOS]] * n)
    hyps = sample(model, src, generator=torch.Generator().manual_seed(11), max_len_a=0.0,
                  max_len_b=1, **options, **SPECIAL)
    return torch.bincount(torch.tensor([h.tokens[0] if h.tokens else EOS for h in hyps]),
                          minlength=8).double()


def test_sampling_draws_from_the_tempered_and_truncated_distribution() -> None:
    probs = {BOS: {4: 0.4, 5: 0.3, 6: 0.2, 7: 0.08, EOS: 0.02}}
    model, n = BigramModel(8, probs), 4000
    p = torch.zeros(8, dtype=torch.float64)
    for token, q in probs[BOS].items():
        p[token] = q

    def close(counts: torch.Tensor, expected: torch.Tensor) -> None:
        expected = expected / expected.sum()
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((counts / n - expected).abs() <= 5 * sigma + 1e-9).all(), (counts / n, expected)

    close(first_tokens(model, n), p)  # the model's own distribution by default
    close(first_tokens(model, n, temperature=1.0), p)
    close(first_tokens(model, n, temperature=2.0), p ** 0.5)
    close(first_tokens(model, n, temperature=0.5), p ** 2)
    close(first_tokens(model, n, top_k=2), p * (p >= 0.3))
    # Nucleus: 4 and 5 hold 0.7 < 0.75, so 6 completes it and 7 and EOS are out.
    close(first_tokens(model, n, top_p=0.75), p * (p >= 0.2))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            first_tokens(model, 1, temperature=temperature)


def test_nucleus_and_top_k_boundaries() -> None:
    logprobs = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64).log()
    kept = lambda **cut: search._sampling_weights(logprobs, 1.0, **cut).isfinite()  # noqa: E731
    # Once the more probable tokens hold exactly top_p, the next one is out.
    assert kept(top_k=None, top_p=0.5).tolist() == [[True, False, False, False]]
    assert kept(top_k=None, top_p=0.75).tolist() == [[True, True, False, False]]
    assert kept(top_k=None, top_p=0.76).tolist() == [[True, True, True, False]]
    # Ties with the k-th most probable token stay in.
    assert kept(top_k=3, top_p=None).tolist() == [[True, True, True, True]]
    assert kept(top_k=2, top_p=None).tolist() == [[True, True, False, False]]
    assert kept(top_k=9, top_p=None).all()
    weights = search._sampling_weights(logprobs, 2.0, None, None)
    torch.testing.assert_close(weights, logprobs / 2.0)


def test_the_bound_uses_the_penalty_of_the_longest_output_the_limit_allows() -> None:
    """"A EOS" finishes first; "A B C D E EOS" ends exactly at the length limit (5 tokens) and,
    with lenpen 2, wins. Bounding the live "A B" with the penalty of a shorter output would
    stop the search before it gets there."""
    a, b, c, d, e = 4, 5, 6, 7, 8
    model = BigramModel(9, {BOS: {a: 0.6, EOS: 0.1}, a: {EOS: 0.5, b: 0.1},
                            b: {c: 0.99}, c: {d: 0.99}, d: {e: 0.99}, e: {EOS: 0.99}})
    src = torch.tensor([[4, 4, EOS]])
    for beam in (1, 2):
        best = beam_search(model, src, beam=beam, lenpen=2.0, max_len_a=0.0, max_len_b=5,
                           **SPECIAL)[0][0]
        assert best.tokens == [a, b, c, d, e]
        assert bigram_reference_beam(model, beam, 2.0, 5)[0][1] == best.tokens


# --- decode and SearchOptions ------------------------------------------------------------------

TOKENIZER = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS)  # all that decode reads


def source_ids(src: torch.Tensor) -> list[list[int]]:
    """The sentences of a padded source batch, without EOS and padding."""
    return [row[:int((row != PAD).sum()) - 1].tolist() for row in src]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("beam", "nbest", "lenpen"), [(4, 3, 1.0), (3, 1, 0.0), (5, 5, 2.0)])
def test_decode_is_beam_search_on_the_same_batch(seed: int, beam: int, nbest: int,
                                                 lenpen: float) -> None:
    model = tiny_model(14, seed)
    src = random_sources(14, [5, 1, 3, 7, 2], seed)
    options = SearchOptions(beam=beam, nbest=nbest, lenpen=lenpen, max_len_a=0.5, max_len_b=4)
    nbests = decode(model, TOKENIZER, source_ids(src), options)
    assert nbests == beam_search(model, src, beam=beam, nbest=nbest, lenpen=lenpen,
                                 max_len_a=0.5, max_len_b=4, **SPECIAL)
    assert [len(hyps) for hyps in nbests] == [nbest] * 5
    # Input order: the same sentences reversed come back reversed.
    backwards = decode(model, TOKENIZER, source_ids(src)[::-1], options)
    for hyps, again in zip(nbests, backwards[::-1], strict=True):
        assert [h.tokens for h in hyps] == [h.tokens for h in again]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in again], abs=1e-5)


def test_decode_with_one_beam_and_no_length_penalty_is_greedy() -> None:
    model = tiny_model(12, 2)
    src = random_sources(12, [3, 5, 1, 4], 2)
    assert decode(model, TOKENIZER, source_ids(src), SearchOptions(beam=1, lenpen=0.0)) == \
        [[h] for h in greedy(model, src, **SPECIAL)]
    # And the default options are beam search's defaults.
    assert decode(model, TOKENIZER, source_ids(src), SearchOptions()) == \
        beam_search(model, src, beam=5, **SPECIAL)


@pytest.mark.parametrize(("spec", "cut"), [("topk:3", {"top_k": 3}), ("topp:0.8", {"top_p": 0.8}),
                                           ("topk:50", {"top_k": 50})])
def test_decode_samples_as_sample_does(spec: str, cut: dict) -> None:
    model = tiny_model(12, 0, peak=1.0)
    src = random_sources(12, [3, 5, 2, 4], 0)
    options = SearchOptions(sample=spec, temperature=1.5, nbest=3, beam=1, max_len_b=6)
    sampled = decode(model, TOKENIZER, source_ids(src), options,
                     generator=torch.Generator().manual_seed(7))
    expected = sample(model, src, temperature=1.5, generator=torch.Generator().manual_seed(7),
                      max_len_b=6, **cut, **SPECIAL)
    assert sampled == [[h] for h in expected]  # one hypothesis each, whatever nbest says


def test_search_options_checks_with_the_cli_flags_words() -> None:
    assert SearchOptions() == SearchOptions(beam=5, nbest=1, lenpen=1.0, max_len_a=1.2,
                                            max_len_b=10, sample=None, temperature=1.0, seed=0)
    for options, message in [
            ({"beam": 0}, "--beam must be at least 1"),
            ({"nbest": 0}, "--nbest must be at least 1"),
            ({"beam": 2, "nbest": 3}, "--nbest 3 cannot exceed --beam 2"),
            ({"sample": "topk:0"}, "--sample 'topk:0': expected topk:K (K >= 1) or topp:P "
                                   "(0 < P <= 1)"),
            ({"sample": "topp:1.5"}, "--sample 'topp:1.5': expected"),
            ({"sample": "beam"}, "--sample 'beam': expected"),
            ({"temperature": 0.0}, "temperature must be positive, got 0.0"),
            ({"temperature": -1.0}, "temperature must be positive, got -1.0"),
            ({"temperature": math.nan}, "temperature must be positive, got nan")]:
        with pytest.raises(TraduireError) as error:
            SearchOptions(**options)
        assert str(error.value).startswith(message), options
    assert SearchOptions(beam=1, nbest=3, sample="topp:0.9").nbest == 3  # sampling: no beam
    assert parse_sampling("topk:7") == (7, None)
    assert parse_sampling("topp:0.25") == (None, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SearchOptions().beam = 2  # type: ignore[misc]


def test_a_frozen_subclass_adds_its_fields_and_keeps_the_checks() -> None:
    @dataclasses.dataclass(frozen=True)
    class Batched(SearchOptions):
        batch_size: int = 0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.batch_size < 0:
                raise TraduireError("--batch-size must not be negative")

    options = Batched(beam=3, batch_size=8)
    assert (options.beam, options.nbest, options.batch_size) == (3, 1, 8)
    with pytest.raises(TraduireError, match="^--beam must be at least 1$"):
        Batched(beam=0)
    with pytest.raises(TraduireError, match="^--batch-size must not be negative$"):
        Batched(batch_size=-1)


# --- The decoding step: host reads and the key/value cache --------------------------------------


def test_a_beam_step_reads_from_the_device_once(monkeypatch) -> None:
    """Every host read of a tensor (cpu, tolist, item, bool) during a search is counted: one
    per decoding step, and one more for the batch's length limits."""
    src = random_sources(12, [4, 1, 6, 3], 3)
    reads, steps = [], []
    for name in ("cpu", "tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for search_once, model in (
            (lambda m: beam_search(m, src, beam=4, nbest=2, **SPECIAL), tiny_model(12, 3)),
            (lambda m: sample(m, src, generator=torch.Generator().manual_seed(1), **SPECIAL),
             tiny_model(12, 0, peak=1.0))):
        decode = model.decode
        model.decode = lambda *args, _decode=decode, **kwargs: (steps.append(1)
                                                                or _decode(*args, **kwargs))
        reads.clear(), steps.clear()
        search_once(model)
        # output_limits reads the source lengths (tolist) and the search its limits (cpu).
        assert len(steps) > 3 and len(reads) <= len(steps) + 2, (len(steps), reads)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_preallocated_cache_gives_the_growing_caches_translations(seed: int,
                                                                      monkeypatch) -> None:
    """The in-place cache (the GPU's form) and the growing one (the CPU's) are the same
    search: the same n-best lists, logprobs equal to rounding."""
    model = tiny_model(14, seed)
    src = random_sources(14, [5, 1, 3, 7, 2, 4], seed)
    growing = beam_search(model, src, beam=4, nbest=3, **SPECIAL)
    monkeypatch.setattr(model, "new_cache",
                        lambda: DecoderCache(len(model.decoder.layers), 4, preallocate=True))
    preallocated = beam_search(model, src, beam=4, nbest=3, **SPECIAL)
    assert [[h.tokens for h in hyps] for hyps in preallocated] == [[h.tokens for h in hyps]
                                                                   for hyps in growing]
    for hyps, expected in zip(preallocated, growing):
        assert [h.logprob for h in hyps] == pytest.approx([h.logprob for h in expected],
                                                          abs=1e-5)
    sampled = sample(model, src, generator=torch.Generator().manual_seed(seed), **SPECIAL)
    monkeypatch.undo()
    assert sampled == sample(model, src, generator=torch.Generator().manual_seed(seed),
                             **SPECIAL)


def test_the_preallocated_cache_writes_in_place_grows_and_reorders_rows() -> None:
    model = tiny_model(12, 4)
    src = random_sources(12, [3, 5], 4)
    memory, src_mask = model.encode(src)
    cache = DecoderCache(len(model.decoder.layers), capacity=2, preallocate=True)
    tgt = torch.tensor([[BOS, 5, 6], [BOS, 7, 8]])
    with torch.no_grad():
        model.decode(tgt[:, :1], memory, src_mask, cache=cache)
        buffer = cache.kv
        model.decode(tgt[:, 1:2], memory, src_mask, cache=cache)
        assert cache.kv is buffer  # written in place, within capacity
        model.decode(tgt[:, 2:3], memory, src_mask, cache=cache)  # beyond it: grows once
        assert cache.kv.size(4) == 4 and cache.length == 3
        before = cache.layers[0]["self"]["k"].clone()
        cache.reorder([1, 1], [1, 1])  # row 0 takes row 1 (and its source); row 1 stays
        after = cache.layers[0]["self"]["k"]
        torch.testing.assert_close(after[0], before[1])
        torch.testing.assert_close(after[1], before[1])
        step = model.decode(torch.tensor([[9], [9]]), memory[[1, 1]], src_mask[[1, 1]],
                            cache=cache)
        full = model(src[[1, 1]], torch.cat([tgt[[1, 1]], torch.tensor([[9], [9]])], dim=1))
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
