"""Dispatch of metrics by task kind, and the primary metric of each kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from multitune.metrics._classification import classification_metrics, multilabel_metrics
from multitune.metrics._regression import regression_metrics
from multitune.metrics._tokens import is_iob_scheme, token_classification_metrics

TaskKind = Literal["classification", "multilabel", "regression", "token_classification"]
"""Kind of a task's labels and head."""

TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

_HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "macro_f1": True,
    "micro_f1": True,
    "subset_accuracy": True,
    "rmse": False,
    "mae": False,
    "pearson": True,
    "spearman": True,
    "token_accuracy": True,
    "entity_precision": True,
    "entity_recall": True,
    "entity_f1": True,
    "loss": False,
}


def validate_kind(kind: str) -> TaskKind:
    """Return ``kind`` unchanged, or raise ``ValueError`` naming the valid kinds."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {list(TASK_KINDS)}")
    return kind  # type: ignore[return-value]


def compute_metrics(kind: str, predictions: Any, labels: Any, *, label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Compute the evaluation metrics of one task from predictions in label space.

    ``predictions`` are what :meth:`multitune.models.MultiTaskModel.predict` returns: class ids,
    multi-hot vectors, values in the targets' original units, or tag ids. Missing labels are
    ignored: ``-100`` for classification, multilabel entries and tokens, NaN for regression.

    ========================  ===========================================================
    kind                      metrics
    ========================  ===========================================================
    ``classification``        ``accuracy``, ``macro_f1``
    ``multilabel``            ``micro_f1``, ``macro_f1``, ``subset_accuracy``
    ``regression``            ``rmse``, ``mae``, ``pearson``, ``spearman``
    ``token_classification``  ``token_accuracy``; with IOB tag names also ``entity_precision``,
                              ``entity_recall``, ``entity_f1`` (seqeval)
    ========================  ===========================================================

    Args:
        kind: the task kind.
        predictions: predictions as a tensor, an array or a list.
        labels: labels of the same layout.
        label_names: tag names by id. Token classification uses them for entity F1; the other
            kinds ignore them.
    """
    kind = validate_kind(kind)
    if kind == "classification":
        return classification_metrics(predictions, labels)
    if kind == "multilabel":
        return multilabel_metrics(predictions, labels)
    if kind == "regression":
        return regression_metrics(predictions, labels)
    return token_classification_metrics(predictions, labels, label_names=label_names)


def primary_metric(kind: str, label_names: Sequence[str] | None = None) -> tuple[str, bool]:
    """Return the name of the metric that ranks models of this task kind, and whether higher is better.

    ``macro_f1`` for classification (robust to class imbalance), ``micro_f1`` for multilabel,
    ``rmse`` for regression, and ``entity_f1`` for token classification. Token classification
    falls back to ``token_accuracy`` when ``label_names`` are given and are not IOB-style tags,
    because :func:`compute_metrics` then has no entity metrics.
    """
    kind = validate_kind(kind)
    if kind == "classification":
        return "macro_f1", True
    if kind == "multilabel":
        return "micro_f1", True
    if kind == "regression":
        return "rmse", False
    if label_names is not None and not is_iob_scheme(label_names):
        return "token_accuracy", True
    return "entity_f1", True


def metric_higher_is_better(name: str) -> bool:
    """Return whether a higher value of the metric ``name`` (one of :func:`compute_metrics`'s keys, or ``loss``) is better."""
    if name not in _HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric {name!r}; known metrics: {sorted(_HIGHER_IS_BETTER)}")
    return _HIGHER_IS_BETTER[name]
