"""Tests of PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", 2020)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import PCGrad, build_balancer
from multitune.balancing._gramian_tools import draw_task_orders
from multitune.balancing._pcgrad import pcgrad_weights

TASKS = ("sentiment", "topic", "toxicity")


def reference_pcgrad(jacobian: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Algorithm 1 of the paper on explicit vectors, in float64."""
    projected = []
    for i, order in enumerate(orders):
        g = jacobian[i].copy()
        for j in order:
            inner = g @ jacobian[j]
            if inner < 0:
                g = g - inner / (jacobian[j] @ jacobian[j]) * jacobian[j]
        projected.append(g)
    return np.sum(projected, axis=0)


def test_two_conflicting_gradients_closed_form():
    g1 = np.array([1.0, 2.0, -1.0])
    g2 = np.array([-2.0, 0.5, 1.0])
    inner = g1 @ g2
    assert inner < 0
    expected = (g1 - inner / (g2 @ g2) * g2) + (g2 - inner / (g1 @ g1) * g1)

    jacobian = torch.tensor(np.stack([g1, g2]))
    coefficients = pcgrad_weights(jacobian @ jacobian.T, [[1], [0]])

    np.testing.assert_allclose((coefficients @ jacobian).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(coefficients.numpy(), [1 - inner / (g1 @ g1), 1 - inner / (g2 @ g2)], rtol=1e-12)


def test_projected_gradients_do_not_conflict_for_two_tasks():
    g1 = np.array([1.0, 2.0, -1.0])
    g2 = np.array([-2.0, 0.5, 1.0])
    g1_projected = g1 - (g1 @ g2) / (g2 @ g2) * g2
    g2_projected = g2 - (g1 @ g2) / (g1 @ g1) * g1
    assert abs(g1_projected @ g2) < 1e-12
    assert abs(g2_projected @ g1) < 1e-12


def test_no_conflict_gives_the_sum():
    jacobian = torch.tensor([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.2, 0.3, 0.4]], dtype=torch.float64)
    coefficients = pcgrad_weights(jacobian @ jacobian.T, [[1, 2], [0, 2], [0, 1]])
    assert coefficients.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", range(5))
def test_three_tasks_every_order_matches_reference(seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(3, 4))
    gramian = torch.tensor(jacobian @ jacobian.T)
    for orders in itertools.product([[1, 2], [2, 1]], [[0, 2], [2, 0]], [[0, 1], [1, 0]]):
        coefficients = pcgrad_weights(gramian, list(orders)).numpy()
        np.testing.assert_allclose(coefficients @ jacobian, reference_pcgrad(jacobian, list(orders)), rtol=1e-10, atol=1e-12)


def test_zero_gradient_is_never_projected_on():
    jacobian = torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    coefficients = pcgrad_weights(jacobian @ jacobian.T, [[1], [0]])
    assert torch.isfinite(coefficients).all()
    np.testing.assert_allclose((coefficients @ jacobian).numpy(), [1.0, -1.0])


def test_wrong_number_of_orders_raises():
    with pytest.raises(ValueError, match="expected 2 task orders"):
        pcgrad_weights(torch.eye(2), [[1]])


def test_orders_are_permutations_of_other_tasks():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        orders = draw_task_orders(4, generator)
        for i, order in enumerate(orders):
            assert sorted(order) == [j for j in range(4) if j != i]


def test_orders_cover_all_permutations():
    generator = torch.Generator().manual_seed(0)
    seen = {tuple(draw_task_orders(3, generator)[0]) for _ in range(50)}
    assert seen == {(1, 2), (2, 1)}


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=5), st.integers(min_value=1, max_value=6), st.integers(0, 2**31 - 1))
def test_random_jacobians_match_reference(num_tasks, dimension, seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(num_tasks, dimension))
    order_generator = torch.Generator().manual_seed(seed)
    orders = draw_task_orders(num_tasks, order_generator)
    coefficients = pcgrad_weights(torch.tensor(jacobian @ jacobian.T), orders).numpy()
    np.testing.assert_allclose(coefficients @ jacobian, reference_pcgrad(jacobian, orders), rtol=1e-9, atol=1e-9)


def _conflicting_gramian() -> torch.Tensor:
    # Three gradients whose PCGrad result depends on the order of projection.
    jacobian = torch.tensor([[1.0, 0.0], [-0.8, 0.6], [-0.2, -1.0]], dtype=torch.float64)
    return jacobian @ jacobian.T


def test_seed_makes_orders_reproducible():
    placeholder = torch.zeros(1, requires_grad=True)
    first = PCGrad(TASKS, [placeholder], seed=7)
    second = PCGrad(TASKS, [placeholder], seed=7)
    gramian = _conflicting_gramian()
    for _ in range(10):
        assert torch.equal(first.weigh(gramian), second.weigh(gramian))


def test_different_orders_give_different_results():
    placeholder = torch.zeros(1, requires_grad=True)
    balancer = PCGrad(TASKS, [placeholder], seed=0)
    gramian = _conflicting_gramian()
    results = {tuple(balancer.weigh(gramian).tolist()) for _ in range(40)}
    assert len(results) > 1


def test_state_dict_restores_generator():
    placeholder = torch.zeros(1, requires_grad=True)
    balancer = PCGrad(TASKS, [placeholder], seed=3)
    gramian = _conflicting_gramian()
    balancer.weigh(gramian)
    state = balancer.state_dict()
    expected = [balancer.weigh(gramian) for _ in range(5)]

    restored = PCGrad(TASKS, [placeholder], seed=99)
    restored.load_state_dict(state)
    for value in expected:
        assert torch.equal(restored.weigh(gramian), value)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_writes_combined_gradient():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())

    losses = model.losses(inputs, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows)

    balancer = build_balancer("pcgrad", TASKS, shared_parameters=shared, seed=11)
    reference_generator = torch.Generator().manual_seed(11)
    orders = draw_task_orders(3, reference_generator)
    balancer.backward(losses)

    combined = torch.cat([p.grad.reshape(-1) for p in shared])
    expected = torch.from_numpy(reference_pcgrad(jacobian.numpy(), orders))
    torch.testing.assert_close(combined, expected, rtol=1e-8, atol=1e-10)
    expected_weights = pcgrad_weights(jacobian @ jacobian.T, orders)
    assert balancer.weights == pytest.approx(dict(zip(TASKS, expected_weights.tolist())), rel=1e-8)
    # Heads receive their own task's gradient (task_gradients="unweighted").
    head_loss = model.losses(inputs, targets)["topic"]
    (head_gradient,) = torch.autograd.grad(head_loss, [model.heads["topic"].weight])
    torch.testing.assert_close(model.heads["topic"].weight.grad, head_gradient)
