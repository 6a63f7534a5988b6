"""Tests for traduire.batch: token-budgeted training batches, translation batches, padding,
output limits and the stream of training steps."""

from __future__ import annotations

import itertools
import queue
import threading
import time

import datasets
import numpy as np
import pytest
import torch

from traduire.batch import (
    EncodedCorpus,
    Prefetcher,
    StepPlan,
    collate,
    output_limits,
    padded,
    sentence_batches,
    source_batch,
    token_batches,
    training_steps,
)

# --- batching ----------------------------------------------------------------------------------


def random_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 30, n), rng.integers(1, 30, n)


def test_token_batches_cover_usable_indices_once_within_budget():
    src, tgt = random_lengths(300, seed=1)
    src[7] = 120  # longer than the budget allows two of
    candidates = np.flatnonzero(np.arange(300) % 7 != 3)  # some pairs are not usable
    batches = token_batches(src, tgt, candidates, batch_tokens=200, seed=3, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == candidates.tolist()
    assert len(flat) == len(set(flat.tolist()))
    for batch in batches:
        assert len(batch) > 0
        padded = max(src[batch].max(), tgt[batch].max()) * len(batch)
        assert padded <= 200 or len(batch) == 1
    assert any(len(b) == 1 and b[0] == 7 for b in batches)
    # Batches are filled, not one sentence each.
    assert len(batches) < len(candidates) / 3


def test_token_batches_oversized_sentence_alone():
    src, tgt = np.array([3, 500, 4, 2]), np.array([3, 2, 600, 2])
    batches = token_batches(src, tgt, np.arange(4), batch_tokens=50, seed=0, epoch=0)
    singles = {int(b[0]) for b in batches if len(b) == 1}
    assert {1, 2} <= singles
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3]


def test_token_batches_group_similar_lengths():
    lengths = np.array([2] * 50 + [20] * 50)
    batches = token_batches(lengths, lengths, np.arange(100), batch_tokens=100, seed=0,
                            epoch=0)
    for batch in batches:
        assert len(set(lengths[batch].tolist())) == 1  # no short sentence padded to 20


def test_token_batches_deterministic_per_seed_and_epoch():
    src, tgt = random_lengths(200, seed=2)
    candidates = np.arange(200)

    def as_lists(seed, epoch):
        return [b.tolist() for b in token_batches(src, tgt, candidates, 150, seed, epoch)]

    assert as_lists(1, 0) == as_lists(1, 0)
    assert as_lists(1, 0) != as_lists(1, 1)
    assert as_lists(1, 0) != as_lists(2, 0)
    # A new epoch reshuffles the batch order and the tie-breaking within equal lengths.
    assert {tuple(b) for b in as_lists(1, 0)} != {tuple(b) for b in as_lists(1, 1)}


def test_token_batches_empty_candidates():
    src, tgt = random_lengths(10, seed=3)
    assert token_batches(src, tgt, np.array([], dtype=np.int64), 100, 0, 0) == []


def test_collate_adds_specials_and_padding():
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11]], pad=0, bos=2, eos=3)
    assert batch.src.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert batch.tgt_in.tolist() == [[2, 9, 0], [2, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, 3, 0], [10, 11, 3]]
    assert batch.num_tgt_tokens == 5 and int((batch.src != 0).sum()) == 6
    assert batch.src.dtype == torch.long
    assert collate([], [], pad=0, bos=2, eos=3).src.shape == (0, 1)


def test_encoded_corpus_lengths_and_max_len():
    ds = datasets.Dataset.from_dict({
        "src_ids": [[5, 6], [5, 6, 7, 8], [5]], "tgt_ids": [[9], [9], [9, 10, 11]],
        "src_len": [2, 4, 1], "tgt_len": [1, 1, 3]})
    corpus = EncodedCorpus(ds, max_len=4)
    assert corpus.src_lens.tolist() == [3, 5, 2]  # + EOS
    assert corpus.tgt_lens.tolist() == [2, 2, 4]
    assert corpus.usable.tolist() == [0, 2]
    assert len(corpus) == 2
    batch = corpus.batch(np.array([2, 0]), pad=0, bos=2, eos=3)
    assert batch.src.tolist() == [[5, 3, 0], [5, 6, 3]]
    assert batch.tgt_out.tolist() == [[9, 10, 11, 3], [9, 3, 0, 0]]
    assert corpus.source_ids(np.array([1])) == [[5, 6, 7, 8]]
    assert len(EncodedCorpus(ds)) == 3


def packed_one_by_one(sizes: np.ndarray, budget: int) -> list[int]:
    """The packing rule written as the plain loop over sentences: the oracle for the
    vectorised one."""
    starts, start, longest = [0] if len(sizes) else [], 0, 0
    for i, size in enumerate(sizes):
        longest_with_i = max(longest, size)
        if i > start and longest_with_i * (i - start + 1) > budget:
            starts.append(i)
            start, longest_with_i = i, size
        longest = longest_with_i
    return starts


@pytest.mark.parametrize("budget", [1, 7, 64, 300, 4096])
def test_token_batches_pack_exactly_as_the_sentence_by_sentence_rule(budget):
    rng = np.random.default_rng(budget)
    src, tgt = rng.integers(1, 90, 2000), rng.integers(1, 90, 2000)
    src[::97] = 500  # some longer than small budgets
    candidates = np.flatnonzero(rng.random(2000) < 0.9)
    batches = token_batches(src, tgt, candidates, budget, seed=5, epoch=2)
    # Undo the shuffle of the batches: sorted by their position in the length order.
    rng_check = np.random.default_rng([5, 2])
    tie_break = rng_check.permutation(len(candidates))
    order = candidates[np.lexsort((tie_break, src[candidates], tgt[candidates]))]
    position = {int(index): p for p, index in enumerate(order)}
    starts = sorted(position[int(b[0])] for b in batches)
    sizes = np.maximum(src[order], tgt[order])
    assert starts == packed_one_by_one(sizes, budget)
    for batch in batches:  # each batch is a contiguous run of the length order
        positions = [position[int(i)] for i in batch]
        assert positions == list(range(positions[0], positions[0] + len(batch)))


def test_sentence_batches_cover_every_sentence_within_the_limits():
    lengths = [5, 1, 9, 3, 3, 7, 0, 12, 2]
    batches = list(sentence_batches(lengths, batch_tokens=20, batch_size=3))
    assert sorted(itertools.chain(*batches)) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert max(lengths[i] + 1 for i in batch) * len(batch) <= 20 or len(batch) == 1
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts)  # shortest first
    assert list(sentence_batches([], 10)) == []
    assert list(sentence_batches([50], 10)) == [[0]]  # too long for the budget: alone


def test_padded_prepends_and_appends():
    values, lengths = np.array([4, 5, 6, 7]), np.array([3, 0, 1])
    assert padded(values, lengths, pad=0).tolist() == [[4, 5, 6], [0, 0, 0], [7, 0, 0]]
    assert padded(values, lengths, pad=0, first=2, last=3).tolist() == [
        [2, 4, 5, 6, 3], [2, 3, 0, 0, 0], [2, 7, 3, 0, 0]]
    assert source_batch([[4, 5], []], pad=0, eos=3).tolist() == [[4, 5, 3], [3, 0, 0]]


def test_output_limit_of_a_sentence_depends_on_it_alone():
    src = source_batch([[5] * 3, [5] * 40, [5] * 9], pad=0, eos=3)
    limits = output_limits(src, pad=0, a=1.5, b=2, max_positions=50).tolist()
    assert limits == [int(1.5 * 4 + 2), 49, int(1.5 * 10 + 2)]  # n counts EOS; capped at 49
    for row in range(3):
        alone = source_batch([[5] * [3, 40, 9][row]], pad=0, eos=3)
        assert output_limits(alone, 0, 1.5, 2, 50).tolist() == [limits[row]]


def toy_corpus(n: int = 60, seed: int = 0) -> EncodedCorpus:
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 30, rng.integers(1, 12)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 30, rng.integers(1, 12)).tolist() for _ in range(n)]
    return EncodedCorpus(datasets.Dataset.from_dict({
        "src_ids": src, "tgt_ids": tgt, "src_len": [len(s) for s in src],
        "tgt_len": [len(t) for t in tgt]}))


def steps_from(corpus, epoch, index, count, rank=0, world_size=1, accumulate=1, prefetch=False):
    plan = StepPlan(batch_tokens=60, seed=3, pad=0, bos=2, eos=3, rank=rank,
                    world_size=world_size, accumulate=accumulate)
    stream = training_steps(corpus, plan, epoch, index)
    if prefetch:
        with Prefetcher(stream, depth=2) as ahead:
            return list(itertools.islice(iter(ahead), count))
    return list(itertools.islice(stream, count))


def signature(step) -> tuple:
    return (step.epoch, step.index, step.epoch_batches,
            tuple((b.src.tolist(), b.tgt_in.tolist(), b.tgt_out.tolist(), w)
                  for b, w in step.parts))


def test_training_steps_run_across_epochs_and_resume_where_they_stopped():
    corpus = toy_corpus()
    steps = steps_from(corpus, 0, 0, 40)
    epoch_batches = steps[0].epoch_batches
    assert 5 < epoch_batches < 40  # the 40 steps cross an epoch boundary
    assert [s.epoch for s in steps] == [i // epoch_batches for i in range(40)]
    assert [s.index for s in steps] == [i % epoch_batches for i in range(40)]
    # Without a start, the stream starts at the first step of epoch 0.
    fresh = training_steps(corpus, StepPlan(batch_tokens=60, seed=3, pad=0, bos=2, eos=3))
    assert [signature(s) for s in itertools.islice(fresh, 3)] == [signature(s) for s in steps[:3]]
    # Each epoch covers the corpus once.
    first_epoch = [s for s in steps if s.epoch == 0]
    assert sum(len(s.src_lengths) for s in first_epoch) == len(corpus)
    # Resuming at any position gives the steps the stream would have given from there.
    for at in (3, epoch_batches - 1, epoch_batches, epoch_batches + 2):
        resumed = steps_from(corpus, steps[at].epoch, steps[at].index, 40 - at)
        assert [signature(s) for s in resumed] == [signature(s) for s in steps[at:]]


def test_ranks_and_passes_split_each_global_batch_between_them():
    corpus = toy_corpus()
    whole = steps_from(corpus, 0, 0, 12)
    shares = [steps_from(corpus, 0, 0, 12, rank=r, world_size=2, accumulate=2) for r in (0, 1)]
    for i, step in enumerate(whole):
        rows = [b.src.tolist() for b, _ in step.parts][0]
        parts = [p for share in shares for p in share[i].parts]
        assert len(parts) == 4
        real = [row for b, w in parts if w > 0 for row in b.src.tolist()]
        # The four slices hold the global batch's sentences once each (padding aside).
        strip = lambda row: [t for t in row if t != 0]  # noqa: E731
        assert sorted(map(strip, real)) == sorted(map(strip, rows))
        assert all(np.array_equal(share[i].src_lengths, step.src_lengths) for share in shares)


def test_prefetcher_yields_exactly_the_plain_steps():
    corpus = toy_corpus()
    plain = steps_from(corpus, 0, 0, 30)
    ahead = steps_from(corpus, 0, 0, 30, prefetch=True)
    assert [signature(s) for s in ahead] == [signature(s) for s in plain]
    at = plain[0].epoch_batches - 2  # a resume just before an epoch boundary
    resumed = steps_from(corpus, plain[at].epoch, plain[at].index, 10, prefetch=True)
    assert [signature(s) for s in resumed] == [signature(s) for s in plain[at:at + 10]]


def test_prefetcher_passes_errors_on_and_stops_its_thread():
    def failing():
        yield "first"
        raise ValueError("bad row")

    with Prefetcher(failing()) as ahead:
        items = iter(ahead)
        assert next(items) == "first"
        with pytest.raises(ValueError, match="bad row"):
            next(items)
    endless = Prefetcher(itertools.count(), depth=1)
    assert next(iter(endless)) == 0
    endless.close()
    assert not endless._thread.is_alive()


# --- what the stream and the batches promise, case by case --------------------------------------


def test_batch_to_moves_every_tensor_and_keeps_the_counts():
    batch = collate([[5, 6], [7]], [[8], [9, 10]], pad=0, bos=2, eos=3)
    moved = batch.to(torch.device("meta"))
    assert [t.device.type for t in (moved.src, moved.tgt_in, moved.tgt_out)] == ["meta"] * 3
    assert [t.shape for t in (moved.src, moved.tgt_in, moved.tgt_out)] == \
        [t.shape for t in (batch.src, batch.tgt_in, batch.tgt_out)]
    assert moved.num_tgt_tokens == 5 and int((batch.src != 0).sum()) == 5


def test_encoded_corpus_source_side_boundary_texts_and_decoder_input():
    ds = datasets.Dataset.from_dict({
        "src_ids": [[5, 6, 7], [5, 6, 7, 8]], "tgt_ids": [[9], [9]], "src_len": [3, 4],
        "tgt_len": [1, 1], "src": ["a b c", "a b c d"], "tgt": ["x", "y"]})
    corpus = EncodedCorpus(ds, max_len=4)  # 3 ids + EOS fit, 4 + EOS do not
    assert corpus.usable.tolist() == [0]
    assert corpus.texts(np.array([1, 0]), "tgt") == ["y", "x"]
    assert corpus.texts(np.array([1]), "src") == ["a b c d"]
    batch = corpus.batch(np.array([0, 1]), pad=0, bos=2, eos=3)
    assert batch.tgt_in.tolist() == [[2, 9], [2, 9]]


@pytest.mark.parametrize("budget", [1, 3, 10, 64])
def test_token_batches_pack_runs_of_the_shortest_sentences(budget):
    """Sentences of one token (EOS alone counts one) and two: the packing must not stop early
    where a batch could hold more than budget // 2 of them."""
    sizes = np.array([1] * 40 + [2] * 40)
    batches = token_batches(sizes, sizes, np.arange(80), budget, 0, 0)
    starts = packed_one_by_one(sizes, budget) + [80]
    expected = [(end - start, int(sizes[start:end].max()))
                for start, end in zip(starts, starts[1:])]
    assert sorted((len(b), int(sizes[b].max())) for b in batches) == sorted(expected)


def batched_one_by_one(lengths: list[int], batch_tokens: int, batch_size: int) -> list[list[int]]:
    """sentence_batches' rule as a plain loop: shortest first, a batch takes the next sentence
    while (longest + EOS) x count stays within batch_tokens and count within batch_size."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        candidate = batches[-1] + [i] if batches else [i]
        fits = max(lengths[j] + 1 for j in candidate) * len(candidate) <= batch_tokens
        if batches and fits and (not batch_size or len(candidate) <= batch_size):
            batches[-1] = candidate
        else:
            batches.append([i])
    return batches


@pytest.mark.parametrize(("batch_tokens", "batch_size"), [(1, 0), (12, 0), (12, 2), (40, 0),
                                                          (40, 3), (1000, 0), (1000, 7)])
def test_sentence_batches_follow_the_rule_exactly(batch_tokens, batch_size):
    rng = np.random.default_rng(batch_tokens + batch_size)
    lengths = rng.integers(0, 12, 50).tolist()
    assert list(sentence_batches(lengths, batch_tokens, batch_size)) == \
        batched_one_by_one(lengths, batch_tokens, batch_size)
    if batch_size == 0:  # without a size limit, only the token budget cuts
        assert list(sentence_batches(lengths, batch_tokens)) == \
            batched_one_by_one(lengths, batch_tokens, 0)
    assert list(sentence_batches([3, 3], 8)) == [[0, 1]]  # 4 x 2 = 8: exactly at the budget


def test_a_slice_left_empty_is_a_zero_weight_pass_over_one_sentence():
    corpus = toy_corpus(n=5)
    # A budget so small that every global batch is one sentence: with two ranks and two
    # passes each, three of the four slices are empty.
    plans = [StepPlan(batch_tokens=1, seed=3, pad=0, bos=2, eos=3, rank=rank, world_size=2,
                      accumulate=2) for rank in (0, 1)]
    steps = [list(itertools.islice(training_steps(corpus, plan), 5)) for plan in plans]
    for first, second in zip(*steps):
        (real, one), (filler, zero) = first.parts
        assert (one, zero) == (1.0, 0.0)
        assert [w for _, w in second.parts] == [0.0, 0.0]
        for batch in (filler, *(b for b, _ in second.parts)):
            assert batch.src.tolist() == real.src.tolist()  # the batch's first sentence
        assert real.tgt_in[0, 0] == 2 and 3 in real.tgt_out[0].tolist()
        index = first.src_lengths  # the global batch's lengths, the same on every rank
        assert np.array_equal(second.src_lengths, index)
        assert len(first.tgt_lengths) == 1 and first.tgt_lengths[0] == real.num_tgt_tokens


def test_prefetcher_ends_with_its_iterator_and_stays_depth_steps_ahead():
    assert list(Prefetcher(iter(range(7)))) == list(range(7))
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    for depth in (1, 2):
        pulled.clear()
        ahead = Prefetcher(source(), depth=depth)
        # Item depth + 1 can be pulled only once item 0 was consumed (the queue holds `depth`);
        # when putting it times out, the producer holds it and pulls no further until the
        # consumer makes room: that is the moment to count.
        full = threading.Event()
        put = ahead._queue.put

        def put_or_see_full(item, timeout=None, put=put, full=full, held=depth + 1):
            try:
                put(item, timeout=timeout)
            except queue.Full:
                if item == held:
                    full.set()
                raise

        ahead._queue.put = put_or_see_full
        items = iter(ahead)
        assert next(items) == 0
        assert full.wait(timeout=120)  # a safety net: it happens within milliseconds
        # The one consumed, `depth` waiting in the queue, one more waiting to get in.
        assert len(pulled) == depth + 2
        ahead.close()
        assert not ahead._thread.is_alive()
    assert Prefetcher(iter(()), depth=2)._queue.maxsize == 2
    assert Prefetcher(iter(()))._queue.maxsize == 2  # two steps ahead unless told otherwise


def test_prefetcher_with_a_slow_consumer_loses_nothing():
    """The producer waits for room however long the consumer takes (here, once, longer than
    the producer's own polling interval)."""
    out: list[int] = []

    def consume():
        for item in Prefetcher(iter(range(30)), depth=1):
            out.append(item)
            time.sleep(0.3 if item == 3 else 0.005)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=30)
    assert out == list(range(30))


def test_a_filler_pass_holds_one_sentence_even_when_the_global_batch_has_more():
    ds = datasets.Dataset.from_dict({"src_ids": [[5, 6]] * 6, "tgt_ids": [[7, 8]] * 6,
                                     "src_len": [2] * 6, "tgt_len": [2] * 6})
    # Three sentences of 3 tokens (EOS included) per global batch, cut into 2 x 2 slices:
    # one slice stays empty.
    plan = StepPlan(batch_tokens=9, seed=0, pad=0, bos=2, eos=3, rank=1, world_size=2,
                    accumulate=2)
    step = next(training_steps(EncodedCorpus(ds), plan))
    assert len(step.src_lengths) == 3
    (real, one), (filler, zero) = step.parts
    assert (one, zero) == (1.0, 0.0)
    assert real.src.shape[0] == 1 and filler.src.shape[0] == 1


# --- lengths rounded for a compiled model ------------------------------------------------------


def test_rounded_lengths_pad_to_the_multiple_and_change_no_real_position():
    from traduire.batch import round_lengths
    from traduire.loss import token_cross_entropy
    from traduire.model import Transformer, TransformerShape

    pad, bos, eos = 0, 2, 3
    batch = collate([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]], [[5, 6], [7, 8, 9, 10]],
                    pad=pad, bos=bos, eos=eos)
    rounded = round_lengths(batch, 8, pad)
    assert rounded.src.shape == (2, 16) and rounded.tgt_in.shape == rounded.tgt_out.shape == (2, 8)
    assert rounded.num_tgt_tokens == batch.num_tgt_tokens
    for before, after in ((batch.src, rounded.src), (batch.tgt_in, rounded.tgt_in),
                          (batch.tgt_out, rounded.tgt_out)):
        assert torch.equal(after[:, :before.size(1)], before)
        assert torch.all(after[:, before.size(1):] == pad)
    assert round_lengths(rounded, 8, pad).src is rounded.src  # already a multiple: as it was
    torch.manual_seed(0)
    model = Transformer(TransformerShape(20, 20, d_model=16, heads=2, ffn_dim=32,
                                         encoder_layers=1, decoder_layers=1, pad_id=pad)).eval()
    with torch.no_grad():
        want, got = model(batch.src, batch.tgt_in), model(rounded.src, rounded.tgt_in)
        torch.testing.assert_close(got[:, :batch.tgt_in.size(1)], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(token_cross_entropy(got, rounded.tgt_out, pad),
                                   token_cross_entropy(want, batch.tgt_out, pad), atol=1e-5,
                                   rtol=1e-6)


def test_rounded_steps_round_every_pass_of_every_step():
    from traduire.batch import rounded_steps

    corpus = toy_corpus()
    rounded = list(itertools.islice(rounded_steps(iter(steps_from(corpus, 0, 0, 6,
                                                                  accumulate=2)), 4, 0), 6))
    widths = set()
    for step, plain in zip(rounded, steps_from(corpus, 0, 0, 6, accumulate=2)):
        assert len(step.parts) == 2
        for (batch, weight), (before, plain_weight) in zip(step.parts, plain.parts):
            assert batch.src.size(1) % 4 == 0 and batch.tgt_in.size(1) % 4 == 0
            assert torch.equal(batch.src[:, :before.src.size(1)], before.src)
            assert weight == plain_weight
            widths.add(before.src.size(1))
    assert len(widths) > 1  # the plain lengths varied


# --- the corpus on disk, and the next epoch planned ahead --------------------------------------


def test_the_next_epoch_is_planned_in_the_background_while_this_one_trains(monkeypatch):
    import traduire.batch as batch_module

    corpus = toy_corpus()
    planned: list[tuple[int, str]] = []
    original = batch_module.token_batches

    def recording(*args):
        planned.append((args[-1], threading.current_thread().name))
        return original(*args)

    monkeypatch.setattr(batch_module, "token_batches", recording)
    plan = StepPlan(batch_tokens=60, seed=3, pad=0, bos=2, eos=3)
    stream = training_steps(corpus, plan)
    first = next(stream)
    halfway = first.epoch_batches // 2
    assert halfway >= 2
    # Epoch 1 is planned from halfway through epoch 0, by another thread.
    before = [first, *itertools.islice(stream, halfway - 1)]  # steps 0 .. halfway - 1
    assert planned == [(0, threading.current_thread().name)]
    before.append(next(stream))  # step halfway: the plan of epoch 1 has begun
    deadline = time.monotonic() + 10
    while len(planned) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert planned == [(0, threading.current_thread().name), (1, "traduire-plan")]
    steps = [*before, *itertools.islice(stream, 2 * first.epoch_batches - halfway)]
    monkeypatch.undo()
    # The same steps as the plan made in turn: (epoch, batch) in order, the same sentences.
    for step in steps:
        want = original(corpus.src_lens, corpus.tgt_lens, corpus.usable, 60, 3, step.epoch)
        assert np.array_equal(step.src_lengths, corpus.src_lens[want[step.index]])
    assert [s.epoch for s in steps] == [0] * first.epoch_batches + [1] * first.epoch_batches + [2]
    # Epoch 2 planned from halfway through epoch 1; epoch 3 not yet (epoch 2 has just begun).
    assert (2, "traduire-plan") in planned and max(e for e, _ in planned) == 2


def test_a_saved_corpus_opens_as_the_same_batches_with_its_ids_left_on_disk(tmp_path):
    from traduire.batch import save_encoded

    rng = np.random.default_rng(1)
    src = [rng.integers(4, 70_000, rng.integers(0, 12)).tolist() for _ in range(50)]
    tgt = [rng.integers(4, 300, rng.integers(1, 12)).tolist() for _ in range(50)]
    ds = datasets.Dataset.from_dict({"src_ids": src, "tgt_ids": tgt,
                                     "src_len": [len(s) for s in src],
                                     "tgt_len": [len(t) for t in tgt]})
    for vocab, kind in ((70_000, np.int32), (300, np.uint16)):
        saved = ds if vocab > 300 else ds.map(lambda r: {"src_ids": [i % 300 for i in
                                                                     r["src_ids"]]})
        save_encoded(saved, tmp_path / str(vocab), vocab, chunk=7)  # chunks end mid-corpus
        opened = EncodedCorpus.open(tmp_path / str(vocab), max_len=8)
        assert isinstance(opened._src.values, np.memmap) and opened._src.values.dtype == kind
        in_memory = EncodedCorpus(saved, max_len=8)
        assert np.array_equal(opened.usable, in_memory.usable)
        rows = np.array([3, 0, 49, 17, 17])
        for a, b in ((opened.batch(rows, pad=0, bos=2, eos=3),
                      in_memory.batch(rows, pad=0, bos=2, eos=3)),):
            assert torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)
        assert opened.source_ids(rows) == [saved["src_ids"][i] for i in rows]
    with pytest.raises(ValueError, match="without its text"):
        opened.texts(rows, "src")


def test_a_plan_with_sampling_builds_each_pass_from_what_the_sampler_gives():
    """The sampler is asked for each pass's positions in its global batch (every sentence
    once over the ranks and passes), and the batch plan keeps the encoded lengths."""
    corpus = toy_corpus()
    asked = []

    def reversed_ids(epoch, index, global_batch, where):
        asked.append((epoch, index, tuple(global_batch[where])))
        rows = global_batch[where]
        return ([s[::-1] for s in corpus.source_ids(rows)],
                [t[::-1] for t in corpus.target_ids(rows)])

    plain = steps_from(corpus, 0, 0, 3)
    for rank in (0, 1):
        plan = StepPlan(batch_tokens=60, seed=3, pad=0, bos=2, eos=3, rank=rank, world_size=2,
                        sample=reversed_ids)
        for step, same in zip(itertools.islice(training_steps(corpus, plan), 3), plain):
            assert np.array_equal(step.src_lengths, same.src_lengths)
            batch, weight = step.parts[0]
            rows = [[t for t in row if t != 0][:-1] for row in batch.src.tolist()]
            assert rows == [s[::-1] for s in corpus.source_ids(np.array(asked[-1][2]))]
    per_step = {}
    for epoch, index, rows in asked:
        per_step.setdefault((epoch, index), []).extend(rows)
    for (epoch, index), rows in per_step.items():
        assert sorted(rows) == sorted(int(i) for i in
                                      token_batches(corpus.src_lens, corpus.tgt_lens,
                                                    corpus.usable, 60, 3, epoch)[index])
