r"""Task heads: the per-task layers on top of the shared backbone, with their loss and predictions.

A head is a small MLP: ``hidden_layers`` blocks of dropout, linear and GELU, then dropout and a
linear layer to ``num_outputs``. Classification, multilabel and regression heads read the pooled
features ``[B, H]``; token classification heads read the per-token states ``[B, L, H]``.

Regression heads can standardise their targets: with ``target_mean`` :math:`\mu` and
``target_std`` :math:`\sigma`, the loss compares the outputs with :math:`(y - \mu) / \sigma`, and
:meth:`TaskHead.predict` returns :math:`\mu + \sigma \hat z` in the targets' original units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from multitune.metrics import TaskKind
from multitune.models._criteria import (
    DEFAULT_LOSSES,
    LOSSES_BY_KIND,
    class_loss,
    multilabel_loss,
    regression_loss,
    select_labelled,
    zero_loss,
)

MULTILABEL_THRESHOLD = 0.5
"""Probability at or above which a multilabel prediction is positive."""


class HeadSpec(BaseModel):
    """Description of one task head: its kind, size, loss and layers.

    Args:
        kind: ``"classification"``, ``"multilabel"``, ``"regression"`` or ``"token_classification"``.
        num_outputs: number of classes, labels, regression targets or tags.
        loss: ``None`` (default) uses the kind's default: cross-entropy, BCE with logits, MSE or
            token cross-entropy. A name picks a built-in loss: ``"cross_entropy"`` or ``"focal"``
            for classification and token classification, ``"bce"`` or ``"focal"`` for multilabel,
            ``"mse"``, ``"l1"`` or ``"huber"`` for regression. A callable
            ``loss(outputs, labels) -> scalar tensor`` gets the outputs and labels of the examples
            whose ``label_mask`` is True, with regression labels already standardised. A callable
            handles ``-100`` entries itself.
        gamma: focusing parameter of the focal loss (default 2.0); only with ``loss="focal"``.
        alpha: class weights of the focal loss, only with ``loss="focal"``. For multilabel, a
            float in [0, 1] weights positives (negatives get ``1 - alpha``), or a list gives one
            such value per label. For classification and token classification, a float scales
            every class, or a list gives one weight per class. ``None`` (default) applies none.
        dropout: dropout probability before each linear layer of the head (default 0.1).
        hidden_layers: number of hidden blocks before the output layer; 0 (default) is a linear head.
        hidden_dim: width of the hidden blocks; ``None`` uses the backbone's hidden size.
        target_mean: regression only; mean of each target (or one value for all targets).
        target_std: regression only; standard deviation of each target, positive.
        label_names: optional class, label or tag names by id, stored with the model.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    kind: TaskKind
    num_outputs: int = Field(ge=1)
    loss: str | Callable[..., Tensor] | None = None
    gamma: float = Field(default=2.0, ge=0.0)
    alpha: float | list[float] | None = None
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    hidden_layers: int = Field(default=0, ge=0)
    hidden_dim: int | None = Field(default=None, ge=1)
    target_mean: float | list[float] | None = None
    target_std: float | list[float] | None = None
    label_names: list[str] | None = None

    @field_validator("loss", mode="before")
    @classmethod
    def _normalise_loss_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower().replace("-", "_")
        return value

    def _check_focal_values(self) -> None:
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if self.alpha is None:
            values: list[float] = []
        elif isinstance(self.alpha, list):
            values = self.alpha
        else:
            values = [self.alpha]
        if not all(math.isfinite(value) and value >= 0.0 for value in values):
            raise ValueError(f"alpha must contain finite numbers >= 0, got {self.alpha}")
        if self.kind == "multilabel" and isinstance(self.alpha, float) and self.alpha > 1.0:
            raise ValueError(f"a multilabel alpha weights positives against negatives, so it must be in [0, 1], got {self.alpha}")

    @model_validator(mode="after")
    def _check_consistency(self) -> HeadSpec:
        if self.kind == "classification" and self.num_outputs < 2:
            raise ValueError("a classification head needs num_outputs >= 2 classes; use kind='multilabel' with num_outputs=1 for a single binary label")

        if isinstance(self.loss, str) and self.loss not in LOSSES_BY_KIND[self.kind]:
            raise ValueError(f"loss {self.loss!r} is not available for kind {self.kind!r}; choose one of {list(LOSSES_BY_KIND[self.kind])}, None or a callable")

        focal_fields = {"gamma", "alpha"} & self.model_fields_set
        if focal_fields and self.loss != "focal":
            raise ValueError(f"{sorted(focal_fields)} apply only to loss='focal', but loss is {self.loss!r}")

        if isinstance(self.alpha, list) and len(self.alpha) != self.num_outputs:
            raise ValueError(f"alpha has {len(self.alpha)} values but num_outputs is {self.num_outputs}; give one float or one value per output")
        self._check_focal_values()

        self._check_standardisation()

        if self.label_names is not None and len(self.label_names) != self.num_outputs:
            raise ValueError(f"label_names has {len(self.label_names)} names but num_outputs is {self.num_outputs}")
        return self

    def _check_standardisation(self) -> None:
        set_fields = [name for name in ("target_mean", "target_std") if getattr(self, name) is not None]
        if set_fields and self.kind != "regression":
            raise ValueError(f"{set_fields} apply only to regression heads, but kind is {self.kind!r}")

        for name in set_fields:
            values = _as_list(getattr(self, name))
            if len(values) not in (1, self.num_outputs):
                raise ValueError(f"{name} has {len(values)} values; give one value or one per target ({self.num_outputs})")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite, got {values}")

        if self.target_std is not None and min(_as_list(self.target_std)) <= 0:
            raise ValueError(f"target_std must be positive, got {self.target_std}")

    @property
    def loss_name(self) -> str:
        """Name of the loss in use: the given name, the kind's default, or ``"custom"`` for a callable."""
        if self.loss is None:
            return DEFAULT_LOSSES[self.kind]
        if isinstance(self.loss, str):
            return self.loss
        return "custom"


class TaskHead(nn.Module):
    """A task's MLP head, with the loss and the conversion of outputs to predictions for its kind.

    Build heads with :func:`build_head`; each task kind has its own subclass.
    """

    def __init__(self, spec: HeadSpec, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.net = _mlp(hidden_size, spec)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def forward(self, features: Tensor) -> Tensor:
        weight = self.net[-1].weight
        return self.net(features.to(weight.dtype))

    def loss(self, outputs: Tensor, labels: Tensor, label_mask: Tensor | None = None) -> Tensor:
        """Return the mean loss over the labelled examples of a batch (a connected zero when there are none)."""
        labels = labels.to(outputs.device)
        outputs, labels = select_labelled(outputs, labels, label_mask)
        if outputs.shape[0] == 0:
            return zero_loss(outputs)

        if callable(self.spec.loss):
            return self.spec.loss(outputs, self._custom_loss_labels(labels, outputs))
        return self._builtin_loss(outputs, labels)

    def predict(self, outputs: Tensor) -> Tensor:
        """Convert outputs to predictions in label space."""
        raise NotImplementedError

    def _builtin_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def _custom_loss_labels(self, labels: Tensor, outputs: Tensor) -> Tensor:
        return labels

    def _focal_options(self) -> dict[str, Any]:
        return {"gamma": self.spec.gamma, "alpha": self.spec.alpha}

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind!r}, num_outputs={self.spec.num_outputs}, loss={self.spec.loss_name!r}"


class ClassificationHead(TaskHead):
    """Head of single-label classification: logits ``[B, C]``, class ids ``[B]`` as labels."""

    def _builtin_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        labels = _check_class_labels(labels, batch_size=outputs.shape[0])
        return class_loss(outputs, labels, loss=self.spec.loss_name, focal_options=self._focal_options())

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.detach().argmax(dim=-1)


class MultilabelHead(TaskHead):
    """Head of multi-label classification: logits ``[B, C]``, multi-hot ``[B, C]`` as labels."""

    def _builtin_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != outputs.shape:
            raise ValueError(f"multilabel labels must be multi-hot of shape {tuple(outputs.shape)}, got {tuple(labels.shape)}")
        return multilabel_loss(outputs, labels, loss=self.spec.loss_name, focal_options=self._focal_options())

    def predict(self, outputs: Tensor) -> Tensor:
        """Return the multi-hot predictions (long): 1 where the sigmoid probability is at least 0.5."""
        return (torch.sigmoid(outputs.detach()) >= MULTILABEL_THRESHOLD).long()


class RegressionHead(TaskHead):
    """Head of regression: standardised predictions ``[B, K]``, targets ``[B, K]`` (or ``[B]`` when K = 1)."""

    target_mean: Tensor
    target_std: Tensor

    def __init__(self, spec: HeadSpec, hidden_size: int) -> None:
        super().__init__(spec, hidden_size)
        mean = _broadcast(spec.target_mean, spec.num_outputs, default=0.0)
        std = _broadcast(spec.target_std, spec.num_outputs, default=1.0)
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float32))

    def standardise(self, targets: Tensor) -> Tensor:
        """Return targets in the head's output space, :math:`(y - \\mu) / \\sigma`."""
        targets = _as_target_matrix(targets, self.spec.num_outputs)
        mean = self.target_mean.to(targets.device, targets.dtype)
        std = self.target_std.to(targets.device, targets.dtype)
        return (targets - mean) / std

    def predict(self, outputs: Tensor) -> Tensor:
        """Return predictions in the targets' original units, :math:`\\mu + \\sigma \\hat z`, shape ``[B, K]``."""
        outputs = outputs.detach()
        mean = self.target_mean.to(outputs.device, outputs.dtype)
        std = self.target_std.to(outputs.device, outputs.dtype)
        return outputs * std + mean

    def _builtin_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return regression_loss(outputs, self.standardise(labels.to(outputs.dtype)), loss=self.spec.loss_name)

    def _custom_loss_labels(self, labels: Tensor, outputs: Tensor) -> Tensor:
        return self.standardise(labels.to(outputs.dtype))


class TokenClassificationHead(TaskHead):
    """Head of token classification: logits ``[B, L, C]`` from per-token states, tag ids ``[B, L]`` as labels."""

    def _builtin_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != outputs.shape[:2]:
            raise ValueError(f"token labels must have shape {tuple(outputs.shape[:2])} (batch, sequence length), got {tuple(labels.shape)}")
        flat_outputs = outputs.reshape(-1, outputs.shape[-1])
        flat_labels = labels.reshape(-1)
        return class_loss(flat_outputs, flat_labels, loss=self.spec.loss_name, focal_options=self._focal_options())

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.detach().argmax(dim=-1)


_HEAD_CLASSES: dict[str, type[TaskHead]] = {
    "classification": ClassificationHead,
    "multilabel": MultilabelHead,
    "regression": RegressionHead,
    "token_classification": TokenClassificationHead,
}


def build_head(spec: HeadSpec, hidden_size: int) -> TaskHead:
    """Return the head of ``spec.kind`` reading features of width ``hidden_size``."""
    return _HEAD_CLASSES[spec.kind](spec, hidden_size)


def _mlp(hidden_size: int, spec: HeadSpec) -> nn.Sequential:
    width = spec.hidden_dim or hidden_size
    layers: list[nn.Module] = []
    in_features = hidden_size
    for _ in range(spec.hidden_layers):
        layers += [nn.Dropout(spec.dropout), nn.Linear(in_features, width), nn.GELU()]
        in_features = width
    layers += [nn.Dropout(spec.dropout), nn.Linear(in_features, spec.num_outputs)]
    return nn.Sequential(*layers)


def _check_class_labels(labels: Tensor, *, batch_size: int) -> Tensor:
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (batch_size,):
        raise ValueError(f"classification labels must be class ids of shape [{batch_size}], got {tuple(labels.shape)}")
    if labels.is_floating_point() and not bool(torch.all(labels == labels.round())):
        raise ValueError("classification labels must be integer class ids, got non-integer floats")
    return labels


def _as_target_matrix(targets: Tensor, num_outputs: int) -> Tensor:
    if targets.dim() == 1 and num_outputs == 1:
        return targets[:, None]
    if targets.dim() != 2 or targets.shape[1] != num_outputs:
        raise ValueError(f"regression labels must have shape [B, {num_outputs}]" + (" or [B]" if num_outputs == 1 else "") + f", got {tuple(targets.shape)}")
    return targets


def _as_list(value: float | Sequence[float]) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _broadcast(value: float | Sequence[float] | None, size: int, *, default: float) -> list[float]:
    if value is None:
        return [default] * size
    values = _as_list(value)
    return values * size if len(values) == 1 else values
