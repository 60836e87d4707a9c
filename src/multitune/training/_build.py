"""Building a run's parts from its config: tokenizer, tasks, model and balancer."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from multitune.balancing import Balancer, GradientBalancer, build_balancer, get_balancer_class
from multitune.config import Config, ModelConfig, resolve_model_path
from multitune.data import TaskData, load_tasks
from multitune.models import HeadSpec, MultiTaskModel

logger = logging.getLogger(__name__)


def load_tokenizer(model_config: ModelConfig) -> Any:
    """Return the Hugging Face tokenizer of a transformer backbone, or None for an MLP."""
    if model_config.type != "transformer":
        return None
    from transformers import AutoTokenizer

    assert model_config.name_or_path is not None
    return AutoTokenizer.from_pretrained(resolve_model_path(model_config.name_or_path))


def load_run_tasks(config: Config, tokenizer: Any, *, label_names: Mapping[str, list[str]] | None = None) -> dict[str, TaskData]:
    """Load and encode every task of ``config`` (split seed: ``training.seed``)."""
    return load_tasks(list(config.tasks.values()), tokenizer, seed=config.training.seed, label_names=label_names)


def head_spec(task: TaskData) -> HeadSpec:
    """Return the head of a loaded task: its kind, output count, loss options and target statistics.

    The task's ``loss`` mapping fills :class:`~multitune.models.HeadSpec`: its ``name`` key is the
    loss name (``focal``, ``huber``, ...), and the other keys are head fields such as ``gamma``,
    ``alpha``, ``dropout`` or ``hidden_layers``.
    """
    fields: dict[str, Any] = {"kind": task.kind, "num_outputs": task.num_outputs}
    loss = dict(task.spec.loss or {})
    from_data = sorted({"kind", "num_outputs", "label_names", "target_mean", "target_std"} & set(loss))
    if from_data:
        raise ValueError(
            f"task {task.name!r}: {from_data} in tasks.{task.name}.loss are set from the task's kind and data; "
            f"remove them (use tasks.{task.name}.kind and tasks.{task.name}.labels instead)"
        )
    if "name" in loss:
        fields["loss"] = loss.pop("name")
    fields.update(loss)
    if task.kind == "regression" and task.target_mean is not None:
        fields["target_mean"] = list(task.target_mean)
        fields["target_std"] = list(task.target_std or [1.0] * len(task.target_mean))
    if task.label_names is not None:
        fields["label_names"] = list(task.label_names)
    if task.kind == "classification" and task.num_outputs < 2:
        raise ValueError(
            f"task {task.name!r}: the training labels contain one class ({task.label_names}), but a classification "
            f"task needs two or more; list every class under tasks.{task.name}.labels, or use kind: multilabel "
            "for a single yes/no label"
        )
    try:
        return HeadSpec.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'head'}: {item['msg']}" for item in error.errors())
        raise ValueError(f"task {task.name!r}: invalid head options ({problems}); set them under tasks.{task.name}.loss") from None


def build_mlp_backbone(input_dim: int, hidden_sizes: list[int], dropout: float) -> nn.Sequential:
    """Return the MLP backbone of numeric-feature tasks: Linear, ReLU and dropout per hidden layer."""
    layers: list[nn.Module] = []
    width = input_dim
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


def build_model(config: Config, tasks: Mapping[str, TaskData]) -> MultiTaskModel:
    """Build the multi-task model of ``config`` with one head per loaded task."""
    heads = {name: head_spec(task) for name, task in tasks.items()}
    model_config = config.model
    if model_config.type == "mlp":
        dims = {name: task.input_dim for name, task in tasks.items()}
        input_dim = model_config.input_dim
        if input_dim is None:
            known = sorted({dim for dim in dims.values() if dim is not None})
            if len(known) != 1:
                raise ValueError(f"model.type mlp needs one input width for all tasks, found {dims}; set model.input_dim")
            input_dim = known[0]
        backbone = build_mlp_backbone(input_dim, model_config.hidden_sizes, model_config.dropout)
        return MultiTaskModel(backbone, heads, last_shared_layer=model_config.last_shared_layer)

    assert model_config.name_or_path is not None
    return MultiTaskModel.from_pretrained(
        resolve_model_path(model_config.name_or_path),
        heads,
        pooling=model_config.pooling,
        lora=model_config.lora,
        last_shared_layer=model_config.last_shared_layer,
    )


def build_run_balancer(config: Config, model: MultiTaskModel, tasks: Mapping[str, TaskData]) -> Balancer:
    """Build the balancer of ``config`` for ``model``.

    Shared parameters: GradNorm and gradient-based balancers with ``gradients="last_shared_layer"``
    get the model's last shared layer; GradNorm with ``per_task_backward: true`` and the other
    gradient-based ones get every trainable backbone parameter. Gradient-based balancers also get each head's parameters as ``task_parameters``.
    Hyper-parameters the config leaves unset are filled from the run where the balancer takes
    them: ``seed`` (the run's seed) and ``task_types`` (the task kinds, for uncertainty weighting).
    """
    name = config.balancer.name
    cls = get_balancer_class(name)
    hyperparameters = dict(config.balancer.hyperparameters)
    accepted = inspect.signature(cls.__init__).parameters

    if "seed" in accepted and "seed" not in hyperparameters:
        hyperparameters["seed"] = config.training.seed
    if "task_types" in accepted and "task_types" not in hyperparameters:
        hyperparameters["task_types"] = {task_name: task.kind for task_name, task in tasks.items()}

    shared: list[nn.Parameter] | None = None
    if cls.requires_shared_parameters:
        if issubclass(cls, GradientBalancer):
            uses_last_layer = hyperparameters.get("gradients") == "last_shared_layer"
        else:
            # GradNorm with per_task_backward takes its norms over every shared parameter.
            uses_last_layer = not hyperparameters.get("per_task_backward", False)
        shared = model.last_shared_parameters() if uses_last_layer else model.shared_parameters()
        if issubclass(cls, GradientBalancer) and "task_parameters" not in hyperparameters:
            hyperparameters["task_parameters"] = {task_name: model.task_parameters(task_name) for task_name in tasks}
    balancer = build_balancer(name, list(tasks), shared_parameters=shared, **hyperparameters)
    logger.info("balancer: %r", balancer)
    return balancer


def select_device(use_cpu: bool) -> torch.device:
    """Return the current CUDA device when CUDA is available and not disabled, else the CPU.

    Under torchrun the current device is the process's ``LOCAL_RANK`` GPU, set when the process
    group is initialised (:func:`multitune.distributed.init_from_environment`).
    """
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """Return whether to autocast to bf16: ``"auto"`` is on for CUDA devices with bf16 support, off elsewhere."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("training.bf16 is true but this CUDA device does not support bf16; set training.bf16: auto or false")
    return bool(setting)
