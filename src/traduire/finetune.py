"""Fine-tuning: a run that starts from another run's weights (`train.init_from`).

The source is a run directory (its average.pt or best.pt, as translate picks), one of its
checkpoints, or a run `traduire import` made. The new run takes the source's tokenizer (so its
ids mean what the weights learned) and architecture, and its own data, optimizer and schedule.
Its run directory records where it started (init_from.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from traduire.checkpoint import check_vocabulary, default_checkpoint, load_checkpoint
from traduire.config import ARCHITECTURE_KEYS, Config, config_from_dict
from traduire.errors import ConfigError
from traduire.files import atomic_write_text, run_dir_of
from traduire.tokenizer import Tokenizer

RECORD = "init_from.json"


@dataclass(frozen=True)
class InitSource:
    run_dir: Path  # the run the weights come from
    checkpoint: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.run_dir / "tokenizer"


def init_source(path: str | Path) -> InitSource:
    """The run and checkpoint `train.init_from` names; ConfigError if it names neither."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"'train.init_from': {path} not found")
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ConfigError(f"'train.init_from': {path} is neither a traduire run directory nor "
                          "a checkpoint inside one (fine-tuning needs the run's tokenizer)")
    return InitSource(run_dir, default_checkpoint(run_dir) if path.is_dir() else path)


def check_architecture(config: Config, source: Config, origin: str) -> None:
    """Refuse, naming the key, a config whose architecture differs from the source's."""
    for key in ARCHITECTURE_KEYS:
        ours, theirs = getattr(config.model, key), getattr(source.model, key)
        if ours != theirs:
            raise ConfigError(f"'model.{key}' is {ours!r}, but {origin} (train.init_from) has "
                              f"{theirs!r}: fine-tuning keeps the source's architecture; leave "
                              f"the key out or set it to {theirs!r}")


def load_initial_weights(model: torch.nn.Module, config: Config, tokenizer: Tokenizer
                         ) -> dict[str, Any]:
    """Load the weights `config.train.init_from` names into `model`; returns what was loaded
    (for the run's record)."""
    source = init_source(config.train.init_from)
    state = load_checkpoint(source.checkpoint, map_location="cpu")
    check_vocabulary(state, tokenizer, source.checkpoint, source.tokenizer_dir)
    check_architecture(config, config_from_dict(state["config"], str(source.checkpoint)),
                       str(source.checkpoint))
    model.load_state_dict(state["model"])
    return {"init_from": str(config.train.init_from),
            "checkpoint": str(source.checkpoint.resolve()),
            "step": (state.get("train_state") or {}).get("step", 0),
            "vocabulary": state.get("vocabulary")}


def record_origin(run_dir: Path, record: dict[str, Any]) -> None:
    """Write RUN/init_from.json: the checkpoint the run started from, and its step."""
    atomic_write_text(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
