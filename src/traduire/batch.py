"""Batches: the one place that turns sentences into the padded tensors the model sees.

  token_batches     an epoch of training batches under a token budget, in a seeded order
  sentence_batches  translation batches of similar source lengths
  EncodedCorpus     the encoded training or validation pairs, gathered into Batches
  collate           token-id lists into a training Batch
  source_batch      token-id lists into a padded source tensor
  output_limits     how many tokens each sentence's translation may have

Conventions: a source is its ids then EOS; the decoder reads BOS then the target ids and
predicts the target ids then EOS. Padding is on the right.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow.compute as pc
import torch


@dataclass
class Batch:
    src: torch.Tensor  # (batch, src_len): ids + EOS, right-padded
    tgt_in: torch.Tensor  # (batch, tgt_len): BOS + ids
    tgt_out: torch.Tensor  # (batch, tgt_len): ids + EOS, the prediction targets
    num_tgt_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device, non_blocking=True),
                     self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True), self.num_tgt_tokens)

    def pin_memory(self) -> Batch:
        return Batch(self.src.pin_memory(), self.tgt_in.pin_memory(), self.tgt_out.pin_memory(),
                     self.num_tgt_tokens)


# --- Padding -----------------------------------------------------------------------------------


def padded(values: np.ndarray, lengths: np.ndarray, pad: int, first: int | None = None,
           last: int | None = None) -> torch.Tensor:
    """Rows of ids given flat (`values`, the rows one after another, and their `lengths`) as a
    right-padded (rows, longest) tensor, with `first` prepended and `last` appended to each row.
    One vectorised scatter, not a copy per sentence."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows, offset = len(lengths), int(first is not None)
    width = int(lengths.max(initial=0)) + offset + int(last is not None)
    out = np.full((rows, width), pad, dtype=np.int64)
    row_of = np.repeat(np.arange(rows), lengths)
    column = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row_of, column + offset] = values
    if first is not None:
        out[:, 0] = first
    if last is not None:
        out[np.arange(rows), lengths + offset] = last
    return torch.from_numpy(out)


def _flat(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    values = np.fromiter((t for s in sequences for t in s), dtype=np.int64,
                         count=int(lengths.sum()))
    return values, lengths


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], *, pad: int,
            bos: int, eos: int) -> Batch:
    """Encoded pairs as the tensors the model trains on."""
    src_values, src_lengths = _flat(src_ids)
    tgt_values, tgt_lengths = _flat(tgt_ids)
    return _batch(src_values, src_lengths, tgt_values, tgt_lengths, pad, bos, eos)


def _batch(src_values: np.ndarray, src_lengths: np.ndarray, tgt_values: np.ndarray,
           tgt_lengths: np.ndarray, pad: int, bos: int, eos: int) -> Batch:
    return Batch(padded(src_values, src_lengths, pad, last=eos),
                 padded(tgt_values, tgt_lengths, pad, first=bos),
                 padded(tgt_values, tgt_lengths, pad, last=eos),
                 num_tgt_tokens=int(tgt_lengths.sum()) + len(tgt_lengths))


def source_batch(src_ids: Sequence[Sequence[int]], *, pad: int, eos: int) -> torch.Tensor:
    """Encoded source sentences as a padded (batch, longest + 1) tensor, EOS after each."""
    return padded(*_flat(src_ids), pad, last=eos)


def output_limits(src: torch.Tensor, pad: int, a: float, b: int, max_positions: int
                  ) -> torch.Tensor:
    """Per sentence of a padded source batch, the most tokens its translation may have before
    EOS: int(a * n + b), n counting the sentence's source tokens and its EOS, and never more
    than the model's positions hold (BOS + tokens). A sentence's limit depends on itself and
    the options only, never on the batch it is in."""
    limit = max_positions - 1
    lengths = [min(int(a * n + b), limit) for n in (src != pad).sum(1).tolist()]
    return torch.tensor(lengths, device=src.device)


# --- Training batches --------------------------------------------------------------------------


class EncodedCorpus:
    """Encoded sentence pairs (columns src_ids, tgt_ids, src_len, tgt_len, and the text in src,
    tgt) as the batcher and the trainer see them: lengths as numpy arrays, batches gathered
    straight from the Arrow table."""

    def __init__(self, dataset: datasets.Dataset, max_len: int | None = None) -> None:
        table = dataset.with_format("arrow")
        # +1: the EOS appended to the source and to the target (or BOS prepended to its input).
        self.src_lens = np.asarray(table["src_len"].to_numpy(), dtype=np.int64) + 1
        self.tgt_lens = np.asarray(table["tgt_len"].to_numpy(), dtype=np.int64) + 1
        self.dataset = dataset
        self._ids = dataset.select_columns(["src_ids", "tgt_ids"]).with_format("arrow")
        self.usable = np.arange(len(dataset))
        if max_len is not None:
            self.usable = np.flatnonzero((self.src_lens <= max_len) & (self.tgt_lens <= max_len))

    def __len__(self) -> int:
        return len(self.usable)

    def batch(self, indices: np.ndarray, *, pad: int, bos: int, eos: int) -> Batch:
        """The pairs at `indices`, padded into a Batch."""
        rows = self._ids[np.asarray(indices).tolist()]
        src, tgt = rows.column("src_ids"), rows.column("tgt_ids")
        return _batch(pc.list_flatten(src).to_numpy(), pc.list_value_length(src).to_numpy(),
                      pc.list_flatten(tgt).to_numpy(), pc.list_value_length(tgt).to_numpy(),
                      pad, bos, eos)

    def source_ids(self, indices: np.ndarray) -> list[list[int]]:
        return self._ids[np.asarray(indices).tolist()].column("src_ids").to_pylist()

    def texts(self, indices: np.ndarray, column: str) -> list[str]:
        """The original text ("src" or "tgt") of some pairs."""
        return self.dataset.select_columns([column])[np.asarray(indices).tolist()][column]


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, candidates: np.ndarray,
                  batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches of sentence indices, in the order they will be trained on.

    Sentences are sorted by length (ties broken at random) so each batch holds similar lengths
    and little padding; batches are then filled up to `batch_tokens` padded tokens (the longer
    side counts) and shuffled. The order depends only on (seed, epoch), so a resumed or
    differently sharded run sees exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    tie_break = rng.permutation(len(candidates))
    order = candidates[length_order(src_lens[candidates], tgt_lens[candidates], tie_break)]
    sizes = np.maximum(src_lens[order], tgt_lens[order])
    batches = np.split(order, _batch_starts(sizes, batch_tokens)[1:]) if len(order) else []
    return [batches[i] for i in rng.permutation(len(batches))]


def length_order(src_lens: np.ndarray, tgt_lens: np.ndarray, tie_break: np.ndarray
                 ) -> np.ndarray:
    """The positions that sort the pairs by target length, then source length, then
    `tie_break` (a permutation of the positions): np.lexsort((tie_break, src_lens, tgt_lens)).

    Where the three fit in 63 bits (lengths in the thousands, billions of pairs), they are
    packed into one integer key and sorted once: on 4M pairs 0.3 s instead of the 3 s of a
    three-key lexsort. The keys are distinct, so any sort algorithm gives this one order."""
    n = len(tie_break)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    tie_bits = int(n - 1).bit_length()
    src_bits = int(src_lens.max()).bit_length()
    tgt_bits = int(tgt_lens.max()).bit_length()
    if tie_bits + src_bits + tgt_bits > 63 or min(src_lens.min(), tgt_lens.min()) < 0:
        return np.lexsort((tie_break, src_lens, tgt_lens))
    key = ((tgt_lens.astype(np.int64) << (src_bits + tie_bits))
           | (src_lens.astype(np.int64) << tie_bits) | tie_break)
    return np.argsort(key)


def _batch_starts(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Where each batch starts when `sizes` are packed in order, greedily: a batch takes the
    next sentence while (its longest sentence) x (its sentence count) stays within `budget`;
    a sentence longer than the budget is a batch of its own.

    A loop per batch, vectorised within: a batch starting at sentence s holds at most
    budget // sizes[s] sentences, so its end lies in the window after s of that length."""
    starts, start, n = [], 0, len(sizes)
    while start < n:
        starts.append(start)
        window = sizes[start:start + max(1, budget // max(int(sizes[start]), 1)) + 1]
        cost = np.maximum.accumulate(window) * np.arange(1, len(window) + 1)
        over = np.flatnonzero(cost[1:] > budget)
        start += int(over[0]) + 1 if len(over) else len(window)
    return np.asarray(starts, dtype=np.int64)


# --- Translation batches -----------------------------------------------------------------------


def sentence_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int = 0
                     ) -> Iterator[list[int]]:
    """Positions of sentences grouped by length (shortest first), so little of each batch is
    padding: at most `batch_tokens` padded source tokens (EOS included) and, if set, at most
    `batch_size` sentences per batch."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batch: list[int] = []
    longest = 0
    for i in order:
        size = lengths[i] + 1
        too_many = batch_size and len(batch) >= batch_size
        if batch and (too_many or max(longest, size) * (len(batch) + 1) > batch_tokens):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, size)
    if batch:
        yield batch


# --- The stream of training steps --------------------------------------------------------------


@dataclass
class PlannedStep:
    """One optimizer step: where it is in the epochs, and this rank's share of its batch."""

    epoch: int
    index: int  # position of the global batch in its epoch
    epoch_batches: int
    parts: list[tuple[Batch, float]]  # this rank's passes and their weights (0: a filler)
    src_lengths: np.ndarray  # of every sentence of the global batch (EOS included)
    tgt_lengths: np.ndarray


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """What fixes one rank's stream of training steps, whichever step it starts at: the token
    budget and seed that order each epoch's batches, this rank's share of every batch (its
    slices of world_size * accumulate), and the special ids that pad and frame the sentences."""

    batch_tokens: int
    seed: int
    pad: int
    bos: int
    eos: int
    rank: int = 0
    world_size: int = 1
    accumulate: int = 1


def training_steps(data: EncodedCorpus, plan: StepPlan, epoch: int = 0, batch_in_epoch: int = 0
                   ) -> Iterator[PlannedStep]:
    """The training steps from (epoch, batch_in_epoch) on, for ever.

    Each global batch is cut into world_size * accumulate contiguous slices of near-equal
    sentence count; rank r trains on slices r*accumulate .. (r+1)*accumulate - 1, one pass
    each. A slice left empty by a tiny batch becomes a zero-weight pass over one sentence, so
    that every rank still joins the gradient all-reduce."""
    while True:
        batches = token_batches(data.src_lens, data.tgt_lens, data.usable, plan.batch_tokens,
                                plan.seed, epoch)
        for index in range(batch_in_epoch, len(batches)):
            global_batch = batches[index]
            slices = np.array_split(global_batch, plan.world_size * plan.accumulate)
            parts = []
            for part in slices[plan.rank * plan.accumulate:(plan.rank + 1) * plan.accumulate]:
                weight = 1.0 if len(part) else 0.0
                part = part if len(part) else global_batch[:1]
                parts.append((data.batch(part, pad=plan.pad, bos=plan.bos, eos=plan.eos), weight))
            yield PlannedStep(epoch, index, len(batches), parts, data.src_lens[global_batch],
                              data.tgt_lens[global_batch])
        epoch, batch_in_epoch = epoch + 1, 0


class Prefetcher:
    """Runs an iterator of training steps in a background thread, `depth` steps ahead, so that
    gathering rows from Arrow, padding and pinning the next batch happen while the GPU computes
    the current step (the trainer uses it on GPUs only). Yields exactly what the iterator
    yields, in the same order."""

    _END = object()

    def __init__(self, steps: Iterator[PlannedStep], depth: int = 2, pin: bool = False) -> None:
        self._steps, self._pin = steps, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True,
                                        name="traduire-prefetch")
        self._started = False

    def _produce(self) -> None:
        try:
            for step in self._steps:
                if self._pin:
                    step.parts = [(batch.pin_memory(), weight) for batch, weight in step.parts]
                if not self._put(step):
                    return
        except BaseException as e:  # raised again in the consumer
            self._put(e)
            return
        self._put(self._END)

    def _put(self, item: object) -> bool:
        """Queue `item`, waiting for room; False if the consumer has gone."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[PlannedStep]:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=5)
