r"""GradVac: raise the cosine similarity of each pair of task gradients towards an adaptive target."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._base import NonFinitePolicy
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import draw_task_orders, gramian_to_numpy, weights_like
from ._registry import register_balancer


def gradvac_weights(
    gramian: Tensor,
    targets: np.ndarray,
    orders: Sequence[Sequence[int]],
    *,
    beta: float = 0.01,
    eps: float = 1e-8,
) -> tuple[Tensor, np.ndarray]:
    r"""Return GradVac's coefficients :math:`c` (with :math:`\sum_i g_i' = \sum_j c_j g_j`) and the updated targets.

    Each corrected gradient is tracked as a coefficient row over the original gradients,
    :math:`g_i' = \sum_j r_{ij} g_j` with :math:`r_i = e_i` at the start, so that
    :math:`\langle g_i', g_j \rangle = (r_i G)_j` and :math:`\|g_i'\|^2 = r_i G r_i^\top`; adding
    :math:`w\, g_j` to :math:`g_i'` adds :math:`w` to :math:`r_{ij}`.

    Args:
        gramian: :math:`G`, shape (k, k).
        targets: :math:`\hat\phi`, a (k, k) float64 array of the target similarities of the present
            tasks (row: the corrected task, column: the other task). Not modified.
        orders: for each task, the other tasks in the order of correction.
        beta: EMA rate of the targets.
        eps: added to the denominators.
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    if targets.shape != (k, k):
        raise ValueError(f"gradvac_weights: targets must have shape ({k}, {k}), got {targets.shape}")
    if len(orders) != k:
        raise ValueError(f"gradvac_weights: expected {k} task orders (one per task), got {len(orders)}")
    updated = targets.astype(np.float64, copy=True)
    norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))

    rows = np.eye(k)
    for i in range(k):
        row = rows[i]
        inner = row @ matrix  # inner[j] = <g_i', g_j>
        for j in orders[i]:
            norm_i = math.sqrt(max(float(inner @ row), 0.0))
            similarity = float(inner[j]) / (norm_i * norms[j] + eps)
            target = float(updated[i, j])
            if similarity < target:
                # Adding w g_j with this w makes cos(g_i', g_j) equal the target.
                sine = math.sqrt(max(1.0 - similarity * similarity, 0.0))
                target_sine = math.sqrt(max(1.0 - target * target, 0.0))
                w = norm_i * (target * sine - similarity * target_sine) / (norms[j] * target_sine + eps)
                row[j] += w
                inner = inner + w * matrix[j]
            updated[i, j] = (1.0 - beta) * target + beta * similarity
    return weights_like(rows.sum(axis=0), gramian), updated


@register_balancer
class GradVac(GradientBalancer):
    r"""Gradient Vaccine: set each pair of task gradients to at least an adaptive target similarity.

    From *Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models* (Wang, Tsvetkov, Firat & Cao, ICLR 2021,
    https://arxiv.org/abs/2010.05874). For each task :math:`i`, :math:`g_i' = g_i`;
    then for every other task :math:`j` in a random order, with
    :math:`\phi_{ij} = \cos(g_i', g_j)` and the target :math:`\hat\phi_{ij}`,

    .. math::

        \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
        g_i' \leftarrow g_i' + \frac{\|g_i'\| \bigl(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\bigr)}{\|g_j\| \sqrt{1-\hat\phi_{ij}^2}}\, g_j ,
        \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\, \phi_{ij} ,

    and the update is :math:`\sum_i g_i'`. The targets start at 0, where the correction is
    PCGrad's projection (a conflicting gradient is made orthogonal). They then follow an
    exponential moving average of the observed similarities. All the quantities come from the Gramian
    (:func:`gradvac_weights`), and :attr:`weights` reports the coefficients of the update.

    The targets (:attr:`targets`, a T x T buffer) and the random generator are saved in
    ``state_dict``; only the pairs of tasks present in a step update their targets.

    NOTE: the paper applies GradVac per layer (or per parameter group) in a multilingual
    Transformer; here one Gramian over all of :math:`J` is used (its "whole model" variant).

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        beta: EMA rate of the targets, in [0, 1] (default 0.01; TorchJD's GradVac defaults to 0.5).
        eps: added to the denominators (default 1e-8).
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "gradvac"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        beta: float = 0.01,
        eps: float = 1e-8,
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
        owner = type(self).__name__
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"{owner}: beta must be in [0, 1], got {beta}")
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0.0:
            raise ValueError(f"{owner}: eps must be a finite number >= 0, got {eps}")
        self.beta = beta
        self.eps = eps
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64))

    def weigh(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        indices = [self.task_index[name] for name in self.present_tasks] if len(self.present_tasks) == k else list(range(k))
        index = torch.tensor(indices, dtype=torch.long, device=self.targets.device)
        targets = self.targets[index][:, index].detach().to(device="cpu", dtype=torch.float64).numpy()

        orders = draw_task_orders(k, self.generator)
        coefficients, updated = gradvac_weights(gramian, targets, orders, beta=self.beta, eps=self.eps)

        rows = index[:, None].expand(k, k)
        columns = index[None, :].expand(k, k)
        self.targets[rows, columns] = torch.from_numpy(updated).to(self.targets)
        return coefficients

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
