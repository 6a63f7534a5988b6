"""Tests for traduire.config: defaults, errors that name the key, overrides, durations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from traduire.config import (
    BOUND_KEYS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    changed_keys,
    load_config,
    parse_duration,
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
