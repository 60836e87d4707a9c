r"""Nash-MTL: task weights from the Nash bargaining solution :math:`G\alpha = 1/\alpha`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._base import NonFinitePolicy, check_nonnegative
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import SolverWarnings, gramian_to_numpy, weights_like
from ._registry import register_balancer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BargainingSolution:
    """Result of :func:`nash_bargaining_weights`.

    Attributes:
        alpha: the weights, each > 0.
        residual: :math:`\\|G\\alpha - 1/\\alpha\\|_2 / \\|1/\\alpha\\|_2` at ``alpha``.
        iterations: Newton iterations taken.
        converged: whether the residual fell to the tolerance.
    """

    alpha: np.ndarray
    residual: float
    iterations: int
    converged: bool


def nash_bargaining_weights(
    gramian: np.ndarray,
    *,
    initial: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-9,
) -> BargainingSolution:
    r"""Solve :math:`G\alpha = 1/\alpha` with :math:`\alpha > 0` by damped Newton steps.

    The equation is the stationarity condition of the strictly convex function

    .. math::

        \psi(\alpha) = \tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i ,
        \qquad \nabla\psi = G\alpha - 1/\alpha, \qquad \nabla^2\psi = G + \operatorname{diag}(1/\alpha^2) ,

    so the solution is the minimiser of :math:`\psi`. Because :math:`\psi` is self-concordant,
    the damped Newton step :math:`\alpha \leftarrow \alpha + \frac{1}{1+\lambda}\Delta`, with
    the Newton decrement :math:`\lambda^2 = -\nabla\psi^\top\Delta`, keeps :math:`\alpha > 0`
    and converges from any positive start. Once :math:`\lambda < 1/4`, full steps are taken and
    converge quadratically. Iteration stops when the relative residual
    :math:`\|G\alpha - 1/\alpha\| / \|1/\alpha\|` is at most ``tol``.

    A minimiser exists unless a non-negative combination of the gradients is zero (a
    Pareto-stationary point): then :math:`\psi` is unbounded below, :math:`\alpha` grows
    without bound and ``converged`` is False.

    Args:
        gramian: :math:`G`, a float64 array of shape (k, k).
        initial: a positive starting point; by default :math:`\alpha_0 = s\mathbf{1}` with
            :math:`s` such that :math:`\alpha_0^\top G \alpha_0 = k`, which the solution satisfies.
        max_iter: maximum Newton iterations.
        tol: tolerance on the relative residual.
    """
    k = gramian.shape[0]
    if initial is None or initial.shape != (k,) or not np.all(initial > 0.0) or not np.all(np.isfinite(initial)):
        initial = np.ones(k)
    alpha = _rescaled_start(gramian, initial.astype(np.float64))

    converged = False
    iterations = 0
    while True:
        residual = _relative_residual(gramian, alpha)
        if residual <= tol:
            converged = True
            break
        if iterations == max_iter:
            break
        step, decrement = _newton_step(gramian, alpha)
        if step is None:
            break
        iterations += 1
        size = 1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)
        alpha = alpha + size * step
    return BargainingSolution(alpha=alpha, residual=residual, iterations=iterations, converged=converged)


def _relative_residual(gramian: np.ndarray, alpha: np.ndarray) -> float:
    inverse = 1.0 / alpha
    return float(np.linalg.norm(gramian @ alpha - inverse) / np.linalg.norm(inverse))


def _newton_step(gramian: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Return the Newton step at ``alpha`` and the Newton decrement (None when the Hessian is singular)."""
    gradient = gramian @ alpha - 1.0 / alpha
    hessian = gramian + np.diag(1.0 / alpha**2)
    try:
        step = -np.linalg.solve(hessian, gradient)
    except np.linalg.LinAlgError:
        # 1/alpha^2 underflows once alpha diverges, which happens only without a solution.
        return None, math.inf
    if not np.all(np.isfinite(step)):
        return None, math.inf
    return step, math.sqrt(max(float(-(gradient @ step)), 0.0))


def _rescaled_start(gramian: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Scale a positive vector so that ``alpha^T G alpha = k``, the value at the solution."""
    quadratic = float(direction @ gramian @ direction)
    if quadratic <= 0.0 or not math.isfinite(quadratic):
        return direction
    return direction * math.sqrt(gramian.shape[0] / quadratic)


@register_balancer
class NashMTL(GradientBalancer):
    r"""Nash-MTL: weights from the Nash bargaining solution between the tasks.

    From *Multi-Task Learning as a Bargaining Game* (Navon, Shamsian, Achituve, Maron,
    Kawaguchi, Chechik & Fetaya, ICML 2022, https://arxiv.org/abs/2202.01017). The update
    :math:`d = \sum_i \alpha_i g_i` maximises :math:`\sum_i \log \langle g_i, d \rangle` in a
    ball; its weights solve

    .. math::

        G \alpha = 1 / \alpha , \qquad \alpha \in \mathbb{R}^T_{>0},
        \quad\text{i.e.}\quad \langle g_i, d \rangle = 1/\alpha_i \text{ for every } i .

    Then :math:`\alpha^\top G \alpha = T`, so the update has norm :math:`\sqrt T` before
    clipping. For numerical conditioning the equation is solved for
    :math:`\tilde G = G / \|G\|_F` and the solution is mapped back to
    :math:`\alpha = \tilde\alpha / \|G\|_F^{1/2}`, which solves :math:`G\alpha = 1/\alpha`. The
    official code also divides by :math:`\|G\|_F` and multiplies it back inside its constraints,
    so its weights solve the equation for :math:`G` too. The official code approximates the solution with up to ``optim_niter`` convex programs
    (cvxpy, ECOS). Here :func:`nash_bargaining_weights` solves it with up to ``optim_niter``
    damped Newton steps on a strictly convex function, warm-started from the last solution; a
    solve that has not converged is logged as a warning and its last iterate used.

    When the combined gradient's norm :math:`\sqrt{\alpha^\top G \alpha}` exceeds
    ``max_norm``, :math:`\alpha` is scaled down to reach it, as the official code clips the
    norm of the shared parameters' gradient (``max_norm=0`` disables this). With
    ``update_weights_every=n`` the bargaining problem is solved on every n-th step only, and the
    steps in between reuse the last :math:`\alpha` (clipped again for the current Gramian);
    the Gramian is still computed on every step.

    :attr:`weights` reports the final :math:`\alpha`. The last solution and the step counter
    are saved in ``state_dict``.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        max_norm: bound on the combined gradient's norm, 0 to disable (default 1.0).
        update_weights_every: solve every this many steps (default 1).
        optim_niter: maximum Newton iterations per solve (default 20).
        tol: Newton stopping tolerance on the relative residual
            :math:`\|\tilde G\alpha - 1/\alpha\| / \|1/\alpha\|` (default 1e-9).
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "nash_mtl"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        tol: float = 1e-9,
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
        self.max_norm = check_nonnegative("max_norm", max_norm, owner=owner)
        if int(update_weights_every) < 1:
            raise ValueError(f"{owner}: update_weights_every must be >= 1, got {update_weights_every}")
        if int(optim_niter) < 1:
            raise ValueError(f"{owner}: optim_niter must be >= 1, got {optim_niter}")
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.tol = check_nonnegative("tol", tol, owner=owner)

        # The last bargaining solution for G (not G / ||G||_F) by task, for the tasks in
        # solved_tasks, and the number of weigh() calls so far.
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("solved_tasks", torch.zeros(self.num_tasks, dtype=torch.bool))
        self.register_buffer("weigh_calls", torch.zeros((), dtype=torch.long))
        self._solver_warnings = SolverWarnings(logger)
        #: The last solve's result (None before the first).
        self.last_solution: BargainingSolution | None = None

    def weigh(self, gramian: Tensor) -> Tensor:
        matrix = gramian_to_numpy(gramian)
        k = matrix.shape[0]
        indices = [self.task_index[name] for name in self.present_tasks] if len(self.present_tasks) == k else list(range(k))
        present = torch.zeros(self.num_tasks, dtype=torch.bool, device=self.solved_tasks.device)
        present[indices] = True

        scale = float(np.linalg.norm(matrix))
        if scale <= 0.0 or not math.isfinite(scale):
            # Every gradient is zero: any weights give the same (zero) update.
            self.weigh_calls += 1
            return weights_like(np.ones(k), gramian)
        normalized = matrix / scale

        previous = self.alpha[indices].detach().to(device="cpu", dtype=torch.float64).numpy()
        same_tasks = bool(torch.equal(self.solved_tasks, present))
        due = int(self.weigh_calls) % self.update_weights_every == 0
        if due or not same_tasks:
            # The start is rescaled inside the solver, so the last solution for G is a valid start for G / ||G||_F.
            solution = nash_bargaining_weights(
                normalized, initial=previous if same_tasks else None, max_iter=self.optim_niter, tol=self.tol
            )
            self.last_solution = solution
            if not solution.converged:
                self._solver_warnings.warn(
                    "Nash-MTL: no bargaining solution after %d Newton iterations (relative residual %.3g of "
                    "G alpha = 1/alpha); using the last iterate. A residual that does not fall means a "
                    "non-negative combination of the task gradients is zero (a Pareto-stationary point)",
                    solution.iterations,
                    solution.residual,
                )
            alpha = solution.alpha / math.sqrt(scale)
            self.alpha.zero_()
            self.alpha[indices] = torch.from_numpy(alpha).to(self.alpha)
            self.solved_tasks.copy_(present)
        else:
            alpha = previous
        self.weigh_calls += 1

        coefficients = alpha.copy()
        if self.max_norm > 0.0:
            norm = math.sqrt(max(float(alpha @ matrix @ alpha), 0.0))
            if norm > self.max_norm:
                coefficients = coefficients * (self.max_norm / norm)
        return weights_like(coefficients, gramian)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter}"
        )
