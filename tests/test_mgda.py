"""Tests of MGDA and MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import MGDA, MGDAUB, build_balancer
from multitune.balancing._mgda import min_norm_weights

TASKS = ("sentiment", "topic", "toxicity")
SOLVERS = ("frank_wolfe", "quadprog")


def two_task_gamma(g1: np.ndarray, g2: np.ndarray) -> float:
    """Return the weight of g1 in min ||gamma g1 + (1 - gamma) g2|| (the two-task case of the paper)."""
    return float(np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))


def _gramian(jacobian: np.ndarray) -> torch.Tensor:
    return torch.tensor(jacobian @ jacobian.T)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "g1, g2",
    [
        ([1.0, 0.0], [0.0, 2.0]),  # interior solution
        ([1.0, 2.0, -1.0], [-2.0, 0.5, 1.0]),  # conflicting
        ([1.0, 0.0], [3.0, 0.1]),  # g1 is the min-norm point (gamma = 1)
        ([4.0, 1.0], [0.5, 0.0]),  # g2 is the min-norm point (gamma = 0)
    ],
)
def test_two_tasks_closed_form(solver, g1, g2):
    g1, g2 = np.array(g1), np.array(g2)
    gamma = two_task_gamma(g1, g2)
    alpha = min_norm_weights(_gramian(np.stack([g1, g2])), solver=solver).numpy()
    np.testing.assert_allclose(alpha, [gamma, 1 - gamma], atol=1e-8)


def test_two_tasks_opposite_gradients_give_zero():
    g1 = np.array([2.0, -1.0])
    g2 = -3.0 * g1
    jacobian = np.stack([g1, g2])
    for solver in SOLVERS:
        alpha = min_norm_weights(_gramian(jacobian), solver=solver).numpy()
        # quadprog's ridge of 1e-10 (relative) leaves a residual of that order.
        np.testing.assert_allclose(alpha @ jacobian, [0.0, 0.0], atol=1e-8)
        np.testing.assert_allclose(alpha, [0.75, 0.25], rtol=1e-8)


def _kkt_violation(gramian: np.ndarray, alpha: np.ndarray) -> float:
    """For the min-norm point, (G alpha)_i >= alpha^T G alpha, with equality where alpha_i > 0."""
    g_alpha = gramian @ alpha
    value = alpha @ g_alpha
    lower = max(0.0, float(value - g_alpha.min()))
    support = alpha > 1e-6
    equality = float(np.abs(g_alpha[support] - value).max()) if support.any() else 0.0
    return max(lower, equality)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=8), st.integers(0, 2**31 - 1))
def test_quadprog_satisfies_optimality_conditions(num_tasks, dimension, seed):
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, dimension))
    gramian = jacobian @ jacobian.T
    alpha = min_norm_weights(torch.tensor(gramian), solver="quadprog").numpy()
    assert np.all(alpha >= 0.0)
    assert abs(alpha.sum() - 1.0) < 1e-12
    assert _kkt_violation(gramian, alpha) < 1e-6 * max(1.0, np.trace(gramian))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=2, max_value=8), st.integers(0, 2**31 - 1))
def test_frank_wolfe_within_convergence_bound(num_tasks, dimension, seed):
    # Frank-Wolfe with exact line search: f(alpha_k) - f* <= 2 L D^2 / (k + 2), with L = 2 lambda_max(G)
    # the gradient's Lipschitz constant and D^2 = 2 the squared diameter of the simplex.
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, dimension))
    gramian = jacobian @ jacobian.T
    exact = min_norm_weights(torch.tensor(gramian), solver="quadprog").numpy()
    iterations = 200
    approximate = min_norm_weights(torch.tensor(gramian), solver="frank_wolfe", max_iter=iterations, tol=0.0).numpy()
    bound = 2 * (2 * np.linalg.eigvalsh(gramian).max()) * 2 / (iterations + 2)
    assert abs(approximate.sum() - 1.0) < 1e-12
    assert np.all(approximate >= 0.0)
    assert exact @ gramian @ exact - 1e-12 <= approximate @ gramian @ approximate <= exact @ gramian @ exact + bound


def test_three_tasks_match_simplex_grid():
    jacobian = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.4, 1.0]])
    gramian = jacobian @ jacobian.T
    steps = np.linspace(0.0, 1.0, 401)
    a, b = np.meshgrid(steps, steps)
    mask = a + b <= 1.0
    grid = np.stack([a[mask], b[mask], 1.0 - a[mask] - b[mask]], axis=1)
    grid_value = np.einsum("ni,ij,nj->n", grid, gramian, grid).min()
    for solver in SOLVERS:
        alpha = min_norm_weights(torch.tensor(gramian), solver=solver).numpy()
        value = alpha @ gramian @ alpha
        assert value <= grid_value + 1e-9
        assert value >= grid_value - 1e-3


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=2, max_value=5), st.integers(min_value=1, max_value=6), st.integers(0, 2**31 - 1))
def test_min_norm_direction_decreases_every_loss(num_tasks, dimension, seed):
    # <g_i, d> >= ||d||^2 for the min-norm point d of the convex hull.
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, dimension))
    alpha = min_norm_weights(_gramian(jacobian), solver="quadprog").numpy()
    direction = alpha @ jacobian
    assert np.all(jacobian @ direction >= direction @ direction - 1e-7)


def test_l2_normalization_solves_for_unit_gradients():
    jacobian = np.array([[10.0, 0.0], [0.0, 0.1], [0.3, 0.3]])
    norms = np.linalg.norm(jacobian, axis=1)
    unit = jacobian / norms[:, None]
    alpha_unit = min_norm_weights(_gramian(unit), solver="quadprog").numpy()
    coefficients = min_norm_weights(_gramian(jacobian), solver="quadprog", normalization="l2").numpy()
    np.testing.assert_allclose(coefficients, alpha_unit / norms, rtol=1e-8)


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="solver must be"):
        MGDA(TASKS, [placeholder], solver="cvxpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization must be"):
        MGDA(TASKS, [placeholder], normalization="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_iter must be"):
        MGDA(TASKS, [placeholder], max_iter=0)


def test_frank_wolfe_first_iteration():
    # Algorithm 2 of the paper, one iteration: from the centre towards e_t, t = argmin (G alpha)_t,
    # with the exact line-search step between u = J^T alpha and v = g_t.
    jacobian = np.array([[1.0, 0.0], [0.0, 1.0], [-0.7, -0.2]])
    gramian = jacobian @ jacobian.T
    start = np.full(3, 1 / 3)
    t = int(np.argmin(gramian @ start))
    u, v = start @ jacobian, jacobian[t]
    gamma = np.clip((u - v) @ u / ((u - v) @ (u - v)), 0.0, 1.0)
    expected = (1 - gamma) * start + gamma * np.eye(3)[t]

    alpha = min_norm_weights(torch.tensor(gramian), solver="frank_wolfe", max_iter=1).numpy()
    np.testing.assert_allclose(alpha, expected, rtol=1e-12)
    assert not np.allclose(alpha, min_norm_weights(torch.tensor(gramian), solver="quadprog").numpy(), atol=1e-3)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.shared(inputs))

    def losses(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def _data() -> tuple[TinyModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    return model, inputs, targets


def test_backward_writes_min_norm_gradient():
    model, inputs, targets = _data()
    shared = list(model.shared.parameters())
    losses = model.losses(model.features(inputs), targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows)

    balancer = build_balancer("mgda", TASKS, shared_parameters=shared)
    assert balancer.solver == "quadprog"
    balancer.backward(losses)

    alpha = min_norm_weights(jacobian @ jacobian.T, solver="quadprog")
    combined = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(combined, alpha @ jacobian, rtol=1e-7, atol=1e-10)
    assert sum(balancer.weights.values()) == pytest.approx(1.0)


def test_mgda_ub_uses_representation_gradients():
    model, inputs, targets = _data()
    shared = list(model.shared.parameters())

    features = model.features(inputs)
    losses = model.losses(features, targets)
    feature_rows = [torch.autograd.grad(losses[n], features, retain_graph=True)[0].reshape(-1) for n in TASKS]
    feature_jacobian = torch.stack(feature_rows)
    alpha = min_norm_weights(feature_jacobian @ feature_jacobian.T, solver="quadprog")
    parameter_rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    expected = alpha @ torch.stack(parameter_rows)

    balancer = build_balancer("mgda_ub", TASKS, shared_parameters=shared, solver="quadprog")
    assert isinstance(balancer, MGDAUB)
    assert balancer.gradients == "features"
    balancer.backward(losses, features=features)

    combined = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(combined, expected, rtol=1e-7, atol=1e-10)
    assert list(balancer.weights.values()) == pytest.approx(alpha.tolist(), rel=1e-7)


def test_mgda_ub_without_features_raises():
    model, inputs, targets = _data()
    balancer = MGDAUB(TASKS, list(model.shared.parameters()))
    losses = model.losses(model.features(inputs), targets)
    with pytest.raises(ValueError, match="features="):
        balancer.backward(losses)
