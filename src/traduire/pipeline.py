"""The run directory and the three stages that fill it: data -> tokenizer -> model.

Each stage records the settings it was run with in stages/<stage>.json. A later run skips a
stage whose record matches the config, refuses to go on if the settings of a finished stage
changed (naming the keys), and with `overwrite` redoes the first changed stage and all after it,
after moving their old outputs into old/<timestamp>/.

A run directory is traduire's or it is refused: `prepare` and `train` write only into a
directory that does not exist yet, is empty, or holds a run (run.json). Nothing traduire did
not write is ever moved or deleted.

Run directory layout:
  run.json                format version of the directory: the mark of a traduire run
  config.yaml             the resolved config of the latest run
  stages/<stage>.json     settings each stage was run with
  data/{train,valid}      cleaned text pairs (Arrow), data/report.json: what was dropped and why;
                          data/test.<lang>: held-out test text where the source has a test split
  tokenizer/spm.model     SentencePiece model(s)
  encoded/{train,valid}   token ids and lengths (numpy arrays, memory-mapped by training)
  checkpoints/step_N.pt   periodic checkpoints (the newest train.keep_last)
  best.pt                 the best checkpoint by validation loss (or BLEU: train.best_metric)
  average.pt              with train.average_last: the mean of the last checkpoints
  metrics.jsonl           one JSON object per log line and validation
  old/<time>/             outputs moved aside by --overwrite
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import yaml
from rich.console import Console

from traduire import distributed
from traduire.batch import EncodedCorpus, is_encoded, save_encoded
from traduire.config import (
    BOUND_KEYS,
    SAMPLING_KEYS,
    Config,
    DataConfig,
    TokenizerConfig,
    changed_keys,
    fingerprint,
    load_config,
    plain,
)
from traduire.data import clean, load_corpus, progress_bars
from traduire.device import resolve_device
from traduire.errors import CheckpointError, DataError, TraduireError
from traduire.files import atomic_open, atomic_write_text, move_aside, replace_directory
from traduire.finetune import check_architecture, init_source
from traduire.runtime import data_workers, default_allocator
from traduire.tokenizer import Tokenizer, encode_corpus, train_tokenizer
from traduire.training import Trainer, TrainState

console = Console(stderr=True)

RUN_FORMAT_VERSION = 1
STAGES = ("data", "tokenizer", "model")
# Files of one launch's ranks talking through the run directory (distributed.py), which
# may be there before run.json: they do not make a directory foreign.
LAUNCH_STATUS = ".launch-status.json"
LAUNCH_FILES = {LAUNCH_STATUS, distributed.SHARED_DIR_TOKEN}
STAGE_OUTPUTS = {"data": ["data"], "tokenizer": ["tokenizer", "encoded"],
                 "model": ["checkpoints", "best.pt", "average.pt", "metrics.jsonl",
                           "tensorboard"]}


# --- The Python API ----------------------------------------------------------------------------


def train(config: Config | str | Path, run_dir: str | Path, overrides: list[str] = (),
          overwrite: bool = False) -> TrainState:
    """Prepare whatever is missing, then train or continue training: `traduire train`.

    `config` is a Config, or a YAML file's path; `overrides` are `section.key=value` strings
    as for --set. Returns the final TrainState; raises TrainingInterrupted on SIGINT/SIGTERM
    (after saving a checkpoint) and TraduireError for anything the user can fix."""
    return run(_as_config(config, overrides), Path(run_dir), overwrite)


def prepare(config: Config | str | Path, run_dir: str | Path, overrides: list[str] = (),
            overwrite: bool = False) -> None:
    """The data and tokenizer stages alone: `traduire prepare`, what to run once on one
    machine before many GPUs train. One process: under torchrun it refuses to start, since
    every rank would prepare the same run directory at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TraduireError("traduire prepare runs in one process: start it without torchrun "
                            "(its cleaning and encoding use every core), then train under "
                            "torchrun")
    _prepare(_as_config(config, overrides), Path(run_dir), overwrite, stages=("data", "tokenizer"))


def _as_config(config: Config | str | Path, overrides: list[str]) -> Config:
    return config if isinstance(config, Config) else load_config(config, list(overrides))


# --- Stages ------------------------------------------------------------------------------------


def run(config: Config, run_dir: Path, overwrite: bool = False) -> TrainState:
    """Run every stage that is not already done, then train (or continue training).

    Under torchrun, rank 0 prepares while the others wait for it without a collective, so a
    large corpus never runs into the process group's timeout (distributed.run_on_main)."""
    run_dir = Path(run_dir)
    ctx = distributed.init(resolve_device(config.train.device).type)

    def prepare_on_main() -> None:
        _prepare(config, run_dir, overwrite)
        write_record(run_dir, "model", config)

    # Every rank checks (reading only) that the directory may be used, so a foreign one stops
    # all of them at once; rank 0's outcome is then written into the run directory only,
    # which every rank must see: that is checked next, in bounded time.
    claim_run_dir(run_dir)
    distributed.check_shared_run_dir(run_dir, ctx)
    distributed.run_on_main(prepare_on_main, run_dir / LAUNCH_STATUS, ctx, console.print)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    # The ids stay on disk, memory-mapped; opening reads the lengths alone (open_encoded).
    train_data = open_encoded(run_dir, "train",
                              max_len=min(config.train.max_len, config.model.max_positions))
    valid_data = open_encoded(run_dir, "valid", max_len=config.model.max_positions)
    if len(train_data) == 0:
        raise DataError(f"no training pair fits train.max_len={config.train.max_len} tokens")
    return Trainer(config, run_dir, tokenizer, train_data, valid_data).train()


def _prepare(config: Config, run_dir: Path, overwrite: bool,
             stages: tuple[str, ...] = STAGES) -> None:
    """Check the config against the records of `stages`, mark the directory as a run, and
    run the data and tokenizer stages (each skipped if done)."""
    if config.train.init_from:  # before any stage: a wrong source fails in the first second
        source = init_source(config.train.init_from)
        check_architecture(config, load_config(source.run_dir / "config.yaml"),
                           str(source.run_dir))
    _start(run_dir, config, check_run_dir(run_dir, config, overwrite, stages))
    with default_allocator():  # training's allocator settings hold its memory too long
        prepare_data(config, run_dir)
        prepare_tokenizer(config, run_dir)


def prepare_data(config: Config, run_dir: Path) -> None:
    """Stage 1: load, clean and save the corpus as Arrow."""
    if _read_record(run_dir, "data") is not None and (run_dir / "data").is_dir():
        console.print("data: done (skipped)")
        return
    _move_leftovers(run_dir, "data")
    workers = data_workers(config.data.workers)
    console.print(f"data: loading and cleaning the corpus ({_processes(workers)})")
    with progress_bars(console.is_terminal):
        _clean_and_save(config, run_dir, workers)
    write_record(run_dir, "data", config)


def _clean_and_save(config: Config, run_dir: Path, workers: int) -> None:
    """Load every split, clean it, and write the kept pairs and report.json into data/."""
    raw = load_corpus(config.data, run_dir / "cache", workers)
    report: dict[str, Any] = {}
    with replace_directory(run_dir / "data") as out:
        for split, pairs in raw.items():
            kept, dropped = clean(pairs, _cleaning_rules(config.data, split), workers,
                                  desc=f"cleaning {split}")
            if split == "valid" and config.data.max_valid:
                kept = kept.select(range(min(len(kept), config.data.max_valid)))
            if split == "train" and len(kept) == 0:
                why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(dropped.items()))
                raise DataError(f"{_train_source(config)}: the training corpus is empty after "
                                f"cleaning ({len(pairs):,} pairs read; dropped: "
                                f"{why or 'none'})")
            _save(kept, out / split)
            if split == "test":  # held-out text for `traduire eval`, as plain aligned files
                _write_text(kept, out, split, config.data)
            report[split] = {"read": len(pairs), "kept": len(kept), "dropped": dropped}
            console.print(f"  {split}: {len(pairs):,} pairs read, {len(kept):,} kept"
                          + "".join(f", {n:,} {why}" for why, n in sorted(dropped.items())))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")


def _cleaning_rules(cfg: DataConfig, split: str) -> DataConfig:
    """The rules for one split. A test set is scored as it is: only pairs that cannot be
    translated or scored (empty, invalid text) leave it; long, unbalanced and repeated pairs
    stay, or a length limit chosen for training would make the test easier."""
    if split != "test":
        return cfg
    return dataclasses.replace(cfg, max_words=sys.maxsize, max_ratio=math.inf, dedupe=False)


def _save(dataset: datasets.Dataset, path: Path) -> None:
    """dataset.save_to_disk, for empty datasets too (left to itself, `datasets` writes no
    shard for them, and then cannot load what it wrote)."""
    dataset.save_to_disk(str(path), num_shards=1 if len(dataset) == 0 else None)


def _write_text(pairs: datasets.Dataset, out: Path, split: str, cfg: DataConfig) -> None:
    """Write the pairs as aligned text files out/<split>.<lang>, a chunk at a time."""
    for column, lang in (("src", cfg.src_lang), ("tgt", cfg.tgt_lang)):
        with atomic_open(out / f"{split}.{lang}") as f:
            for chunk in pairs.select_columns([column]).with_format("arrow").iter(10_000):
                f.writelines(f"{line}\n" for line in chunk.column(0).to_pylist())


def prepare_tokenizer(config: Config, run_dir: Path) -> None:
    """Stage 2: train SentencePiece (or, with train.init_from, take the source run's
    tokenizer) and encode both splits."""
    if _read_record(run_dir, "tokenizer") is not None and (run_dir / "encoded").is_dir():
        console.print("tokenizer: done (skipped)")
        _upgrade_encoded(run_dir)
        return
    _move_leftovers(run_dir, "tokenizer")
    train = datasets.load_from_disk(str(run_dir / "data" / "train"))
    valid = datasets.load_from_disk(str(run_dir / "data" / "valid"))
    cfg = config.tokenizer
    if config.train.init_from:
        source = init_source(config.train.init_from).tokenizer_dir
        console.print(f"tokenizer: {source}'s (train.init_from)", markup=False,
                      highlight=False, soft_wrap=True)
        with replace_directory(run_dir / "tokenizer") as out:
            for file in source.iterdir():
                shutil.copyfile(file, out / file.name)
    else:
        sentences = len(train) * (2 if cfg.joint else 1)  # per model
        sample = min(cfg.input_sentence_size or sentences, sentences)
        console.print(f"tokenizer: training SentencePiece {cfg.model_type} ({cfg.vocab_size} "
                      f"pieces) on {sample:,} of {sentences:,} sentences")
        with replace_directory(run_dir / "tokenizer") as out:
            train_tokenizer(train, config.tokenizer, out)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    workers = data_workers(config.data.workers)
    console.print(f"tokenizer: encoding ({_processes(workers)})")
    cache = run_dir / "cache"
    cache.mkdir(exist_ok=True)
    # The cache file is named by the settings that made it: `datasets` reuses a cache file
    # by name alone, so a retrained tokenizer must never find the old one.
    key = fingerprint(plain({**stage_settings(config, "data"),
                             **stage_settings(config, "tokenizer")}))
    with replace_directory(run_dir / "encoded") as out, progress_bars(console.is_terminal):
        for split, pairs in (("train", train), ("valid", valid)):
            encoded = encode_corpus(pairs, tokenizer, cache / f"encoded-{split}-{key}.arrow",
                                    workers, desc=f"encoding {split}")
            save_encoded(encoded, out / split, _vocab_size(tokenizer))
            pieces = [pc.sum(encoded.data.column(f"{side}_len")).as_py() or 0
                      for side in ("src", "tgt")]
            console.print(f"  {split}: {pieces[0]:,} source and {pieces[1]:,} target pieces")
    write_record(run_dir, "tokenizer", config)
    # `datasets`' intermediate files (the loaded, judged and encoded copies: 3-5x the corpus
    # on disk) are no longer needed once both stages have saved their outputs.
    shutil.rmtree(run_dir / "cache", ignore_errors=True)


def _vocab_size(tokenizer: Tokenizer) -> int:
    return max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)


def open_encoded(run_dir: Path, split: str, max_len: int) -> EncodedCorpus:
    """An encoded split of a run, its text (for reports) left in data/<split> until asked
    for. An encoded/ of the layout before this one is refused with the command that
    converts it (prepare and train do it themselves)."""
    path = Path(run_dir) / "encoded" / split
    if not is_encoded(path):
        raise DataError(f"{path}: encoded in an older layout (token ids beside the text); run "
                        f"`traduire prepare --run-dir {run_dir}` once to convert it")
    return EncodedCorpus.open(path, max_len=max_len, texts=Path(run_dir) / "data" / split)


def _upgrade_encoded(run_dir: Path) -> None:
    """Convert encoded/ from the older layout (Arrow rows holding the ids, the lengths and
    the text) to this one (arrays of ids and lengths), once: the ids are copied as they are,
    nothing is encoded again."""
    encoded = run_dir / "encoded"
    splits = [p for p in sorted(encoded.iterdir()) if p.is_dir()]
    if all(is_encoded(p) for p in splits):
        return
    console.print("tokenizer: converting encoded/ to the current layout (ids and lengths in "
                  "arrays of their own, without the text); once")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    with replace_directory(encoded) as out:
        for split in splits:
            save_encoded(datasets.load_from_disk(str(split)), out / split.name,
                         _vocab_size(tokenizer))


def stage_settings(config: Config, stage: str) -> dict[str, Any]:
    """The config keys whose values determine a stage's output."""
    if stage == "data":
        # How many processes clean the data does not change what they make.
        return {"data": {k: v for k, v in asdict(config.data).items() if k != "workers"}}
    if stage == "tokenizer":
        if config.train.init_from:  # the source's tokenizer, whatever the section says
            return {"tokenizer": {"init_from": config.train.init_from}}
        return {"tokenizer": {k: v for k, v in asdict(config.tokenizer).items()
                              if k not in SAMPLING_KEYS}}
    train_settings = {k: v for k, v in asdict(config.train).items() if k not in BOUND_KEYS}
    # Sampling changes what the model trains on: a run resumed with other sampling keys
    # would not continue the run it resumes, so they are the model stage's settings. Off
    # (sample_alpha 0 or null), the others do nothing: recorded at their defaults.
    sampled = config.tokenizer if config.tokenizer.sample_alpha else TokenizerConfig()
    sampling = {k: getattr(sampled, k) for k in sorted(SAMPLING_KEYS)}
    return {"model": asdict(config.model), "train": train_settings, "tokenizer": sampling}


# --- The run directory -------------------------------------------------------------------------


def claim_run_dir(run_dir: Path) -> None:
    """Refuse a directory that is neither new, nor empty, nor a traduire run (run.json):
    anything else (a project folder, `.`, a data folder) holds files that are not ours."""
    if run_dir.is_symlink() and not run_dir.exists() or run_dir.is_file():
        raise TraduireError(f"{run_dir}: exists and is not a directory; choose another "
                            "--run-dir")
    if not run_dir.exists() or (run_dir / "run.json").is_file():
        return
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()
                         if not _launch_file(p.name))
    except OSError as e:
        raise TraduireError(f"{run_dir}: cannot read it ({e.strerror})") from None
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more"
                                          if len(entries) > 5 else "")
        raise TraduireError(f"{run_dir}: not a traduire run directory (it holds {shown}); "
                            "nothing was written. Choose a new or empty --run-dir")


def _launch_file(name: str) -> bool:
    """One of LAUNCH_FILES, or the temporary file it is being written as (files.atomic_open:
    rank 0's heartbeat writes while its stages check the directory)."""
    return name in LAUNCH_FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp")
                                       for f in LAUNCH_FILES)


def check_run_dir(run_dir: Path, config: Config, overwrite: bool,
                  stages: tuple[str, ...] = STAGES) -> str | None:
    """Compare the config with the stages already run. Returns the first stage to redo because
    of `overwrite` (None if nothing changed); raises TraduireError if something changed and
    `overwrite` is off."""
    claim_run_dir(run_dir)
    _check_format(run_dir)
    for stage in stages:
        record = _read_record(run_dir, stage)
        if record is None:
            continue
        settings = stage_settings(config, stage)
        changed = changed_keys(_with_added_keys(record["settings"], settings, stage), settings)
        if not changed:
            continue
        if overwrite:
            return stage
        raise TraduireError(
            f"{run_dir}: the {stage} stage was run with other settings; changed: "
            f"{', '.join(changed)}. Use --overwrite to redo the {stage} stage and those after it "
            f"(old outputs are moved to {run_dir / 'old'}), or choose another --run-dir")
    return None


def _with_added_keys(recorded: dict[str, Any], settings: dict[str, Any], stage: str
                     ) -> dict[str, Any]:
    """A stage record with the keys of `settings` it lacks filled in at their defaults: keys
    added to traduire after the stage ran, which a config that leaves them at their default
    computes as that run did (a record written before `train.decay_fraction` existed still
    matches a config that does not set it)."""
    defaults = stage_settings(Config(), stage)
    filled = dict(recorded)
    for section, values in settings.items():
        old = recorded.get(section, {})
        if not isinstance(values, dict) or not isinstance(old, dict):
            continue
        added = {k: v for k, v in defaults.get(section, {}).items() if k in values
                 and k not in old}
        filled[section] = {**added, **old}
    return filled


def _start(run_dir: Path, config: Config, redo: str | None) -> None:
    """Mark the directory as a run, move aside what `overwrite` redoes, record the config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run.json",
                      json.dumps({"format_version": RUN_FORMAT_VERSION}) + "\n")
    if redo is not None:
        later = STAGES[STAGES.index(redo):]
        paths = [run_dir / name for s in later for name in STAGE_OUTPUTS[s]]
        paths += [run_dir / "stages" / f"{s}.json" for s in later]
        moved = move_aside(paths, run_dir)
        if moved:
            console.print(f"overwrite: redoing the {redo} stage; old outputs moved to {moved}",
                          markup=False, highlight=False, soft_wrap=True)
    atomic_write_text(run_dir / "config.yaml",
                      yaml.safe_dump(plain(config.to_dict()), sort_keys=False))


def _move_leftovers(run_dir: Path, stage: str) -> None:
    """Outputs of a stage that has no record (it was interrupted, or its record was removed)
    are moved to old/, never deleted, before the stage runs again."""
    moved = move_aside([run_dir / name for name in STAGE_OUTPUTS[stage]], run_dir)
    if moved:
        console.print(f"{stage}: outputs without a stage record moved to {moved}",
                      markup=False, highlight=False, soft_wrap=True)


def _processes(workers: int) -> str:
    return f"up to {workers} processes" if workers > 1 else "1 process"


def _train_source(config: Config) -> str:
    """Where the training pairs come from, for messages."""
    d = config.data
    if d.source == "files":
        root = Path(d.dir).expanduser()
        if d.format == "text":
            return f"{root / d.train_prefix}.{{{d.src_lang},{d.tgt_lang}}}"
        return str(root / f"{d.train_prefix}.{d.format}")
    if d.source == "hub":
        return f"{d.hub_name} ({d.train_split})"
    return f"bible {d.bible_src}/{d.bible_tgt}"


def _read_record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = run_dir / "stages" / f"{stage}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: unreadable stage record") from None


def write_record(run_dir: Path, stage: str, config: Config) -> None:
    settings = plain(stage_settings(config, stage))
    atomic_write_text(run_dir / "stages" / f"{stage}.json", json.dumps(
        {"fingerprint": fingerprint(settings), "settings": settings}, indent=2) + "\n")


def _check_format(run_dir: Path) -> None:
    path = run_dir / "run.json"
    if not path.exists():
        return
    try:
        version = json.loads(path.read_text(encoding="utf-8"))["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: unreadable run directory record") from None
    if version > RUN_FORMAT_VERSION:
        raise CheckpointError(f"{run_dir}: made by a newer traduire (run format {version}, "
                              f"this version reads {RUN_FORMAT_VERSION}); upgrade traduire")
