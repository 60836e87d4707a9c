r"""UPGrad: project every task gradient onto the dual cone of all of them, then average."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import quadprog
from torch import Tensor

from ._base import NonFinitePolicy, check_nonnegative
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import SolverWarnings, gramian_to_numpy, weights_like
from ._registry import register_balancer

logger = logging.getLogger(__name__)

# Warnings of calls made without a SolverWarnings of their own (an UPGrad balancer has one).
_default_warnings = SolverWarnings(logger)


def dual_cone_weights(gramian: np.ndarray, lower: np.ndarray) -> np.ndarray:
    r"""Return :math:`w^\star = \arg\min_{w \ge u} \tfrac12 w^\top G w` for a positive definite ``gramian``.

    By Proposition 1 of Quinton and Rey (2024), :math:`J^\top w^\star` is the projection of
    :math:`J^\top u` onto the dual cone :math:`\{x : Jx \ge 0\}` of the rows of :math:`J`: the
    Lagrangian of :math:`\min_x \tfrac12\|x - J^\top u\|^2` s.t. :math:`Jx \ge 0` gives
    :math:`x = J^\top(u + \mu)` with :math:`\mu \ge 0`, and the dual in :math:`w = u + \mu` is
    this quadratic program, solved with :func:`quadprog.solve_qp`. A solver failure raises
    :class:`RuntimeError`.
    """
    k = gramian.shape[0]
    try:
        return quadprog.solve_qp(gramian, np.zeros(k), np.eye(k), lower, 0)[0]
    except ValueError as error:
        raise RuntimeError(f"UPGrad: quadprog failed on the regularised Gramian {gramian.tolist()}: {error}") from error


def upgrad_weights(
    gramian: Tensor,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    solver_warnings: SolverWarnings | None = None,
) -> Tensor:
    r"""Return UPGrad's coefficients :math:`c = \frac1k \sum_i w^{(i)}` from the Gramian.

    :math:`w^{(i)} = \arg\min_{w \ge e_i / k} w^\top \tilde G w` (:func:`dual_cone_weights`) with
    :math:`\tilde G = G / \operatorname{tr}(G) + \epsilon_{reg} I`. The trace scaling leaves the
    minimisers unchanged and ``reg_eps`` makes :math:`\tilde G` positive definite, as quadprog
    requires; it moves the solution by :math:`O(\epsilon_{reg})`. When
    :math:`\operatorname{tr}(G) = \sum_i \|g_i\|^2 <` ``norm_eps``, :math:`\tilde G = \epsilon_{reg} I`
    and the coefficients are :math:`1/k` each (the mean of the gradients); a warning is logged.
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    trace = float(np.trace(matrix))
    if trace < norm_eps:
        (solver_warnings or _default_warnings).warn(
            "UPGrad: the squared norms of the task gradients sum to %.3g, below norm_eps=%.3g; using the mean of "
            "the gradients for this step (lower norm_eps to project gradients this small)",
            trace,
            norm_eps,
        )
        normalized = np.zeros_like(matrix)
    else:
        normalized = matrix / trace
    regularized = normalized + reg_eps * np.eye(k)

    total = np.zeros(k)
    for i in range(k):
        lower = np.zeros(k)
        lower[i] = 1.0 / k
        total += dual_cone_weights(regularized, lower)
    return weights_like(total, gramian)


@register_balancer
class UPGrad(GradientBalancer):
    r"""UPGrad: the mean of the task gradients, each projected onto the dual cone of all of them.

    From *Jacobian Descent for Multi-Objective Optimization* (Quinton & Rey, 2024,
    https://arxiv.org/abs/2406.16232). With the dual cone of the rows of :math:`J`,
    :math:`\mathcal C = \{x : Jx \ge 0\}` (the directions that do not increase any task loss to
    first order), and the projection :math:`\pi_J(y) = \arg\min_{x \in \mathcal C} \|x - y\|^2`,

    .. math::

        \mathcal A_{\mathrm{UPGrad}}(J) = \frac{1}{T} \sum_{i=1}^T \pi_J(g_i) .

    The result lies in :math:`\mathcal C` (it conflicts with no task), equals the mean gradient
    when no pair of gradients conflicts, and is zero exactly at a Pareto-stationary point. By
    the paper's Proposition 1, :math:`\pi_J(J^\top u) = J^\top w` with
    :math:`w = \arg\min_{v \ge u} v^\top G v`, so the weights come from T quadratic programs of
    size T x T on the Gramian, solved with quadprog (:func:`upgrad_weights`), as in TorchJD, the
    authors' library. :attr:`weights` reports :math:`c = \frac1T\sum_i w^{(i)}`.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        norm_eps: below this value of :math:`\operatorname{tr}(G) = \sum_i\|g_i\|^2` the
            Gramian is treated as zero and the step is the mean gradient (default 1e-4, TorchJD's).
            It is an absolute threshold: lower it when the gradients are small.
        reg_eps: ridge added to the trace-normalised Gramian so that it is positive definite
            (default 1e-4, TorchJD's).
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "upgrad"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
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
        self.norm_eps = check_nonnegative("norm_eps", norm_eps, owner=owner)
        self.reg_eps = check_nonnegative("reg_eps", reg_eps, owner=owner)
        if self.reg_eps == 0.0:
            raise ValueError(f"{owner}: reg_eps must be > 0 so that quadprog gets a positive definite matrix, got 0")
        self._solver_warnings = SolverWarnings(logger)

    def weigh(self, gramian: Tensor) -> Tensor:
        return upgrad_weights(gramian, norm_eps=self.norm_eps, reg_eps=self.reg_eps, solver_warnings=self._solver_warnings)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_eps={self.norm_eps}, reg_eps={self.reg_eps}"
