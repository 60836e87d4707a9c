"""Task normalization: divide each task loss by a running average of its own value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy, check_nonnegative
from ._registry import register_balancer


@register_balancer
class TaskNormalization(Balancer):
    r"""Divide each task loss by an exponential moving average (EMA) of that loss.

    With :math:`\beta \in [0, 1)` and optional static weights :math:`w_i` (default 1), each call
    first updates the EMA of every present task with its current loss, then divides by it:

    .. math::

        m_i(t) &= \beta\, m_i(t-1) + (1-\beta)\, \mathcal{L}_i(t), \qquad m_i(t_0) = \mathcal{L}_i(t_0),

        \mathcal{L} &= \sum_{i \in P} w_i \, \frac{\mathcal{L}_i(t)}{\max(\operatorname{sg}[m_i(t)], \epsilon)}

    where :math:`t_0` is the first call in which task :math:`i` is present and :math:`P` is the set
    of tasks present with a finite loss. :math:`\operatorname{sg}` stops the gradient, so the EMA
    is a constant for autograd and task :math:`i` contributes the gradient of
    :math:`\mathcal{L}_i` scaled by :math:`w_i / m_i(t)`. The division uses :math:`m_i(t)`, which
    already includes the current loss. Starting the EMA at the task's first loss, rather than at
    zero, makes the first ratio exactly 1; a zero start would make it :math:`1/(1-\beta)`.
    ``beta=0`` divides each loss by itself, so every task's gradient is normalised by its current
    loss value.

    The losses pass through :meth:`~multitune.balancing.Balancer.reduce_task_stats` before they
    update the EMA, so distributed ranks keep the same EMA. A task absent from a call keeps its
    EMA. In ``eval()`` mode the EMA is not updated (as with batch-norm running statistics), and a
    task that has no EMA yet is divided by its own loss.

    :attr:`weights` reports the factor :math:`w_i / \max(m_i(t), \epsilon)` applied to each loss.

    NOTE: the method assumes non-negative losses (cross-entropy, squared error). A negative EMA
    is clamped to ``eps``, which gives that task a very large weight.

    Args:
        task_names: names of the tasks.
        beta: EMA decay :math:`\beta`, in ``[0, 1)``; default 0.9.
        weights: optional static weight of every task (finite, ``>= 0``); default 1 for all.
        eps: lower bound of the divisor, which guards against a zero EMA; default 1e-8.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "task_normalization"

    ema: Tensor
    initialized: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        beta: float = 0.9,
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-8,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        beta = float(beta)
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"TaskNormalization: beta must be in [0, 1), got {beta}; 0.9 averages over about 10 steps")
        eps = float(eps)
        if not (math.isfinite(eps) and eps > 0.0):
            raise ValueError(f"TaskNormalization: eps must be a finite number > 0, got {eps}")
        self.beta = beta
        self.eps = eps
        self.static_weights: dict[str, float] = _static_weights(self.task_names, weights)

        self.register_buffer("ema", torch.zeros(self.num_tasks))
        self.register_buffer("initialized", torch.zeros(self.num_tasks, dtype=torch.bool))
        self._uniform_weights = all(weight == 1.0 for weight in self.static_weights.values())
        # Host copy of ``initialized`` for the fast path; None means "read it from the buffer".
        self._host_initialized: list[bool] | None = [False] * self.num_tasks
        self.register_load_state_dict_post_hook(_forget_host_initialized)

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        stacked = torch.stack(list(losses.values()))
        every_task = len(losses) == self.num_tasks
        if self.training and every_task and self._reduce_fn is None and self._all_initialized():
            # Fast path of the common step: every task present, one process, every EMA started.
            self.ema.mul_(self.beta).add_(stacked.detach().to(self.ema.dtype), alpha=1.0 - self.beta)
            divisor = self.ema.to(stacked.dtype).clamp_min(self.eps)
        else:
            if self.training:
                self._update_ema(losses)
            ema, initialized = self.ema, self.initialized
            if not every_task:
                index = torch.tensor([self.task_index[name] for name in losses], device=ema.device)
                ema, initialized = ema[index], initialized[index]
            divisor = torch.where(initialized, ema.to(stacked.dtype), stacked.detach()).clamp_min(self.eps)

        if self._uniform_weights:
            factors = divisor.reciprocal()
        else:
            static = [self.static_weights[name] for name in losses]
            factors = torch.tensor(static, dtype=stacked.dtype, device=stacked.device) / divisor
        total = (factors * stacked).sum()
        return total, factors

    def _all_initialized(self) -> bool:
        if self._host_initialized is None:
            self._host_initialized = self.initialized.tolist()
        return all(self._host_initialized)

    def _update_ema(self, losses: dict[str, Tensor]) -> None:
        means, present = self.reduce_task_stats(losses)
        current = means[0].to(self.ema.dtype)
        updated = torch.where(self.initialized, self.beta * self.ema + (1.0 - self.beta) * current, current)
        self.ema.copy_(torch.where(present, updated, self.ema))
        self.initialized.logical_or_(present)

        if self._reduce_fn is not None:
            # Other ranks may have started tasks that this rank has not seen.
            self._host_initialized = None
        elif self._host_initialized is not None:
            for name in losses:
                self._host_initialized[self.task_index[name]] = True

    def extra_repr(self) -> str:
        return f"tasks={list(self.task_names)}, beta={self.beta}, eps={self.eps}"


def _forget_host_initialized(module: TaskNormalization, incompatible_keys: object) -> None:
    """Drop the host copy of ``initialized`` after ``load_state_dict`` replaced the buffer's values."""
    module._host_initialized = None


def _static_weights(task_names: tuple[str, ...], weights: Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(task_names, 1.0)
    unknown = [name for name in weights if name not in task_names]
    if unknown:
        raise ValueError(f"TaskNormalization: weights given for unknown task(s) {unknown}; known tasks: {list(task_names)}")
    missing = [name for name in task_names if name not in weights]
    if missing:
        raise ValueError(f"TaskNormalization: no weight for task(s) {missing}; give every task a weight or leave weights=None")
    return {
        name: check_nonnegative(f"the weight of task {name!r}", weights[name], owner="TaskNormalization")
        for name in task_names
    }
