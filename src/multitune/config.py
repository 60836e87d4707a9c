"""The run configuration: a YAML file validated by pydantic, with ``--set key=value`` overrides.

A config has six sections::

    model:      backbone (a Hugging Face model, or an MLP over numeric features)
    tasks:      one entry per task (a mapping name -> task fields, or a list with ``name`` keys)
    mixing:     how the tasks' batches are mixed into steps
    balancer:   the loss-balancing method and its hyper-parameters
    training:   optimizer, schedule, evaluation and checkpoint settings (Hugging Face Trainer names)
    baselines:  optional reference metrics per task, for the mean relative change Δm%

Every section rejects unknown keys. :func:`load_config` turns every validation problem into one
:class:`ConfigError` whose message names the file, the key path and the value, such as
``config.yaml: training.learning_rate: Input should be a valid number, got 'fast'``.

Relative data paths in ``tasks`` resolve against the folder of the config file. A relative
``training.output_dir`` resolves against the working directory, as in the Hugging Face Trainer.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from multitune.data import DatasetSource, MixingSpec, TaskSpec
from multitune.metrics import metric_higher_is_better
from multitune.models import LoraSpec, Pooling

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
"""``model.name_or_path`` prefix that names a pip package shipping a Hugging Face model folder."""


class ConfigError(ValueError):
    """An invalid configuration; the message names the file, the key path and the expected value."""


# Model ---------------------------------------------------------------------------------------------


class ModelConfig(BaseModel):
    """The shared backbone: a pretrained Hugging Face model (``type: transformer``) or an MLP (``type: mlp``).

    ``name_or_path`` is a hub name, a local folder or ``package:<module>``, a pip package that ships a
    Hugging Face model folder (found with :func:`importlib.util.find_spec`, see
    :func:`resolve_model_path`). The MLP reads the ``input_values`` of numeric-feature tasks.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["transformer", "mlp"] = "transformer"
    name_or_path: str | None = Field(default=None, description="transformer: hub name, local folder or package:<module>.")
    pooling: Pooling | None = Field(default=None, description="transformer: 'mean' (default) or 'cls' pooling of the token states.")
    lora: LoraSpec | None = Field(default=None, description="transformer: LoRA options; the backbone is frozen except the adapters.")
    last_shared_layer: str | None = Field(
        default=None, description="Name of the module whose parameters gradient-based balancers use (model default when unset)."
    )
    hidden_sizes: list[int] = Field(default=[128], description="mlp: widths of the hidden layers.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="mlp: dropout after each hidden layer.")
    input_dim: int | None = Field(default=None, ge=1, description="mlp: input width; inferred from the data when unset.")

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if not value or any(size < 1 for size in value):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got {value}")
        return value

    @model_validator(mode="after")
    def _check_type(self) -> ModelConfig:
        if self.type == "transformer" and not self.name_or_path:
            raise ValueError("model.name_or_path is required for a transformer backbone (a hub name, folder or package:<module>)")
        if self.type == "mlp":
            for key in ("name_or_path", "pooling", "lora"):
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key} applies to transformer backbones only; remove it or set model.type: transformer")
        return self


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable model name or folder; ``package:<module>`` becomes the module's model folder.

    The package is located with :func:`importlib.util.find_spec` (it is not imported), and the
    model folder is the package folder itself or the first sub-folder holding a ``config.json``.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module = name_or_path[len(PACKAGE_PREFIX) :].strip()
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path: package {module!r} is not installed (from {name_or_path!r}); "
            f"install it with pip install {module.replace('_', '-')}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    if (root / "config.json").is_file():
        return str(root)
    for config_file in sorted(root.rglob("config.json")):
        folder = config_file.parent
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            return str(folder)
    raise ConfigError(f"model.name_or_path: package {module!r} ({root}) contains no Hugging Face model folder with config.json")


# Balancer ------------------------------------------------------------------------------------------


class BalancerConfig(BaseModel):
    """The loss-balancing method: ``name`` (a registry name) and its hyper-parameters as sibling keys.

    Example::

        balancer:
          name: gradnorm
          alpha: 1.5

    The hyper-parameters are the keyword arguments of the balancer class. A key that the class
    does not take is rejected, and the message lists the keys it takes. Values are checked by building the
    balancer once when the whole config is validated.
    """

    model_config = ConfigDict(extra="allow")

    name: str = "equal"

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        from multitune.balancing import available_balancers

        names = available_balancers()
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown balancer {value!r}{hint}; available: {', '.join(names)}")
        return value

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters: every key except ``name``."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_name_and_keys(self) -> BalancerConfig:
        from multitune.balancing import get_balancer_class

        cls = get_balancer_class(self.name)
        accepted = balancer_hyperparameter_names(cls)
        for key in self.hyperparameters:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"balancer {self.name!r} has no hyper-parameter {key!r}{hint}; accepted: {', '.join(accepted) or 'none'}"
                )
        return self


def balancer_hyperparameter_names(cls: type) -> list[str]:
    """Return the keyword arguments of a balancer class's constructor, other than the ones the trainer passes."""
    parameters = inspect.signature(cls.__init__).parameters
    skipped = {"self", "task_names", "shared_parameters"}
    return [
        name
        for name, parameter in parameters.items()
        if name not in skipped and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]


# Training ------------------------------------------------------------------------------------------


class TrainingConfig(BaseModel):
    """Optimizer, schedule, evaluation, checkpoint and logging settings, named as in the Hugging Face Trainer."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field(default="runs/multitune", description="Run folder: checkpoints, metrics.jsonl, results.")
    learning_rate: float = Field(default=5e-5, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(default=1e-8, gt=0.0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=0, ge=0, description="Warm-up steps; overrides warmup_ratio when > 0.")
    max_steps: int | None = Field(default=None, description="Optimizer steps to run; overrides num_train_epochs. -1 or unset: use epochs.")
    num_train_epochs: int | None = Field(default=None, ge=1, description="Whole passes over the epoch task's training data.")
    epoch_task: str | None = Field(default=None, description="Task whose passes count as epochs (the largest task when unset).")
    per_device_train_batch_size: int = Field(default=16, ge=1, description="Batch size of a task without its own batch_size.")
    per_device_eval_batch_size: int = Field(default=64, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Loader steps accumulated into one optimizer step.")
    max_grad_norm: float | None = Field(default=1.0, description="Gradient clipping norm; 0 or unset disables clipping.")
    eval_steps: int | None = Field(default=None, ge=1, description="Evaluate every N optimizer steps; the run also evaluates at its end.")
    save_steps: int | None = Field(default=None, ge=1, description="Save a checkpoint every N optimizer steps; the run also saves at its end.")
    logging_steps: int = Field(default=10, ge=1)
    seed: int = 0
    bf16: bool | Literal["auto"] = Field(default="auto", description="bf16 autocast; auto: on for CUDA devices that support bf16, off on CPU.")
    use_cpu: bool = Field(default=False, description="Train on the CPU even when CUDA is available.")
    save_total_limit: int | None = Field(default=None, ge=1, description="Keep at most N checkpoints (plus the best one).")
    metric_for_best_model: str | None = Field(
        default=None,
        description="'<task>/<metric>', 'delta_m' (needs baselines) or 'eval_loss'; selects the best checkpoint.",
    )
    greater_is_better: bool | None = Field(
        default=None, description="Direction of metric_for_best_model; unset: lower is better for losses, delta_m, rmse and mae."
    )
    load_best_model_at_end: bool = False
    report_to: Literal["all", "tensorboard", "none"] = Field(default="all", description="all: TensorBoard when installed.")
    disable_progress_bar: bool = False

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int | None) -> int | None:
        if value is None or value == -1:
            return None
        if value < 1:
            raise ValueError(f"max_steps must be >= 1 (or -1 to train by epochs), got {value}")
        return value

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16(cls, value: Any) -> Any:
        if value in (True, False, "auto"):
            return value
        raise ValueError(f"bf16 must be true, false or 'auto', got {value!r}")

    @field_validator("max_grad_norm")
    @classmethod
    def _grad_norm(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0, got {value}")
        return value or None

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingConfig:
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError(
                "the run length is unset: set training.max_steps (optimizer steps) or training.num_train_epochs "
                "(passes over the epoch task); max_steps -1 means 'train by epochs', so it needs num_train_epochs"
            )
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"
        return self


# The whole config ----------------------------------------------------------------------------------


class Config(BaseModel):
    """A complete multi-task run."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: ModelConfig
    tasks: dict[str, TaskSpec]
    mixing: MixingSpec = Field(default_factory=MixingSpec)
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    training: TrainingConfig
    baselines: dict[str, dict[str, float]] | None = Field(
        default=None, description="Reference metrics by task, e.g. single-task runs; Δm% compares against them."
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_by_name(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            named = {}
            for name, fields in value.items():
                if isinstance(fields, Mapping):
                    fields = dict(fields)
                    if "name" in fields and fields["name"] != name:
                        raise ValueError(f"task {name!r} has name {fields['name']!r}; leave name out in the mapping form")
                    fields["name"] = name
                named[name] = fields
            value = named
        elif isinstance(value, Sequence) and not isinstance(value, str):
            named = {}
            for index, fields in enumerate(value):
                if not isinstance(fields, Mapping) or "name" not in fields:
                    raise ValueError(f"tasks[{index}] needs a 'name' key (or write tasks as a mapping name -> fields)")
                if fields["name"] in named:
                    raise ValueError(f"task name {fields['name']!r} is used twice")
                named[fields["name"]] = fields
            value = named
        if isinstance(value, Mapping) and not value:
            raise ValueError("tasks is empty; a run needs at least one task")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = list(self.tasks)
        training = self.training
        if training.epoch_task is not None and training.epoch_task not in self.tasks:
            raise ValueError(f"training.epoch_task: unknown task {training.epoch_task!r}; tasks: {names}")
        if self.baselines is not None:
            unknown = [name for name in self.baselines if name not in self.tasks]
            if unknown:
                raise ValueError(f"baselines: unknown task(s) {unknown}; tasks: {names}")
        metric = training.metric_for_best_model
        if metric is not None and metric not in ("eval_loss", "delta_m"):
            task, _, metric_name = metric.partition("/")
            if task not in self.tasks or not metric_name:
                raise ValueError(
                    f"training.metric_for_best_model must be 'eval_loss', 'delta_m' or '<task>/<metric>' with a task of {names}, got {metric!r}"
                )
            try:
                metric_higher_is_better(metric_name)
            except KeyError as error:
                raise ValueError(f"training.metric_for_best_model: {error.args[0]}") from None
        if metric == "delta_m" and not self.baselines:
            raise ValueError("training.metric_for_best_model 'delta_m' needs baselines for the tasks")
        if self.model.type == "mlp":
            text_tasks = [name for name, spec in self.tasks.items() if spec.text_fields]
            if text_tasks:
                raise ValueError(f"model.type mlp reads numeric features only; task(s) {text_tasks} have text_fields")
        check_balancer_builds(self.balancer, names)
        return self

    def resolve_paths(self, base_dir: Path) -> Config:
        """Return a copy whose relative task data paths are resolved against ``base_dir``."""
        tasks = {name: _resolve_task_paths(spec, Path(base_dir)) for name, spec in self.tasks.items()}
        return self.model_copy(update={"tasks": tasks})

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain data (YAML-ready), balancer hyper-parameters included."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["tasks"] = {name: _task_dict(spec) for name, spec in self.tasks.items()}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _task_dict(spec: TaskSpec) -> dict[str, Any]:
    data = spec.model_dump(mode="json", exclude_none=True)
    data.pop("name", None)
    return data


def check_balancer_builds(balancer: BalancerConfig, task_names: Sequence[str]) -> None:
    """Build the balancer once with placeholder shared parameters, so invalid hyper-parameter values fail early."""
    import torch
    from torch import nn

    from multitune.balancing import build_balancer

    placeholder = [nn.Parameter(torch.zeros(2))]
    try:
        build_balancer(balancer.name, list(task_names), shared_parameters=placeholder, **balancer.hyperparameters)
    except (TypeError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise ValueError(f"balancer: invalid hyper-parameters for {balancer.name!r}: {message}") from None


def _resolve(path: str, base_dir: Path) -> str:
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    return str((base_dir / expanded).resolve())


def _resolve_source(source: Any, base_dir: Path) -> Any:
    if isinstance(source, str):
        return _resolve(source, base_dir)
    if isinstance(source, DatasetSource):
        update: dict[str, Any] = {}
        if (base_dir / source.dataset).exists():
            update["dataset"] = _resolve(source.dataset, base_dir)
        if source.data_dir is not None:
            update["data_dir"] = _resolve(source.data_dir, base_dir)
        files = source.data_files
        if isinstance(files, str):
            update["data_files"] = _resolve(files, base_dir)
        elif isinstance(files, list):
            update["data_files"] = [_resolve(item, base_dir) for item in files]
        elif isinstance(files, dict):
            update["data_files"] = {
                split: _resolve(item, base_dir) if isinstance(item, str) else [_resolve(i, base_dir) for i in item]
                for split, item in files.items()
            }
        return source.model_copy(update=update)
    return source


def _resolve_task_paths(spec: TaskSpec, base_dir: Path) -> TaskSpec:
    return spec.model_copy(update={"train": _resolve_source(spec.train, base_dir), "eval": _resolve_source(spec.eval, base_dir)})


# Loading and overrides -----------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into the key path and the YAML-parsed value (``20`` → int, ``[a, b]`` → list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set training.max_steps=20")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"--set {text!r}: invalid key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return ``data`` with each ``key.path=value`` override applied (missing mappings are created).

    In a ``tasks`` list, a path segment matches the item with that ``name``.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            child = _child(node, part)
            if child is None:
                child = {}
                _set_child(node, part, child, text)
            if not isinstance(child, (dict, list)):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {text!r}: {where} is the value {child!r}, not a section of keys")
            node = child
        _set_child(node, parts[-1], value, text)
    return data


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    for item in node:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    if part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _set_child(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, dict):
        node[part] = value
        return
    for index, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            node[index] = value
            return
    if part.isdigit() and int(part) < len(node):
        node[int(part)] = value
        return
    raise ConfigError(f"--set {text!r}: no list item named {part!r}")


def format_validation_error(error: ValidationError, source: str) -> str:
    """Turn a pydantic error into one line ``source: key.path: message, got value``.

    Several problems are joined with ``"; "`` after one ``source:`` prefix.
    """
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"] if not _is_internal_loc(part))
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            problems.append(f"{location}: unknown key" + _valid_keys_hint(item["loc"]))
            continue
        text = f"{location}: {message}" if location else message
        if item["type"] not in ("value_error", "missing") and "input" in item:
            text += f", got {_short_repr(item['input'])}"
        problems.append(text)
    return f"{source}: " + "; ".join(problems)


def _is_internal_loc(part: Any) -> bool:
    # pydantic adds the member type of a union and validator names ('function-after[...]') to locations.
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict", "literal"))


def _valid_keys_hint(loc: tuple[Any, ...]) -> str:
    section_models: dict[str, type[BaseModel]] = {
        "model": ModelConfig,
        "training": TrainingConfig,
        "mixing": MixingSpec,
    }
    if len(loc) == 1:
        fields = list(Config.model_fields)
    elif len(loc) == 2 and loc[0] in section_models:
        fields = list(section_models[loc[0]].model_fields)
    elif len(loc) == 3 and loc[0] == "tasks":
        fields = [name for name in TaskSpec.model_fields if name != "name"]
    else:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(fields)}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "config") -> Config:
    """Validate ``data`` as a :class:`Config`; relative task paths resolve against ``base_dir`` (default: the working directory)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, tasks, training, ...), got {type(data).__name__}")
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
    return config.resolve_paths(Path(base_dir) if base_dir is not None else Path.cwd())



class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated in one mapping (plain YAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is defined twice in one mapping; keep one of them", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or does not validate; the message
            names the file and the key path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, tasks, training, ...), got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return config_from_dict(data, base_dir=path.resolve().parent, source=path.name)
