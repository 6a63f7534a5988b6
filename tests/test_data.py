"""Tests for traduire.data: loading aligned corpora, cleaning, and token-budgeted batching."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from traduire.config import DataConfig
from traduire.data import (
    EncodedCorpus,
    clean,
    collate,
    load_corpus,
    pad_sequences,
    split_batch,
    token_batches,
)
from traduire.errors import DataError

# --- loading -----------------------------------------------------------------------------------


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_load_aligned_text(corpus_dir, tmp_path):
    corpus = load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    assert set(corpus) == {"train", "valid"}
    assert len(corpus["train"]) == 200 and len(corpus["valid"]) == 20
    en = (corpus_dir / "train.en").read_text(encoding="utf-8").splitlines()
    fr = (corpus_dir / "train.fr").read_text(encoding="utf-8").splitlines()
    assert corpus["train"]["src"] == en and corpus["train"]["tgt"] == fr
    # Aligned text also carries a per-pair `invalid` flag (bad UTF-8) for clean() to count.
    assert corpus["train"].column_names[:2] == ["src", "tgt"]
    assert not any(corpus["train"]["invalid"])


def test_languages_and_prefixes_choose_the_files(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write_lines(d / "a.fr", ["le chat", "un chien"])
    write_lines(d / "a.en", ["the cat", "a dog"])
    write_lines(d / "b.fr", ["le cheval"])
    write_lines(d / "b.en", ["the horse"])
    cfg = DataConfig(dir=str(d), src_lang="fr", tgt_lang="en", train_prefix="a",
                     valid_prefix="b")
    corpus = load_corpus(cfg, tmp_path / "cache")
    assert corpus["train"]["src"] == ["le chat", "un chien"]
    assert corpus["train"]["tgt"] == ["the cat", "a dog"]
    assert corpus["valid"]["tgt"] == ["the horse"]


def test_line_count_mismatch_names_both_files_and_counts(corpus_dir, tmp_path):
    lines = (corpus_dir / "train.fr").read_text(encoding="utf-8").splitlines()
    write_lines(corpus_dir / "train.fr", lines[:-3])
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    message = str(info.value)
    assert str(corpus_dir / "train.en") in message and str(corpus_dir / "train.fr") in message
    assert "200" in message and "197" in message


def test_missing_file_is_named(corpus_dir, tmp_path):
    (corpus_dir / "val.fr").unlink()
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    assert str(corpus_dir / "val.fr") in str(info.value)


def write_with_invalid_utf8(corpus_dir):
    """Replace line 3 of train.en by one with a stray byte; return its byte offset."""
    lines = (corpus_dir / "train.en").read_bytes().split(b"\n")
    offset = len(lines[0]) + 1 + len(lines[1]) + 1 + len(b"the ")
    lines[2] = b"the \xff dog"
    (corpus_dir / "train.en").write_bytes(b"\n".join(lines))
    return offset


def test_invalid_utf8_names_file_line_and_byte(corpus_dir, tmp_path):
    offset = write_with_invalid_utf8(corpus_dir)
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    message = str(info.value)
    assert f"{corpus_dir / 'train.en'}:3:" in message
    assert f"byte {offset}" in message
    assert "skip_invalid_utf8" in message


def test_invalid_utf8_line_skipped_on_request(corpus_dir, tmp_path):
    en = (corpus_dir / "train.en").read_text(encoding="utf-8").splitlines()
    fr = (corpus_dir / "train.fr").read_text(encoding="utf-8").splitlines()
    write_with_invalid_utf8(corpus_dir)
    cfg = DataConfig(dir=str(corpus_dir), skip_invalid_utf8=True, dedupe=False)
    corpus = load_corpus(cfg, tmp_path / "cache")
    # Loading marks the pair; cleaning drops it and counts it.
    assert sum(corpus["train"]["invalid"]) == 1
    train, dropped = clean(corpus["train"], cfg)
    assert dropped["invalid_utf8"] == 1
    assert len(train) + sum(dropped.values()) == 200
    # The pair is gone from both sides and the others stay aligned.
    assert train["src"] == en[:2] + en[3:]
    assert train["tgt"] == fr[:2] + fr[3:]


def test_invalid_utf8_in_target_file_also_skips_the_pair(corpus_dir, tmp_path):
    fr = (corpus_dir / "val.fr").read_bytes().split(b"\n")
    fr[0] = b"\xc3\x28 chat"  # an invalid two-byte sequence
    (corpus_dir / "val.fr").write_bytes(b"\n".join(fr))
    with pytest.raises(DataError, match=r"val\.fr:1: invalid UTF-8 at byte 0"):
        load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    cfg = DataConfig(dir=str(corpus_dir), skip_invalid_utf8=True)
    corpus = load_corpus(cfg, tmp_path / "cache2")
    assert corpus["valid"]["invalid"] == [True] + [False] * 19  # marked while loading ...
    kept, dropped = clean(corpus["valid"], cfg)  # ... dropped and counted by cleaning
    assert dropped.get("invalid_utf8") == 1
    en = (corpus_dir / "val.en").read_text(encoding="utf-8").splitlines()
    assert set(kept["src"]) == set(en[1:]) - {en[0]}


def test_carriage_return_inside_a_line_does_not_split_it(tmp_path):
    d = tmp_path / "cr"
    d.mkdir()
    # 2 lines of English (one with a stray CR, as in crawled text) against 3 of French: the
    # files are misaligned and must be refused, not read as 3 pairs shifted by one.
    (d / "train.en").write_bytes(b"the dog\rruns\na cat\n")
    (d / "train.fr").write_bytes(b"le chien court\nun chat\nle cheval\n")
    write_lines(d / "val.en", ["the bird"])
    write_lines(d / "val.fr", ["l'oiseau"])
    with pytest.raises(DataError, match="2 lines"):
        load_corpus(DataConfig(dir=str(d)), tmp_path / "cache")


def test_windows_line_endings(tmp_path):
    d = tmp_path / "crlf"
    d.mkdir()
    (d / "train.en").write_bytes(b"the dog\r\na cat\r\n")
    (d / "train.fr").write_bytes(b"le chien\nun chat\n")
    (d / "val.en").write_bytes(b"the bird\r\n")
    (d / "val.fr").write_bytes(b"l'oiseau\r\n")
    corpus = load_corpus(DataConfig(dir=str(d)), tmp_path / "cache")
    assert corpus["train"]["src"] == ["the dog", "a cat"]
    assert corpus["valid"]["tgt"] == ["l'oiseau"]


def test_tsv_loading(tmp_path):
    d = tmp_path / "tsv"
    d.mkdir()
    write_lines(d / "train.tsv", ['the "big" dog\tle "grand" chien', "NA\tNA", "a cat\tun chat"])
    write_lines(d / "val.tsv", ["the bird\tl'oiseau"])
    corpus = load_corpus(DataConfig(dir=str(d), format="tsv"), tmp_path / "cache")
    assert corpus["train"]["src"] == ['the "big" dog', "NA", "a cat"]
    assert corpus["train"]["tgt"] == ['le "grand" chien', "NA", "un chat"]
    assert corpus["valid"]["tgt"] == ["l'oiseau"]


def test_jsonl_loading_flat_and_nested(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    rows = [{"en": "the cat", "fr": "le chat", "id": 1}, {"en": "a dog", "fr": "un chien", "id": 2}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    nested = [{"translation": {"en": "the horse", "fr": "le cheval"}}]
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nested), "utf-8")
    corpus = load_corpus(DataConfig(dir=str(d), format="jsonl"), tmp_path / "cache")
    assert corpus["train"]["src"] == ["the cat", "a dog"]
    assert corpus["train"]["tgt"] == ["le chat", "un chien"]
    assert corpus["train"].column_names == ["src", "tgt"]
    assert corpus["valid"]["src"] == ["the horse"] and corpus["valid"]["tgt"] == ["le cheval"]


def test_jsonl_without_a_language_names_it(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"en": "the cat", "de": "die Katze"}) + "\n")
    (d / "val.jsonl").write_text(json.dumps({"en": "a cat", "de": "eine Katze"}) + "\n")
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(dir=str(d), format="jsonl"), tmp_path / "cache")
    assert "'fr'" in str(info.value) and "train.jsonl" in str(info.value)


def test_tsv_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train.tsv"):
        load_corpus(DataConfig(dir=str(tmp_path), format="tsv"), tmp_path / "cache")


# --- cleaning ----------------------------------------------------------------------------------


def test_clean_drops_with_reasons_and_counts():
    pairs = datasets.Dataset.from_dict({
        "src": ["the dog", "", "a cat", "one two three four five six", "a", "  the dog ",
                "a cat", "the bird sings", "a b c d e", "x y"],
        "tgt": ["le chien", "un chat", "   ", "un", "un deux trois", "le chien",
                "un chat", "l'oiseau chante", "a b c d e", "x y"],
    })
    kept, dropped = clean(pairs, DataConfig(dir="x", max_words=5, max_ratio=2.0))
    # "a" -> 3 words: ratio 3 > 2; six words > 5 (checked before the ratio);
    # " the dog " strips to a duplicate of the first pair; "a cat"/"   " is empty, so the
    # later "a cat"/"un chat" is the first of its kind and kept.
    assert dropped == {"empty": 2, "too_long": 1, "length_ratio": 1, "duplicate": 1}
    assert kept["src"] == ["the dog", "a cat", "the bird sings", "a b c d e", "x y"]
    assert kept["tgt"] == ["le chien", "un chat", "l'oiseau chante", "a b c d e", "x y"]
    assert kept.column_names == ["src", "tgt"]


def test_clean_strips_whitespace_and_keeps_duplicates_without_dedupe():
    pairs = datasets.Dataset.from_dict({"src": [" a b ", "a b", "a b"],
                                        "tgt": ["c d\t", "c d", "c e"]})
    kept, dropped = clean(pairs, DataConfig(dir="x", dedupe=False))
    assert dropped == {}
    assert kept["src"] == ["a b", "a b", "a b"] and kept["tgt"] == ["c d", "c d", "c e"]
    kept, dropped = clean(pairs, DataConfig(dir="x"))
    assert dropped == {"duplicate": 1}
    assert kept["tgt"] == ["c d", "c e"]


def test_clean_ratio_boundary_is_kept():
    pairs = datasets.Dataset.from_dict({"src": ["a b", "a"], "tgt": ["w x y z", "w x y"]})
    kept, dropped = clean(pairs, DataConfig(dir="x", max_ratio=2.0))
    assert kept["src"] == ["a b"]  # ratio exactly 2 is allowed, 3 is not
    assert dropped == {"length_ratio": 1}


def test_clean_of_the_toy_corpus_counts_duplicates(corpus_dir, tmp_path):
    corpus = load_corpus(DataConfig(dir=str(corpus_dir)), tmp_path / "cache")
    kept, dropped = clean(corpus["train"], DataConfig(dir=str(corpus_dir)))
    pairs = list(zip(corpus["train"]["src"], corpus["train"]["tgt"]))
    assert len(kept) == len(set(pairs))
    assert dropped == ({"duplicate": len(pairs) - len(set(pairs))}
                       if len(set(pairs)) < len(pairs) else {})


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


@pytest.mark.parametrize("size, parts", [(10, 3), (4, 4), (2, 4), (7, 1)])
def test_split_batch_covers_the_batch(size, parts):
    batch = np.arange(100, 100 + size)
    pieces = split_batch(batch, parts)
    assert len(pieces) == parts
    assert np.concatenate(pieces).tolist() == batch.tolist()
    counts = [len(p) for p in pieces]
    assert max(counts) - min(counts) <= 1


def test_collate_adds_specials_and_padding():
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11]], pad=0, bos=2, eos=3)
    assert batch.src.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert batch.tgt_in.tolist() == [[2, 9, 0], [2, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, 3, 0], [10, 11, 3]]
    assert batch.num_tgt_tokens == 5 and batch.num_src_tokens == 6
    assert batch.src.dtype == torch.long
    assert pad_sequences([], 0).shape == (0, 0)


def test_encoded_corpus_lengths_and_max_len():
    ds = datasets.Dataset.from_dict({
        "src_ids": [[5, 6], [5, 6, 7, 8], [5]], "tgt_ids": [[9], [9], [9, 10, 11]],
        "src_len": [2, 4, 1], "tgt_len": [1, 1, 3]})
    corpus = EncodedCorpus(ds, max_len=4)
    assert corpus.src_lens.tolist() == [3, 5, 2]  # + EOS
    assert corpus.tgt_lens.tolist() == [2, 2, 4]
    assert corpus.usable.tolist() == [0, 2]
    assert len(corpus) == 2
    src, tgt = corpus.pairs(np.array([2, 0]))
    assert src == [[5], [5, 6]] and tgt == [[9, 10, 11], [9]]
    assert len(EncodedCorpus(ds)) == 3
