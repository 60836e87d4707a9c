"""Tests of IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import IMTLG, build_balancer
from multitune.balancing._gramian_tools import SolverWarnings
from multitune.balancing._imtl_g import imtl_g_weights

TASKS = ("sentiment", "topic", "toxicity")


def reference_alpha(jacobian: np.ndarray) -> np.ndarray:
    """The paper's closed form on explicit vectors: alpha_{2:T} = g_1 U^T (D U^T)^{-1}."""
    unit = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    differences = jacobian[0] - jacobian[1:]
    unit_differences = unit[0] - unit[1:]
    rest = jacobian[0] @ unit_differences.T @ np.linalg.inv(differences @ unit_differences.T)
    return np.concatenate([[1.0 - rest.sum()], rest])


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(0, 2**31 - 1))
def test_equal_projections_onto_unit_gradients(num_tasks, seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(num_tasks, num_tasks + 3)) * generator.uniform(0.1, 10.0, size=(num_tasks, 1))
    alpha = imtl_g_weights(torch.tensor(jacobian @ jacobian.T)).numpy()
    combined = alpha @ jacobian
    projections = jacobian @ combined / np.linalg.norm(jacobian, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-7, atol=1e-9)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_matches_closed_form_on_vectors(seed):
    jacobian = np.random.default_rng(seed).normal(size=(4, 6))
    alpha = imtl_g_weights(torch.tensor(jacobian @ jacobian.T)).numpy()
    np.testing.assert_allclose(alpha, reference_alpha(jacobian), rtol=1e-9)


def test_two_tasks_closed_form():
    # Two gradients: g = a g1 + (1 - a) g2 with <g, u1> = <g, u2>, i.e. a = <g2, u2 - u1> / <g1 - g2, u1 - u2>.
    g1, g2 = np.array([3.0, 0.0]), np.array([1.0, 2.0])
    u1, u2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
    a = g2 @ (u2 - u1) / ((g1 - g2) @ (u1 - u2))
    alpha = imtl_g_weights(torch.tensor(np.stack([g1, g2]) @ np.stack([g1, g2]).T)).numpy()
    np.testing.assert_allclose(alpha, [a, 1 - a], rtol=1e-12)


def test_single_task_weight_is_one():
    assert imtl_g_weights(torch.tensor([[4.0]])).tolist() == [1.0]


def test_direction_ignores_task_scales():
    jacobian = np.random.default_rng(0).normal(size=(3, 5))
    scaled = jacobian * np.array([[100.0], [1.0], [0.01]])
    direction = imtl_g_weights(torch.tensor(jacobian @ jacobian.T)).numpy() @ jacobian
    scaled_direction = imtl_g_weights(torch.tensor(scaled @ scaled.T)).numpy() @ scaled
    cosine = direction @ scaled_direction / (np.linalg.norm(direction) * np.linalg.norm(scaled_direction))
    assert cosine == pytest.approx(1.0, abs=1e-9)


def test_singular_system_logs_and_stays_finite(caplog):
    # g_1 and g_2 are parallel, so u_1 - u_2 = 0 and D U^T has a zero column.
    jacobian = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    with caplog.at_level(logging.WARNING, logger="multitune.balancing._imtl_g"):
        fresh = SolverWarnings(logging.getLogger("multitune.balancing._imtl_g"))
        alpha = imtl_g_weights(torch.tensor(jacobian @ jacobian.T), solver_warnings=fresh).numpy()
    assert "singular" in caplog.text
    assert np.all(np.isfinite(alpha))
    assert alpha.sum() == pytest.approx(1.0)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_writes_impartial_gradient():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    losses = model.losses(inputs, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows).numpy()

    balancer = build_balancer("imtl_g", TASKS, shared_parameters=shared)
    assert isinstance(balancer, IMTLG)
    balancer.backward(losses)

    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(combined, reference_alpha(jacobian) @ jacobian, rtol=1e-7, atol=1e-10)
    assert list(balancer.weights.values()) == pytest.approx(reference_alpha(jacobian).tolist(), rel=1e-7)
