"""Tests of GradVac (Wang et al., "Gradient Vaccine", ICLR 2021)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import GradVac, build_balancer
from multitune.balancing._gradvac import gradvac_weights
from multitune.balancing._gramian_tools import draw_task_orders
from multitune.balancing._pcgrad import pcgrad_weights

TASKS = ("sentiment", "topic", "toxicity")


def reference_gradvac(jacobian: np.ndarray, targets: np.ndarray, orders: list[list[int]], beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Apply the paper's per-pair correction and EMA update to explicit vectors (eps = 0), in float64."""
    targets = targets.copy()
    corrected = []
    for i, order in enumerate(orders):
        g = jacobian[i].copy()
        for j in order:
            g_j = jacobian[j]
            phi = g @ g_j / (np.linalg.norm(g) * np.linalg.norm(g_j))
            target = targets[i, j]
            if phi < target:
                w = np.linalg.norm(g) * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
                w /= np.linalg.norm(g_j) * np.sqrt(1 - target**2)
                g = g + w * g_j
            targets[i, j] = (1 - beta) * target + beta * phi
        corrected.append(g)
    return np.sum(corrected, axis=0), targets


@pytest.mark.parametrize("seed", range(4))
def test_every_order_matches_reference(seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(3, 5))
    targets = generator.uniform(-0.5, 0.8, size=(3, 3))
    gramian = torch.tensor(jacobian @ jacobian.T)
    for orders in itertools.product([[1, 2], [2, 1]], [[0, 2], [2, 0]], [[0, 1], [1, 0]]):
        coefficients, updated = gradvac_weights(gramian, targets, list(orders), beta=0.1, eps=0.0)
        expected, expected_targets = reference_gradvac(jacobian, targets, list(orders), 0.1)
        np.testing.assert_allclose(coefficients.numpy() @ jacobian, expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(updated, expected_targets, rtol=1e-12)


def test_correction_reaches_target_similarity():
    g1, g2 = np.array([1.0, 0.2]), np.array([-0.6, 1.0])
    jacobian = np.stack([g1, g2])
    targets = np.array([[0.0, 0.3], [0.3, 0.0]])
    coefficients, _ = gradvac_weights(torch.tensor(jacobian @ jacobian.T), targets, [[1], [0]], eps=0.0)
    # Row 0 of the coefficients is g1' = g1 + w g2; its cosine with g2 is the target.
    w = coefficients.numpy()[1] - 1.0  # coefficient of g2 = 1 (itself) + w from task 0's correction
    corrected = g1 + w * g2
    assert corrected @ g2 / (np.linalg.norm(corrected) * np.linalg.norm(g2)) == pytest.approx(0.3, abs=1e-12)


def test_zero_targets_equal_pcgrad_for_two_tasks():
    jacobian = np.array([[1.0, 2.0, -1.0], [-2.0, 0.5, 1.0]])
    gramian = torch.tensor(jacobian @ jacobian.T)
    coefficients, _ = gradvac_weights(gramian, np.zeros((2, 2)), [[1], [0]], eps=0.0)
    np.testing.assert_allclose(coefficients.numpy(), pcgrad_weights(gramian, [[1], [0]]).numpy(), rtol=1e-12)


def test_targets_follow_ema_of_similarities():
    jacobian = np.array([[1.0, 0.0], [1.0, 1.0]])
    gramian = torch.tensor(jacobian @ jacobian.T)
    cosine = 1 / np.sqrt(2)
    _, updated = gradvac_weights(gramian, np.zeros((2, 2)), [[1], [0]], beta=0.01)
    np.testing.assert_allclose(updated, [[0.0, 0.01 * cosine], [0.01 * cosine, 0.0]], rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=2, max_value=5), st.integers(min_value=2, max_value=6), st.integers(0, 2**31 - 1))
def test_random_jacobians_match_reference(num_tasks, dimension, seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(num_tasks, dimension))
    targets = generator.uniform(-0.9, 0.9, size=(num_tasks, num_tasks))
    orders = draw_task_orders(num_tasks, torch.Generator().manual_seed(seed))
    coefficients, updated = gradvac_weights(torch.tensor(jacobian @ jacobian.T), targets, orders, beta=0.3, eps=0.0)
    expected, expected_targets = reference_gradvac(jacobian, targets, orders, 0.3)
    np.testing.assert_allclose(coefficients.numpy() @ jacobian, expected, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(updated, expected_targets, rtol=1e-10, atol=1e-12)


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="beta must be in"):
        GradVac(TASKS, [placeholder], beta=1.5)
    with pytest.raises(ValueError, match="eps must be"):
        GradVac(TASKS, [placeholder], eps=-1.0)
    with pytest.raises(ValueError, match="targets must have shape"):
        gradvac_weights(torch.eye(2), np.zeros((3, 3)), [[1], [0]])


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_updates_targets_of_present_pairs_only():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    balancer = build_balancer("gradvac", TASKS, shared_parameters=shared, seed=5, beta=0.2, eps=0.0)
    balancer.targets.copy_(torch.tensor([[0.0, 0.1, 0.2], [0.3, 0.0, 0.4], [0.5, 0.6, 0.0]], dtype=torch.float64))
    before = balancer.targets.clone()

    losses = model.losses(inputs, targets)
    del losses["topic"]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in losses]
    jacobian = torch.stack(rows).numpy()
    orders = draw_task_orders(2, torch.Generator().manual_seed(5))
    present = before[[0, 2]][:, [0, 2]].numpy()
    expected, expected_targets = reference_gradvac(jacobian, present, orders, 0.2)
    balancer.backward(losses)

    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(combined, expected, rtol=1e-7, atol=1e-10)
    after = balancer.targets
    np.testing.assert_allclose(after[[0, 2]][:, [0, 2]].numpy(), expected_targets, rtol=1e-6, atol=1e-9)
    assert after[1].tolist() == before[1].tolist()
    assert after[:, 1].tolist() == before[:, 1].tolist()


def test_state_dict_round_trip():
    placeholder = torch.zeros(1, requires_grad=True)
    balancer = GradVac(TASKS, [placeholder], seed=1)
    jacobian = torch.tensor(np.random.default_rng(0).normal(size=(3, 4)))
    gramian = jacobian @ jacobian.T
    balancer.weigh(gramian)

    restored = GradVac(TASKS, [placeholder], seed=2)
    restored.load_state_dict(balancer.state_dict())
    assert torch.equal(restored.targets, balancer.targets)
    assert torch.equal(restored.weigh(gramian), balancer.weigh(gramian))
