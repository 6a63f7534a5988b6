"""The run directory and the three stages that fill it: data -> tokenizer -> model.

Each stage records the settings it was run with in stages/<stage>.json. A later `train` skips a
stage whose record matches the config, refuses to go on if the settings of a finished stage
changed (naming the keys), and with `overwrite` redoes the first changed stage and all after it,
after moving their old outputs into old/<timestamp>/.

Run directory layout:
  config.yaml             the resolved config of the latest run
  run.json                format version of the directory
  stages/<stage>.json     settings each stage was run with
  data/{train,valid}      cleaned text pairs (Arrow), data/report.json: what was dropped and why;
                          data/test.<lang>: held-out test text where the source has a test split
  tokenizer/spm.model     SentencePiece model(s)
  encoded/{train,valid}   token ids (Arrow)
  checkpoints/step_N.pt   periodic checkpoints; best.pt: best validation loss
  metrics.jsonl           one JSON object per log line and validation
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import yaml
from rich.console import Console

from traduire import distributed
from traduire.checkpoint import atomic_directory, atomic_write_text, move_aside
from traduire.config import BOUND_KEYS, Config, changed_keys, fingerprint
from traduire.data import EncodedCorpus, clean, load_corpus
from traduire.errors import CheckpointError, DataError, TraduireError
from traduire.tokenizer import Tokenizer, encode_corpus, train_tokenizer
from traduire.train import Trainer, TrainState, resolve_device

log = logging.getLogger(__name__)
console = Console(stderr=True)

RUN_FORMAT_VERSION = 1
STAGES = ("data", "tokenizer", "model")
STAGE_OUTPUTS = {"data": ["data"], "tokenizer": ["tokenizer", "encoded"],
                 "model": ["checkpoints", "best.pt", "metrics.jsonl"]}


def stage_settings(config: Config, stage: str) -> dict[str, Any]:
    """The config keys whose values determine a stage's output."""
    if stage == "data":
        return {"data": asdict(config.data)}
    if stage == "tokenizer":
        return {"tokenizer": asdict(config.tokenizer)}
    train = {k: v for k, v in asdict(config.train).items() if k not in BOUND_KEYS}
    return {"model": asdict(config.model), "train": train}


def check_run_dir(run_dir: Path, config: Config, overwrite: bool) -> str | None:
    """Compare the config with the stages already run. Returns the first stage to redo because
    of `overwrite` (None if nothing changed); raises TraduireError if something changed and
    `overwrite` is off."""
    _check_format(run_dir)
    for stage in STAGES:
        record = _read_record(run_dir, stage)
        if record is None:
            continue
        changed = changed_keys(record["settings"], stage_settings(config, stage))
        if not changed:
            continue
        if overwrite:
            return stage
        raise TraduireError(
            f"{run_dir}: the {stage} stage was run with other settings; changed: "
            f"{', '.join(changed)}. Use --overwrite to redo the {stage} stage and those after it "
            f"(old outputs are moved to {run_dir / 'old'}), or choose another --run-dir")
    return None


def run(config: Config, run_dir: Path, overwrite: bool = False) -> TrainState:
    """Run every stage that is not already done, then train (or continue training)."""
    run_dir = Path(run_dir)
    ctx = distributed.init(resolve_device(config.train.device).type)
    redo = check_run_dir(run_dir, config, overwrite)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if redo is not None:
            _redo_from(run_dir, redo)
        atomic_write_text(run_dir / "run.json",
                          json.dumps({"format_version": RUN_FORMAT_VERSION}) + "\n")
        atomic_write_text(run_dir / "config.yaml",
                          yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))
        # Data and tokenizer run once; the other ranks wait, then read what rank 0 wrote.
        prepare_data(config, run_dir)
        prepare_tokenizer(config, run_dir)
        _write_record(run_dir, "model", config)
    distributed.barrier()
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    train_data = EncodedCorpus(datasets.load_from_disk(str(run_dir / "encoded" / "train")),
                               max_len=min(config.train.max_len, config.model.max_positions))
    valid_data = EncodedCorpus(datasets.load_from_disk(str(run_dir / "encoded" / "valid")),
                               max_len=config.model.max_positions)
    if len(train_data) == 0:
        raise DataError(f"no training pair fits train.max_len={config.train.max_len} tokens")
    return Trainer(config, run_dir, tokenizer, train_data, valid_data).train()


def prepare_data(config: Config, run_dir: Path) -> None:
    """Stage 1: load, clean and save the corpus as Arrow."""
    if _read_record(run_dir, "data") is not None and (run_dir / "data").is_dir():
        console.print("data: done (skipped)")
        return
    console.print("data: loading and cleaning the corpus")
    raw = load_corpus(config.data, run_dir / "cache")
    report: dict[str, Any] = {}
    with atomic_directory(run_dir / "data") as out:
        for split, pairs in raw.items():
            kept, dropped = clean(pairs, config.data)
            if split == "valid" and config.data.max_valid:
                kept = kept.select(range(min(len(kept), config.data.max_valid)))
            if split == "train" and len(kept) == 0:
                why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(dropped.items()))
                raise DataError(f"{_train_source(config)}: the training corpus is empty after "
                                f"cleaning ({len(pairs):,} pairs read; dropped: "
                                f"{why or 'none'})")
            kept.save_to_disk(str(out / split))
            if split == "test":  # held-out text for `traduire eval`, as plain aligned files
                for column, lang in (("src", config.data.src_lang), ("tgt", config.data.tgt_lang)):
                    atomic_write_text(out / f"test.{lang}", "".join(f"{line}\n"
                                                                     for line in kept[column]))
            report[split] = {"read": len(pairs), "kept": len(kept), "dropped": dropped}
            console.print(f"  {split}: {len(pairs):,} pairs read, {len(kept):,} kept"
                          + "".join(f", {n:,} {why}" for why, n in sorted(dropped.items())))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_record(run_dir, "data", config)


def prepare_tokenizer(config: Config, run_dir: Path) -> None:
    """Stage 2: train SentencePiece and encode both splits."""
    if _read_record(run_dir, "tokenizer") is not None and (run_dir / "encoded").is_dir():
        console.print("tokenizer: done (skipped)")
        return
    train = datasets.load_from_disk(str(run_dir / "data" / "train"))
    valid = datasets.load_from_disk(str(run_dir / "data" / "valid"))
    console.print(f"tokenizer: training SentencePiece {config.tokenizer.model_type} "
                  f"({config.tokenizer.vocab_size} pieces) on {len(train):,} pairs")
    with atomic_directory(run_dir / "tokenizer") as out:
        tokenizer = train_tokenizer(train, config.tokenizer, out)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    cache = run_dir / "cache"
    cache.mkdir(exist_ok=True)
    # The cache file is named by the settings that made it: `datasets` reuses a cache file
    # by name alone, so a retrained tokenizer must never find the old one.
    key = fingerprint(_plain({**stage_settings(config, "data"),
                              **stage_settings(config, "tokenizer")}))
    with atomic_directory(run_dir / "encoded") as out:
        for split, pairs in (("train", train), ("valid", valid)):
            encoded = encode_corpus(pairs, tokenizer, cache / f"encoded-{split}-{key}.arrow")
            encoded.save_to_disk(str(out / split))
            console.print(f"  {split}: {sum(encoded['src_len']):,} source and "
                          f"{sum(encoded['tgt_len']):,} target pieces")
    _write_record(run_dir, "tokenizer", config)


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


# --- stage records -----------------------------------------------------------------------------


def _read_record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = run_dir / "stages" / f"{stage}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: unreadable stage record") from None


def _write_record(run_dir: Path, stage: str, config: Config) -> None:
    settings = _plain(stage_settings(config, stage))
    atomic_write_text(run_dir / "stages" / f"{stage}.json", json.dumps(
        {"fingerprint": fingerprint(settings), "settings": settings}, indent=2) + "\n")


def _redo_from(run_dir: Path, stage: str) -> None:
    later = STAGES[STAGES.index(stage):]
    paths = [run_dir / name for s in later for name in STAGE_OUTPUTS[s]]
    paths += [run_dir / "stages" / f"{s}.json" for s in later]
    moved = move_aside(paths, run_dir)
    if moved:
        console.print(f"overwrite: redoing the {stage} stage; old outputs moved to {moved}",
                      markup=False, highlight=False, soft_wrap=True)


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


def _plain(value: Any) -> Any:
    """Tuples -> lists, so records compare equal after a JSON/YAML round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

