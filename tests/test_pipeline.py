"""Tests for traduire.pipeline: stage records, skipping, refusing changes, overwrite, resuming."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from conftest import make_pair
from traduire.batch import EncodedCorpus
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import load_config
from traduire.errors import CheckpointError, DataError, TraduireError
from traduire.pipeline import check_run_dir, open_encoded, prepare, run
from traduire.tokenizer import Tokenizer

SHORT = ["train.max_steps=10"]


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def mtimes(run_dir: Path) -> dict[str, int]:
    """Modification times of every file of the data and tokenizer stages."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for stage in ("data", "tokenizer", "encoded") for p in (run_dir / stage).rglob("*")
            if p.is_file()}


@pytest.fixture
def first_run(tiny_config_path, tmp_path, capsys) -> Path:
    run_dir = tmp_path / "run"
    state = run(load_config(tiny_config_path, SHORT), run_dir)
    assert state.step == 10
    capsys.readouterr()
    return run_dir


def test_first_run_fills_the_run_directory(first_run, tiny_config_path):
    for name in ("run.json", "config.yaml", "stages/data.json", "stages/tokenizer.json",
                 "stages/model.json", "data/report.json", "tokenizer/spm.model",
                 "best.pt", "metrics.jsonl"):
        assert (first_run / name).is_file(), name
    assert (first_run / "encoded" / "train").is_dir()
    assert [p.name for p in step_checkpoints(first_run / "checkpoints")] == ["step_00000010.pt"]
    assert json.loads((first_run / "run.json").read_text())["format_version"] == 1
    saved = yaml.safe_load((first_run / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 32 and saved["train"]["max_steps"] == 10
    # The saved config loads back to the config that ran.
    assert load_config(first_run / "config.yaml") == load_config(tiny_config_path, SHORT)
    report = json.loads((first_run / "data" / "report.json").read_text())
    assert report["train"]["read"] == 200
    assert report["train"]["kept"] + sum(report["train"]["dropped"].values()) == 200
    tokenizer = Tokenizer.load(first_run / "tokenizer")
    assert tokenizer.src_vocab_size == 40
    # The ids and lengths in arrays of their own; the text stays in data/ only.
    encoded = EncodedCorpus.open(first_run / "encoded" / "train",
                                 texts=first_run / "data" / "train")
    text = datasets.load_from_disk(str(first_run / "data" / "train"))
    rows = np.arange(len(encoded))
    assert len(encoded) == report["train"]["kept"] == len(text)
    assert encoded.source_ids(rows) == tokenizer.encode_src(list(text["src"]))
    assert list(encoded.src_lens - 1) == [len(ids) for ids in encoded.source_ids(rows)]
    assert encoded.texts(rows[:3], "tgt") == text["tgt"][:3]


def test_second_run_skips_data_and_tokenizer(first_run, tiny_config_path, capsys):
    before = mtimes(first_run)
    assert before
    state = run(load_config(tiny_config_path, ["train.max_steps=15"]), first_run)
    err = capsys.readouterr().err
    assert "data: done (skipped)" in err
    assert "tokenizer: done (skipped)" in err
    assert "loading and cleaning" not in err and "training SentencePiece" not in err
    assert mtimes(first_run) == before
    assert state.step == 15


def test_changed_vocab_size_is_refused_naming_the_key(first_run, tiny_config_path):
    before = mtimes(first_run)
    config_before = (first_run / "config.yaml").read_text()
    with pytest.raises(TraduireError) as info:
        run(load_config(tiny_config_path, SHORT + ["tokenizer.vocab_size=48"]), first_run)
    message = str(info.value)
    assert "tokenizer.vocab_size" in message and "--overwrite" in message
    assert "data." not in message  # the data stage did not change
    # Nothing was touched.
    assert mtimes(first_run) == before
    assert (first_run / "config.yaml").read_text() == config_before
    assert not (first_run / "old").exists()


def test_changed_model_or_training_key_is_refused(first_run, tiny_config_path):
    with pytest.raises(TraduireError, match=r"model\.d_model"):
        run(load_config(tiny_config_path, SHORT + ["model.d_model=16"]), first_run)
    with pytest.raises(TraduireError, match=r"train\.lr"):
        run(load_config(tiny_config_path, SHORT + ["train.lr=0.001"]), first_run)
    with pytest.raises(TraduireError, match=r"data\.max_words"):
        run(load_config(tiny_config_path, SHORT + ["data.max_words=10"]), first_run)


def test_overwrite_redoes_tokenizer_and_model_and_keeps_old_outputs(first_run, tiny_config_path,
                                                                    capsys):
    old_model = (first_run / "tokenizer" / "spm.model").read_bytes()
    old_metrics = (first_run / "metrics.jsonl").read_text()
    data_before = {k: v for k, v in mtimes(first_run).items() if k.startswith("data")}
    config = load_config(tiny_config_path, SHORT + ["tokenizer.vocab_size=48"])
    state = run(config, first_run, overwrite=True)
    err = capsys.readouterr().err
    assert state.step == 10
    assert "data: done (skipped)" in err and "training SentencePiece" in err
    assert "resuming" not in err  # the model stage started over

    (old,) = (first_run / "old").iterdir()
    assert (old / "tokenizer" / "spm.model").read_bytes() == old_model
    assert (old / "encoded" / "train").is_dir()
    assert [p.name for p in step_checkpoints(old / "checkpoints")] == ["step_00000010.pt"]
    assert (old / "best.pt").is_file()
    assert (old / "metrics.jsonl").read_text() == old_metrics
    assert not (old / "data").exists()  # the data stage was not redone
    old_record = json.loads((old / "tokenizer.json").read_text())  # the old stage record
    assert old_record["settings"]["tokenizer"]["vocab_size"] == 40

    assert Tokenizer.load(first_run / "tokenizer").src_vocab_size == 48
    assert {k: v for k, v in mtimes(first_run).items() if k.startswith("data")} == data_before
    assert metric_steps(first_run) == [5, 10]  # a fresh metrics file
    weights = load_checkpoint(first_run / "checkpoints" / "step_00000010.pt")["model"]
    assert weights["decoder.embedding.weight"].shape == (48, 32)
    record = json.loads((first_run / "stages" / "tokenizer.json").read_text())
    assert record["settings"]["tokenizer"]["vocab_size"] == 48
    # The run directory now matches the new config: a plain run goes on without complaint.
    assert run(load_config(tiny_config_path, ["train.max_steps=15",
                                              "tokenizer.vocab_size=48"]), first_run).step == 15


def test_overwrite_encodes_with_the_new_tokenizer(first_run, tiny_config_path):
    run(load_config(tiny_config_path, SHORT + ["tokenizer.vocab_size=48"]), first_run,
        overwrite=True)
    tokenizer = Tokenizer.load(first_run / "tokenizer")
    for split in ("train", "valid"):
        encoded = EncodedCorpus.open(first_run / "encoded" / split)
        text = datasets.load_from_disk(str(first_run / "data" / split))
        rows = np.arange(len(encoded))
        assert encoded.source_ids(rows) == tokenizer.encode_src(list(text["src"]))
        assert encoded.target_ids(rows) == tokenizer.encode_tgt(list(text["tgt"]))


def test_overwrite_of_a_model_key_keeps_data_and_tokenizer(first_run, tiny_config_path):
    before = mtimes(first_run)
    state = run(load_config(tiny_config_path, SHORT + ["model.ffn_dim=32"]), first_run,
                overwrite=True)
    assert state.step == 10
    assert mtimes(first_run) == before
    (old,) = (first_run / "old").iterdir()
    # The model stage's outputs and its record; the data and tokenizer stages stay.
    assert sorted(p.name for p in old.iterdir()) == ["best.pt", "checkpoints", "metrics.jsonl",
                                                     "model.json"]
    weights = load_checkpoint(first_run / "checkpoints" / "step_00000010.pt")["model"]
    assert weights["encoder.layers.0.ffn.linear1.weight"].shape == (32, 32)


def test_overwrite_without_changes_changes_nothing(first_run, tiny_config_path):
    state = run(load_config(tiny_config_path, SHORT), first_run, overwrite=True)
    assert state.step == 10
    assert not (first_run / "old").exists()


def test_raising_max_steps_continues_from_the_last_step(first_run, tiny_config_path, capsys):
    state = run(load_config(tiny_config_path, ["train.max_steps=20"]), first_run)
    err = capsys.readouterr().err
    assert "resuming at step 10" in err
    assert state.step == 20
    assert metric_steps(first_run) == [5, 10, 15, 20]
    assert [p.name for p in step_checkpoints(first_run / "checkpoints")] == [
        "step_00000010.pt", "step_00000020.pt"]


def test_reaching_the_limit_again_does_nothing(first_run, tiny_config_path, capsys):
    checkpoint = first_run / "checkpoints" / "step_00000010.pt"
    before = checkpoint.stat().st_mtime_ns
    state = run(load_config(tiny_config_path, SHORT), first_run)
    assert state.step == 10
    assert "nothing to do" in capsys.readouterr().err
    assert checkpoint.stat().st_mtime_ns == before
    assert metric_steps(first_run) == [5, 10]


def test_changing_a_bound_key_is_allowed(first_run, tiny_config_path):
    state = run(load_config(tiny_config_path, ["train.max_steps=16", "train.log_every=4",
                                               "train.keep_last=1"]), first_run)
    assert state.step == 16
    assert metric_steps(first_run) == [5, 10, 12, 16]
    assert [p.name for p in step_checkpoints(first_run / "checkpoints")] == ["step_00000016.pt"]
    assert yaml.safe_load((first_run / "config.yaml").read_text())["train"]["log_every"] == 4


def test_sampling_keys_are_the_model_stages_not_the_tokenizers(first_run, tiny_config_path):
    """Subword sampling changes the training batches, not the vocabulary: turning it on never
    trains SentencePiece or encodes again, and a run is not resumed with other batches."""
    sampling = SHORT + ["tokenizer.sample_alpha=0.2"]
    with pytest.raises(TraduireError, match=r"changed: tokenizer\.sample_alpha\. Use"):
        run(load_config(tiny_config_path, sampling), first_run)
    assert check_run_dir(first_run, load_config(tiny_config_path, sampling), True) == "model"
    # Off, the other sampling keys change nothing.
    assert check_run_dir(first_run, load_config(tiny_config_path, SHORT + [
        "tokenizer.sample_nbest=8", "tokenizer.sample_alpha=null"]), False) is None


def test_a_record_older_than_a_key_matches_the_keys_default(first_run, tiny_config_path):
    """A stage record written before a key existed matches a config leaving it at its default
    (a run directory of an older traduire resumes), and not one that sets it."""
    path = first_run / "stages" / "model.json"
    record = json.loads(path.read_text())
    del record["settings"]["train"]["decay_fraction"]
    del record["settings"]["tokenizer"]
    path.write_text(json.dumps(record))
    assert check_run_dir(first_run, load_config(tiny_config_path, SHORT), False) is None
    with pytest.raises(TraduireError, match=r"changed: train\.decay_fraction\. Use"):
        check_run_dir(first_run, load_config(tiny_config_path, SHORT + [
            "train.decay_fraction=0.5"]), False)


def test_newer_run_directory_format_is_refused(tiny_config_path, tmp_path):
    run_dir = tmp_path / "future"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError) as info:
        run(load_config(tiny_config_path, SHORT), run_dir)
    assert "99" in str(info.value) and "newer" in str(info.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_unreadable_run_record_is_refused(tiny_config_path, tmp_path):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="run.json"):
        run(load_config(tiny_config_path, SHORT), run_dir)


def test_empty_training_corpus_after_cleaning(tiny_config_path, corpus_dir, tmp_path):
    for name in ("train.en", "train.fr"):
        (corpus_dir / name).write_text("\n\n\n", encoding="utf-8")
    with pytest.raises(TraduireError, match="empty after cleaning"):
        run(load_config(tiny_config_path, SHORT), tmp_path / "run")


# --- a run directory is traduire's or it is refused ------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def cli_train(config: Path, run_dir: Path, cwd: Path | None = None):
    import os

    from typer.testing import CliRunner

    from traduire.cli import app

    before = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(app, ["train", "-c", str(config), "-r", str(run_dir)])
    finally:
        os.chdir(before)


def test_a_folder_holding_a_users_data_is_refused_and_left_untouched(tmp_path, corpus_dir,
                                                                    tiny_config_path):
    """The data-loss case: a --run-dir that holds a folder named data/ (here the project
    folder itself, '.') was once replaced by the cleaned corpus."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "notes.txt").write_text("mine", encoding="utf-8")
    (project / "config.yaml").write_text("not traduire's\n", encoding="utf-8")
    before = snapshot(project)
    result = cli_train(tiny_config_path, Path("."), cwd=project)
    assert result.exit_code == 1
    assert "not a traduire run directory (it holds config.yaml, data/)" in result.output
    assert "Traceback" not in result.output
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == [
        "config.yaml", "data"]


def test_the_data_folder_itself_is_refused_as_a_run_directory(corpus_dir, tiny_config_path):
    before = snapshot(corpus_dir)
    result = cli_train(tiny_config_path, corpus_dir)
    assert result.exit_code == 1
    assert f"{corpus_dir}: not a traduire run directory (it holds train.en" in result.output
    assert snapshot(corpus_dir) == before
    assert sorted(p.name for p in corpus_dir.iterdir()) == sorted(
        ["train.en", "train.fr", "val.en", "val.fr"])


def test_prepare_refuses_too_and_a_file_is_no_run_directory(tmp_path, tiny_config_path):
    from traduire.pipeline import prepare

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(TraduireError, match="not a traduire run directory"):
        prepare(tiny_config_path, tmp_path / "busy")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TraduireError, match="is not a directory"):
        prepare(tiny_config_path, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"


def test_an_empty_or_new_directory_becomes_a_run(tmp_path, tiny_config_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run(load_config(tiny_config_path, ["train.max_steps=2"]), empty)
    assert (empty / "run.json").is_file()
    # Once it holds a run, the user's own files beside it are left alone by later runs.
    (empty / "my-notes.txt").write_text("keep")
    run(load_config(tiny_config_path, ["train.max_steps=4"]), empty)
    assert (empty / "my-notes.txt").read_text() == "keep"


def test_stage_outputs_without_a_record_are_moved_aside_not_deleted(first_run,
                                                                    tiny_config_path):
    """A stage that must run again (its record is gone) never deletes the folder it
    replaces: it moves it to old/."""
    (first_run / "stages" / "data.json").unlink()
    (first_run / "data" / "mine.txt").write_text("a file someone put there")
    run(load_config(tiny_config_path, ["train.max_steps=10"]), first_run)
    kept = list((first_run / "old").glob("*/data/mine.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "a file someone put there"
    assert not (first_run / "data" / "mine.txt").exists()


# --- the hub source ----------------------------------------------------------------------------


def write_hub_dataset(root: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A dataset repository laid out as the hub's WMT ones are: one Parquet file per split and
    language pair, rows {"translation": {"de"|"fr": ..., "en": ...}}, and the README's header
    naming each configuration's files (what `datasets.load_dataset` reads to find them)."""
    header = ["---", "configs:"]
    for pair in ("de-en", "fr-en"):
        other = pair.split("-")[0]
        header += [f"- config_name: {pair}", "  data_files:"]
        (root / pair).mkdir(parents=True)
        for split, pairs in splits.items():
            rows = [{"translation": {other: f"{other}:{tgt}", "en": src}} for src, tgt in pairs]
            features = datasets.Features({"translation": datasets.Translation([other, "en"])})
            datasets.Dataset.from_list(rows, features=features).to_parquet(
                str(root / pair / f"{split}-00000-of-00001.parquet"))
            header += [f"  - split: {split}", f"    path: {pair}/{split}-*"]
    (root / "README.md").write_text("\n".join(header + ["---", ""]), encoding="utf-8")
    return root


def hub_config(hub: Path, *overrides: str):
    return load_config(None, ["data.source=hub", f"data.hub_name={hub}",
                              "data.hub_config=fr-en", "tokenizer.vocab_size=40", *overrides])


def test_hub_source_reads_the_translation_rows_of_the_chosen_config(tmp_path):
    rng = random.Random(3)
    train = [make_pair(rng) for _ in range(60)] + [("", "vide"), ("a cat", "un chat")] * 2
    valid = [make_pair(rng) for _ in range(5)]
    hub = write_hub_dataset(tmp_path / "wmt-toy", {"train": train, "validation": valid})
    prepare(hub_config(hub), tmp_path / "run")

    kept = datasets.load_from_disk(str(tmp_path / "run" / "data" / "train"))
    expected = list(dict.fromkeys((s, f"fr:{t}") for s, t in train if s))  # cleaned, deduped
    assert list(zip(kept["src"], kept["tgt"])) == expected
    assert datasets.load_from_disk(str(tmp_path / "run" / "data" / "valid"))["tgt"] == \
        [f"fr:{t}" for _, t in valid]
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    assert report["train"]["read"] == len(train) and report["valid"]["read"] == len(valid)
    assert report["train"]["dropped"]["empty"] == 2
    assert (tmp_path / "run" / "tokenizer" / "spm.model").is_file()

    # Another language pair of the same repository, a missing language, a missing split.
    prepare(hub_config(hub, "data.hub_config=de-en", "data.tgt_lang=de"), tmp_path / "de")
    assert datasets.load_from_disk(str(tmp_path / "de" / "data" / "valid"))["tgt"] == \
        [f"de:{t}" for _, t in valid]
    with pytest.raises(TraduireError, match=r"no field 'fr' \(found: de, en\)"):
        prepare(hub_config(hub, "data.hub_config=de-en"), tmp_path / "no-fr")
    with pytest.raises(TraduireError, match="split 'dev'"):
        prepare(hub_config(hub, "data.valid_split=dev"), tmp_path / "no-dev")


def test_a_run_encoded_in_the_older_layout_is_converted_once_and_trains_on(
        first_run, tiny_config_path, capsys):
    new = {p.name: p.read_bytes() for p in sorted((first_run / "encoded" / "train").iterdir())}
    for split in ("train", "valid"):  # the older layout: ids, lengths and text in Arrow rows
        corpus = EncodedCorpus.open(first_run / "encoded" / split)
        rows = np.arange(len(corpus))
        text = datasets.load_from_disk(str(first_run / "data" / split))
        old = datasets.Dataset.from_dict({
            "src": text["src"], "tgt": text["tgt"], "src_ids": corpus.source_ids(rows),
            "tgt_ids": corpus.target_ids(rows), "src_len": (corpus.src_lens - 1).tolist(),
            "tgt_len": (corpus.tgt_lens - 1).tolist()})
        shutil.rmtree(first_run / "encoded" / split)
        old.save_to_disk(str(first_run / "encoded" / split))
    with pytest.raises(DataError) as refused:  # what reads it without preparing first
        open_encoded(first_run, "train", max_len=100)
    assert str(refused.value) == (
        f"{first_run / 'encoded' / 'train'}: encoded in an older layout (token ids beside the "
        f"text); run `traduire prepare --run-dir {first_run}` once to convert it")
    capsys.readouterr()
    assert run(load_config(tiny_config_path, ["train.max_steps=12"]), first_run).step == 12
    assert "converting encoded/ to the current layout" in capsys.readouterr().err
    # The same arrays as the tokenizer stage writes, so the same batches as before.
    assert {p.name: p.read_bytes()
            for p in sorted((first_run / "encoded" / "train").iterdir())} == new
    run(load_config(tiny_config_path, ["train.max_steps=13"]), first_run)
    assert "converting" not in capsys.readouterr().err  # once


def test_the_files_of_a_launch_do_not_make_a_new_directory_foreign(tmp_path):
    from traduire.pipeline import claim_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What rank 0 writes before run.json: the start-up token, the heartbeat and its
    # temporary file, caught half-way.
    for name in (".launch", ".launch-status.json", "..launch-status.json.x1y2.tmp"):
        (run_dir / name).write_text("{}")
    claim_run_dir(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(TraduireError, match=r"it holds notes.txt\)"):
        claim_run_dir(run_dir)
