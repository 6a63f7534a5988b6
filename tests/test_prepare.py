"""`traduire prepare`: the data and tokenizer stages alone, their results whatever the number of
workers, and a fresh run directory under torchrun however long rank 0 prepares."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import make_pair, tiny_settings, write_config
from traduire import distributed, runtime
from traduire.batch import EncodedCorpus, length_order
from traduire.checkpoint import step_checkpoints
from traduire.config import config_from_dict
from traduire.errors import TraduireError
from traduire.pipeline import prepare, train

needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(),
                                       reason="torch.distributed unavailable")


# --- prepare, then train ----------------------------------------------------------------------


def test_prepare_then_train_skips_both_stages(tmp_path, tiny_config_path, capsys):
    run_dir = tmp_path / "run"
    prepare(tiny_config_path, run_dir)
    assert "data: loading" in capsys.readouterr().err
    made = {name: (run_dir / name).stat().st_ino
            for name in ("data", "tokenizer", "encoded", "stages/data.json",
                         "stages/tokenizer.json")}
    state = train(tiny_config_path, run_dir, overrides=["train.max_steps=2"])
    err = capsys.readouterr().err
    assert "data: done (skipped)" in err and "tokenizer: done (skipped)" in err
    assert {name: (run_dir / name).stat().st_ino for name in made} == made  # not rewritten
    assert state.step == 2
    # datasets' intermediate copies are gone once both stages have saved their outputs.
    assert not (run_dir / "cache").exists()


def test_prepare_under_torchrun_refuses_to_start(tmp_path, tiny_config_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in every rank
    with pytest.raises(TraduireError, match="start it without torchrun"):
        prepare(tiny_config_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def prepared_files(run_dir: Path) -> dict[str, object]:
    """What prepare made, as comparable values: text, report, SentencePiece model, token ids."""
    out: dict[str, object] = {
        "report": json.loads((run_dir / "data" / "report.json").read_text()),
        "spm": (run_dir / "tokenizer" / "spm.model").read_bytes()}
    for split in ("train", "valid"):
        out[f"data/{split}"] = datasets.load_from_disk(str(run_dir / "data" / split)).to_dict()
        out[f"encoded/{split}"] = {f.name: f.read_bytes()
                                   for f in sorted((run_dir / "encoded" / split).iterdir())}
    for stage in ("data", "tokenizer"):
        out[stage] = json.loads((run_dir / "stages" / f"{stage}.json").read_text())
    return out


def test_prepare_gives_the_same_results_for_one_and_two_workers(tmp_path, corpus_dir,
                                                               monkeypatch):
    # Pairs to drop for each reason (the toy corpus repeats pairs all along, so duplicates
    # fall in both workers' shares and across them).
    with open(corpus_dir / "train.en", "a", encoding="utf-8") as en, \
            open(corpus_dir / "train.fr", "a", encoding="utf-8") as fr:
        en.write("the dog runs\n\n" + "dog " * 300 + "\nthe\n")
        fr.write("le chien court\nle chat\nchien\nle grand chien court ici maintenant\n")
    config = write_config(tmp_path / "c.yaml", tiny_settings(corpus_dir,
                                                             data={"max_ratio": 4.0}))
    monkeypatch.setattr(runtime, "ROWS_PER_PROCESS", 50)  # two for the 204 training pairs
    prepare(config, tmp_path / "one", ["data.workers=1"])
    prepare(config, tmp_path / "two", ["data.workers=2"])
    one, two = prepared_files(tmp_path / "one"), prepared_files(tmp_path / "two")
    assert one == two
    assert set(one["report"]["train"]["dropped"]) == {"duplicate", "empty", "too_long",
                                                      "length_ratio"}
    # Neither the stage records nor a later run care about the number of workers.
    prepare(config, tmp_path / "one", ["data.workers=2"])
    assert prepared_files(tmp_path / "one") == one


def test_held_out_bible_text_is_written_as_aligned_files_and_scored_whole(tmp_path):
    """The test split is written as aligned text for `traduire eval`, and only what cannot
    be translated leaves it: the length and repetition rules chosen for training would make
    the test easier."""
    import sqlite3

    from traduire.pipeline import prepare_data

    db = tmp_path / "bible.db"
    long_verse = " ".join(["word"] * 300)  # over data.max_words (250)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, "
                    "cNumber INTEGER, vNumber INTEGER, vText TEXT)")
        # Genesis to train on, Acts (44) to validate, John (43) held out as the test split.
        verses = [(book, verse) for book in (1, 44, 43) for verse in range(1, 9)]
        rows = [(0, version, book, 1, verse, f"{word} {book} {verse % 6} ...")
                for book, verse in verses for version, word in (("4", "verse"), ("l", "verset"))]
        rows += [(0, version, book, 2, 1, long_verse) for book in (1, 43) for version in "4l"]
        con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.close()
    config = config_from_dict({"data": {"source": "bible", "bible_db": str(db)}})
    prepare_data(config, tmp_path / "run")
    data = tmp_path / "run" / "data"
    # John 1:7 and 1:8 repeat 1:1 and 1:2 (verse % 6), and 2:1 is too long to train on: in a
    # training split they would be dropped; the test keeps them.
    assert (data / "test.en").read_text("utf-8").splitlines() == [
        f"verse 43 {verse % 6} ..." for verse in range(1, 9)] + [long_verse]
    assert (data / "test.fr").read_text("utf-8").splitlines() == [
        f"verset 43 {verse % 6} ..." for verse in range(1, 9)] + [long_verse]
    report = json.loads((data / "report.json").read_text())
    assert report["test"] == {"read": 9, "kept": 9, "dropped": {}}
    assert report["train"] == {"read": 9, "kept": 6,
                               "dropped": {"duplicate": 2, "too_long": 1}}


# --- a prepared run starts training at once ----------------------------------------------------


@pytest.mark.parametrize("longest", [90, 2**40])  # packed into one key; too long to pack
def test_length_order_is_lexsorts_order(longest):
    rng = np.random.default_rng(longest % 97)
    src, tgt = rng.integers(1, 30, 5000), rng.integers(1, 30, 5000)  # many ties
    src[::101], tgt[::103] = longest, longest
    tie_break = rng.permutation(5000)
    assert np.array_equal(length_order(src, tgt, tie_break),
                          np.lexsort((tie_break, src, tgt)))
    assert len(length_order(src[:0], tgt[:0], tie_break[:0])) == 0


# --- a fresh run directory under torchrun ---------------------------------------------------------


def torchrun(args: list[str], env: dict[str, str], timeout: float = 180
             ) -> subprocess.CompletedProcess:
    """`traduire ARGS` under torchrun with two CPU ranks (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "traduire", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# Loaded at start-up by every Python process that has its folder on PYTHONPATH: on rank 0 it
# makes cleaning the training split sleep, so the data stage outlasts the process group's
# timeout, and has the 200 training pairs cleaned and encoded by worker processes.
SLOW_CLEANING = """
import os

if os.environ.get("RANK") == "0":
    import time

    import traduire.data
    import traduire.runtime

    traduire.runtime.ROWS_PER_PROCESS = 50
    original = traduire.data.clean

    def slow_clean(pairs, *args, **kwargs):
        if len(pairs) > 100:  # the training split
            time.sleep(float(os.environ["SLOW_CLEAN_S"]))
        return original(pairs, *args, **kwargs)

    traduire.data.clean = slow_clean
"""


@needs_distributed
def test_rank_0_may_prepare_for_longer_than_the_process_group_timeout(tmp_path, corpus_dir):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_CLEANING)
    config = write_config(tmp_path / "c.yaml", tiny_settings(
        corpus_dir, train={"max_steps": 2, "valid_every": 2, "save_every": 2, "threads": 1}))
    run_dir = tmp_path / "run"
    # The cleaning alone outlasts the timeout, so rank 1's wait does whatever the machine's
    # speed. The timeout still bounds every collective of the run (the process group's
    # start-up, each step): 10 s leaves a loaded machine room for one rank to lag the other.
    result = torchrun(["train", "-c", str(config), "-r", str(run_dir)],
                      env={"PYTHONPATH": str(hooks), "SLOW_CLEAN_S": "11",
                           "TRADUIRE_DIST_TIMEOUT": "10"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 2" in result.stderr
    assert [p.name for p in step_checkpoints(run_dir / "checkpoints")] == ["step_00000002.pt"]


@needs_distributed
def test_a_failure_while_preparing_ends_every_rank_with_its_message(tmp_path, corpus_dir):
    lines = (corpus_dir / "train.fr").read_text(encoding="utf-8").splitlines()
    (corpus_dir / "train.fr").write_text("".join(f"{line}\n" for line in lines[:-1]), "utf-8")
    config = write_config(tmp_path / "c.yaml", tiny_settings(corpus_dir))
    run_dir = tmp_path / "run"
    result = torchrun(["train", "-c", str(config), "-r", str(run_dir)],
                      env={"TRADUIRE_DIST_TIMEOUT": "120"})
    ended = time.time()
    assert result.returncode != 0
    why = f"{corpus_dir / 'train.en'} has 200 lines but {corpus_dir / 'train.fr'} has 199"
    said = [line for line in result.stderr.splitlines() if why in line]
    assert f"error: {why}; aligned files need equal line counts" in said  # rank 0
    assert any(line.startswith("error: rank 1: rank 0 failed while preparing the run: ")
               for line in said)
    assert "traduire/" not in result.stderr  # no traceback of ours (torchrun has its own)
    # Timed from rank 0's failure (when it wrote its status), not from the launch, whose
    # start-up takes as long as the machine needs; waiting for rank 0's stages would take
    # the whole process-group timeout.
    failed_at = (run_dir / ".launch-status.json").stat().st_mtime
    assert ended - failed_at < 60, f"the job took {ended - failed_at:.0f}s to end after the failure"


@needs_distributed
def test_a_waiting_rank_stopped_by_the_launcher_still_gives_rank_0s_error(tmp_path,
                                                                          monkeypatch):
    # torchrun stops the other ranks as soon as rank 0 exits, which may be before they poll
    # rank 0's status again. Here rank 0 fails and the SIGTERM arrives while the waiting rank
    # sleeps between two polls, the first of which found no status: the wait's own sleep
    # does both, so the signal lands at that moment on every machine.
    import signal
    from types import SimpleNamespace

    monkeypatch.setattr(distributed, "launch_token", lambda: "launch")
    status = tmp_path / "status.json"
    sleeps: list[float] = []

    def fail_then_terminate(seconds: float) -> None:
        sleeps.append(seconds)
        assert not status.exists()  # the poll before this sleep found nothing
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        distributed._write_status(status, "launch", "failed", "train.en: 3 lines, train.fr: 2")
        signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
        raise AssertionError("SIGTERM did not interrupt the wait")

    monkeypatch.setattr(distributed, "time", SimpleNamespace(monotonic=time.monotonic,
                                                             sleep=fail_then_terminate))
    with pytest.raises(TraduireError, match="rank 1: rank 0 failed while preparing the run: "
                                            "train.en: 3 lines, train.fr: 2"):
        distributed.run_on_main(lambda: None, status, distributed.Context(1, 2), print)
    assert len(sleeps) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# --- fuzzing the data path ---------------------------------------------------------------------

# Pieces of lines: blanks of every kind, NUL and other controls, a lone CR, Unicode line and
# paragraph separators (text, not line ends, in a corpus), BOM, combining marks, RTL text,
# emoji, a line over data.max_words and one very long word.
PIECES = ["", " ", "\t", "\x00", "\x07", "\x1b[31m", "\r", "\x0b", "\x0c", "\x1c", "\x85",
          "\u2028", "\u2029", "\ufeff", "\u200b", "\u00a0", "e\u0301", "مرحبا", "😀", "a",
          "the dog runs", "le chien court", "dog " * 30, "x" * 3000]
ANY_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")
TEXT = st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(PIECES),
                 st.lists(st.one_of(st.sampled_from(PIECES), st.text(ANY_CHAR, max_size=4)),
                          max_size=4).map("".join))
# A line as bytes: the text, maybe broken by bytes that are not UTF-8, and its line end.
LINE = st.tuples(TEXT, st.sampled_from([b""] * 40 + [b"\xff", b"\xc3(", b"\xe2\x82"]),
                 st.sampled_from([b"\n", b"\n", b"\r\n"])).map(
    lambda t: t[0].encode() + t[1] + t[2])
# The two files of a split: aligned lines, sometimes an extra line on one side, sometimes no
# line end after the last line.
SIDES = st.tuples(st.lists(st.tuples(LINE, LINE), max_size=6), st.sampled_from([0] * 8 + [1, 2]),
                  LINE, st.sampled_from([True, True, True, False])).map(lambda t: misaligned(*t))

# Each example prepares a run (SentencePiece included): few examples, tiny vocabulary.
CLEANING = {"max_words": 20, "max_ratio": 3.0}
TOY = [make_pair(random.Random(seed)) for seed in range(40)]


def misaligned(pairs: list[tuple[bytes, bytes]], extra_on: int, extra: bytes,
               last_line_end: bool) -> tuple[bytes, bytes]:
    src, tgt = b"".join(s for s, _ in pairs), b"".join(t for _, t in pairs)
    if extra_on == 1:
        src += extra
    elif extra_on == 2:
        tgt += extra
    if not last_line_end:
        src, tgt = src.removesuffix(b"\n"), tgt.removesuffix(b"\n")
    return src, tgt


def lines_of(data: bytes) -> list[bytes]:
    """The documented reading of a corpus file: lines end at '\\n' (a '\\r' before it goes with
    it); nothing after the last line end is no line."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


def expected_split(paths: tuple[Path, Path], skip_invalid: bool
                   ) -> tuple[str | None, list[tuple[str, str]], dict[str, int], int]:
    """What reading and cleaning one split should give, by the README's rules, written the
    simple way: (error it should raise, kept pairs, dropped counts, pairs read)."""
    sides = [lines_of(path.read_bytes()) for path in paths]
    texts: list[list[str | None]] = [[], []]
    for number in range(1, max(map(len, sides)) + 1):
        for side, path in enumerate(paths):  # the source line is read first
            if number > len(sides[side]):
                continue
            try:
                texts[side].append(sides[side][number - 1].decode("utf-8"))
            except UnicodeDecodeError:
                if not skip_invalid:
                    return f"{path}:{number}: invalid UTF-8 at byte", [], {}, 0
                texts[side].append(None)
        if number > min(map(len, sides)):  # one file ended first
            return (f"{paths[0]} has {len(sides[0])} lines but {paths[1]} has "
                    f"{len(sides[1])}", [], {}, 0)
    kept, dropped, seen = [], {}, set()
    for src, tgt in zip(*texts):
        if src is None or tgt is None:
            reason = "invalid_utf8"
        else:
            src, tgt = src.strip(), tgt.strip()
            n_src, n_tgt = len(src.split()), len(tgt.split())
            if not n_src or not n_tgt:
                reason = "empty"
            elif max(n_src, n_tgt) > CLEANING["max_words"]:
                reason = "too_long"
            elif max(n_src, n_tgt) / min(n_src, n_tgt) > CLEANING["max_ratio"]:
                reason = "length_ratio"
            elif (src, tgt) in seen:
                reason = "duplicate"
            else:
                reason = ""
                seen.add((src, tgt))
                kept.append((src, tgt))
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
    return None, kept, dropped, len(texts[0])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=SIDES, valid=SIDES, skip_invalid=st.booleans(),
       toy=st.sampled_from([True, True, True, False]))
def test_fuzzed_corpora_through_prepare(train, valid, skip_invalid, toy):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        if toy:  # often enough text for the tokenizer stage to finish too
            prefix = [b"".join(f"{pair[side]}\n".encode() for pair in TOY) for side in (0, 1)]
            train = (prefix[0] + train[0], prefix[1] + train[1])
        files = {}
        for split, prefix, (src, tgt) in (("train", "train", train), ("valid", "val", valid)):
            files[split] = (corpus / f"{prefix}.en", corpus / f"{prefix}.fr")
            files[split][0].write_bytes(src)
            files[split][1].write_bytes(tgt)
        config = config_from_dict(tiny_settings(
            corpus, data={**CLEANING, "skip_invalid_utf8": skip_invalid},
            tokenizer={"vocab_size": 40, "character_coverage": 0.98}))
        expected = {split: expected_split(files[split], skip_invalid) for split in files}
        run_dir = Path(tmp) / "run"
        try:
            prepare(config, run_dir)
            error = None
        except TraduireError as e:  # anything else fails the test, with its traceback
            error = str(e)
        assert error is None or "\n" not in error

        # Both splits are read, then cleaned.
        for split in ("train", "valid"):
            if expected[split][0] is not None:
                assert error is not None and expected[split][0] in error
                event("refused while reading")
                return
        if not expected["train"][1]:
            assert error is not None and "the training corpus is empty" in error
            event("nothing left to train on")
            return
        report = json.loads((run_dir / "data" / "report.json").read_text())
        for split in ("train", "valid"):
            _, kept, dropped, read = expected[split]
            assert report[split] == {"read": read, "kept": len(kept), "dropped": dropped}
            assert read == len(kept) + sum(dropped.values())
            saved = datasets.load_from_disk(str(run_dir / "data" / split))
            assert list(zip(saved["src"], saved["tgt"])) == kept  # byte for byte
        if error is not None:  # the tokenizer stage: a vocabulary this corpus cannot have
            assert error.startswith("'tokenizer.vocab_size'"), error
            event("cleaned; no such vocabulary")
            return
        event("prepared")
        for split in ("train", "valid"):
            encoded = EncodedCorpus.open(run_dir / "encoded" / split,
                                         texts=run_dir / "data" / split)
            rows = np.arange(len(encoded))
            assert encoded.texts(rows, "src") == [s for s, _ in expected[split][1]]
            assert list(encoded.src_lens - 1) == [len(ids) for ids in encoded.source_ids(rows)]
