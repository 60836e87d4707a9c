"""Tests of GradDrop (Chen et al., "Just Pick a Sign: Gradient Sign Dropout", NeurIPS 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multitune.balancing import GradDrop, build_balancer
from multitune.balancing._graddrop import graddrop_aggregate

TASKS = ("sentiment", "topic", "toxicity")


def reference_graddrop(jacobian: np.ndarray, uniform: np.ndarray, leak: np.ndarray) -> np.ndarray:
    """Algorithm 1 of the paper, one coordinate at a time, in float64."""
    result = np.zeros(jacobian.shape[1])
    for p in range(jacobian.shape[1]):
        column = jacobian[:, p]
        magnitude = np.abs(column).sum()
        purity = 0.5 * (1 + column.sum() / magnitude) if magnitude > 0 else 0.5
        for i, value in enumerate(column):
            keep = (purity > uniform[p] and value > 0) or (purity < uniform[p] and value < 0)
            result[p] += (leak[i] + (1 - leak[i]) * float(keep)) * value
    return result


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_with_given_draws(seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(3, 50))
    jacobian[:, 0] = 0.0  # a coordinate no task reaches
    uniform = generator.uniform(size=50)
    leak = np.array([0.0, 0.3, 1.0])
    result = graddrop_aggregate(torch.tensor(jacobian), torch.tensor(uniform), leak=torch.tensor(leak))
    np.testing.assert_allclose(result.numpy(), reference_graddrop(jacobian, uniform, leak), rtol=1e-12)
    no_leak = graddrop_aggregate(torch.tensor(jacobian), torch.tensor(uniform))
    np.testing.assert_allclose(no_leak.numpy(), reference_graddrop(jacobian, uniform, np.zeros(3)), rtol=1e-12)


def test_coordinates_with_one_sign_are_kept_whole():
    jacobian = torch.tensor([[1.0, -2.0], [3.0, -0.5]], dtype=torch.float64)
    # Purity is 1 (all positive) or 0 (all negative): the draw never drops these.
    for value in (0.01, 0.5, 0.99):
        uniform = torch.full((2,), value, dtype=torch.float64)
        assert graddrop_aggregate(jacobian, uniform).tolist() == [4.0, -2.5]


def test_conflicting_coordinate_keeps_one_sign():
    jacobian = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    # Purity = (1 + 1/3) / 2 = 2/3: U below keeps the positive gradient, U above the negative one.
    assert graddrop_aggregate(jacobian, torch.tensor([0.5], dtype=torch.float64)).tolist() == [2.0]
    assert graddrop_aggregate(jacobian, torch.tensor([0.9], dtype=torch.float64)).tolist() == [-1.0]


def test_full_leak_gives_the_sum():
    jacobian = torch.randn(3, 20, dtype=torch.float64)
    uniform = torch.rand(20, dtype=torch.float64)
    result = graddrop_aggregate(jacobian, uniform, leak=torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result, jacobian.sum(dim=0))


def test_purity_function_is_applied():
    jacobian = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    uniform = torch.tensor([0.5], dtype=torch.float64)
    # f(P) = P^4 = 0.198 < 0.5 keeps the negative gradient.
    assert graddrop_aggregate(jacobian, uniform, purity_fn=lambda p: p**4).tolist() == [-1.0]


def test_positive_sign_frequency_equals_purity():
    jacobian = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)
    placeholder = torch.zeros(1, requires_grad=True)
    balancer = GradDrop(TASKS[:2], [placeholder], seed=0)
    results = torch.stack([balancer.aggregate(jacobian) for _ in range(4000)])
    frequency = (results > 0).double().mean().item()
    assert frequency == pytest.approx(0.75, abs=0.03)


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="leak for task 'topic' must be in"):
        GradDrop(TASKS, [placeholder], leak={"topic": 1.5})
    with pytest.raises(KeyError, match="unknown task"):
        GradDrop(TASKS, [placeholder], leak={"ner": 0.5})
    with pytest.raises(ValueError, match="full Jacobian"):
        GradDrop(TASKS, [placeholder], gradients="last_shared_layer", task_gradients="weighted")
    with pytest.raises(ValueError, match="expected a"):
        graddrop_aggregate(torch.ones(2, 3), torch.ones(2))


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_writes_dropped_gradient_and_is_reproducible():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    balancer = build_balancer("graddrop", TASKS, shared_parameters=shared, seed=4, leak={"toxicity": 0.5})

    losses = model.losses(inputs, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in TASKS]
    jacobian = torch.stack(rows)
    uniform = torch.rand(jacobian.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = reference_graddrop(jacobian.numpy(), uniform.numpy(), np.array([0.0, 0.0, 0.5]))

    state = balancer.state_dict()
    balancer.backward(losses)
    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(combined, expected, rtol=1e-10, atol=1e-12)
    assert balancer.weights == {name: 1.0 for name in TASKS}

    # Restoring the generator reproduces the same draw.
    replay = GradDrop(TASKS, shared, seed=123, leak={"toxicity": 0.5})
    replay.load_state_dict(state)
    torch.testing.assert_close(replay.aggregate(jacobian), torch.from_numpy(expected))
