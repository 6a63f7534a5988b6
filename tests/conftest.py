"""Shared fixtures: a toy English->French corpus and a tiny config that trains on it in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

# A made-up word-for-word mapping: enough structure for a tiny model to learn, few pieces.
LEXICON = {
    "the": "le", "a": "un", "dog": "chien", "cat": "chat", "bird": "oiseau", "horse": "cheval",
    "runs": "court", "sleeps": "dort", "eats": "mange", "sings": "chante", "jumps": "saute",
    "big": "grand", "small": "petit", "red": "rouge", "green": "vert", "here": "ici",
    "now": "maintenant", "today": "aujourd'hui",
}
DETERMINERS = ["the", "a"]
ADJECTIVES = ["big", "small", "red", "green"]
NOUNS = ["dog", "cat", "bird", "horse"]
VERBS = ["runs", "sleeps", "eats", "sings", "jumps"]
ADVERBS = ["here", "now", "today"]


def make_pair(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words += [rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADVERBS))
    return " ".join(words), " ".join(LEXICON[w] for w in words)


def write_corpus(directory: Path, n_train: int = 200, n_valid: int = 20, seed: int = 0) -> Path:
    """Write train.en/train.fr/val.en/val.fr into `directory` and return it."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("val", n_valid)):
        pairs = [make_pair(rng) for _ in range(n)]
        (directory / f"{prefix}.en").write_text("".join(s + "\n" for s, _ in pairs), "utf-8")
        (directory / f"{prefix}.fr").write_text("".join(t + "\n" for _, t in pairs), "utf-8")
    return directory


TINY_SETTINGS = {
    "tokenizer": {"vocab_size": 40},
    "model": {"layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64, "max_positions": 64},
    # fp32: the same numbers on every CPU (precision auto would be bf16 on some).
    "train": {"batch_tokens": 256, "max_steps": 20, "warmup_steps": 10, "save_every": 10,
              "valid_every": 10, "log_every": 5, "lr": 0.003, "progress": False,
              "precision": "fp32"},
}


def tiny_settings(data_dir: Path, **sections: dict) -> dict:
    """The tiny config as a dict, with some keys of some sections replaced."""
    settings = {"data": {"dir": str(data_dir)}}
    for name, values in TINY_SETTINGS.items():
        settings[name] = dict(values)
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    return settings


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def one_line_error(result, *expected: str, after_progress: bool = False, case: str = "") -> str:
    """A CLI result that failed as a user error: exit status 1, no traceback, and one line on
    stderr that starts with 'error:' and contains every expected text. It is the last line, and
    the only one unless `after_progress` (progress lines before it). With `case`, the line is
    printed as "MESSAGE case -> error: ..." (`pytest -s` shows every case's message)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], lines
    if not after_progress:
        assert len(lines) == 1, lines
    for text in expected:
        assert text in errors[0], errors[0]
    if case:
        print(f"MESSAGE {case} -> {errors[0]}")
    return errors[0]


@pytest.fixture(autouse=True)
def _few_threads():
    """The machine is shared: keep torch to one thread in every test (and restore after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A fresh toy aligned corpus (200 train / 20 valid pairs) in tmp_path/data."""
    return write_corpus(tmp_path / "data")


@pytest.fixture
def tiny_config_path(tmp_path: Path, corpus_dir: Path) -> Path:
    """A tiny YAML config (1 layer, d_model 32, 40 pieces, 20 steps) for `corpus_dir`."""
    return write_config(tmp_path / "tiny.yaml", tiny_settings(corpus_dir))


@pytest.fixture
def tiny_config(tiny_config_path: Path):
    from traduire.config import load_config

    return load_config(tiny_config_path)


# Smaller than the tiny config: every process start and step counts on a shared CPU. Used by
# the reliability, bad-input and fuzz tests through the session-wide `small_run`.
SMALL_SETTINGS = {
    "model": {"d_model": 16, "heads": 2, "ffn_dim": 32, "max_positions": 32},
    "train": {"max_steps": 6, "save_every": 2, "valid_every": 1000, "log_every": 1000,
              "keep_last": 100, "threads": 1, "warmup_steps": 4},
}


def small_settings(data_dir: Path, **sections: dict) -> dict:
    """The small config as a dict, with some keys of some sections replaced."""
    settings = tiny_settings(data_dir, **SMALL_SETTINGS)
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    return settings


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, run dir) of a small run trained in-process to step 6 (checkpoints at 2, 4,
    6 and best.pt), made once per session. Tests must not change it: copy it to train on."""
    from traduire.config import load_config
    from traduire.pipeline import run

    root = tmp_path_factory.mktemp("small-run")
    config_path, run_dir = root / "small.yaml", root / "run"
    write_config(config_path, small_settings(write_corpus(root / "data")))
    run(load_config(config_path), run_dir)
    return config_path, run_dir


@pytest.fixture(scope="session")
def inspect_run(tmp_path_factory) -> Path:
    """A run trained for 10 steps (2 layers, d_model 32): enough to exercise every path of
    analysis and report. Tests must not change it."""
    from traduire.config import config_from_dict
    from traduire.pipeline import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inspect")
    settings = tiny_settings(write_corpus(root / "data"), model={"layers": 2},
                             train={"max_steps": 10, "save_every": 10, "valid_every": 10})
    run(config_from_dict(settings), root / "run")
    torch.set_num_threads(before)
    return root / "run"


def toy_sentences() -> list[str]:
    """60 sentences of the toy language, then 60 word salads of its words."""
    rng = random.Random(5)
    words = [*LEXICON]
    return ([make_pair(rng)[0] for _ in range(60)]
            + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(60)])


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """A run that learns the toy corpus (120 steps, word-level pieces, no dropout), with
    checkpoints at step 60, where it still often prefers an empty translation, and 120, where
    beam search and greedy search part ways on some sentences. Tests must not change it."""
    from traduire.config import config_from_dict
    from traduire.pipeline import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learned")
    settings = tiny_settings(write_corpus(root / "data"), tokenizer={"vocab_size": 64},
                             model={"dropout": 0.0},
                             train={"max_steps": 120, "save_every": 60, "valid_every": 120,
                                    "log_every": 120, "lr": 0.01, "warmup_steps": 5,
                                    "schedule": "linear", "decay_steps": 1000})
    run(config_from_dict(settings), root / "run")
    torch.set_num_threads(before)
    return root / "run"
