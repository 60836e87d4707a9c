r"""MGDA and MGDA-UB: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import quadprog
from torch import Tensor

from ._base import NonFinitePolicy, check_nonnegative
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import gramian_to_numpy, positive_definite, weights_like
from ._registry import register_balancer

logger = logging.getLogger(__name__)

MinNormSolver = Literal["frank_wolfe", "quadprog"]
GradientNormalization = Literal["none", "l2"]


def min_norm_weights(
    gramian: Tensor,
    *,
    solver: MinNormSolver = "quadprog",
    max_iter: int = 250,
    tol: float = 1e-5,
    normalization: GradientNormalization = "none",
) -> Tensor:
    r"""Return :math:`\alpha` on the simplex that minimises :math:`\|\sum_i \alpha_i g_i\|^2 = \alpha^\top G \alpha`.

    With ``normalization="l2"`` the problem is solved for the unit gradients
    :math:`g_i / \|g_i\|` and the returned coefficients apply to the original ones,
    :math:`c_i = \alpha_i / \|g_i\|`.

    Args:
        gramian: :math:`G = J J^\top`, shape (k, k).
        solver: ``"quadprog"`` (the quadratic program solved exactly by
            :func:`quadprog.solve_qp`) or ``"frank_wolfe"`` (Algorithm 2 of Sener and Koltun, 2018).
        max_iter: maximum number of Frank-Wolfe iterations.
        tol: Frank-Wolfe stops when the step size :math:`\hat\gamma` is at most ``tol``.
        normalization: ``"none"`` or ``"l2"``, see above.
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    scale = np.ones(k)
    if normalization == "l2":
        norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))
        scale = np.where(norms > 0.0, 1.0 / np.where(norms > 0.0, norms, 1.0), 0.0)
        matrix = matrix * scale[:, None] * scale[None, :]
    elif normalization != "none":
        raise ValueError(f"min_norm_weights: normalization must be 'none' or 'l2', got {normalization!r}")

    if solver == "frank_wolfe":
        alpha = _frank_wolfe(matrix, max_iter=max_iter, tol=tol)
    elif solver == "quadprog":
        alpha = _quadprog_simplex(matrix)
    else:
        raise ValueError(f"min_norm_weights: solver must be 'frank_wolfe' or 'quadprog', got {solver!r}")
    return weights_like(alpha * scale, gramian)


def _frank_wolfe(matrix: np.ndarray, *, max_iter: int, tol: float) -> np.ndarray:
    r"""Frank-Wolfe on the simplex, started at the centre, with an exact line search per step."""
    k = matrix.shape[0]
    alpha = np.full(k, 1.0 / k)
    for _ in range(max_iter):
        g_alpha = matrix @ alpha
        t = int(np.argmin(g_alpha))

        # Exact minimiser of ||(1 - gamma) u + gamma v||^2 over [0, 1], u = J^T alpha, v = g_t.
        uu = float(alpha @ g_alpha)
        uv = float(g_alpha[t])
        vv = float(matrix[t, t])
        curvature = uu - 2.0 * uv + vv
        if curvature <= 0.0:
            break
        gamma = min(max((uu - uv) / curvature, 0.0), 1.0)

        alpha = (1.0 - gamma) * alpha
        alpha[t] += gamma
        if gamma <= tol:
            break
    return alpha


def _quadprog_simplex(matrix: np.ndarray) -> np.ndarray:
    r"""Solve :math:`\min_\alpha \tfrac12 \alpha^\top G \alpha` s.t. :math:`\mathbf{1}^\top\alpha = 1, \alpha \ge 0`."""
    k = matrix.shape[0]
    trace = float(np.trace(matrix))
    if trace <= 0.0:
        return np.full(k, 1.0 / k)
    # Scaling by the trace leaves the minimiser unchanged. quadprog needs a positive definite
    # matrix, so rounding errors below zero are lifted and a ridge of 1e-10 (relative) is added.
    quadratic = positive_definite(matrix / trace, ridge=1e-10)
    constraints = np.concatenate([np.ones((k, 1)), np.eye(k)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(k)])
    try:
        solution = quadprog.solve_qp(quadratic, np.zeros(k), constraints, bounds, meq=1)[0]
    except ValueError as error:
        raise RuntimeError(f"MGDA: quadprog failed on the normalised Gramian {quadratic.tolist()}: {error}") from error
    alpha = np.clip(solution, 0.0, None)
    return alpha / alpha.sum()


@register_balancer
class MGDA(GradientBalancer):
    r"""MGDA: step along the minimum-norm element of the convex hull of the task gradients.

    From *Multi-Task Learning as Multi-Objective Optimization* (Sener & Koltun, NeurIPS 2018,
    https://arxiv.org/abs/1810.04650), after Désidéri's multiple-gradient descent algorithm
    (2012). The coefficients solve

    .. math::

        \alpha^\star = \operatorname*{arg\,min}_{\alpha \in \Delta^{T-1}}
        \Bigl\| \sum_i \alpha_i g_i \Bigr\|^2 = \operatorname*{arg\,min}_{\alpha \in \Delta^{T-1}} \alpha^\top G \alpha ,

    and the update is :math:`\sum_i \alpha^\star_i g_i`, which is zero exactly at a
    Pareto-stationary point and otherwise decreases every task loss. For two tasks the solution
    is :math:`\alpha_1 = \operatorname{clip}\bigl(\langle g_2 - g_1, g_2\rangle / \|g_1 - g_2\|^2, 0, 1\bigr)`.

    ``solver="quadprog"`` (default) solves this T x T quadratic program exactly with quadprog.
    ``solver="frank_wolfe"`` is the paper's Algorithm 2: start at :math:`\alpha = \mathbf{1}/T`,
    move towards the vertex :math:`e_t` with :math:`t = \arg\min_r (G\alpha)_r` by an exact
    line search, and stop when the step :math:`\hat\gamma \le` ``tol`` or after ``max_iter``
    iterations. The official code allows 250 iterations and stops when the L1 change of
    :math:`\alpha` (at most :math:`2\hat\gamma`) is below 1e-5. Frank-Wolfe converges as
    :math:`O(1/k)` when the solution lies on a face of the simplex (some :math:`\alpha_i = 0`), so
    after 250 iterations its :math:`\alpha^\top G \alpha` can still be about 1% above the minimum.

    ``normalization="l2"`` solves the problem for unit gradients :math:`g_i/\|g_i\|`, and the
    coefficients :math:`c_i = \alpha_i/\|g_i\|` reported by :attr:`weights` apply to the original
    gradients, so the update is the min-norm element of the unit gradients. NOTE: the authors'
    code (github.com/intel-isl/MultiObjectiveOptimization, not the paper) normalises the same
    way but applies :math:`\alpha_i` itself to the original losses, and also normalises by the
    loss (``loss``, ``loss+``), which is not implemented here.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        solver: ``"quadprog"`` (default) or ``"frank_wolfe"``.
        max_iter: maximum Frank-Wolfe iterations (default 250).
        tol: Frank-Wolfe step-size tolerance (default 1e-5).
        normalization: ``"none"`` (default) or ``"l2"``.
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`. ``gradients="features"`` is MGDA-UB
            (:class:`MGDAUB`).
    """

    name = "mgda"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        solver: MinNormSolver = "quadprog",
        max_iter: int = 250,
        tol: float = 1e-5,
        normalization: GradientNormalization = "none",
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
        if solver not in ("frank_wolfe", "quadprog"):
            raise ValueError(f"{owner}: solver must be 'frank_wolfe' or 'quadprog', got {solver!r}")
        if normalization not in ("none", "l2"):
            raise ValueError(f"{owner}: normalization must be 'none' or 'l2', got {normalization!r}")
        if int(max_iter) < 1:
            raise ValueError(f"{owner}: max_iter must be >= 1, got {max_iter}")
        self.solver: MinNormSolver = solver
        self.max_iter = int(max_iter)
        self.tol = check_nonnegative("tol", tol, owner=owner)
        self.normalization: GradientNormalization = normalization

    def weigh(self, gramian: Tensor) -> Tensor:
        return min_norm_weights(
            gramian, solver=self.solver, max_iter=self.max_iter, tol=self.tol, normalization=self.normalization
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, solver={self.solver!r}, normalization={self.normalization!r}"


@register_balancer
class MGDAUB(MGDA):
    r"""MGDA-UB: MGDA on the gradients with respect to the shared representation.

    From *Multi-Task Learning as Multi-Objective Optimization* (Sener & Koltun, NeurIPS 2018,
    https://arxiv.org/abs/1810.04650). The norm of the combined parameter gradient
    is bounded by :math:`\|\partial Z / \partial \theta\|` times the norm of the combined
    representation gradient, so MGDA-UB minimises the upper bound
    :math:`\|\sum_i \alpha_i \nabla_Z L_i\|^2` instead. It needs T backward passes through the
    heads only, and one through the shared model. This is :class:`MGDA` with
    ``gradients="features"``: call ``balancer.backward(losses, features=Z)`` with ``Z`` the
    representation every head reads (for example the encoder output).

    Takes the arguments of :class:`MGDA`; ``gradients`` defaults to ``"features"``.
    """

    name = "mgda_ub"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        solver: MinNormSolver = "quadprog",
        max_iter: int = 250,
        tol: float = 1e-5,
        normalization: GradientNormalization = "none",
        gradients: GradientSource = "features",
        task_gradients: TaskGradientPolicy = "unweighted",
        task_parameters: Mapping[str, Iterable[Tensor]] | None = None,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(
            task_names,
            shared_parameters,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            normalization=normalization,
            gradients=gradients,
            task_gradients=task_gradients,
            task_parameters=task_parameters,
            seed=seed,
            on_nonfinite=on_nonfinite,
        )
