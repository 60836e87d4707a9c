r"""CAGrad: the update that maximises the worst task improvement within a ball around the average gradient."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ._base import NonFinitePolicy, check_nonnegative
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import SolverWarnings, gramian_to_numpy, weights_like
from ._registry import register_balancer

logger = logging.getLogger(__name__)

CAGradRescale = Literal["none", "one_plus_c_squared", "one_plus_c"]

# Warnings of calls made without a SolverWarnings of their own (a CAGrad balancer has one).
_default_warnings = SolverWarnings(logger)


def cagrad_dual_weights(gramian: Tensor, c: float, *, solver_warnings: SolverWarnings | None = None) -> Tensor:
    r"""Return the minimiser :math:`w \in \Delta^{k-1}` of CAGrad's dual objective.

    .. math::

        F(w) = g_w^\top g_0 + \sqrt{\phi}\, \|g_w\|, \qquad
        g_w = \sum_i w_i g_i,\quad g_0 = \tfrac1k \sum_i g_i,\quad \phi = c^2 \|g_0\|^2 ,

    which in Gramian terms is :math:`F(w) = w^\top G \mathbf{1}/k + c\,\|g_0\| \sqrt{w^\top G w}`
    with :math:`\|g_0\| = \sqrt{\mathbf{1}^\top G \mathbf{1}}/k`. :math:`F` is convex and is
    minimised on :math:`G / \operatorname{tr}(G)`, which has the same minimiser: in closed form
    for two tasks, otherwise with SciPy's SLSQP (as in the official code) and the analytic
    gradient of :math:`F`. A run that SciPy reports as failed is logged as a warning and its
    last iterate, projected onto the simplex, is used.
    """
    return weights_like(_dual_weights(gramian_to_numpy(gramian), c, solver_warnings), gramian)


def _dual_weights(matrix: np.ndarray, c: float, solver_warnings: SolverWarnings | None) -> np.ndarray:
    k = matrix.shape[0]
    trace = float(np.trace(matrix))
    if k == 1 or trace <= 0.0:
        return np.full(k, 1.0 / k)
    matrix = matrix / trace

    linear = matrix @ np.full(k, 1.0 / k)
    radius = c * math.sqrt(max(float(linear.sum()) / k, 0.0))
    if k == 2:
        return _two_task_dual_weights(matrix, linear, radius)

    def objective(w: np.ndarray) -> float:
        return float(w @ linear) + radius * math.sqrt(max(float(w @ matrix @ w), 0.0))

    def gradient(w: np.ndarray) -> np.ndarray:
        g_w = matrix @ w
        norm = math.sqrt(max(float(w @ g_w), 0.0))
        if norm <= 1e-15:
            return linear.copy()
        return linear + (radius / norm) * g_w

    result = minimize(
        objective,
        np.full(k, 1.0 / k),
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=({"type": "eq", "fun": lambda w: float(w.sum()) - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    if not result.success:
        (solver_warnings or _default_warnings).warn(
            "CAGrad: SLSQP did not converge (%s) on the normalised Gramian %s; using its last iterate",
            result.message,
            matrix.tolist(),
        )
    w = np.clip(np.asarray(result.x, dtype=np.float64), 0.0, None)
    total = float(w.sum())
    return w / total if total > 0.0 else np.full(k, 1.0 / k)


def _two_task_dual_weights(matrix: np.ndarray, linear: np.ndarray, radius: float) -> np.ndarray:
    r"""Minimise :math:`F(x) = \beta x + \text{const} + s\sqrt{q(x)}` over :math:`w = (x, 1 - x)`, :math:`x \in [0, 1]`, exactly.

    With :math:`q(x) = \|x g_1 + (1-x) g_2\|^2 = (u^2 + D)/A`, where :math:`A = \|g_1 - g_2\|^2`,
    :math:`u = A x + G_{12} - G_{22}` and :math:`D = G_{11}G_{22} - G_{12}^2 \ge 0`, the condition
    :math:`F'(x) = 0` reads :math:`u / \sqrt{u^2 + D} = \rho` with
    :math:`\rho = -\beta / (s\sqrt{A})`. Its root is :math:`u = \rho\sqrt{D / (1 - \rho^2)}` when
    :math:`|\rho| < 1`; otherwise :math:`F` is monotonic. :math:`F` is convex, so clipping the root to
    :math:`[0, 1]` gives the minimiser.
    """
    beta = float(linear[0] - linear[1])
    curvature = float(matrix[0, 0] - 2.0 * matrix[0, 1] + matrix[1, 1])
    if radius <= 0.0 or curvature <= 0.0:
        # F is linear in x (no ball, or g_1 = g_2), so a vertex minimises it; any x does when F is constant.
        if beta < 0.0:
            return np.array([1.0, 0.0])
        if beta > 0.0:
            return np.array([0.0, 1.0])
        return np.array([0.5, 0.5])

    offset = float(matrix[0, 1] - matrix[1, 1])
    determinant = max(float(matrix[0, 0] * matrix[1, 1] - matrix[0, 1] ** 2), 0.0)
    rho = -beta / (radius * math.sqrt(curvature))
    if rho >= 1.0:
        x = 1.0
    elif rho <= -1.0:
        x = 0.0
    else:
        u = rho * math.sqrt(determinant / (1.0 - rho * rho))
        x = min(max((u - offset) / curvature, 0.0), 1.0)
    return np.array([x, 1.0 - x])


def cagrad_weights(
    gramian: Tensor,
    *,
    c: float = 0.4,
    rescale: CAGradRescale = "one_plus_c_squared",
    solver_warnings: SolverWarnings | None = None,
) -> Tensor:
    r"""Return CAGrad's coefficients :math:`\lambda` with :math:`d = \sum_i \lambda_i g_i`.

    With :math:`w` from :func:`cagrad_dual_weights`,

    .. math::

        d = g_0 + \frac{\sqrt{\phi}}{\|g_w\|}\, g_w, \qquad
        \lambda_i = \frac{1}{k} + \frac{c\,\|g_0\|}{\|g_w\|}\, w_i ,

    divided by :math:`1 + c^2` (``rescale="one_plus_c_squared"``, as the CAGrad code of the
    Nash-MTL repository does), by :math:`1 + c` (``"one_plus_c"``, as the CAGrad toy script
    does) or left as is (``"none"``).

    When :math:`\|g_w\|^2 = w^\top G w` is at the level of rounding errors
    (:math:`\le k\,\varepsilon \operatorname{tr}(G)`, :math:`\varepsilon` of the Gramian's dtype), a
    convex combination of the gradients vanishes and the point is Pareto-stationary. The best
    worst-case improvement is then 0 and the direction of :math:`g_w` is undefined, so
    :math:`d = 0` (all coefficients 0), as in TorchJD's CAGrad.
    """
    if rescale not in ("none", "one_plus_c_squared", "one_plus_c"):
        raise ValueError(f"cagrad_weights: rescale must be 'none', 'one_plus_c_squared' or 'one_plus_c', got {rescale!r}")
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    w = _dual_weights(matrix, c, solver_warnings)

    g0_norm = math.sqrt(max(float(matrix.sum()), 0.0)) / k
    g_w_squared = float(w @ matrix @ w)
    # Below k * eps * tr(G), w^T G w is rounding noise: g_w = 0 and the point is Pareto-stationary.
    noise = k * torch.finfo(gramian.dtype).eps * float(np.trace(matrix))
    if c > 0.0 and g_w_squared <= noise:
        return weights_like(np.zeros(k), gramian)
    coefficients = np.full(k, 1.0 / k)
    if c > 0.0:
        coefficients = coefficients + (c * g0_norm / math.sqrt(g_w_squared)) * w

    if rescale == "one_plus_c_squared":
        coefficients = coefficients / (1.0 + c * c)
    elif rescale == "one_plus_c":
        coefficients = coefficients / (1.0 + c)
    return weights_like(coefficients, gramian)


@register_balancer
class CAGrad(GradientBalancer):
    r"""CAGrad: maximise the smallest task improvement within a ball around the average gradient.

    From *Conflict-Averse Gradient Descent for Multi-task Learning* (Liu, Liu, Jin, Stone & Liu,
    NeurIPS 2021, https://arxiv.org/abs/2110.14048), Algorithm 1. With the average gradient
    :math:`g_0 = \frac1T \sum_i g_i`, the update solves

    .. math::

        \max_{d} \min_i \langle g_i, d \rangle
        \quad\text{s.t.}\quad \|d - g_0\| \le c\, \|g_0\| ,

    through its dual over the simplex,
    :math:`\min_{w \in \Delta} g_w^\top g_0 + \sqrt{\phi}\,\|g_w\|` with
    :math:`g_w = \sum_i w_i g_i` and :math:`\phi = c^2 \|g_0\|^2`, whose solution gives
    :math:`d = g_0 + \frac{\sqrt{\phi}}{\|g_w\|} g_w`. Everything is a function of the Gramian
    (:func:`cagrad_weights`), and :attr:`weights` reports the coefficients of :math:`d`. The
    published implementations divide :math:`d` by :math:`1 + c^2` or :math:`1 + c` (``rescale``).
    ``c = 0`` gives :math:`g_0` (the mean of the gradients), and a large ``c`` approaches MGDA's
    direction.

    The dual is a convex problem in T variables. It is solved in closed form for two tasks and
    otherwise with SciPy's SLSQP, as in the official code. A run that SciPy reports as failed is
    logged as a warning and its last iterate is used.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        c: radius of the ball relative to :math:`\|g_0\|`, :math:`c \ge 0` (default 0.4, the
            default of the CAGrad implementation in the Nash-MTL code; the CAGrad toy script
            uses 0.5).
        rescale: ``"one_plus_c_squared"`` (default), ``"one_plus_c"`` or ``"none"``, see above.
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "cagrad"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        c: float = 0.4,
        rescale: CAGradRescale = "one_plus_c_squared",
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
        self.c = check_nonnegative("c", c, owner=owner)
        if rescale not in ("none", "one_plus_c_squared", "one_plus_c"):
            raise ValueError(f"{owner}: rescale must be 'none', 'one_plus_c_squared' or 'one_plus_c', got {rescale!r}")
        self.rescale: CAGradRescale = rescale
        self._solver_warnings = SolverWarnings(logger)

    def weigh(self, gramian: Tensor) -> Tensor:
        return cagrad_weights(gramian, c=self.c, rescale=self.rescale, solver_warnings=self._solver_warnings)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.c}, rescale={self.rescale!r}"
