r"""IMTL-G: the combined gradient has equal projections onto every unit task gradient."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._base import NonFinitePolicy
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import SolverWarnings, gramian_to_numpy, weights_like
from ._registry import register_balancer

logger = logging.getLogger(__name__)

# Warnings of calls made without a SolverWarnings of their own (an IMTLG balancer has one).
_default_warnings = SolverWarnings(logger)


def imtl_g_weights(gramian: Tensor, *, solver_warnings: SolverWarnings | None = None) -> Tensor:
    r"""Return the IMTL-G coefficients :math:`\alpha` (summing to 1) from the Gramian.

    With unit gradients :math:`u_i = g_i / \|g_i\|`, the rows of
    :math:`D = [g_1 - g_2; \dots; g_1 - g_k]` and :math:`U = [u_1 - u_2; \dots; u_1 - u_k]`,

    .. math::

        \alpha_{2:k} = g_1 U^\top (D U^\top)^{-1}, \qquad \alpha_1 = 1 - \sum_{i \ge 2} \alpha_i .

    Every inner product is read from :math:`G`:
    :math:`\langle g_a, u_b \rangle = G_{ab} / \sqrt{G_{bb}}`, so
    :math:`(g_1 U^\top)_j = \langle g_1, u_1 \rangle - \langle g_1, u_j \rangle` and
    :math:`(D U^\top)_{ij} = \langle g_1 - g_i, u_1 - u_j \rangle`. When :math:`D U^\top` is
    singular (two tasks with parallel gradients, or more tasks than independent gradients) or
    its condition number exceeds :math:`1/\varepsilon` of the Gramian's dtype, the
    minimum-norm least-squares solution is used and a warning is logged.
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    if k == 1:
        return weights_like(np.ones(1), gramian)

    norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))
    safe_norms = np.where(norms > 0.0, norms, 1.0)
    # projections[a, b] = <g_a, u_b>
    projections = matrix / safe_norms[None, :]

    first = projections[0, 0] - projections[0, 1:]
    system = projections[0, 0] - projections[0:1, 1:] - projections[1:, 0:1] + projections[1:, 1:]

    # alpha_{2:k} D U^T = g_1 U^T, i.e. (D U^T)^T alpha_{2:k}^T = (g_1 U^T)^T. Beyond a condition
    # number of 1 / eps of the Gramian's dtype, the rounding of G decides the solution.
    condition = float(np.linalg.cond(system))
    if np.isfinite(condition) and condition < 1.0 / torch.finfo(gramian.dtype).eps:
        rest = np.linalg.solve(system.T, first)
    else:
        (solver_warnings or _default_warnings).warn(
            "IMTL-G: the matrix D U^T is singular (condition number %.3g) for the Gramian %s; "
            "using the minimum-norm least-squares solution",
            condition,
            matrix.tolist(),
        )
        rest = np.linalg.lstsq(system.T, first, rcond=None)[0]
    alpha = np.concatenate([[1.0 - rest.sum()], rest])
    return weights_like(alpha, gramian)


@register_balancer
class IMTLG(GradientBalancer):
    r"""IMTL-G: the gradient part of impartial multi-task learning.

    From *Towards Impartial Multi-task Learning* (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang,
    ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr). IMTL-G chooses the combined
    gradient :math:`g = \sum_i \alpha_i g_i` with :math:`\sum_i \alpha_i = 1` whose projections
    onto all unit task gradients :math:`u_i = g_i / \|g_i\|` are equal,
    :math:`\langle g, u_1 \rangle = \langle g, u_i \rangle` for every :math:`i`. In closed form
    (derived in the paper),

    .. math::

        \alpha_{2:T} = g_1 U^\top \bigl(D U^\top\bigr)^{-1}, \qquad
        \alpha_1 = 1 - \sum_{i=2}^T \alpha_i ,

    with :math:`D^\top = [g_1 - g_2, \dots, g_1 - g_T]` and
    :math:`U^\top = [u_1 - u_2, \dots, u_1 - u_T]`. All the inner products come from the Gramian
    (:func:`imtl_g_weights`). The paper computes these gradients with respect to the shared
    representation; ``gradients="features"`` does that here.

    The loss part of IMTL (IMTL-L, learned loss scales) is
    :class:`~multitune.balancing.IMTLL`.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "imtl_g"

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
        self._solver_warnings = SolverWarnings(logger)

    def weigh(self, gramian: Tensor) -> Tensor:
        return imtl_g_weights(gramian, solver_warnings=self._solver_warnings)
