"""Tests of Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import AlignedMTL, build_balancer
from multitune.balancing._aligned_mtl import aligned_mtl_weights, balance_transformation

TASKS = ("sentiment", "topic", "toxicity")


def reference_aligned_update(jacobian: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """The aligned matrix from the SVD of J itself, J = V S U^T -> J_hat = s_min V U^T, update J_hat^T w."""
    v, singular_values, u_transposed = np.linalg.svd(jacobian, full_matrices=False)
    rank = int((singular_values > singular_values.max() * max(jacobian.shape) * 1e-13).sum())
    aligned = singular_values[rank - 1] * v[:, :rank] @ u_transposed[:rank]
    return aligned.T @ preference


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=9), st.integers(0, 2**31 - 1))
def test_aligned_matrix_has_equal_singular_values(num_tasks, dimension, seed):
    generator = np.random.default_rng(seed)
    jacobian = generator.normal(size=(num_tasks, dimension)) * generator.uniform(0.1, 10.0, size=(num_tasks, 1))
    transformation = balance_transformation(torch.tensor(jacobian @ jacobian.T)).numpy()
    singular_values = np.linalg.svd(transformation @ jacobian, compute_uv=False)
    rank = min(num_tasks, dimension)
    expected = np.linalg.svd(jacobian, compute_uv=False)[rank - 1]
    np.testing.assert_allclose(singular_values[:rank], expected, rtol=1e-7)
    np.testing.assert_allclose(singular_values[rank:], 0.0, atol=1e-7 * expected)


@pytest.mark.parametrize("shape", [(2, 5), (3, 3), (4, 7), (5, 2)])
def test_update_matches_svd_of_jacobian(shape):
    generator = np.random.default_rng(sum(shape))
    jacobian = generator.normal(size=shape)
    preference = np.full(shape[0], 1.0 / shape[0])
    alpha = aligned_mtl_weights(torch.tensor(jacobian @ jacobian.T)).numpy()
    np.testing.assert_allclose(alpha @ jacobian, reference_aligned_update(jacobian, preference), rtol=1e-8, atol=1e-12)


def test_preference_vector_weights_aligned_rows():
    jacobian = np.random.default_rng(0).normal(size=(3, 6))
    preference = np.array([0.6, 0.3, 0.1])
    alpha = aligned_mtl_weights(torch.tensor(jacobian @ jacobian.T), torch.tensor(preference)).numpy()
    np.testing.assert_allclose(alpha @ jacobian, reference_aligned_update(jacobian, preference), rtol=1e-8)


def _lower_median(values: np.ndarray) -> float:
    return float(np.sort(values)[(values.size - 1) // 2])


@pytest.mark.parametrize("num_tasks", [3, 4])
@pytest.mark.parametrize("scale, statistic", [("min", np.min), ("median", _lower_median), ("rmse", np.mean)])
def test_scale_modes(num_tasks, scale, statistic):
    jacobian = np.random.default_rng(1).normal(size=(num_tasks, 5))
    gramian = jacobian @ jacobian.T
    transformation = balance_transformation(torch.tensor(gramian), scale=scale).numpy()
    expected = statistic(np.linalg.eigvalsh(gramian))
    np.testing.assert_allclose(transformation @ gramian @ transformation, expected * np.eye(num_tasks), atol=1e-10)


def test_orthogonal_equal_norm_gradients_are_unchanged():
    jacobian = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    transformation = balance_transformation(torch.tensor(jacobian @ jacobian.T)).numpy()
    np.testing.assert_allclose(transformation, np.eye(2), atol=1e-12)


def test_dominating_gradient_is_scaled_down():
    jacobian = np.array([[100.0, 0.0], [0.0, 1.0]])
    alpha = aligned_mtl_weights(torch.tensor(jacobian @ jacobian.T)).numpy()
    np.testing.assert_allclose(alpha @ jacobian, [0.5, 0.5], rtol=1e-12)


def test_zero_gramian_gives_preference():
    alpha = aligned_mtl_weights(torch.zeros(3, 3, dtype=torch.float64))
    assert alpha.tolist() == pytest.approx([1 / 3] * 3)


def test_invalid_arguments_raise():
    placeholder = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="scale must be"):
        AlignedMTL(TASKS, [placeholder], scale="max")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown task"):
        AlignedMTL(TASKS, [placeholder], preference={"ner": 1.0})
    with pytest.raises(ValueError, match="preference must have shape"):
        aligned_mtl_weights(torch.eye(2), torch.ones(3))


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in TASKS})

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(inputs))
        return {name: (self.heads[name](features).squeeze(-1) - targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)}


def test_backward_uses_preference_of_present_tasks():
    torch.manual_seed(0)
    model = TinyModel().double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    targets = torch.randn(16, 3, dtype=torch.float64) * torch.tensor([1.0, -3.0, 5.0], dtype=torch.float64)
    shared = list(model.shared.parameters())
    balancer = build_balancer(
        "aligned_mtl", TASKS, shared_parameters=shared, preference={"sentiment": 0.5, "topic": 0.2, "toxicity": 0.3}
    )

    losses = model.losses(inputs, targets)
    del losses["topic"]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]) for n in losses]
    jacobian = torch.stack(rows).numpy()
    balancer.backward(losses)

    combined = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    expected = reference_aligned_update(jacobian, np.array([0.5, 0.3]))
    np.testing.assert_allclose(combined, expected, rtol=1e-7, atol=1e-10)
    assert set(balancer.weights) == {"sentiment", "toxicity"}
