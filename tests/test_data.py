"""Tests for traduire.data: loading aligned corpora and cleaning them."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from traduire.config import DataConfig
from traduire.data import clean, load_corpus, pair_hash
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


def test_dedupe_keeps_first_occurrences_and_the_counts_add_up():
    src = ["a b", "c d", "a b", "", "a b", "c d", "e f", "c  d ", "x " * 9, "a b"]
    tgt = ["1 2", "3 4", "1 2", "5", "1 3", "3 4", "5 6", "3 4", "y", "1 2"]
    kept, dropped = clean(datasets.Dataset.from_dict({"src": src, "tgt": tgt}),
                          DataConfig(dir="x", max_ratio=3.0))
    # "c  d " is not "c d": whitespace inside a sentence is text, only its ends are stripped.
    assert list(zip(kept["src"], kept["tgt"])) == [
        ("a b", "1 2"), ("c d", "3 4"), ("a b", "1 3"), ("e f", "5 6"), ("c  d", "3 4")]
    assert dropped == {"duplicate": 3, "empty": 1, "length_ratio": 1}
    assert len(kept) + sum(dropped.values()) == len(src)


def test_cleaning_in_several_processes_gives_the_same_result(monkeypatch):
    from traduire import runtime

    rng = random.Random(3)
    words = ["a", "b", "c", "d", " ", "\t", "\u00a0"]
    pairs = [("".join(rng.choices(words, k=rng.randint(0, 14))),
              "".join(rng.choices(words, k=rng.randint(0, 14)))) for _ in range(260)]
    pairs += rng.sample(pairs, 40)  # repeats, some in another process than the first
    dataset = datasets.Dataset.from_dict({"src": [s for s, _ in pairs],
                                          "tgt": [t for _, t in pairs]})
    cfg = DataConfig(dir="x", max_words=5, max_ratio=2.0)
    one = clean(dataset, cfg, workers=1)
    monkeypatch.setattr(runtime, "ROWS_PER_PROCESS", 40)  # 300 pairs: 3 processes of 100
    three = clean(dataset, cfg, workers=3)
    assert one[1] == three[1] and set(one[1]) == {"empty", "too_long", "length_ratio",
                                                  "duplicate"}
    assert one[0].to_dict() == three[0].to_dict()


def test_pair_hash_is_fixed():
    # Written out: Python's own hash() of a string changes from process to process
    # (PYTHONHASHSEED), and workers must agree on which pairs are the same.
    assert pair_hash("le chat", "the cat") == 659159919009448642
    assert pair_hash("a\x00b", "\u2028") == 17579735162331002132
    assert pair_hash("ab", "c") != pair_hash("a", "bc")
