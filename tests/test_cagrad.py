"""Tests of CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", 2021)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from torch import nn

from multitune.balancing import CAGrad, build_balancer
from multitune.balancing._cagrad import cagrad_dual_weights, cagrad_weights
from multitune.balancing._gramian_tools import SolverWarnings
from multitune.balancing._mgda import min_norm_weights

TASKS = ("sentiment", "topic", "toxicity")


def _direction(jacobian: np.ndarray, c: float, rescale: str = "none") -> np.ndarray:
    coefficients = cagrad_weights(torch.tensor(jacobian @ jacobian.T), c=c, rescale=rescale).numpy()  # type: ignore[arg-type]
    return coefficients @ jacobian


def _brute_force_value(jacobian: np.ndarray, c: float) -> float:
    """max over a polar grid of the ball ||d - g0|| <= c ||g0|| (in 2-D) of min_i <g_i, d>."""
    g0 = jacobian.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    angles = np.linspace(0.0, 2 * np.pi, 7200, endpoint=False)
    radii = np.linspace(0.0, radius, 30)
    r, theta = np.meshgrid(radii, angles)
    points = g0 + np.stack([(r * np.cos(theta)).ravel(), (r * np.sin(theta)).ravel()], axis=1)
    return float((points @ jacobian.T).min(axis=1).max())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_objective_matches_brute_force(seed, num_tasks, c):
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, 2)) * np.array([[1.0], [3.0], [0.5]])[:num_tasks]
    direction = _direction(jacobian, c)
    value = float((jacobian @ direction).min())
    best = _brute_force_value(jacobian, c)
    scale = np.abs(jacobian).max() ** 2
    # The grid is feasible, so the exact optimum is at least its best value.
    assert value >= best - 1e-9 * scale
    assert value <= best + 2e-4 * scale


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=8), st.integers(0, 2**31 - 1), st.floats(0.05, 2.0))
def test_direction_respects_ball_constraint(num_tasks, dimension, seed, c):
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, dimension))
    direction = _direction(jacobian, c)
    g0 = jacobian.mean(axis=0)
    if not direction.any():
        # d = 0 only at a Pareto-stationary point: 0 is in the convex hull of the gradients.
        alpha = min_norm_weights(torch.tensor(jacobian @ jacobian.T), solver="quadprog").numpy()
        assert np.linalg.norm(alpha @ jacobian) < 1e-6
        return
    assert np.linalg.norm(direction - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9) + 1e-12
    # g0 itself is feasible, so the worst task improvement is at least that of g0.
    assert (jacobian @ direction).min() >= (jacobian @ g0).min() - 1e-7


def test_two_task_dual_matches_scalar_minimisation():
    generator = np.random.default_rng(1)
    for _ in range(50):
        jacobian = generator.normal(size=(2, 3)) * generator.uniform(0.1, 5.0, size=(2, 1))
        gramian = jacobian @ jacobian.T
        g0_norm = np.linalg.norm(jacobian.mean(axis=0))

        def objective(x: float) -> float:
            g_w = x * jacobian[0] + (1 - x) * jacobian[1]
            return float(g_w @ jacobian.mean(axis=0) + 0.4 * g0_norm * np.linalg.norm(g_w))

        reference = minimize_scalar(objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12})
        w = cagrad_dual_weights(torch.tensor(gramian), 0.4).numpy()
        assert objective(w[0]) <= reference.fun + 1e-9


def test_zero_c_gives_mean():
    jacobian = np.random.default_rng(0).normal(size=(3, 4))
    coefficients = cagrad_weights(torch.tensor(jacobian @ jacobian.T), c=0.0, rescale="none").numpy()
    np.testing.assert_allclose(coefficients, [1 / 3] * 3, rtol=1e-12)


def test_large_c_approaches_mgda_direction():
    jacobian = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.4, 1.0]])
    direction = _direction(jacobian, 1e4)
    alpha = min_norm_weights(torch.tensor(jacobian @ jacobian.T), solver="quadprog").numpy()
    mgda = alpha @ jacobian
    cosine = direction @ mgda / (np.linalg.norm(direction) * np.linalg.norm(mgda))
    assert cosine > 1 - 1e-6


@pytest.mark.parametrize("rescale, divisor", [("none", 1.0), ("one_plus_c_squared", 1.16), ("one_plus_c", 1.4)])
def test_rescale(rescale, divisor):
    jacobian = np.random.default_rng(2).normal(size=(3, 4))
    gramian = torch.tensor(jacobian @ jacobian.T)
    base = cagrad_weights(gramian, c=0.4, rescale="none").numpy()
    scaled = cagrad_weights(gramian, c=0.4, rescale=rescale).numpy()
    np.testing.assert_allclose(scaled, base / divisor, rtol=1e-12)


def test_coefficients_formula():
    # lambda_i = 1/k + c ||g0|| / ||g_w|| * w_i with w from the dual problem.
    jacobian = np.random.default_rng(3).normal(size=(3, 5))
    gramian = torch.tensor(jacobian @ jacobian.T)
    w = cagrad_dual_weights(gramian, 0.4).numpy()
    g_w = w @ jacobian
    expected = 1 / 3 + 0.4 * np.linalg.norm(jacobian.mean(axis=0)) / np.linalg.norm(g_w) * w
    np.testing.assert_allclose(cagrad_weights(gramian, c=0.4, rescale="none").numpy(), expected, rtol=1e-10)


def test_pareto_stationary_gives_zero():
    # 1-D gradients of both signs: 0 is in their convex hull. With c = 1.5 the dual minimum is at
    # g_w = 0 (F(e_2) = g_2 g_0 + c |g_0| |g_2| > 0), so d = 0.
    jacobian = np.array([[0.12573022], [-0.13210486], [0.64042265]])
    coefficients = cagrad_weights(torch.tensor(jacobian @ jacobian.T), c=1.5, rescale="none").numpy()
    assert coefficients.tolist() == [0.0, 0.0, 0.0]


def test_one_dimensional_conflict_closed_form():
    # Same gradients with c = 0.4: F(e_2) < 0 = F(g_w = 0), so w = e_2 and d = g0 - c |g0|.
    jacobian = np.array([[0.12573022], [-0.13210486], [0.64042265]])
    g0 = jacobian.mean()
    np.testing.assert_allclose(_direction(jacobian, 0.4), [g0 - 0.4 * abs(g0)], rtol=1e-9)


def test_scale_invariance_of_weights():
    jacobian = np.random.default_rng(4).normal(size=(4, 6))
    gramian = torch.tensor(jacobian @ jacobian.T)
    np.testing.assert_allclose(cagrad_weights(gramian * 1e-6).numpy(), cagrad_weights(gramian).numpy(), rtol=1e-6)


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(TASKS, [placeholder], c=-0.1)
    with pytest.raises(ValueError, match="rescale must be"):
        CAGrad(TASKS, [placeholder], rescale=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rescale must be"):
        cagrad_weights(torch.eye(2), rescale="half")  # type: ignore[arg-type]


def test_solver_failure_is_logged(monkeypatch, caplog):
    import multitune.balancing._cagrad as module

    class Failed:
        success = False
        message = "Iteration limit reached"
        x = np.array([0.5, 0.2, 0.3])

    monkeypatch.setattr(module, "minimize", lambda *args, **kwargs: Failed())
    with caplog.at_level(logging.WARNING, logger="multitune.balancing._cagrad"):
        fresh = SolverWarnings(logging.getLogger("multitune.balancing._cagrad"))
        w = cagrad_dual_weights(torch.eye(3, dtype=torch.float64), 0.4, solver_warnings=fresh)
    assert "SLSQP did not converge (Iteration limit reached)" in caplog.text
    np.testing.assert_allclose(w.numpy(), [0.5, 0.2, 0.3])


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_writes_cagrad_direction():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    losses = model.losses(inputs, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows).numpy()

    balancer = build_balancer("cagrad", TASKS, shared_parameters=shared)
    balancer.backward(losses)

    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(combined, _direction(jacobian, 0.4, "one_plus_c_squared"), rtol=1e-6, atol=1e-10)
