"""Training losses of the task heads, with missing labels masked out.

Every loss is the mean over the labelled elements of the batch: examples whose ``label_mask`` is
False, class labels and tag labels equal to ``-100``, multilabel entries equal to ``-100`` and NaN
regression targets contribute nothing. A batch with no labelled element gets a zero loss that is
still connected to the outputs (its gradient is zero), so it back-propagates without NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss computed from the outputs and labels of the labelled examples; returns a scalar tensor."""

DEFAULT_LOSSES: dict[str, str] = {
    "classification": "cross_entropy",
    "multilabel": "bce",
    "regression": "mse",
    "token_classification": "cross_entropy",
}

LOSSES_BY_KIND: dict[str, tuple[str, ...]] = {
    "classification": ("cross_entropy", "focal"),
    "multilabel": ("bce", "focal"),
    "regression": ("mse", "l1", "huber"),
    "token_classification": ("cross_entropy", "focal"),
}


def labelled_count(kind: str, labels: Tensor, label_mask: Tensor | None = None, target_mask: Tensor | None = None) -> int:
    """Return the number of labelled elements of a batch: the count that a built-in loss averages over.

    Elements are as in this module's losses. Only the rows whose ``label_mask`` is True count.
    In them, a class, label or tag counts unless it is ``-100``. A regression target counts
    unless it is NaN or, when ``target_mask`` is given, marked absent there.
    """
    if label_mask is not None:
        rows = label_mask.to(dtype=torch.bool).reshape(-1)
        labels = labels[rows]
        target_mask = target_mask[rows] if target_mask is not None else None
    if kind == "regression":
        present = ~torch.isnan(labels)
        if target_mask is not None:
            present &= target_mask.to(dtype=torch.bool).reshape(present.shape)
        return int(present.sum())
    return int((labels != IGNORE_INDEX).sum())


def zero_loss(outputs: Tensor) -> Tensor:
    """Return a scalar zero that depends on ``outputs``, so ``backward()`` works and gives zero gradients.

    Summing an empty slice keeps the result finite even if ``outputs`` contains NaN or infinity.
    """
    return outputs.reshape(-1)[:0].sum()


def select_labelled(outputs: Tensor, labels: Tensor, label_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return the outputs and labels of the examples whose ``label_mask`` is True (all when it is None)."""
    if label_mask is None:
        return outputs, labels
    mask = label_mask.to(device=outputs.device, dtype=torch.bool).reshape(-1)
    if mask.shape[0] != outputs.shape[0]:
        raise ValueError(f"label_mask has {mask.shape[0]} entries but the batch has {outputs.shape[0]} examples")
    return outputs[mask], labels[mask]


def class_loss(outputs: Tensor, labels: Tensor, *, loss: str, focal_options: dict[str, Any]) -> Tensor:
    """Mean cross-entropy or focal loss of class logits ``[N, C]`` against class ids ``[N]`` (``-100`` ignored)."""
    labels = labels.to(device=outputs.device, dtype=torch.long)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return zero_loss(outputs)

    if loss == "focal":
        from multitune.losses import focal_loss

        return focal_loss(outputs, labels, mode="multiclass", reduction="mean", ignore_index=IGNORE_INDEX, **focal_options)
    return F.cross_entropy(outputs[valid], labels[valid])


def multilabel_loss(outputs: Tensor, labels: Tensor, *, loss: str, focal_options: dict[str, Any]) -> Tensor:
    """Mean binary cross-entropy or sigmoid focal loss over the labelled entries of ``[N, C]`` multi-hot labels."""
    labels = labels.to(device=outputs.device, dtype=outputs.dtype)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return zero_loss(outputs)

    if loss == "focal":
        from multitune.losses import focal_loss

        return focal_loss(outputs, labels, mode="multilabel", reduction="mean", ignore_index=IGNORE_INDEX, **focal_options)
    return F.binary_cross_entropy_with_logits(outputs[valid], labels[valid])


def regression_loss(outputs: Tensor, targets: Tensor, *, loss: str) -> Tensor:
    """Mean squared error, absolute error or Huber loss over the non-NaN elements of ``targets``."""
    valid = ~torch.isnan(targets)
    if not bool(valid.any()):
        return zero_loss(outputs)

    predicted = outputs[valid]
    expected = targets[valid]
    if loss == "l1":
        return F.l1_loss(predicted, expected)
    if loss == "huber":
        return F.huber_loss(predicted, expected)
    return F.mse_loss(predicted, expected)
