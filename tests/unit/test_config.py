"""Config loading: YAML + `--set` overrides, typed values, one-line errors naming key and allowed values."""

from pathlib import Path

import pytest
import yaml

from dapeng.config import RunConfig, apply_override, dump_config, load_config, parse_value, validate_config
from dapeng.errors import ConfigError

BASE = {"task": "text-classification", "data": {"dataset": "rotten-tomatoes"}, "model": {"name": "lstm"}}


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"epochs": 2}})
    cfg = load_config(path, ["train.optimizer.lr=1e-3", "train.epochs=5", "model.kwargs.hidden=128",
                             "train.deterministic=true", "model.kwargs.sizes=[1, 2]", "train.optimizer.name=sgd"])
    assert cfg.train.epochs == 5
    assert cfg.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.train.optimizer.name == "sgd"
    assert cfg.train.deterministic is True
    assert cfg.model.kwargs == {"hidden": 128, "sizes": [1, 2]}


def test_parse_value_types():
    assert parse_value("3") == 3
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("false") is False
    assert parse_value("null") is None
    assert parse_value("adamw") == "adamw"


def test_literal_error_names_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "train": {"optimizer": {"name": "adamx"}}})
    assert str(err.value) == "config key train.optimizer.name: 'adamx' is not one of sgd, adam, adamw"


def test_unknown_key_suggests_and_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "train": {"optimzer": {"lr": 0.1}}})
    message = str(err.value)
    assert message.startswith("config key train.optimzer: unknown key — did you mean optimizer?")
    assert "batch_size" in message and "\n" not in message


def test_wrong_type_and_missing_key_are_one_line():
    with pytest.raises(ConfigError, match=r"config key train.epochs: 'many'"):
        validate_config({**BASE, "train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"config key model: missing"):
        validate_config({"task": "x", "data": {}})
    with pytest.raises(ConfigError, match=r"train.grad_clip.*greater than 0"):
        validate_config({**BASE, "train": {"grad_clip": -1}})


def test_missing_files_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "task: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"config key data.train: file .*missing.csv.* not found"):
        load_config(write(tmp_path, {**BASE, "data": {"train": "missing.csv"}}))


def test_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "train.csv").write_text("text,label\na,b\n")
    path = write(tmp_path, {**BASE, "data": {"train": "train.csv"}})
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert cfg.data.train == (tmp_path / "train.csv").resolve()


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"task": "x"}, "task.name=y")


def test_dump_round_trips():
    cfg = validate_config({**BASE, "train": {"epochs": 7}})
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert "warmup_steps" in dump_config(cfg)  # fully resolved: defaults spelled out


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.task and cfg.model.name and cfg.train.epochs > 0
