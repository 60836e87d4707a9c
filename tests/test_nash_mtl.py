"""Tests of Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import NashMTL, build_balancer
from multitune.balancing._nash_mtl import nash_bargaining_weights

TASKS = ("sentiment", "topic", "toxicity")


def _balancer(**kwargs: object) -> NashMTL:
    placeholder = torch.zeros(1, requires_grad=True)
    return NashMTL(TASKS, [placeholder], **kwargs)  # type: ignore[arg-type]


def _random_jacobian(seed: int, num_tasks: int = 3, dimension: int = 6) -> np.ndarray:
    generator = np.random.default_rng(seed)
    # A shared component keeps the gradients away from Pareto stationarity.
    jacobian = generator.normal(size=(num_tasks, dimension)) + generator.normal(size=(1, dimension))
    return jacobian * generator.uniform(0.2, 5.0, size=(num_tasks, 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=5), st.integers(0, 2**31 - 1))
def test_bargaining_solution_satisfies_optimality_condition(num_tasks, seed):
    jacobian = _random_jacobian(seed, num_tasks, num_tasks + 2)
    gramian = jacobian @ jacobian.T
    normalized = gramian / np.linalg.norm(gramian)
    solution = nash_bargaining_weights(normalized, max_iter=100)
    assert solution.converged
    assert np.all(solution.alpha > 0)
    np.testing.assert_allclose(normalized @ solution.alpha, 1.0 / solution.alpha, rtol=1e-6)


def test_orthogonal_gradients_closed_form():
    # G = diag(a, b): alpha_i = 1 / sqrt(G_ii).
    gramian = np.diag([4.0, 0.25])
    solution = nash_bargaining_weights(gramian)
    np.testing.assert_allclose(solution.alpha, [0.5, 2.0], rtol=1e-10)


def test_two_tasks_closed_form():
    # For two tasks, G alpha = 1/alpha gives a alpha_1^2 + c alpha_1 alpha_2 = 1 = b alpha_2^2 + c alpha_1 alpha_2,
    # so alpha_2 = alpha_1 sqrt(a / b) and alpha_1^2 (a + c sqrt(a / b)) = 1.
    a, b, c = 2.0, 0.5, -0.6
    alpha_1 = 1.0 / np.sqrt(a + c * np.sqrt(a / b))
    expected = [alpha_1, alpha_1 * np.sqrt(a / b)]
    solution = nash_bargaining_weights(np.array([[a, c], [c, b]]))
    np.testing.assert_allclose(solution.alpha, expected, rtol=1e-10)


def test_each_task_gets_inner_product_one_over_alpha():
    jacobian = _random_jacobian(0)
    gramian = jacobian @ jacobian.T
    coefficients = _balancer(max_norm=0.0).weigh(torch.tensor(gramian)).numpy()
    inner = jacobian @ (coefficients @ jacobian)
    np.testing.assert_allclose(inner, 1.0 / coefficients, rtol=1e-7)
    # alpha^T G alpha = sum_i alpha_i / alpha_i = T.
    assert np.linalg.norm(coefficients @ jacobian) == pytest.approx(np.sqrt(3), rel=1e-7)


def test_weights_scale_inversely_with_gradients():
    # G -> s G maps the solution alpha to alpha / sqrt(s).
    jacobian = _random_jacobian(1)
    gramian = torch.tensor(jacobian @ jacobian.T)
    first = _balancer(max_norm=0.0).weigh(gramian)
    second = _balancer(max_norm=0.0).weigh(gramian * 1e4)
    torch.testing.assert_close(second, first / 100, rtol=1e-8, atol=0.0)


def test_max_norm_clips_combined_gradient():
    jacobian = _random_jacobian(2) * 10
    gramian = torch.tensor(jacobian @ jacobian.T)
    free = _balancer(max_norm=0.0).weigh(gramian).numpy()
    clipped = _balancer(max_norm=1.0).weigh(gramian).numpy()
    assert np.linalg.norm(free @ jacobian) > 1.0
    assert np.linalg.norm(clipped @ jacobian) == pytest.approx(1.0, rel=1e-10)
    np.testing.assert_allclose(clipped / free, clipped[0] / free[0], rtol=1e-10)


def test_update_weights_every_reuses_solution():
    balancer = _balancer(max_norm=0.0, update_weights_every=3)
    first = _random_jacobian(3)
    second = _random_jacobian(4)
    gramian_first = torch.tensor(first @ first.T)
    gramian_second = torch.tensor(second @ second.T)

    solved = balancer.weigh(gramian_first)
    assert torch.equal(balancer.weigh(gramian_second), solved)
    assert torch.equal(balancer.weigh(gramian_second), solved)
    fresh = _balancer(max_norm=0.0).weigh(gramian_second)
    torch.testing.assert_close(balancer.weigh(gramian_second), fresh, rtol=1e-8, atol=0.0)


def test_warm_start_reaches_the_same_solution():
    jacobian = _random_jacobian(5)
    gramian = jacobian @ jacobian.T
    normalized = gramian / np.linalg.norm(gramian)
    cold = nash_bargaining_weights(normalized)
    warm = nash_bargaining_weights(normalized, initial=cold.alpha * 1.3)
    np.testing.assert_allclose(warm.alpha, cold.alpha, rtol=1e-8)
    assert warm.iterations <= cold.iterations


def test_pareto_stationary_point_logs_non_convergence(caplog):
    # g_2 = -g_1: a non-negative combination is zero and G alpha = 1/alpha has no solution.
    jacobian = np.array([[1.0, 2.0], [-1.0, -2.0], [0.5, -0.25]])
    with caplog.at_level(logging.WARNING, logger="multitune.balancing._nash_mtl"):
        coefficients = _balancer().weigh(torch.tensor(jacobian @ jacobian.T))
    assert "no bargaining solution" in caplog.text
    assert torch.isfinite(coefficients).all()
    assert np.linalg.norm(coefficients.numpy() @ jacobian) <= 1.0 + 1e-9


def test_zero_gradients_give_unit_weights():
    assert _balancer().weigh(torch.zeros(3, 3, dtype=torch.float64)).tolist() == [1.0, 1.0, 1.0]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="update_weights_every must be"):
        _balancer(update_weights_every=0)
    with pytest.raises(ValueError, match="optim_niter must be"):
        _balancer(optim_niter=0)
    with pytest.raises(ValueError, match="max_norm must be"):
        _balancer(max_norm=-1.0)


def test_state_dict_round_trip():
    balancer = _balancer(max_norm=0.0, update_weights_every=2)
    jacobian = _random_jacobian(6)
    gramian = torch.tensor(jacobian @ jacobian.T)
    solved = balancer.weigh(gramian)

    restored = _balancer(max_norm=0.0, update_weights_every=2)
    restored.load_state_dict(balancer.state_dict())
    other = _random_jacobian(7)
    # With the restored counter, the next step reuses the saved solution.
    assert torch.equal(restored.weigh(torch.tensor(other @ other.T)), solved)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_with_missing_task_keeps_other_solution():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    balancer = build_balancer("nash_mtl", TASKS, shared_parameters=shared, max_norm=0.0)

    losses = model.losses(inputs, targets)
    del losses["topic"]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in losses]
    jacobian = torch.stack(rows).numpy()
    balancer.backward(losses)

    expected = nash_bargaining_weights(jacobian @ jacobian.T).alpha
    assert set(balancer.weights) == {"sentiment", "toxicity"}
    assert [balancer.weights["sentiment"], balancer.weights["toxicity"]] == pytest.approx(expected.tolist(), rel=1e-6)
    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    np.testing.assert_allclose(combined, expected @ jacobian, rtol=1e-6, atol=1e-10)
    assert balancer.solved_tasks.tolist() == [True, False, True]
