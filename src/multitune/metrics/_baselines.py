"""Metrics of constant predictors fitted on the training labels: the floor a trained task must beat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from multitune.metrics._arrays import IGNORE_INDEX, to_numpy
from multitune.metrics._compute import compute_metrics, validate_kind


def baseline_predictions(kind: str, train_labels: Any, eval_labels: Any) -> np.ndarray | list[np.ndarray]:
    """Return the constant predictions, fitted on ``train_labels``, for every example of ``eval_labels``.

    * classification: the most frequent training class (the smallest id on ties);
    * multilabel: each label predicted positive when more than half of its training entries are;
    * regression: the training mean of each target (NaN targets skipped);
    * token classification: the most frequent training tag, at every position.

    Labels equal to ``-100`` (NaN for regression) are left out of the fit.
    """
    kind = validate_kind(kind)

    if kind == "regression":
        return _mean_predictions(train_labels, eval_labels)

    if kind == "multilabel":
        train = to_numpy(train_labels, name="train_labels")
        evaluation = to_numpy(eval_labels, name="eval_labels")
        if train.ndim != 2 or evaluation.ndim != 2 or train.shape[1] != evaluation.shape[1]:
            raise ValueError(f"multilabel labels must be [N, C] with the same C; got train {train.shape} and eval {evaluation.shape}")
        positive = np.where(train == IGNORE_INDEX, 0.0, train == 1).sum(axis=0)
        counted = (train != IGNORE_INDEX).sum(axis=0)
        majority = (positive * 2 > counted).astype(np.int64)
        return np.tile(majority, (evaluation.shape[0], 1))

    majority_id = _majority_id(train_labels)
    if kind == "classification":
        evaluation = to_numpy(eval_labels, name="eval_labels").reshape(-1)
        return np.full(evaluation.shape, majority_id, dtype=np.int64)

    if isinstance(eval_labels, (list, tuple)):
        return [np.full(len(row), majority_id, dtype=np.int64) for row in eval_labels]
    evaluation = to_numpy(eval_labels, name="eval_labels")
    return np.full(evaluation.shape, majority_id, dtype=np.int64)


def baseline_metrics(kind: str, train_labels: Any, eval_labels: Any, *, label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Return :func:`compute_metrics` of the constant predictor of :func:`baseline_predictions` on ``eval_labels``.

    A trained task that does not beat these numbers has learned nothing beyond the label
    distribution. Correlations of a constant predictor are undefined, so ``pearson`` and
    ``spearman`` are NaN for regression.
    """
    predictions = baseline_predictions(kind, train_labels, eval_labels)
    return compute_metrics(kind, predictions, eval_labels, label_names=label_names)


def _majority_id(train_labels: Any) -> int:
    if isinstance(train_labels, (list, tuple)) and train_labels and not np.isscalar(train_labels[0]):
        flat = np.concatenate([to_numpy(row, name="train_labels").reshape(-1) for row in train_labels])
    else:
        flat = to_numpy(train_labels, name="train_labels").reshape(-1)

    flat = flat[flat != IGNORE_INDEX].astype(np.int64)
    if flat.size == 0:
        raise ValueError("the baseline needs at least one training label; every train label is -100")
    if flat.min() < 0:
        raise ValueError(f"class ids must be non-negative (or -100 for missing), got {int(flat.min())}")
    return int(np.bincount(flat).argmax())


def _mean_predictions(train_labels: Any, eval_labels: Any) -> np.ndarray:
    train = to_numpy(train_labels, name="train_labels").astype(np.float64)
    evaluation = to_numpy(eval_labels, name="eval_labels").astype(np.float64)
    train_columns = train[:, None] if train.ndim == 1 else train
    if np.all(np.isnan(train_columns), axis=0).any():
        raise ValueError("the mean baseline needs at least one training value per target; a target is NaN everywhere")
    mean = np.nanmean(train_columns, axis=0)

    if evaluation.ndim == 1:
        if mean.shape[0] != 1:
            raise ValueError(f"eval labels have one target but train labels have {mean.shape[0]}")
        return np.full(evaluation.shape, mean[0])
    if evaluation.shape[1] != mean.shape[0]:
        raise ValueError(f"eval labels have {evaluation.shape[1]} targets but train labels have {mean.shape[0]}")
    return np.tile(mean, (evaluation.shape[0], 1))
