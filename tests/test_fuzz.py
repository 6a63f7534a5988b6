"""Property-based fuzzing of tokenize -> translate with a tiny trained model: whatever Unicode
(or bytes) comes in, translation raises nothing and gives exactly one line of valid UTF-8 per
input line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traduire.translate import DecodeOptions, Translator
from traduire.translate_files import translate_file


# The same small run as test_reliability.py (shared through the session's base temp dir).
@pytest.fixture(scope="module")
def translator(small_run) -> Translator:
    return Translator.load(small_run[1], device="cpu")


# Interesting pieces: empty, blanks, combining marks, RTL text and marks, emoji (with joiners),
# NUL and other controls, every character Python's splitlines() treats as a line break, BOM.
SPECIAL = ["", " ", "   ", "\t", "\x00", "\x07", "\x1b[31m", "\r", "\x0b", "\x0c", "\x1c",
           "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\ufeff", "\u200b", "\u200f", "\u202e",
           "e\u0301", "\u0301\u0301\u0301", "مرحبا بالعالم", "שלום", "😀", "👨\u200d👩\u200d👧",
           "🇫🇷", "\U0010ffff", "\ufffd", "the big dog runs", "le chat", "ǅ", "ﬁ", "𝔘𝔫𝔦"]
ANY_CHAR = st.characters(blacklist_categories=("Cs",))  # every code point UTF-8 can hold
LINE = st.one_of(
    st.text(ANY_CHAR, max_size=30),
    st.sampled_from(SPECIAL),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(ANY_CHAR, max_size=5)),
             max_size=8).map("".join),
)
# Greedy and short outputs: the properties do not depend on the output length.
OPTIONS = DecodeOptions(beam=1, max_len_a=0.5, max_len_b=4, batch_tokens=64, chunk_lines=3)
# No deadline and no too_slow health check: both time the machine (each example, and drawing
# the first examples), and a busy or slow CPU is no failure of the code under test.
FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def assert_one_clean_line_each(outputs: list[str]) -> None:
    for text in outputs:
        text.encode("utf-8")  # no lone surrogates or other unencodable text
        assert text.splitlines() in ([], [text]), repr(text)  # no line break of any kind
        assert "\n" not in text


@FUZZ
@given(lines=st.lists(LINE, max_size=7))
def test_translate_lines_gives_one_line_per_input(translator, lines):
    ids, _ = translator.encode([line for line in lines if line.strip()])
    vocab = translator.tokenizer.src_vocab_size
    assert all(0 <= i < vocab for s in ids for i in s)
    assert all(len(s) <= translator.max_source_tokens for s in ids)
    results = list(translator.translate_lines(lines, OPTIONS))
    assert len(results) == len(lines)
    assert_one_clean_line_each([r.best for r in results])
    for line, result in zip(lines, results):
        if not line.strip():
            assert result.best == ""


@FUZZ
@given(lines=st.lists(LINE.filter(lambda s: "\n" not in s), max_size=7),
       trailing_newline=st.booleans(), beam=st.sampled_from([1, 2]))
def test_translate_file_gives_one_line_per_input(translator, lines, trailing_newline, beam):
    content = "\n".join(lines) + ("\n" if trailing_newline and lines else "")
    expected = len(content.split("\n")) - content.endswith("\n") if content else 0
    options = DecodeOptions(beam=beam, nbest=1, max_len_a=0.5, max_len_b=4, batch_tokens=64)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.txt", Path(tmp) / "out.txt"
        source.write_bytes(content.encode("utf-8"))
        translate_file(translator, str(source), out, options, progress=False)
        text = out.read_bytes().decode("utf-8")  # strict: the output is valid UTF-8
    assert text.count("\n") == expected and (text.endswith("\n") or not expected)
    assert_one_clean_line_each(text.split("\n")[:-1])


@FUZZ
@given(data=st.binary(max_size=200))
def test_translate_file_survives_arbitrary_bytes(translator, data):
    expected = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.bin", Path(tmp) / "out.txt"
        source.write_bytes(data)
        translate_file(translator, str(source), out, OPTIONS, progress=False)
        text = out.read_bytes().decode("utf-8")
    assert text.count("\n") == expected
    assert_one_clean_line_each(text.split("\n")[:-1])
