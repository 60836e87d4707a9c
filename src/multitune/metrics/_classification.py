r"""Metrics of single-label and multi-label classification.

F1 of one class :math:`c` is computed from its true positives, false positives and false negatives
as :math:`F_1 = 2\,TP_c / (2\,TP_c + FP_c + FN_c)`. This equals the harmonic mean of precision and
recall whenever both are defined, and it is 0 for a class that is predicted but never true (or the
reverse). Macro-F1 averages :math:`F_1` over classes, while micro-F1 pools the counts of all
classes first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multitune.metrics._arrays import IGNORE_INDEX, to_numpy


def classification_metrics(predictions: Any, labels: Any) -> dict[str, float]:
    """Compute ``accuracy`` and ``macro_f1`` of single-label class predictions.

    Args:
        predictions: class ids of shape ``[N]``, or scores of shape ``[N, C]`` (the arg-max is taken).
        labels: class ids of shape ``[N]``. Examples labelled ``-100`` (missing label) are ignored.

    Macro-F1 averages over the classes that occur in the labels or in the predictions of the
    examples kept, which is what ``sklearn.metrics.f1_score(average="macro")`` does by default.

    Raises:
        ValueError: if the shapes differ or no example has a label.
    """
    predicted = _class_ids(to_numpy(predictions, name="predictions"))
    true = to_numpy(labels, name="labels").reshape(-1)
    if predicted.shape != true.shape:
        raise ValueError(f"classification predictions have shape {predicted.shape} but labels have shape {true.shape}; pass one class id per example")

    keep = true != IGNORE_INDEX
    predicted = predicted[keep].astype(np.int64)
    true = true[keep].astype(np.int64)
    if true.size == 0:
        raise ValueError("classification metrics need at least one labelled example; every label is -100")

    classes = np.union1d(true, predicted)
    per_class_f1 = [_f1(true == c, predicted == c) for c in classes]

    return {
        "accuracy": float(np.mean(predicted == true)),
        "macro_f1": float(np.mean(per_class_f1)),
    }


def multilabel_metrics(predictions: Any, labels: Any) -> dict[str, float]:
    """Compute ``micro_f1``, ``macro_f1`` and ``subset_accuracy`` of multi-label predictions.

    Args:
        predictions: multi-hot predictions of shape ``[N, C]``; values of at least 0.5 count as
            positive, so 0/1 predictions and probabilities both work.
        labels: multi-hot labels of shape ``[N, C]``. Entries equal to ``-100`` are ignored.

    ``macro_f1`` averages over the labels that are positive in at least one kept entry of the
    labels or of the predictions. A label that is never true and never predicted has no defined
    F1, so it is left out. When no entry is positive at all, both F1 values are 0.0 (the value that
    scikit-learn returns with its default ``zero_division``). ``subset_accuracy`` is the share of
    examples whose kept entries are all predicted correctly (exact match).

    Raises:
        ValueError: if the shapes differ, are not 2-D, or no entry has a label.
    """
    scores = to_numpy(predictions, name="predictions")
    true = to_numpy(labels, name="labels")
    if scores.ndim != 2 or scores.shape != true.shape:
        raise ValueError(f"multilabel predictions have shape {scores.shape} and labels {true.shape}; both must be [N, C] multi-hot arrays of the same shape")

    keep = true != IGNORE_INDEX
    if not keep.any():
        raise ValueError("multilabel metrics need at least one labelled entry; every label is -100")

    predicted = (scores >= 0.5) & keep
    positive = (true == 1) & keep

    tp = np.sum(predicted & positive, axis=0)
    fp = np.sum(predicted & ~positive, axis=0)
    fn = np.sum(~predicted & positive, axis=0)

    micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    micro_f1 = 2 * tp.sum() / micro_denominator if micro_denominator > 0 else 0.0

    present = (2 * tp + fp + fn) > 0
    macro_f1 = float(np.mean(2 * tp[present] / (2 * tp + fp + fn)[present])) if present.any() else 0.0

    rows = keep.any(axis=1)
    exact = np.all((predicted == positive) | ~keep, axis=1)

    return {
        "micro_f1": float(micro_f1),
        "macro_f1": macro_f1,
        "subset_accuracy": float(np.mean(exact[rows])),
    }


def _class_ids(predicted: np.ndarray) -> np.ndarray:
    if predicted.ndim == 2:
        return predicted.argmax(axis=1)
    return predicted.reshape(-1)


def _f1(true: np.ndarray, predicted: np.ndarray) -> float:
    tp = np.sum(true & predicted)
    denominator = 2 * tp + np.sum(~true & predicted) + np.sum(true & ~predicted)
    return float(2 * tp / denominator) if denominator > 0 else 0.0

