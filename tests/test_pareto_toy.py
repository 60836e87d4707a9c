"""The two-objective toy problem of CAGrad, Nash-MTL and FAMO: every gradient method reaches its Pareto front.

The objectives are those of the CAGrad toy script (Liu et al., "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021), with the first loss scaled by 0.1 and the five starting
points of the Nash-MTL and FAMO toy experiments. For (x, y):

    a1 = 0.5 (-x - 7) - tanh(-y),   a2 = 0.5 (-x + 3) + tanh(-y) + 2
    c1 = max(tanh(y / 2), 0),       c2 = max(tanh(-y / 2), 0)
    f1 = scale * ((log max(|a1|, 5e-6) + 6) c1 + (((-x + 7)^2 + 0.1 (-y - 8)^2) / 10 - 20) c2)
    f2 =          (log max(|a2|, 5e-6) + 6) c1 + (((-x - 7)^2 + 0.1 (-y - 8)^2) / 10 - 20) c2

The Pareto front lies near y = -8.36 for x in [-7, 7]. The papers run 50,000 to 100,000 Adam
steps at lr 1e-3; to keep this test to a few seconds it runs 400 Adam steps at lr 0.1 with
beta2 = 0.9 (a short second-moment memory, so that the large gradients of the first steps do
not slow down the descent along the flat valley that leads to the front).

Reaching the front is measured by Pareto stationarity: the norm of the minimum-norm element of
the convex hull of the two unit gradients, min over a in [0, 1] of ||a u1 + (1 - a) u2|| with
u = g / ||g||, computed in closed form. It is zero exactly where the gradients are opposite (the
front) and does not shrink on the plateaus where both gradients are small.

The gradients are written out analytically, vectorised over the five starting points, with
PyTorch's convention for the gradient of ``clamp`` at its bound (it passes), and a test checks
them against autograd. Each step then calls the balancer's own ``weigh`` (or ``aggregate`` for
GradDrop) with the Gramian of one starting point, so the methods keep their state and random
generators as in training.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multitune.balancing import build_balancer

LOWER = 5e-6
SCALE = 0.1
STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
STEPS = 400
TOLERANCE = 1e-2

METHODS = ["pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "gradvac", "graddrop", "upgrad"]


def toy_losses(x: torch.Tensor, y: torch.Tensor, scale: float = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """The two objectives, written as in the CAGrad toy script."""
    f1 = torch.clamp((0.5 * (-x - 7) - torch.tanh(-y)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x + 3) + torch.tanh(-y) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(y * 0.5), 0)
    f1_sq = ((-x + 7).pow(2) + 0.1 * (-y - 8).pow(2)) / 10 - 20
    f2_sq = ((-x - 7).pow(2) + 0.1 * (-y - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-y * 0.5), 0)
    return (f1 * c1 + f1_sq * c2) * scale, f2 * c1 + f2_sq * c2


def toy_jacobians(points: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Return the gradients of (f1, f2) at each point, shape (n, 2 tasks, 2 coordinates)."""
    x, y = points[:, 0], points[:, 1]
    tanh_y = np.tanh(y)
    a1 = 0.5 * (-x - 7) + tanh_y
    a2 = 0.5 * (-x + 3) - tanh_y + 2
    log1 = np.log(np.maximum(np.abs(a1), LOWER)) + 6
    log2 = np.log(np.maximum(np.abs(a2), LOWER)) + 6
    dlog1 = np.where(np.abs(a1) >= LOWER, 1.0 / a1, 0.0)
    dlog2 = np.where(np.abs(a2) >= LOWER, 1.0 / a2, 0.0)

    half = np.tanh(0.5 * y)
    c1 = np.maximum(half, 0.0)
    c2 = np.maximum(-half, 0.0)
    dhalf = 0.5 * (1.0 - half**2)
    dc1 = np.where(half >= 0.0, dhalf, 0.0)
    dc2 = np.where(-half >= 0.0, -dhalf, 0.0)

    q1 = ((x - 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20
    q2 = ((x + 7) ** 2 + 0.1 * (y + 8) ** 2) / 10 - 20
    dq_dy = 0.02 * (y + 8)
    sech2 = 1.0 - tanh_y**2

    df1_dx = scale * (-0.5 * dlog1 * c1 + (x - 7) / 5 * c2)
    df1_dy = scale * (dlog1 * sech2 * c1 + log1 * dc1 + dq_dy * c2 + q1 * dc2)
    df2_dx = -0.5 * dlog2 * c1 + (x + 7) / 5 * c2
    df2_dy = -dlog2 * sech2 * c1 + log2 * dc1 + dq_dy * c2 + q2 * dc2
    return np.stack([np.stack([df1_dx, df1_dy], axis=-1), np.stack([df2_dx, df2_dy], axis=-1)], axis=1)


def min_norm_in_hull(jacobian: np.ndarray) -> float:
    """Return min over a in [0, 1] of ||a g1 + (1 - a) g2|| for a (2, P) Jacobian."""
    g1, g2 = jacobian
    difference = g1 - g2
    squared = float(difference @ difference)
    a = 0.5 if squared == 0.0 else min(max(float((g2 - g1) @ g2) / squared, 0.0), 1.0)
    return float(np.linalg.norm(a * g1 + (1 - a) * g2))


def pareto_gap(jacobian: np.ndarray) -> float:
    """Return :func:`min_norm_in_hull` of the unit gradients (0 on the Pareto front, at most 1)."""
    return min_norm_in_hull(jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True))


def run_method(method: str, steps: int = STEPS) -> np.ndarray:
    """Run one balancer per starting point for ``steps`` Adam steps; return the final points."""
    points = torch.tensor(STARTS, dtype=torch.float64, requires_grad=True)
    # weigh() and aggregate() take the Gramian or Jacobian directly; the constructor still needs a
    # parameter that requires grad.
    placeholder = torch.zeros(1, requires_grad=True)
    balancers = [
        build_balancer(method, ["f1", "f2"], shared_parameters=[placeholder], seed=index) for index in range(len(STARTS))
    ]
    optimizer = torch.optim.Adam([points], lr=0.1, betas=(0.9, 0.9))

    for _ in range(steps):
        jacobians = torch.from_numpy(toy_jacobians(points.detach().numpy()))
        directions = []
        for balancer, jacobian in zip(balancers, jacobians):
            if balancer.needs_jacobian:
                directions.append(balancer.aggregate(jacobian))
            else:
                directions.append(balancer.weigh(jacobian @ jacobian.T) @ jacobian)
        points.grad = torch.stack(directions)
        optimizer.step()
    return points.detach().numpy()


def test_analytic_gradients_match_autograd():
    generator = np.random.default_rng(0)
    points = np.concatenate([np.array(STARTS), generator.uniform(-10, 10, size=(20, 2)), [[0.0, -8.36]]])
    expected = []
    for x_value, y_value in points:
        x = torch.tensor(x_value, dtype=torch.float64, requires_grad=True)
        y = torch.tensor(y_value, dtype=torch.float64, requires_grad=True)
        f1, f2 = toy_losses(x, y)
        rows = [torch.stack(torch.autograd.grad(f, (x, y), retain_graph=True)).numpy() for f in (f1, f2)]
        expected.append(np.stack(rows))
    np.testing.assert_allclose(toy_jacobians(points), np.stack(expected), rtol=1e-10, atol=1e-12)


def test_starting_points_are_far_from_front():
    gaps = [pareto_gap(jacobian) for jacobian in toy_jacobians(np.array(STARTS))]
    assert min(gaps) > 10 * TOLERANCE, gaps


def test_min_norm_in_hull_closed_form():
    # Opposite gradients: the segment between them contains 0.
    assert min_norm_in_hull(np.array([[1.0, 0.0], [-2.0, 0.0]])) < 1e-15
    # Two equal gradients: the minimum is their norm.
    assert math.isclose(min_norm_in_hull(np.array([[3.0, 4.0], [3.0, 4.0]])), 5.0)
    # Orthogonal gradients (1, 0) and (0, 2): a = 0.8 gives (0.8, 0.4).
    assert math.isclose(min_norm_in_hull(np.array([[1.0, 0.0], [0.0, 2.0]])), math.sqrt(0.8))


def test_pareto_gap_is_scale_free():
    jacobian = np.array([[1.0, 0.5], [-2.0, 0.3]])
    assert math.isclose(pareto_gap(jacobian), pareto_gap(jacobian * np.array([[1e-4], [10.0]])))


@pytest.mark.parametrize("method", METHODS)
def test_method_reaches_pareto_front(method):
    final = run_method(method)
    gaps = [pareto_gap(jacobian) for jacobian in toy_jacobians(final)]
    for start, point, gap in zip(STARTS, final, gaps):
        assert gap < TOLERANCE, f"{method} from {start} ended at {point.tolist()} with Pareto gap {gap:.3g}"
    for start, point in zip(STARTS, final):
        assert -7.2 <= point[0] <= 7.2, f"{method} from {start} ended outside the front at {point.tolist()}"
        assert abs(point[1] + 8.36) < 0.15, f"{method} from {start} ended outside the front at {point.tolist()}"
