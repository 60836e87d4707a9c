r"""PCGrad: each task gradient loses its component along the task gradients it conflicts with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from torch import Tensor

from ._base import NonFinitePolicy
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import draw_task_orders, gramian_to_numpy, weights_like
from ._registry import register_balancer


def pcgrad_weights(gramian: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    r"""Return the PCGrad coefficients :math:`c` with :math:`\sum_i g_i^{PC} = \sum_j c_j g_j`.

    Each projected gradient is tracked as a coefficient row over the original gradients,
    :math:`g_i^{PC} = \sum_j r_{ij} g_j`, starting from :math:`r_i = e_i`. Then
    :math:`\langle g_i^{PC}, g_j \rangle = (r_i G)_j`, and the projection
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j\rangle}{\|g_j\|^2} g_j`
    only changes :math:`r_{ij}`. The result is :math:`c = \sum_i r_i`.

    Args:
        gramian: :math:`G = J J^\top`, shape (k, k).
        orders: for each task ``i``, the other tasks in the order in which ``i`` is projected
            (see :func:`draw_task_orders`).
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    if len(orders) != k:
        raise ValueError(f"pcgrad_weights: expected {k} task orders (one per task), got {len(orders)}")

    rows = np.eye(k)
    for i in range(k):
        row = rows[i]
        for j in orders[i]:
            squared_norm = matrix[j, j]
            if squared_norm <= 0.0:
                continue
            inner = float(row @ matrix[:, j])
            if inner < 0.0:
                row[j] -= inner / squared_norm
    return weights_like(rows.sum(axis=0), gramian)


@register_balancer
class PCGrad(GradientBalancer):
    r"""PCGrad ("gradient surgery"): remove from each task gradient the parts that conflict with the others.

    From *Gradient Surgery for Multi-Task Learning* (Yu, Kumar, Gupta, Levine, Hausman & Finn,
    NeurIPS 2020, https://arxiv.org/abs/2001.06782), Algorithm 1. For each task :math:`i`,
    :math:`g_i^{PC} = g_i`, then for every other task :math:`j` in a random order

    .. math::

        \text{if } \langle g_i^{PC}, g_j \rangle < 0: \quad
        g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j \rangle}{\|g_j\|^2}\, g_j ,

    and the update is the sum :math:`\Delta\theta = \sum_i g_i^{PC}`. Projections use only
    inner products, so the update is :math:`\sum_j c_j g_j` with :math:`c` computed from the
    Gramian alone (:func:`pcgrad_weights`); :attr:`weights` reports :math:`c`. The random orders
    are drawn from :attr:`generator` (seeded by ``seed``, saved in ``state_dict``), one
    permutation of the other tasks per task and per step.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "pcgrad"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        gradients: GradientSource = "shared",
        task_gradients: TaskGradientPolicy = "unweighted",
        task_parameters: Mapping[str, Iterable[Tensor]] | None = None,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(
            task_names,
            shared_parameters,
            gradients=gradients,
            task_gradients=task_gradients,
            task_parameters=task_parameters,
            seed=seed,
            on_nonfinite=on_nonfinite,
        )

    def weigh(self, gramian: Tensor) -> Tensor:
        orders = draw_task_orders(gramian.shape[0], self.generator)
        return pcgrad_weights(gramian, orders)
