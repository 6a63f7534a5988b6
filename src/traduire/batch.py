"""Batches: the one place that turns sentences into the padded tensors the model sees.

  token_batches     an epoch of training batches under a token budget, in a seeded order
  sentence_batches  translation batches of similar source lengths
  EncodedCorpus     the encoded training or validation pairs, gathered into Batches
  save_encoded      an encoded Dataset written as the arrays EncodedCorpus.open maps
  collate           token-id lists into a training Batch
  source_batch      token-id lists into a padded source tensor
  output_limits     how many tokens each sentence's translation may have

Conventions: a source is its ids then EOS; the decoder reads BOS then the target ids and
predicts the target ids then EOS. Padding is on the right.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
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


def round_lengths(batch: Batch, multiple: int, pad: int) -> Batch:
    """`batch` with its source and target lengths padded up to a multiple of `multiple`, so
    that a compiled model sees a few lengths again and again (and matrix products get sizes
    the hardware likes). Every real position computes what it did: source padding is masked,
    target padding is ignored by the loss and never seen by a real position (attention in the
    decoder is causal)."""
    def grown(t: torch.Tensor) -> torch.Tensor:
        extra = -t.size(1) % multiple
        return torch.nn.functional.pad(t, (0, extra), value=pad) if extra else t

    return Batch(grown(batch.src), grown(batch.tgt_in), grown(batch.tgt_out),
                 batch.num_tgt_tokens)


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


ENCODED_LAYOUT = 2  # of encoded/<split>/: ids and lengths in arrays of their own
LAYOUT_FILE = "layout.json"


class FlatIds:
    """Token-id rows stored flat: every row's ids one after another (`values`) and where each
    row starts (`offsets`, one more than the rows). Both may be memory-mapped files: gathering
    rows reads the pages that hold them, and no others."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets

    @classmethod
    def from_lists(cls, column: pa.ChunkedArray | pa.Array) -> FlatIds:
        """From an Arrow column of id lists (a Dataset's src_ids)."""
        lengths = np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False),
                             dtype=np.int64)
        values = np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False))
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `rows`, flat (int64), and their lengths."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self.offsets[rows], dtype=np.int64)
        lengths = np.asarray(self.offsets[rows + 1], dtype=np.int64) - starts
        where = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        where += np.arange(int(lengths.sum()), dtype=np.int64)
        return np.asarray(self.values[where], dtype=np.int64), lengths


class EncodedCorpus:
    """Encoded sentence pairs as the batcher and the trainer see them: the lengths as numpy
    arrays, batches gathered from the flat ids. Made from a Dataset (columns src_ids, tgt_ids,
    src_len, tgt_len, and the text in src, tgt where there is one), or opened from a
    directory that `save_encoded` wrote: then the ids stay on disk, memory-mapped, and opening
    reads the lengths alone (4 bytes a pair), never the text: the text of reports (BLEU on the
    validation set) comes from `texts`, a Dataset read when first asked for."""

    def __init__(self, dataset: datasets.Dataset, max_len: int | None = None) -> None:
        table = dataset.with_format("arrow")
        self._setup(FlatIds.from_lists(table["src_ids"]), FlatIds.from_lists(table["tgt_ids"]),
                    table["src_len"].to_numpy(), table["tgt_len"].to_numpy(), max_len,
                    dataset if "tgt" in dataset.column_names else None)

    @classmethod
    def open(cls, directory: Path, max_len: int | None = None,
             texts: Path | None = None) -> EncodedCorpus:
        """The corpus `save_encoded` wrote into `directory`; `texts`: the saved Dataset of its
        pairs' text (the data stage's output), read only by `texts()`."""
        directory = Path(directory)
        corpus = cls.__new__(cls)

        def array(name: str) -> np.ndarray:
            return np.load(directory / f"{name}.npy", mmap_mode="r")

        lengths = np.load(directory / "lengths.npy")
        corpus._setup(FlatIds(array("src_ids"), array("src_offsets")),
                      FlatIds(array("tgt_ids"), array("tgt_offsets")), lengths[0], lengths[1],
                      max_len, texts)
        return corpus

    def _setup(self, src: FlatIds, tgt: FlatIds, src_len: np.ndarray, tgt_len: np.ndarray,
               max_len: int | None, texts: datasets.Dataset | Path | None) -> None:
        self._src, self._tgt, self._texts = src, tgt, texts
        # +1: the EOS appended to the source and to the target (or BOS prepended to its input).
        # 32-bit lengths and indices: at tens of millions of pairs these arrays, and the epoch
        # plan's copies of them, are most of what a rank holds beyond the model.
        self.src_lens = np.asarray(src_len, dtype=np.int32) + 1
        self.tgt_lens = np.asarray(tgt_len, dtype=np.int32) + 1
        index = index_dtype(len(self.src_lens))
        self.usable = np.arange(len(self.src_lens), dtype=index)
        if max_len is not None:
            self.usable = np.flatnonzero((self.src_lens <= max_len)
                                         & (self.tgt_lens <= max_len)).astype(index)

    def __len__(self) -> int:
        return len(self.usable)

    def batch(self, indices: np.ndarray, *, pad: int, bos: int, eos: int) -> Batch:
        """The pairs at `indices`, padded into a Batch."""
        return _batch(*self._src.gather(indices), *self._tgt.gather(indices), pad, bos, eos)

    def source_ids(self, indices: np.ndarray) -> list[list[int]]:
        return _rows(*self._src.gather(indices))

    def target_ids(self, indices: np.ndarray) -> list[list[int]]:
        return _rows(*self._tgt.gather(indices))

    def texts(self, indices: np.ndarray, column: str) -> list[str]:
        """The original text ("src" or "tgt") of some pairs."""
        if self._texts is None:
            raise ValueError("this corpus was opened without its text")
        if not isinstance(self._texts, datasets.Dataset):
            self._texts = datasets.load_from_disk(str(self._texts))
        return self._texts.select_columns([column])[np.asarray(indices).tolist()][column]


def _rows(values: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    if not len(lengths):
        return []
    return [row.tolist() for row in np.split(values, np.cumsum(lengths)[:-1])]


def is_encoded(directory: Path) -> bool:
    """Whether `directory` holds a corpus in the layout EncodedCorpus.open reads."""
    try:
        layout = json.loads((Path(directory) / LAYOUT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(layout, dict) and layout.get("layout") == ENCODED_LAYOUT


def save_encoded(dataset: datasets.Dataset, directory: Path, vocab_size: int,
                 chunk: int = 200_000) -> None:
    """Write an encoded Dataset (src_ids, tgt_ids, src_len, tgt_len) into `directory` (new or
    empty) as the arrays EncodedCorpus.open maps: the ids of each side flat (uint16 where the
    vocabulary allows: half the pages of int32), where each row starts, and the lengths, a
    chunk of rows at a time so memory stays bounded whatever the corpus size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = dataset.with_format("arrow")
    n = len(dataset)
    lengths = np.stack([np.asarray(table["src_len"].to_numpy(), dtype=np.int64),
                        np.asarray(table["tgt_len"].to_numpy(), dtype=np.int64)]
                       ) if n else np.zeros((2, 0), dtype=np.int64)
    small = lengths.max(initial=0) < np.iinfo(np.uint16).max
    np.save(directory / "lengths.npy", lengths.astype(np.uint16 if small else np.int32))
    id_type = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    for side, row_lengths in (("src", lengths[0]), ("tgt", lengths[1])):
        offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        np.save(directory / f"{side}_offsets.npy", offsets)
        values = np.lib.format.open_memmap(directory / f"{side}_ids.npy", mode="w+",
                                           dtype=id_type, shape=(int(offsets[-1]),))
        for start in range(0, n, chunk):
            rows = table[start:start + chunk][f"{side}_ids"]
            flat = pc.list_flatten(rows).to_numpy(zero_copy_only=False)
            values[offsets[start]:offsets[min(start + chunk, n)]] = flat
        values.flush()
        del values
    (directory / LAYOUT_FILE).write_text(json.dumps({"layout": ENCODED_LAYOUT, "pairs": n})
                                         + "\n", encoding="utf-8")


def index_dtype(n: int) -> type:
    """The integer type of positions among `n` pairs: 32 bits while they fit."""
    return np.int32 if n < 2**31 else np.int64


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, candidates: np.ndarray,
                  batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches of sentence indices, in the order they will be trained on.

    Sentences are sorted by length (ties broken at random) so each batch holds similar lengths
    and little padding; batches are then filled up to `batch_tokens` padded tokens (the longer
    side counts) and shuffled. The order depends only on (seed, epoch), so a resumed or
    differently sharded run sees exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    # permutation(n) in 32 bits: the same shuffle of 0 .. n-1 as rng.permutation(n).
    tie_break = rng.permutation(np.arange(len(candidates), dtype=index_dtype(len(candidates))))
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
    # Built in place: one 64-bit array, however many pairs.
    key = tgt_lens.astype(np.int64)
    key <<= src_bits
    key |= src_lens
    key <<= tie_bits
    key |= tie_break
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
    # Subword sampling (tokenizer.SubwordSampler): (epoch, batch index, global batch, the
    # positions of one pass in it) -> that pass's (source ids, target ids). None: the ids as
    # encoded, the best segmentation.
    sample: Callable[[int, int, np.ndarray, np.ndarray],
                     tuple[list[list[int]], list[list[int]]]] | None = None


def training_steps(data: EncodedCorpus, plan: StepPlan, epoch: int = 0, batch_in_epoch: int = 0
                   ) -> Iterator[PlannedStep]:
    """The training steps from (epoch, batch_in_epoch) on, for ever.

    Each global batch is cut into world_size * accumulate contiguous slices of near-equal
    sentence count; rank r trains on slices r*accumulate .. (r+1)*accumulate - 1, one pass
    each. A slice left empty by a tiny batch becomes a zero-weight pass over one sentence, so
    that every rank still joins the gradient all-reduce.

    The next epoch's batches are planned in a background thread while this epoch trains
    (seconds at tens of millions of pairs, which would otherwise stall the step at the epoch
    boundary), from halfway through this one: started at the boundary itself, its work (a sort
    of every pair's length, then the packing) would slow the steps just after it, on a CPU
    whose cores compute the step and with Python's interpreter lock shared; from halfway it
    has half an epoch to finish. The plan depends on (seed, epoch) alone, so it is the same
    plan."""

    def planned(epoch: int) -> list[np.ndarray]:
        return token_batches(data.src_lens, data.tgt_lens, data.usable, plan.batch_tokens,
                             plan.seed, epoch)

    batches = planned(epoch)
    while True:
        halfway = max(batch_in_epoch, len(batches) // 2)
        upcoming = None
        for index in range(batch_in_epoch, len(batches)):
            if index == halfway:
                upcoming = _Ahead(lambda epoch=epoch: planned(epoch + 1))
            global_batch = batches[index]
            slices = np.array_split(np.arange(len(global_batch)),
                                    plan.world_size * plan.accumulate)
            parts = []
            for where in slices[plan.rank * plan.accumulate:(plan.rank + 1) * plan.accumulate]:
                weight = 1.0 if len(where) else 0.0
                where = where if len(where) else np.zeros(1, dtype=np.int64)
                if plan.sample is None:
                    batch = data.batch(global_batch[where], pad=plan.pad, bos=plan.bos,
                                       eos=plan.eos)
                else:
                    batch = collate(*plan.sample(epoch, index, global_batch, where),
                                    pad=plan.pad, bos=plan.bos, eos=plan.eos)
                parts.append((batch, weight))
            yield PlannedStep(epoch, index, len(batches), parts, data.src_lens[global_batch],
                              data.tgt_lens[global_batch])
        batches = upcoming.result() if upcoming else planned(epoch + 1)
        epoch, batch_in_epoch = epoch + 1, 0


def rounded_steps(steps: Iterator[PlannedStep], multiple: int, pad: int
                  ) -> Iterator[PlannedStep]:
    """`steps` with every pass's lengths rounded up to a multiple (see round_lengths)."""
    for step in steps:
        step.parts = [(round_lengths(batch, multiple, pad), weight) for batch, weight in step.parts]
        yield step


class _Ahead:
    """The result of `work`, computed in a daemon thread from now on (or at once, without
    `background`), waited for by `result`."""

    def __init__(self, work: Callable[[], Any], background: bool = True) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True,
                                        name="traduire-plan")
        if background:
            self._thread.start()
        else:
            self._run(work)
            self._thread = None

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._value = work()
        except BaseException as e:  # raised again where the result is wanted
            self._error = e

    def result(self) -> Any:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


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
