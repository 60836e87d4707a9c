"""Tests of UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

from multitune.balancing import UPGrad, build_balancer
from multitune.balancing._gramian_tools import SolverWarnings
from multitune.balancing._upgrad import dual_cone_weights, upgrad_weights

TASKS = ("sentiment", "topic", "toxicity")
# A ridge this small keeps quadprog's matrix positive definite in float64. Its effect on the
# combined gradient is below 1e-5 relative to the gradients' scale, far below the violations
# (of order 1) that an unprojected gradient has.
SMALL_RIDGE = 1e-9
TOLERANCE = 1e-5


def _row_weights(gramian: np.ndarray, ridge: float = SMALL_RIDGE) -> list[np.ndarray]:
    k = gramian.shape[0]
    regularized = gramian / np.trace(gramian) + ridge * np.eye(k)
    return [dual_cone_weights(regularized, np.eye(k)[i] / k) for i in range(k)]


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=8), st.integers(0, 2**31 - 1))
@example(num_tasks=3, dimension=1, seed=245562489)
def test_combined_gradient_conflicts_with_no_task(num_tasks, dimension, seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(num_tasks, dimension)) * generator.uniform(0.1, 10.0, size=(num_tasks, 1))
    gramian = jacobian @ jacobian.T
    coefficients = upgrad_weights(torch.tensor(gramian), reg_eps=SMALL_RIDGE).numpy()
    direction = coefficients @ jacobian
    scale = np.linalg.norm(jacobian, axis=1) * np.linalg.norm(jacobian, axis=1).max()
    # With fewer dimensions than tasks and gradients that conflict (opposite signs in 1-D, for
    # example), the exact update is zero and the ridge moves it by the order of sqrt(ridge), not
    # ridge: 2e-5 relative in the first example above. A task whose squared gradient norm is not
    # far above the ridge (relative to the trace) is barely protected at all (a limit stated in
    # the balancer docs), so such draws are left out. Full-rank Jacobians stay within TOLERANCE.
    tolerance = TOLERANCE
    if dimension < num_tasks:
        assume(np.min(np.diag(gramian)) / np.trace(gramian) > 1e3 * SMALL_RIDGE)
        tolerance = 10.0 * np.sqrt(SMALL_RIDGE)
    assert np.all(jacobian @ direction >= -tolerance * scale)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=8), st.integers(0, 2**31 - 1))
def test_each_projected_row_lies_in_dual_cone(num_tasks, dimension, seed):
    jacobian = np.random.default_rng(seed).normal(size=(num_tasks, dimension))
    gramian = jacobian @ jacobian.T
    scale = np.trace(gramian)
    for i, weights in enumerate(_row_weights(gramian)):
        projected = weights @ jacobian
        assert np.all(jacobian @ projected >= -TOLERANCE * scale)
        # w >= e_i / k: the projection adds non-negative multiples of the gradients.
        lower = np.eye(num_tasks)[i] / num_tasks
        assert np.all(weights >= lower - 1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_projection_matches_primal_problem(seed):
    # min ||x - g_i / k||^2 s.t. J x >= 0, solved in the parameter space with SciPy.
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(3, 4))
    gramian = jacobian @ jacobian.T
    for i, weights in enumerate(_row_weights(gramian)):
        target = jacobian[i] / 3
        result = minimize(
            lambda x: float((x - target) @ (x - target)),
            target,
            jac=lambda x: 2 * (x - target),
            constraints=({"type": "ineq", "fun": lambda x: jacobian @ x, "jac": lambda x: jacobian},),
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        assert result.success
        np.testing.assert_allclose(weights @ jacobian, result.x, atol=1e-6)


def test_no_conflict_gives_mean():
    jacobian = np.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.0, 2.0]])
    assert np.all(jacobian @ jacobian.T >= 0)
    coefficients = upgrad_weights(torch.tensor(jacobian @ jacobian.T)).numpy()
    np.testing.assert_allclose(coefficients, [1 / 3] * 3, rtol=1e-12)


def test_opposite_gradients_give_zero():
    jacobian = np.array([[1.0, -2.0], [-2.0, 4.0]])
    coefficients = upgrad_weights(torch.tensor(jacobian @ jacobian.T), reg_eps=SMALL_RIDGE).numpy()
    np.testing.assert_allclose(coefficients @ jacobian, [0.0, 0.0], atol=1e-7)


def test_two_conflicting_tasks_closed_form():
    # For two tasks, pi(g_1) = g_1 - min(<g_1, g_2>, 0) / ||g_2||^2 g_2 when g_1 has a conflict with g_2
    # and the projection onto {x : <g_2, x> >= 0} already satisfies <g_1, x> >= 0.
    g1, g2 = np.array([1.0, 0.3]), np.array([-0.5, 1.0])
    inner = g1 @ g2
    assert inner < 0
    projected_1 = g1 - inner / (g2 @ g2) * g2
    projected_2 = g2 - inner / (g1 @ g1) * g1
    assert projected_1 @ g1 >= 0
    assert projected_2 @ g2 >= 0
    expected = (projected_1 + projected_2) / 2
    jacobian = np.stack([g1, g2])
    coefficients = upgrad_weights(torch.tensor(jacobian @ jacobian.T), reg_eps=SMALL_RIDGE).numpy()
    np.testing.assert_allclose(coefficients @ jacobian, expected, rtol=1e-7)


def test_small_gramian_falls_back_to_mean_with_warning(caplog):
    jacobian = np.array([[1e-3, 0.0], [-1e-3, 1e-4]])
    with caplog.at_level(logging.WARNING, logger="multitune.balancing._upgrad"):
        fresh = SolverWarnings(logging.getLogger("multitune.balancing._upgrad"))
        coefficients = upgrad_weights(torch.tensor(jacobian @ jacobian.T), solver_warnings=fresh).numpy()
    assert "below norm_eps" in caplog.text
    np.testing.assert_allclose(coefficients, [0.5, 0.5], rtol=1e-12)
    # A lower threshold projects them.
    projected = upgrad_weights(torch.tensor(jacobian @ jacobian.T), norm_eps=0.0).numpy()
    assert not np.allclose(projected, [0.5, 0.5])


def test_weights_are_invariant_to_gradient_scale():
    jacobian = np.random.default_rng(0).normal(size=(4, 5))
    gramian = torch.tensor(jacobian @ jacobian.T)
    np.testing.assert_allclose(upgrad_weights(gramian * 1e3).numpy(), upgrad_weights(gramian).numpy(), rtol=1e-10)


def test_solver_failure_raises():
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(RuntimeError, match="quadprog failed"):
        dual_cone_weights(indefinite, np.array([0.5, 0.0]))


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="reg_eps must be > 0"):
        UPGrad(TASKS, [placeholder], reg_eps=0.0)
    with pytest.raises(ValueError, match="norm_eps must be"):
        UPGrad(TASKS, [placeholder], norm_eps=-1.0)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


@pytest.mark.parametrize("path", ["backward", "forward"])
def test_training_paths_write_upgrad_direction(path):
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    balancer = build_balancer("upgrad", TASKS, shared_parameters=shared)

    losses = model.losses(inputs, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows)
    expected = upgrad_weights(jacobian @ jacobian.T) @ jacobian
    if path == "backward":
        balancer.backward(losses)
    else:
        balancer(losses).backward()

    combined = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(combined, expected, rtol=1e-7, atol=1e-10)
    assert np.all((jacobian @ combined).numpy() >= -1e-4 * float((jacobian**2).sum()))
