"""IMTL-L: learnable loss scales that drive every scaled loss towards 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer


@register_balancer
class IMTLL(Balancer):
    r"""Loss balancing of Impartial Multi-Task Learning (IMTL-L): one learnable log-scale per task.

    The loss part of *Towards Impartial Multi-task Learning* (Liu, Li, Kuang, Xue, Chen, Yang,
    Liao & Zhang, ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr). Each task :math:`i`
    has a learnable :math:`s_i` (stored in :attr:`log_scales`, initialised to 0) and

    .. math::

        \mathcal{L} = \sum_i \bigl(e^{s_i} L_i - s_i\bigr),
        \qquad
        \frac{\partial \mathcal{L}}{\partial s_i} = e^{s_i} L_i - 1 .

    The minimum over :math:`s_i` is at :math:`s_i = -\log L_i`, where every scaled loss
    :math:`e^{s_i} L_i` equals 1, so no task dominates by the scale of its loss. The total can be
    negative. :attr:`weights` reports the multipliers :math:`e^{s_i}`.

    The scales are :class:`torch.nn.Parameter`\ s: add ``balancer.parameters()`` to the optimizer
    (without weight decay, which would pull every :math:`s_i` towards 0). A task missing from a
    call gets no weight and no gradient for its :math:`s_i`.

    Args:
        task_names: names of the tasks.
        init_log_scale: initial value of every :math:`s_i` (default 0, a weight of 1).
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "imtl_l"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        init_log_scale: float = 0.0,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), float(init_log_scale)))

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        terms = []
        weights: dict[str, Tensor] = {}
        for name, loss in losses.items():
            log_scale = self.log_scales[self.task_index[name]].to(device=loss.device, dtype=loss.dtype)
            scale = log_scale.exp()
            terms.append(scale * loss - log_scale)
            weights[name] = scale.detach()
        return torch.stack(terms).sum(), weights
