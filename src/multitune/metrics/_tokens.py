"""Metrics of token classification: entity F1 with ``seqeval`` and token accuracy.

Entity-level precision, recall and F1 (micro-averaged over entity types) come from
``seqeval.metrics`` in its default mode, which is compatible with the CoNLL-2000 ``conlleval``
script: an ``I-`` tag that follows ``O`` or another type still opens an entity. Entity metrics need
the tag names, and the names must follow an IOB-style scheme (every tag is ``O`` or starts with
``B-``, ``I-``, ``E-`` or ``S-``). Otherwise only ``token_accuracy`` is returned.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from multitune.metrics._arrays import IGNORE_INDEX, to_numpy

logger = logging.getLogger(__name__)

_IOB_TAG = re.compile(r"^(O|[BIES]-.+)$")


def is_iob_scheme(label_names: Sequence[str] | None) -> bool:
    """Return whether ``label_names`` are IOB-style tags with at least one entity tag."""
    if not label_names:
        return False
    if not all(isinstance(name, str) and _IOB_TAG.match(name) for name in label_names):
        return False
    return any(name != "O" for name in label_names)


def token_classification_metrics(predictions: Any, labels: Any, *, label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Compute ``token_accuracy`` and, for IOB tags, ``entity_precision``, ``entity_recall`` and ``entity_f1``.

    Args:
        predictions: tag ids of shape ``[N, L]`` (or ``N`` rows of ids; rows may differ in length).
        labels: tag ids of the same shape. Positions labelled ``-100`` (padding, special tokens,
            continuation sub-words) are ignored, and so are sentences with no kept position.
        label_names: tag name of each id, e.g. ``["O", "B-PER", "I-PER"]``. Without names, or
            with names that are not IOB-style, the entity metrics are left out.

    Raises:
        ValueError: if a row's lengths differ, no position has a label, or a tag id has no name.
    """
    true_rows = _rows(labels, name="labels")
    predicted_rows = _rows(predictions, name="predictions")
    if len(true_rows) != len(predicted_rows):
        raise ValueError(f"token predictions have {len(predicted_rows)} sentences but labels have {len(true_rows)}")

    true_ids: list[np.ndarray] = []
    predicted_ids: list[np.ndarray] = []
    for index, (true, predicted) in enumerate(zip(true_rows, predicted_rows)):
        if true.shape != predicted.shape:
            raise ValueError(f"sentence {index}: predictions have {predicted.shape[0]} tags but labels have {true.shape[0]}")
        keep = true != IGNORE_INDEX
        if keep.any():
            true_ids.append(true[keep].astype(np.int64))
            predicted_ids.append(predicted[keep].astype(np.int64))

    if not true_ids:
        raise ValueError("token classification metrics need at least one labelled token; every label is -100")

    flat_true = np.concatenate(true_ids)
    flat_predicted = np.concatenate(predicted_ids)
    metrics = {"token_accuracy": float(np.mean(flat_true == flat_predicted))}

    if label_names is None or not is_iob_scheme(label_names):
        logger.debug("tag names %s are not IOB-style tags, so only token_accuracy is computed", label_names)
        return metrics

    metrics.update(_entity_metrics(true_ids, predicted_ids, list(label_names)))
    return metrics


def _rows(values: Any, *, name: str) -> list[np.ndarray]:
    if isinstance(values, (list, tuple)):
        return [to_numpy(row, name=name).reshape(-1) for row in values]
    array = to_numpy(values, name=name)
    if array.ndim != 2:
        raise ValueError(f"token {name} must have shape [N, L], got {array.shape}")
    return list(array)


def _entity_metrics(true_ids: list[np.ndarray], predicted_ids: list[np.ndarray], label_names: list[str]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    largest = max(int(max(ids.max(), pred.max())) for ids, pred in zip(true_ids, predicted_ids))
    smallest = min(int(min(ids.min(), pred.min())) for ids, pred in zip(true_ids, predicted_ids))
    if smallest < 0 or largest >= len(label_names):
        raise ValueError(f"tag ids range over [{smallest}, {largest}] but label_names has {len(label_names)} names; pass one name per tag id")

    true_tags = [[label_names[i] for i in ids] for ids in true_ids]
    predicted_tags = [[label_names[i] for i in ids] for ids in predicted_ids]

    return {
        "entity_precision": float(precision_score(true_tags, predicted_tags, zero_division=0)),
        "entity_recall": float(recall_score(true_tags, predicted_tags, zero_division=0)),
        "entity_f1": float(f1_score(true_tags, predicted_tags, zero_division=0)),
    }
