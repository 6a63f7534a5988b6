"""Tests for traduire.config: defaults, errors that name the key, overrides, durations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from traduire.config import (
    BOUND_KEYS,
    MODEL_PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    changed_keys,
    config_from_dict,
    encoder_decoder_layers,
    fingerprint,
    load_config,
    parse_duration,
    replace,
)
from traduire.errors import ConfigError


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# The defaults read files from data.dir, which has no default: every config must name it.
DIR = "data.dir=corpus"


def test_defaults_without_a_data_dir_name_the_key():
    with pytest.raises(ConfigError, match="data.dir"):
        load_config(None)


def test_defaults_load():
    config = load_config(None, [DIR])
    assert config == Config(data=DataConfig(dir="corpus"))
    assert config.model.layers == 6 and config.model.d_model == 512
    assert config.data.source == "files" and config.data.dir == "corpus"
    assert config.train.adam_betas == (0.9, 0.98)


def test_tiny_config_loads_with_its_values(tiny_config_path, corpus_dir):
    config = load_config(tiny_config_path)
    assert config.data.dir == str(corpus_dir)
    assert config.tokenizer.vocab_size == 40
    assert config.model == ModelConfig(layers=1, d_model=32, heads=2, ffn_dim=64,
                                       max_positions=64)
    assert config.train.progress is False
    # A float field written as an int in YAML becomes a float.
    assert isinstance(config.train.lr, float)


def test_unknown_key_names_key_and_file_and_suggests(tmp_path):
    path = write_yaml(tmp_path, "model:\n  layerz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "model.layerz" in message
    assert str(path) in message
    assert "'layers'" in message


def test_unknown_section_is_refused(tmp_path):
    path = write_yaml(tmp_path, "modle:\n  layers: 3\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    path = write_yaml(tmp_path, 'model:\n  d_model: "big"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.d_model" in str(info.value)
    assert "big" in str(info.value)


def test_bool_is_not_an_integer(tmp_path):
    path = write_yaml(tmp_path, "model:\n  layers: true\n")
    with pytest.raises(ConfigError, match="model.layers"):
        load_config(path)


def test_literal_value_checked(tmp_path):
    path = write_yaml(tmp_path, "model:\n  norm: middle\n")
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(path)


def test_override_is_typed_and_applied(tiny_config_path):
    config = load_config(tiny_config_path, ["model.layers=6", "train.lr=0.5",
                                            "train.max_time=30m", "data.dedupe=false"])
    assert config.model.layers == 6 and isinstance(config.model.layers, int)
    assert config.train.lr == 0.5
    assert config.train.max_time == "30m"
    assert config.data.dedupe is False
    # Other keys of the overridden section survive.
    assert config.model.d_model == 32


def test_float_in_exponent_notation(tmp_path):
    path = write_yaml(tmp_path, "data: {dir: corpus}\ntrain:\n  lr: 5e-4\n")
    assert load_config(path).train.lr == 5e-4
    assert load_config(None, [DIR, "train.lr=1e-3"]).train.lr == 1e-3


def test_override_without_file():
    assert load_config(None, [DIR, "model.layers=2"]).model.layers == 2


def test_override_bad_value_is_validated(tiny_config_path):
    with pytest.raises(ConfigError, match="model.layers"):
        load_config(tiny_config_path, ["model.layers=abc"])
    with pytest.raises(ConfigError, match="model.layers"):
        load_config(tiny_config_path, ["model.layers=0"])


def test_override_unknown_key_and_bad_form(tiny_config_path):
    with pytest.raises(ConfigError, match="model.layerz"):
        load_config(tiny_config_path, ["model.layerz=6"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(tiny_config_path, ["layers=6"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(tiny_config_path, ["model.layers"])


def test_d_model_not_divisible_by_heads(tmp_path):
    path = write_yaml(tmp_path, "model:\n  d_model: 30\n  heads: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.d_model" in str(info.value) and "model.heads" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("model.layers", 0), ("model.d_model", -32), ("model.heads", 0), ("model.ffn_dim", -1),
    ("tokenizer.vocab_size", 0), ("train.batch_tokens", 0), ("train.lr", -0.1),
    ("model.encoder_layers", 0), ("train.warmup_steps", -1), ("train.max_steps", -5),
])
def test_non_positive_sizes_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [DIR, f"{key}={value}"])


@pytest.mark.parametrize("key, value", [("model.dropout", 1.0), ("model.dropout", -0.1),
                                        ("train.label_smoothing", 1.5)])
def test_probabilities_in_range(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [DIR, f"{key}={value}"])


def test_special_ids_must_fit_the_vocabulary():
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(None, [DIR, "tokenizer.vocab_size=3"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, [DIR, "tokenizer.bos_id=0"])


def test_shared_embeddings_need_joint_vocabulary():
    with pytest.raises(ConfigError, match="share_embeddings"):
        load_config(None, [DIR, "tokenizer.joint=false"])
    config = load_config(None, [DIR, "tokenizer.joint=false", "model.share_embeddings=false"])
    assert not config.model.share_embeddings


def test_files_source_needs_a_directory(tmp_path):
    path = write_yaml(tmp_path, "data:\n  source: files\n")
    with pytest.raises(ConfigError, match="data.dir"):
        load_config(path)


def test_adam_betas_tuple_from_list(tmp_path):
    path = write_yaml(tmp_path, "data: {dir: corpus}\ntrain:\n  adam_betas: [0.8, 0.9]\n")
    assert load_config(path).train.adam_betas == (0.8, 0.9)
    path = write_yaml(tmp_path, "train:\n  adam_betas: [0.8]\n", "bad.yaml")
    with pytest.raises(ConfigError, match="train.adam_betas"):
        load_config(path)


@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800.0), ("1h30m", 5400.0), ("2h", 7200.0), ("90s", 90.0), ("90", 90.0),
    ("1h0m30s", 3630.0), ("1.5h", 5400.0), (" 10M ", 600.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30x", "", "h", "m30", "1h-5m", "30 m"])
def test_parse_duration_refuses_bad_text(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_bad_max_time_is_a_config_error(tmp_path):
    path = write_yaml(tmp_path, "data: {dir: corpus}\ntrain:\n  max_time: 30x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.max_time" in str(info.value) and "30x" in str(info.value)
    assert load_config(None, [DIR, "train.max_time=1h30m"]).train.max_time == "1h30m"


def test_python_object_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write_yaml(tmp_path, "model: !!python/object/apply:os.system\n"
                                f"  - 'touch {marker}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    path = write_yaml(tmp_path, "model: !!python/object:traduire.config.ModelConfig\n"
                                "  layers: 2\n", "object.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write_yaml(tmp_path, "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path, "model: 3\n", "scalar.yaml"))


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), [DIR]) == Config(data=DataConfig(dir="corpus"))
    path = write_yaml(tmp_path, "data: {dir: corpus}\nmodel:\n", "empty.yaml")
    assert load_config(path).model == ModelConfig()


def test_changed_keys_names_dotted_keys():
    old = load_config(None, [DIR]).to_dict()
    new = load_config(None, [DIR, "model.layers=3", "train.lr=0.5"]).to_dict()
    assert changed_keys(old, new) == ["model.layers", "train.lr"]
    # Tuples and lists with equal items (a JSON round trip) are not a change.
    old["train"]["adam_betas"] = list(old["train"]["adam_betas"])
    assert changed_keys(old, load_config(None, [DIR]).to_dict()) == []
    assert changed_keys(old, Config().to_dict()) == ["data.dir"]


def test_bound_keys_are_train_keys():
    names = {f for f in TrainConfig.__dataclass_fields__}
    assert BOUND_KEYS <= names
    # Keys that change what training computes must not be bound keys.
    assert not {"lr", "seed", "batch_tokens", "warmup_steps", "label_smoothing"} & BOUND_KEYS


@pytest.mark.parametrize("text", ["train: {lr: .nan}", "train: {lr: .inf}", "train: {lr: nan}",
                                  "model: {dropout: -.inf}", "train: {adam_betas: [0.9, .nan]}",
                                  "train: {clip_norm: inf}"])
def test_not_a_number_and_infinity_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{dir: x}}\n{text}\n")
    key = text.split(":")[0] + "." + text.split("{")[1].split(":")[0]
    with pytest.raises(ConfigError, match=rf"c.yaml: '{re.escape(key)}' must be a finite number"):
        load_config(path)
    value = text.split(": ", 2)[2].rstrip("}")
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, ["data.dir=x", f"{key}={value}"])


# --- every check names its key and where the value came from ------------------------------------


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


POSITIVE = ["tokenizer.vocab_size", "model.layers", "model.encoder_layers",
            "model.decoder_layers", "model.d_model", "model.heads", "model.ffn_dim",
            "model.max_positions", "train.batch_tokens", "train.accumulate", "train.max_len",
            "train.lr", "train.save_every", "train.keep_last", "train.valid_every",
            "train.log_every", "train.valid_bleu_sentences", "train.valid_beam",
            "train.max_bad_steps", "data.max_words", "data.max_ratio"]
NON_NEGATIVE = ["train.max_steps", "train.max_epochs", "train.warmup_steps", "train.clip_norm",
                "train.threads", "train.decay_steps", "train.min_lr", "train.patience",
                "train.average_last", "data.max_valid", "data.workers",
                "tokenizer.input_sentence_size"]
PROBABILITIES = ["model.dropout", "model.attention_dropout", "model.activation_dropout",
                 "train.label_smoothing"]
FLOATS = {"train.lr", "data.max_ratio", "train.clip_norm", "train.min_lr", *PROBABILITIES}


@pytest.mark.parametrize("key", POSITIVE + NON_NEGATIVE + PROBABILITIES)
def test_every_range_check_names_the_key_the_file_and_the_value(tmp_path, key):
    section, name = key.split(".")
    bad = 0 if key in POSITIVE else -1 if key in NON_NEGATIVE else 1
    path = write_yaml(tmp_path, f"data: {{dir: corpus}}\n{section}: {{{name}: {bad}}}\n")
    shown = float(bad) if key in FLOATS else bad
    rule = ("must be positive" if key in POSITIVE else "must not be negative"
            if key in NON_NEGATIVE else "must be in [0, 1)")
    assert error_of(path) == f"{path}: '{key}' {rule}; got {shown}"


def test_checks_that_join_keys_say_which(tmp_path):
    path = write_yaml(tmp_path, "data: {source: hub}\n")
    assert error_of(path) == \
        f"{path}: 'data.hub_name' is required when data.source is 'hub'"
    assert load_config(path, ["data.hub_name=wmt14"]).data.hub_name == "wmt14"
    assert error_of(None, DIR, "train.schedule=cosine") == (
        "defaults: 'train.schedule: cosine' needs 'train.decay_steps' or 'train.max_steps' "
        "to know when to end")
    for bound in ("train.decay_steps=100", "train.max_steps=100"):
        assert load_config(None, [DIR, "train.schedule=linear", bound]).train.schedule == \
            "linear"
    assert error_of(None, DIR, "train.best_metric=bleu") == \
        "defaults: 'train.best_metric: bleu' needs 'train.valid_bleu: true'"
    assert load_config(None, [DIR, "train.best_metric=bleu", "train.valid_bleu=true"])
    for coverage in (0, 1.5):
        assert error_of(None, DIR, f"tokenizer.character_coverage={coverage}") == \
            "defaults: 'tokenizer.character_coverage' must be in (0, 1]"
    assert load_config(None, [DIR, "tokenizer.character_coverage=1"])


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("model: {layers: abc}", "'model.layers' must be an integer; got str 'abc'"),
    ("model: {layers: null}", "'model.layers' must be an integer; got NoneType None"),
    ("model: {encoder_layers: x}", "'model.encoder_layers' must be an integer; got str 'x'"),
    ("train: {lr: true}", "'train.lr' must be a number; got bool True"),
    ("train: {lr: .nan}", "'train.lr' must be a finite number; got nan"),
    ("data: {max_ratio: .inf}", "'data.max_ratio' must be a finite number; got inf"),
    ("train: {adam_betas: [0.9, x]}", "'train.adam_betas' must be a number; got str 'x'"),
    ("data: {dedupe: 3}", "'data.dedupe' must be true or false; got int 3"),
    ("data: {src_lang: [en]}", "'data.src_lang' must be a string; got list ['en']"),
    ("data: {src_lang: true}", "'data.src_lang' must be a string; got bool True"),
    ("model: {norm: middle}", "'model.norm' must be one of pre, post; got 'middle'"),
    ("model: {zzzz: 1}", "unknown key 'model.zzzz'"),
    ("model: {layerz: 1}", "unknown key 'model.layerz' (did you mean 'layers'?)"),
    ("modle: {layers: 1}", "unknown section 'modle' (expected one of data, tokenizer, model, "
                           "train)"),
])
def test_type_errors_say_what_was_expected_and_what_came(tmp_path, yaml_text, message):
    path = write_yaml(tmp_path, "data: {dir: corpus}\n" * ("data:" not in yaml_text)
                      + yaml_text + "\n")
    assert error_of(path) == f"{path}: {message}"


def test_values_are_converted_where_yaml_reads_them_otherwise(tmp_path):
    path = write_yaml(tmp_path, "data: {dir: '2024', bible_src: 4, max_ratio: 3}\n"
                                "model: {encoder_layers: null, decoder_layers: 2}\n"
                                "train: {lr: 1, adam_betas: [1, 0.5]}\n")
    config = load_config(path)
    assert config.data.dir == "2024" and config.data.bible_src == "4"
    assert config.data.max_ratio == 3.0 and isinstance(config.data.max_ratio, float)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.adam_betas == (1.0, 0.5) and isinstance(config.train.adam_betas[0],
                                                                float)
    assert config.model.encoder_layers is None
    assert encoder_decoder_layers(config.model) == (6, 2)
    assert encoder_decoder_layers(ModelConfig(layers=3, encoder_layers=4)) == (4, 3)


def test_a_preset_fills_in_the_model_keys_the_config_leaves_out():
    for name, values in MODEL_PRESETS.items():
        model = load_config(None, [DIR, f"model.preset={name}"]).model
        assert {key: getattr(model, key) for key in values} == values
    model = load_config(None, [DIR, "model.preset=big", "model.layers=2"]).model
    assert (model.layers, model.d_model, model.dropout) == (2, 1024, 0.3)
    assert config_from_dict({"data": {"dir": "x"}, "model": {"preset": None}}).model == \
        ModelConfig()


def test_where_an_error_comes_from_is_named(tmp_path):
    assert error_of(None, DIR, "model.layers=0") == \
        "defaults: 'model.layers' must be positive; got 0"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"dir": "x"}, "model": {"heads": "8"}})
    assert str(info.value) == "config: 'model.heads' must be an integer; got str '8'"
    path = write_yaml(tmp_path, "data: {dir: x}\nmodel: 3\n")
    assert error_of(path, "model.layers=2") == f"{path}: section 'model' must be a mapping"
    # The reader's and the parser's own words, on one line.
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read config: ")
    (tmp_path / "latin1.yaml").write_bytes("data: {dir: caf\xe9}\n".encode("latin-1"))
    assert "cannot read config: 'utf-8' codec" in error_of(tmp_path / "latin1.yaml")
    broken = error_of(write_yaml(tmp_path, "model: [1, 2\n", "broken.yaml"))
    assert broken.startswith(f"{tmp_path / 'broken.yaml'}: invalid YAML: while parsing a flow")
    assert "\n" not in broken and "  " not in broken


def test_overrides_split_on_the_first_equals_sign_and_keep_text_yaml_cannot_read():
    config = load_config(None, ["data.dir=a=b", "data.train_prefix=[x", "train.max_time="])
    assert config.data.dir == "a=b"
    assert config.data.train_prefix == "[x"
    assert config.train.max_time is None
    with pytest.raises(ConfigError, match=r"unknown key 'model\.a\.b'"):
        load_config(None, [DIR, "model.a.b=1"])


def test_changed_keys_with_keys_on_one_side_and_a_section_replaced_by_a_value():
    assert changed_keys({"a": 1, "s": {"x": 1}}, {"b": 1, "s": {"x": 1, "y": 2}}) == \
        ["a", "b", "s.y"]
    assert changed_keys({"s": {"x": 1}}, {"s": 3}) == ["s"]
    assert changed_keys({"s": 3}, {"s": {"x": 1}}) == ["s"]


def test_fingerprints_depend_on_the_settings_only():
    a = fingerprint({"model": {"layers": 2, "d_model": 32}, "betas": (0.9, 0.98)})
    b = fingerprint({"betas": [0.9, 0.98], "model": {"d_model": 32, "layers": 2}})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert fingerprint({"model": {"layers": 3, "d_model": 32}, "betas": (0.9, 0.98)}) != a
    assert fingerprint({"ids": range(3)}) == fingerprint({"ids": [0, 1, 2]})


def test_replace_changes_only_the_keys_given():
    config = load_config(None, [DIR])
    changed = replace(config, train={"lr": 0.5, "seed": 3}, model={"layers": 2})
    assert (changed.train.lr, changed.train.seed, changed.model.layers) == (0.5, 3, 2)
    assert changed_keys(config.to_dict(), changed.to_dict()) == \
        ["model.layers", "train.lr", "train.seed"]
    assert config.train.lr == 1e-3  # the original is unchanged


BUDGET = [DIR, "train.schedule=budget"]


@pytest.mark.parametrize(("overrides", "key", "words"), [
    ([], "train.schedule", "needs 'train.max_steps' or 'train.max_time'"),
    (["train.max_steps=100", "train.decay_fraction=0"], "train.decay_fraction",
     "must be in (0, 1]"),
    (["train.max_steps=100", "train.decay_fraction=1.5"], "train.decay_fraction",
     "must be in (0, 1]"),
    (["train.max_steps=100", "train.decay_steps=50"], "train.decay_steps",
     "is for cosine and linear"),
    (["train.max_time=9m", "train.warmup_fraction=0.05"], "train.warmup_fraction",
     "needs 'train.max_steps'"),
    (["train.max_steps=100", "train.warmup_fraction=1"], "train.warmup_fraction",
     "must be in [0, 1)"),
    (["train.max_steps=100", "train.warmup_fraction=0.9"], "train.warmup_fraction",
     "add up to more than the budget"),
])
def test_the_budget_schedule_refuses_what_it_cannot_plan(overrides, key, words):
    message = error_of(None, *BUDGET, *overrides)
    assert f"'{key}" in message and words in message and "\n" not in message


def test_the_budget_schedule_takes_a_step_or_time_budget_and_a_warmup_share():
    for budget in (["train.max_steps=100"], ["train.max_time=9m"],
                   ["train.max_steps=100", "train.max_time=9m"]):
        assert load_config(None, [*BUDGET, *budget]).train.decay_fraction == 0.2
    train = load_config(None, [*BUDGET, "train.max_steps=100", "train.warmup_fraction=0.1",
                               "train.decay_fraction=0.9"]).train
    assert (train.warmup_fraction, train.decay_fraction) == (0.1, 0.9)
    assert "'train.warmup_fraction' is a share of the budget of 'train.schedule: budget'" in \
        error_of(None, DIR, "train.max_steps=100", "train.warmup_fraction=0.1")


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["tokenizer.sample_alpha=-0.1"], "tokenizer.sample_alpha", "must be in [0, 1]"),
    (["tokenizer.sample_alpha=1.5"], "tokenizer.sample_alpha", "must be in [0, 1]"),
    (["tokenizer.sample_alpha=0.1", "tokenizer.sample_nbest=1"], "tokenizer.sample_nbest",
     "must be at least 2"),
    (["tokenizer.sample_alpha=0.1", "tokenizer.sample_nbest=-1"], "tokenizer.sample_nbest",
     "must be at least 2"),
    (["tokenizer.sample_alpha=0.1", "tokenizer.model_type=bpe"], "tokenizer.sample_alpha",
     "needs 'tokenizer.model_type: unigram'"),
    (["tokenizer.sample_alpha=0.1", "tokenizer.model_type=bpe", "tokenizer.sample_nbest=8"],
     "tokenizer.sample_nbest", "a BPE model has no n-best segmentations"),
])
def test_subword_sampling_keys_are_checked(overrides, key, words):
    message = error_of(None, DIR, *overrides)
    assert f"'{key}" in message and words in message and "\n" not in message


def test_subword_sampling_is_off_by_default_and_with_zero_or_null():
    assert load_config(None, [DIR]).tokenizer.sample_alpha == 0.0
    for off in ("0", "null"):
        assert not load_config(None, [DIR, f"tokenizer.sample_alpha={off}"]).tokenizer.sample_alpha
    # Off, a BPE model is fine: nothing is sampled.
    assert load_config(None, [DIR, "tokenizer.model_type=bpe"]).tokenizer.sample_nbest == 64
    on = load_config(None, [DIR, "tokenizer.sample_alpha=0.1", "tokenizer.sample_target=true"])
    assert (on.tokenizer.sample_alpha, on.tokenizer.sample_target) == (0.1, True)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_every_shipped_config_loads(path):
    # load_config raises on any key training would refuse (a budget schedule without its
    # budget, sampling with a BPE model, a misspelt key): the README's configs stay runnable.
    assert load_config(path).data.source in ("files", "hub", "bible")
