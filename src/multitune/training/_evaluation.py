"""Evaluation of a multi-task model: per-task metrics, eval losses, constant baselines and Δm%."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitune.data import IGNORE_INDEX, TaskBatch, TaskData, eval_batches
from multitune.metrics import baseline_metrics, compute_metrics, delta_m, metric_higher_is_better, primary_metric
from multitune.models import MultiTaskModel

logger = logging.getLogger(__name__)


def prepare_batch(task: TaskData, batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Return ``batch`` on ``device`` in the layout the model's heads expect.

    The data layer standardises regression targets and marks a missing target with
    ``target_mask = False`` and a 0 label. The regression head standardises targets itself (it
    stores the same mean and standard deviation) and skips NaN targets. Regression labels are
    therefore returned in data units, with NaN for missing targets.
    """
    prepared = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if task.kind == "regression":
        prepared["labels"] = data_unit_targets(task, prepared["labels"], prepared.get("target_mask"), prepared.get("label_mask"))
        prepared.pop("target_mask", None)
    return prepared


def data_unit_targets(task: TaskData, labels: Tensor, target_mask: Tensor | None, label_mask: Tensor | None) -> Tensor:
    """Return standardised regression ``labels`` ``[B, K]`` in data units, NaN where a target or the example's label is missing."""
    labels = labels.to(torch.float32)
    if labels.dim() == 1:
        labels = labels[:, None]
    mean = torch.tensor(task.target_mean or [0.0], dtype=torch.float32, device=labels.device)
    std = torch.tensor(task.target_std or [1.0], dtype=torch.float32, device=labels.device)
    values = labels * std + mean
    missing = torch.zeros_like(values, dtype=torch.bool)
    if target_mask is not None:
        missing |= ~target_mask.to(torch.bool).reshape(values.shape)
    if label_mask is not None:
        missing |= ~label_mask.to(torch.bool).reshape(-1, 1)
    return values.masked_fill(missing, math.nan)


def metric_labels(task: TaskData, batch: Mapping[str, Tensor]) -> Any:
    """Return a prepared batch's labels in the layout of :func:`multitune.metrics.compute_metrics`.

    Missing labels become ``-100`` (NaN for regression, which :func:`prepare_batch` has set).
    Token classification returns a list with one row per example.
    """
    labels = batch["labels"].detach().cpu()
    label_mask = batch.get("label_mask")
    if task.kind == "regression":
        return labels.numpy()
    if task.kind == "token_classification":
        return [row for row in labels.numpy()]
    if label_mask is not None:
        missing = ~label_mask.detach().cpu().to(torch.bool)
        labels = labels.clone()
        if task.kind == "classification":
            labels[missing] = IGNORE_INDEX
        else:
            labels[missing] = float(IGNORE_INDEX)
    return labels.numpy()


def train_labels(task: TaskData) -> Any:
    """Return every training label of ``task`` in metric layout (for the constant baseline)."""
    tensors = task.tensors("train")
    labels: list[Any] = []
    for start in range(0, len(tensors), 4096):
        batch = tensors.batch(torch.arange(start, min(start + 4096, len(tensors))))
        prepared = prepare_batch(task, batch, torch.device("cpu"))
        rows = metric_labels(task, prepared)
        labels.extend(rows if isinstance(rows, list) else [rows])
    if task.kind == "token_classification":
        return labels
    return np.concatenate(labels)


def length_sorted_batches(task: TaskData, batch_size: int, *, split: str = "eval") -> Iterator[TaskBatch]:
    """Yield the batches of a split with its examples sorted by token count, so each batch pads little.

    Metrics do not depend on the order of the examples, and a batch of similar lengths costs
    less than one padded to an outlier. Numeric-feature tasks keep the row order.
    """
    dataset = task.split(split)
    if "input_ids" not in dataset.column_names:
        yield from eval_batches(task, batch_size, split=split)
        return
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    order = torch.from_numpy(np.argsort(lengths, kind="stable"))
    tensors = task.tensors(split)
    for start in range(0, len(order), batch_size):
        yield tensors.batch(order[start : start + batch_size])


@dataclass
class TaskEvaluation:
    """Evaluation of one task: metrics in data units, mean eval loss and the primary metric."""

    metrics: dict[str, float]
    loss: float
    primary_metric: str
    higher_is_better: bool
    num_examples: int
    predictions: list[Any] = field(default_factory=list, repr=False)

    @property
    def primary(self) -> float:
        return self.metrics.get(self.primary_metric, math.nan)


def _concat(parts: list[Any], kind: str) -> Any:
    if kind == "token_classification":
        return [row for part in parts for row in part]
    return np.concatenate(parts)


@torch.no_grad()
def evaluate_task(
    model: MultiTaskModel,
    task: TaskData,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    split: str = "eval",
) -> TaskEvaluation:
    """Run ``model`` over one task's split and return its metrics and mean loss (model left in eval mode)."""
    model.eval()
    predictions: list[Any] = []
    labels: list[Any] = []
    loss_sum, count = 0.0, 0
    for batch in length_sorted_batches(task, batch_size, split=split):
        prepared = prepare_batch(task, batch, device)
        with autocast if autocast is not None else contextlib.nullcontext():
            outputs = model(prepared, task.name)
            loss = model.compute_loss(task.name, outputs, prepared)
        size = int(prepared["labels"].shape[0])
        loss_sum += float(loss.float()) * size
        count += size
        predicted = model.predict(task.name, outputs.float()).cpu().numpy()
        predictions.append([row for row in predicted] if task.kind == "token_classification" else predicted)
        labels.append(metric_labels(task, prepared))

    if count == 0:
        raise ValueError(f"task {task.name!r}: the {split} split is empty")
    all_predictions = _concat(predictions, task.kind)
    all_labels = _concat(labels, task.kind)
    metrics = compute_metrics(task.kind, all_predictions, all_labels, label_names=task.label_names)
    name, higher = primary_metric(task.kind, task.label_names)
    return TaskEvaluation(metrics=metrics, loss=loss_sum / count, primary_metric=name, higher_is_better=higher, num_examples=count)


def constant_baseline(task: TaskData) -> dict[str, float]:
    """Return the metrics of the constant predictor (majority class, majority per label or mean target) on the eval split."""
    eval_parts = [metric_labels(task, prepare_batch(task, batch, torch.device("cpu"))) for batch in eval_batches(task, 4096)]
    return baseline_metrics(task.kind, train_labels(task), _concat(eval_parts, task.kind), label_names=task.label_names)


def delta_m_against(evaluations: Mapping[str, TaskEvaluation], baselines: Mapping[str, Mapping[str, float]]) -> float | None:
    """Return Δm% (lower is better) of the metrics that ``baselines`` gives, or None when it gives none.

    Every metric named in ``baselines[task]`` counts once; a metric the evaluation lacks raises.
    """
    values: dict[str, float] = {}
    references: dict[str, float] = {}
    directions: dict[str, bool] = {}
    for task, task_baselines in baselines.items():
        if task not in evaluations:
            continue
        for metric, reference in task_baselines.items():
            if metric == "loss":
                value = evaluations[task].loss
            elif metric in evaluations[task].metrics:
                value = evaluations[task].metrics[metric]
            else:
                known = sorted(evaluations[task].metrics)
                raise KeyError(f"baselines.{task}.{metric}: the task has no metric {metric!r}; its metrics: {known}")
            key = f"{task}/{metric}"
            values[key] = value
            references[key] = reference
            directions[key] = metric_higher_is_better(metric)
    if not values:
        return None
    return delta_m(values, references, directions)

