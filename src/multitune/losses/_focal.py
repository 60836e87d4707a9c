r"""Focal loss for binary, multi-label and multi-class classification, computed in log space.

The focal loss of Lin, Goyal, Girshick, He and Dollár, "Focal Loss for Dense Object Detection"
(ICCV 2017, https://arxiv.org/abs/1708.02002), scales the cross entropy of each entry by a
modulating factor that shrinks the loss of well-classified entries:

.. math::

    \mathrm{FL}(p_t) = -\alpha_t \, (1 - p_t)^{\gamma} \, \log p_t

where :math:`p_t` is the probability the model gives to the target.

Every term is evaluated from log-probabilities: :math:`\log p_t` with ``logsigmoid`` or
``log_softmax``, and the factor as :math:`\exp(\gamma \log(1 - p_t))` with :math:`\log(1 - p_t)`
computed without forming :math:`1 - p_t`. The naive :math:`(1 - p_t)^{\gamma}` has an infinite
derivative at :math:`p_t = 1` for :math:`0 < \gamma < 1`, so a saturated logit gives NaN gradients.
In the exponential form the derivative is :math:`\exp(\gamma \log(1 - p_t)) \, \gamma \,
\frac{d}{dz}\log(1 - p_t)`, a product of zero and a finite number, so values and gradients are
finite for every finite logit and every :math:`\gamma \ge 0`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FocalMode = Literal["binary", "multilabel", "multiclass"]
Reduction = Literal["none", "mean", "sum"]
Alpha = Union[float, Sequence[float], Tensor]

_MODES: tuple[str, ...] = ("binary", "multilabel", "multiclass")
_REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
_HALF_PRECISION = (torch.float16, torch.bfloat16)
# Below log(1/2), log1p(-exp(x)) is accurate. Above it, 1 - p_t is computed from the other classes.
_LOG_HALF = -math.log(2.0)


def focal_loss(
    input: Tensor,
    target: Tensor,
    *,
    mode: FocalMode,
    alpha: Alpha | None = None,
    gamma: float = 2.0,
    reduction: Reduction = "mean",
    ignore_index: int | None = -100,
) -> Tensor:
    r"""Compute the focal loss of logits against targets.

    .. math::

        \mathrm{FL} = -\alpha_t \, (1 - p_t)^{\gamma} \, \log p_t

    (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.)

    Sigmoid modes (``"binary"``, ``"multilabel"``): each logit :math:`z` is an independent binary
    prediction with :math:`p = \sigma(z)` and target :math:`y \in [0, 1]`. The loss of one entry is

    .. math::

        \alpha_t \, (1 - p_t)^{\gamma} \, \mathrm{BCE}(z, y), \quad
        p_t = p\,y + (1 - p)(1 - y), \quad \alpha_t = \alpha\,y + (1 - \alpha)(1 - y),

    with :math:`\log(1 - p_t) = \operatorname{logaddexp}(\log\sigma(z) + \log(1 - y),\;
    \log\sigma(-z) + \log y)`. For hard targets (0 or 1) this is the formula above, and
    :math:`\alpha` weights positives and :math:`1 - \alpha` negatives, as in
    ``torchvision.ops.sigmoid_focal_loss``. Soft targets keep the binary cross entropy
    :math:`-y \log p - (1 - y)\log(1 - p)` as the log term, so ``gamma=0`` and ``alpha=None``
    give ``binary_cross_entropy_with_logits`` for soft targets too.

    Multiclass mode (``"multiclass"``): :math:`p_t` is the softmax probability of the target class
    over dim 1, and :math:`\alpha_t` is ``alpha[target]`` for a per-class vector or ``alpha`` itself
    for a scalar. :math:`\log(1 - p_t)` is :math:`\log(1 - e^{\log p_t})` where :math:`p_t \le 1/2`,
    and the log-sum-exp of the other classes' logits minus the log-sum-exp of all logits where
    :math:`p_t > 1/2`, so it stays accurate as :math:`p_t \to 1`.

    With ``gamma=0`` and ``alpha=None`` the result equals
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` (sigmoid modes) or
    :func:`torch.nn.functional.cross_entropy` (multiclass) with the same ``ignore_index``.

    Args:
        input: logits. ``"binary"``: ``[N]`` or ``[N, 1]``. ``"multilabel"``: ``[N, C]``.
            ``"multiclass"``: ``[N, C]`` or ``[N, C, d1, ...]`` with ``C >= 2``. float16 and
            bfloat16 logits are computed in float32.
        target: sigmoid modes: the shape of ``input``, values in ``[0, 1]`` (any real dtype, cast to
            the computation dtype) or ``ignore_index``. Multiclass: integer class indices in
            ``[0, C)`` or ``ignore_index``, shape ``[N]`` or ``[N, d1, ...]``.
        mode: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        alpha: ``None`` (default) applies no :math:`\alpha_t` factor. Sigmoid modes: a number in
            ``[0, 1]`` weighting positives (negatives get ``1 - alpha``); ``"multilabel"`` also
            takes a ``[C]`` vector, one value per label. Multiclass: one number ``>= 0`` that scales
            every entry, or a ``[C]`` vector of per-class weights ``>= 0``.
        gamma: focusing parameter :math:`\gamma \ge 0` (default 2). ``0`` gives the
            (:math:`\alpha`-weighted) cross entropy.
        reduction: ``"none"`` returns the per-entry loss (sigmoid modes: the shape of ``input``;
            multiclass: the shape of ``target``), with 0 at ignored entries. ``"mean"`` (default)
            divides the sum by the number of kept entries, not by the sum of :math:`\alpha_t` as
            ``cross_entropy(weight=...)`` does. ``"sum"`` returns the sum.
        ignore_index: target value that marks entries contributing nothing to the loss or to the
            ``"mean"`` denominator (default -100); ``None`` keeps every entry. When every entry is
            ignored, ``"mean"`` and ``"sum"`` return 0 with a zero gradient.

    Returns:
        The loss, a scalar for ``"mean"`` and ``"sum"``. Its dtype is float32 for float16 and
        bfloat16 logits and the dtype of ``input`` otherwise.

    Raises:
        ValueError: for an unknown ``mode`` or ``reduction``, a negative or non-finite ``gamma``,
            shapes that do not match ``mode``, a target value out of range, or an ``alpha`` of the
            wrong length or out of range.
        TypeError: for non-floating-point logits or a non-integer multiclass target.
    """
    _check_mode(mode)
    gamma = _check_gamma(gamma)
    _check_reduction(reduction)
    alpha_values = _check_alpha(alpha, mode)

    if not input.is_floating_point():
        raise TypeError(f"focal_loss: input must hold floating-point logits, got dtype {input.dtype}")
    logits = input.float() if input.dtype in _HALF_PRECISION else input

    if mode == "multiclass":
        losses, keep = _softmax_focal_terms(logits, target, alpha_values, gamma, ignore_index)
    else:
        losses, keep = _sigmoid_focal_terms(logits, target, mode, alpha_values, gamma, ignore_index)
    return _reduce(losses, keep, reduction)


class FocalLoss(nn.Module):
    r"""Module form of :func:`focal_loss`, with the hyper-parameters fixed at construction.

    .. math::

        \mathrm{FL} = -\alpha_t \, (1 - p_t)^{\gamma} \, \log p_t

    (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.) ``alpha``, ``gamma``,
    ``mode`` and ``reduction`` are validated here, so a bad configuration fails before training.
    The length of a vector ``alpha`` is checked against ``C`` on the first call. A tensor ``alpha``
    is a non-persistent buffer: it moves with ``.to(device)`` and stays out of ``state_dict``.

    Args:
        mode: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        alpha: see :func:`focal_loss`; default ``None``.
        gamma: focusing parameter :math:`\gamma \ge 0`; default 2.
        reduction: ``"none"``, ``"mean"`` (default) or ``"sum"``.
        ignore_index: target value of ignored entries; default -100, ``None`` keeps every entry.
    """

    alpha: Tensor | None

    def __init__(
        self,
        mode: FocalMode,
        *,
        alpha: Alpha | None = None,
        gamma: float = 2.0,
        reduction: Reduction = "mean",
        ignore_index: int | None = -100,
    ) -> None:
        super().__init__()
        _check_mode(mode)
        _check_reduction(reduction)
        self.mode: FocalMode = mode
        self.gamma: float = _check_gamma(gamma)
        self.reduction: Reduction = reduction
        self.ignore_index: int | None = ignore_index
        self.register_buffer("alpha", _check_alpha(alpha, mode), persistent=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return focal_loss(
            input,
            target,
            mode=self.mode,
            alpha=self.alpha,
            gamma=self.gamma,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else self.alpha.tolist()
        return (
            f"mode={self.mode!r}, alpha={alpha}, gamma={self.gamma}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        )


# Per-entry terms --------------------------------------------------------------------------------


def _sigmoid_focal_terms(
    logits: Tensor,
    target: Tensor,
    mode: str,
    alpha: Tensor | None,
    gamma: float,
    ignore_index: int | None,
) -> tuple[Tensor, Tensor]:
    _check_sigmoid_shapes(logits, target, mode, alpha)

    targets = target.to(logits.dtype)
    keep = _keep_mask(targets, ignore_index)
    invalid = keep & ~((targets >= 0) & (targets <= 1))
    if invalid.any():
        value = targets[invalid][0].item()
        raise ValueError(
            f"focal_loss: {mode} targets must be in [0, 1] or equal ignore_index={ignore_index}, "
            f"found {value}; pass probabilities or 0/1 labels"
        )
    # Ignored entries get a valid target so that no NaN reaches the backward pass. They are zeroed below.
    targets = torch.where(keep, targets, 0.0)

    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")

    if gamma > 0:
        # 1 - p_t = p (1 - y) + (1 - p) y, summed in log space, where log(0) = -inf drops a term exactly.
        log_one_minus_pt = torch.logaddexp(
            F.logsigmoid(logits) + torch.log1p(-targets),
            F.logsigmoid(-logits) + torch.log(targets),
        )
        losses = torch.exp(gamma * log_one_minus_pt) * losses

    if alpha is not None:
        alpha = alpha.to(device=logits.device, dtype=logits.dtype)
        alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
        losses = alpha_t * losses

    return torch.where(keep, losses, 0.0), keep


def _softmax_focal_terms(
    logits: Tensor,
    target: Tensor,
    alpha: Tensor | None,
    gamma: float,
    ignore_index: int | None,
) -> tuple[Tensor, Tensor]:
    _check_softmax_shapes(logits, target, alpha)

    num_classes = logits.shape[1]
    keep = _keep_mask(target, ignore_index)
    invalid = keep & ((target < 0) | (target >= num_classes))
    if invalid.any():
        value = target[invalid][0].item()
        raise ValueError(
            f"focal_loss: multiclass target {value} is out of range for {num_classes} classes; "
            f"targets must be in [0, {num_classes}) or equal ignore_index={ignore_index}"
        )
    # Ignored entries point at class 0 so that gather and alpha indexing stay in range. They are zeroed below.
    safe_target = torch.where(keep, target, 0).long()
    index = safe_target.unsqueeze(1)

    log_pt = F.log_softmax(logits, dim=1).gather(1, index).squeeze(1)
    losses = -log_pt

    if gamma > 0:
        log_one_minus_pt = _log_one_minus_softmax_target(logits, log_pt, index)
        losses = torch.exp(gamma * log_one_minus_pt) * losses

    if alpha is not None:
        alpha = alpha.to(device=logits.device, dtype=logits.dtype)
        alpha_t = alpha if alpha.ndim == 0 else alpha[safe_target]
        losses = alpha_t * losses

    return torch.where(keep, losses, 0.0), keep


def _log_one_minus_softmax_target(logits: Tensor, log_pt: Tensor, index: Tensor) -> Tensor:
    """Return log(1 - p_t) for the softmax over dim 1, accurate for p_t near 0 and near 1."""
    # For p_t <= 1/2, log1p(-exp(log p_t)) is accurate. The clamp keeps this branch's gradient finite
    # where torch.where does not select it, because p_t -> 1 would give -1/0 there.
    from_target = torch.log1p(-torch.exp(log_pt.clamp(max=_LOG_HALF)))

    # For p_t > 1/2, 1 - p_t is the softmax mass of the other classes. Their log-sum-exp stays accurate
    # where 1 - p_t formed from p_t would round to 0.
    other_logits = logits.scatter(1, index, float("-inf"))
    from_others = torch.logsumexp(other_logits, dim=1) - torch.logsumexp(logits, dim=1)

    return torch.where(log_pt < _LOG_HALF, from_target, from_others)


def _keep_mask(target: Tensor, ignore_index: int | None) -> Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _reduce(losses: Tensor, keep: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    # With every entry ignored the sum is 0, and the clamp makes the mean 0 instead of 0 / 0.
    kept_count = keep.sum().to(total.dtype).clamp(min=1)
    return total / kept_count


# Validation -------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"focal_loss: mode must be one of {', '.join(_MODES)}; got {mode!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")


def _check_gamma(gamma: float) -> float:
    value = float(gamma)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"focal_loss: gamma must be a finite number >= 0, got {gamma}; use gamma=0 for cross entropy")
    return value


def _check_alpha(alpha: Alpha | None, mode: str) -> Tensor | None:
    """Return ``alpha`` as a 0-d or 1-d floating-point tensor after checking its values for ``mode``."""
    if alpha is None:
        return None

    values = alpha if isinstance(alpha, Tensor) else torch.as_tensor(alpha, dtype=torch.float64)
    if not values.is_floating_point():
        values = values.to(torch.float64)
    if values.ndim > 1:
        raise ValueError(f"focal_loss: alpha must be a number or a 1-D vector, got shape {tuple(values.shape)}")

    checked = values.detach()
    if not torch.isfinite(checked).all():
        raise ValueError(f"focal_loss: alpha must be finite, got {checked.tolist()}")
    if mode == "multiclass":
        if (checked < 0).any():
            raise ValueError(f"focal_loss: multiclass alpha (class weights) must be >= 0, got {checked.tolist()}")
    elif ((checked < 0) | (checked > 1)).any():
        raise ValueError(
            f"focal_loss: {mode} alpha must be in [0, 1] (it weights positives, 1 - alpha weights negatives), "
            f"got {checked.tolist()}"
        )
    return values


def _check_sigmoid_shapes(logits: Tensor, target: Tensor, mode: str, alpha: Tensor | None) -> None:
    if mode == "binary":
        if not (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)):
            raise ValueError(
                f"focal_loss: binary input must have shape [N] or [N, 1], got {tuple(logits.shape)}; "
                "use mode='multilabel' for [N, C] with C > 1"
            )
        num_labels = 1
    else:
        if logits.ndim != 2:
            raise ValueError(f"focal_loss: multilabel input must have shape [N, C], got {tuple(logits.shape)}")
        num_labels = logits.shape[1]

    if target.shape != logits.shape:
        raise ValueError(
            f"focal_loss: {mode} target must have the shape of input {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if alpha is not None and alpha.ndim == 1 and alpha.shape[0] != num_labels:
        raise ValueError(
            f"focal_loss: {mode} alpha has {alpha.shape[0]} values but input has {num_labels} label(s); "
            f"pass one number or {num_labels} values"
        )


def _check_softmax_shapes(logits: Tensor, target: Tensor, alpha: Tensor | None) -> None:
    if logits.ndim < 2 or logits.shape[1] < 2:
        raise ValueError(
            f"focal_loss: multiclass input must have shape [N, C, ...] with C >= 2, got {tuple(logits.shape)}; "
            "use mode='binary' for one logit per example"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"focal_loss: multiclass target must have shape {expected} for input {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"focal_loss: multiclass target must hold integer class indices, got dtype {target.dtype}; "
            "convert it with target.long()"
        )

    num_classes = logits.shape[1]
    if alpha is not None and alpha.ndim == 1 and alpha.shape[0] != num_classes:
        raise ValueError(
            f"focal_loss: multiclass alpha has {alpha.shape[0]} values but input has {num_classes} classes; "
            f"pass one weight per class or one number"
        )
