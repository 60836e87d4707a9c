"""Geometric loss strategy: the geometric mean of the task losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer
from ._scale_invariant import NonPositivePolicy, check_nonpositive_policy, drop_nonpositive, zero_total_like


@register_balancer
class GeometricMean(Balancer):
    r"""Geometric loss strategy (GLS): the geometric mean of the task losses.

    From *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning* (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019,
    https://arxiv.org/abs/1904.08492). With :math:`n` tasks in the step,

    .. math::

        \mathcal{L} = \Bigl(\prod_{i=1}^{n} L_i\Bigr)^{1/n}
                    = \exp\Bigl(\frac{1}{n} \sum_{i=1}^{n} \log L_i\Bigr),
        \qquad
        \frac{\partial \mathcal{L}}{\partial L_i} = \frac{\mathcal{L}}{n\, L_i} .

    The total is computed in log space, so a product of many small or large losses neither
    underflows nor overflows. :attr:`weights` reports the gradient multipliers
    :math:`\mathcal{L} / (n L_i)`, which favour the tasks with the smaller losses.

    The logarithm needs positive losses. A loss :math:`\le 0` is handled by ``on_nonpositive``:
    ``"skip"`` leaves that task out of the step (the mean then runs over the remaining tasks) with
    one warning per task, and ``"raise"`` raises :class:`ValueError`. Tasks missing from a call
    are left out the same way. The method is stateless.

    Args:
        task_names: names of the tasks.
        on_nonpositive: ``"skip"`` (default) or ``"raise"`` for a loss :math:`\le 0`.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "gls"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        on_nonpositive: NonPositivePolicy = "skip",
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        self.on_nonpositive: NonPositivePolicy = check_nonpositive_policy(on_nonpositive, owner=type(self).__name__)
        self.nonpositive_counts: dict[str, int] = {}

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        positive = drop_nonpositive(self, losses)
        if not positive:
            return zero_total_like(losses), {}

        log_losses = torch.stack([loss.log() for loss in positive.values()])
        total = log_losses.mean().exp()

        scale = total.detach() / len(positive)
        weights = {name: scale / loss.detach() for name, loss in positive.items()}
        return total, weights
