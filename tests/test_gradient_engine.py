"""Tests of the per-task gradient engine (multitune.gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.gradients import (
    GradientAccumulator,
    graph_leaves,
    task_gradient_norms,
    task_gramian,
    task_jacobian,
)


def _model(dtype: torch.dtype, seed: int = 0, tasks: int = 3):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(6, 2).to(dtype) for _ in range(tasks)])
    x = torch.randn(9, 5, dtype=dtype)
    targets = [torch.randn(9, 2, dtype=dtype) for _ in range(tasks)]
    return trunk, heads, x, targets


def _losses(trunk, heads, x, targets):
    features = trunk(x)
    losses = [((head(features) - target) ** 2).mean() for head, target in zip(heads, targets)]
    return losses, features


def _separate_jacobian(losses, inputs):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for t, g in zip(inputs, grads)]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobian_matches_separate_grads(dtype):
    trunk, heads, x, targets = _model(dtype)
    shared = list(trunk.parameters())
    losses, _ = _losses(trunk, heads, x, targets)
    expected = _separate_jacobian(losses, shared)

    jacobian = task_jacobian(losses, shared)

    assert jacobian.dtype == dtype
    assert jacobian.shape == (3, sum(p.numel() for p in shared))
    torch.testing.assert_close(jacobian, expected, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_gramian_equals_jacobian_product():
    trunk, heads, x, targets = _model(torch.float64)
    shared = list(trunk.parameters())
    losses, _ = _losses(trunk, heads, x, targets)
    jacobian = _separate_jacobian(losses, shared)

    gramian = task_gramian(losses, shared)

    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gramian, gramian.T, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    tasks=st.integers(min_value=1, max_value=5),
    sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_gramian_property_random_tensors(tasks, sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(size, 3, dtype=torch.float64, generator=generator, requires_grad=True) for size in sizes]
    weights = torch.randn(tasks, len(sizes), dtype=torch.float64, generator=generator)
    losses = [sum(weights[t, i] * (p**2).sum() * (t + 1) + p.sum() * weights[t, i] for i, p in enumerate(params)) for t in range(tasks)]
    jacobian = _separate_jacobian(losses, params)

    gramian = task_gramian(losses, params)

    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-10, atol=1e-10)
    assert torch.linalg.eigvalsh(gramian).min() > -1e-8


def test_features_jacobian_matches_separate_grads():
    trunk, heads, x, targets = _model(torch.float64)
    losses, features = _losses(trunk, heads, x, targets)
    expected = _separate_jacobian(losses, [features])

    jacobian = task_jacobian(losses, [features], retain_graph=True)

    torch.testing.assert_close(jacobian, expected, rtol=1e-12, atol=1e-14)
    # The trunk's graph survives (retain_graph=True) for the backward of the combined gradient.
    features.backward(jacobian.sum(0).view_as(features))
    assert all(p.grad is not None for p in trunk.parameters())


def test_accumulator_rounds_sum_micro_batches():
    trunk, heads, x, targets = _model(torch.float64)
    shared = list(trunk.parameters())
    accumulator = GradientAccumulator(shared, num_tasks=3)

    # Task 1 appears in two micro-batches (rows 0..4 and 5..8), task 0 in one, task 2 in none.
    first, _ = _losses(trunk, heads, x[:5], [t[:5] for t in targets])
    accumulator.backward(1, first[1])
    second, _ = _losses(trunk, heads, x[5:], [t[5:] for t in targets])
    accumulator.backward(1, second[1], retain_graph=True)
    accumulator.backward(0, second[0])

    # The same micro-batches on fresh graphs give the expected rows.
    a, _ = _losses(trunk, heads, x[:5], [t[:5] for t in targets])
    b, _ = _losses(trunk, heads, x[5:], [t[5:] for t in targets])
    expected_1 = _separate_jacobian([a[1] + b[1]], shared)[0]
    expected_0 = _separate_jacobian([b[0]], shared)[0]

    assert accumulator.tasks == [0, 1]
    jacobian = accumulator.jacobian()
    torch.testing.assert_close(jacobian[0], expected_0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jacobian[1], expected_1, rtol=1e-12, atol=1e-14)
    stacked = torch.stack([expected_0, expected_1])
    torch.testing.assert_close(accumulator.gramian(), stacked @ stacked.T, rtol=1e-12, atol=1e-14)


def test_accumulator_combine_weighted_sum():
    trunk, heads, x, targets = _model(torch.float64)
    shared = list(trunk.parameters())
    losses, _ = _losses(trunk, heads, x, targets)
    jacobian = _separate_jacobian(losses, shared)
    accumulator = GradientAccumulator(shared, num_tasks=3)
    for index, loss in enumerate(losses):
        accumulator.backward(index, loss, retain_graph=True)
    coefficients = torch.tensor([0.7, -0.2, 1.5], dtype=torch.float64)

    combined = accumulator.combine(coefficients)

    flat = torch.cat([g.reshape(-1) for g in combined])
    torch.testing.assert_close(flat, coefficients @ jacobian, rtol=1e-12, atol=1e-14)
    assert accumulator.tasks == []


def test_accumulator_unreached_input_is_none():
    used = torch.randn(3, dtype=torch.float64, requires_grad=True)
    only_first = torch.randn(2, dtype=torch.float64, requires_grad=True)
    never = torch.randn(4, dtype=torch.float64, requires_grad=True)
    losses = [(used**2).sum() + (only_first**3).sum(), used.sum()]
    accumulator = GradientAccumulator([used, only_first, never], num_tasks=2)
    for index, loss in enumerate(losses):
        accumulator.backward(index, loss, retain_graph=True)
    jacobian = _separate_jacobian(losses, [used, only_first, never])

    torch.testing.assert_close(accumulator.jacobian(), jacobian, rtol=0, atol=0)
    torch.testing.assert_close(accumulator.gramian(), jacobian @ jacobian.T, rtol=1e-12, atol=1e-14)
    combined = accumulator.combine([2.0, 3.0])

    torch.testing.assert_close(combined[0], 2.0 * 2 * used.detach() + 3.0)
    torch.testing.assert_close(combined[1], 2.0 * 3 * only_first.detach() ** 2)
    assert combined[2] is None


def test_accumulator_aliased_gradients_copied():
    # d(a + b)/da and d(a + b)/db can be the same tensor object; in-place sums must not mix them.
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    losses = [(a + b).sum(), (a * b).sum()]
    accumulator = GradientAccumulator([a, b], num_tasks=2)
    for index, loss in enumerate(losses):
        accumulator.backward(index, loss, retain_graph=True)

    combined = accumulator.combine([2.0, 1.0])

    torch.testing.assert_close(combined[0], 2.0 + b.detach())
    torch.testing.assert_close(combined[1], 2.0 + a.detach())


def test_gradient_norms_match_gramian_diagonal():
    trunk, heads, x, targets = _model(torch.float64)
    shared = list(trunk.parameters())
    losses, _ = _losses(trunk, heads, x, targets)
    jacobian = _separate_jacobian(losses, shared)

    norms = task_gradient_norms(losses, shared)

    torch.testing.assert_close(norms, jacobian.norm(dim=1), rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in shared)


def test_gradient_norms_with_weights_write_grad():
    trunk, heads, x, targets = _model(torch.float64)
    everything = list(trunk.parameters()) + list(heads.parameters())
    weights = [0.5, 2.0, 1.25]
    losses, _ = _losses(trunk, heads, x, targets)
    expected = torch.autograd.grad(sum(w * l for w, l in zip(weights, losses)), everything, retain_graph=True)
    jacobian = _separate_jacobian(losses, list(trunk.parameters()))

    norms = task_gradient_norms(losses, list(trunk.parameters()), weights=weights)

    torch.testing.assert_close(norms, jacobian.norm(dim=1), rtol=1e-12, atol=1e-14)
    for parameter, gradient in zip(everything, expected):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-12, atol=1e-14)


def test_graph_leaves_finds_heads_and_stops_at_features():
    trunk, heads, x, targets = _model(torch.float64)
    losses, features = _losses(trunk, heads, x, targets)
    shared = list(trunk.parameters())

    below = graph_leaves(losses[0], exclude=shared)
    bounded = graph_leaves(losses[0], stop_at=[features])
    everything = graph_leaves(losses[0])

    head_ids = {id(p) for p in heads[0].parameters()}
    assert {id(p) for p in below} == head_ids
    assert {id(p) for p in bounded} == head_ids
    assert {id(p) for p in everything} == head_ids | {id(p) for p in shared}


class _TokenModel(nn.Module):
    """Embedding table + mixing layer; ``tied`` also uses the table as an output projection."""

    def __init__(self, tied: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(50, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.tied = tied
        self.double()

    def forward(self, ids, task):
        hidden = torch.tanh(self.mix(self.embedding(ids))).mean(1)
        if self.tied:
            hidden = hidden @ self.embedding.weight.T
        return (hidden.sum(-1) * (task + 1) + hidden.pow(2).sum(-1)).mean()


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_rows_match_dense(tied):
    model = _TokenModel(tied=tied)
    params = list(model.parameters())
    ids = [torch.tensor([[3, 7, 0], [7, 9, 11]]), torch.tensor([[5, 3, 3], [0, 0, 2]])]

    def fill(accumulator):
        # Task 0 gets both micro-batches (different rows), task 1 only the second.
        accumulator.backward(0, model(ids[0], 0))
        second = [model(ids[1], 0), model(ids[1], 1)]
        accumulator.backward(0, second[0], retain_graph=True)
        accumulator.backward(1, second[1])

    sparse = GradientAccumulator(params, num_tasks=2)
    dense = GradientAccumulator(params, num_tasks=2, embedding_rows=False)
    fill(sparse)
    fill(dense)
    expected = _separate_jacobian([model(ids[0], 0) + model(ids[1], 0), model(ids[1], 1)], params)

    torch.testing.assert_close(sparse.jacobian(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sparse.gramian(), expected @ expected.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dense.gramian(), expected @ expected.T, rtol=1e-12, atol=1e-14)
    combined = torch.cat([g.reshape(-1) for g in sparse.combine([0.25, -2.0])])
    torch.testing.assert_close(combined, torch.tensor([0.25, -2.0], dtype=torch.float64) @ expected, rtol=1e-12, atol=1e-14)


def test_embedding_lookup_rows_kept_only():
    model = _TokenModel()
    accumulator = GradientAccumulator(list(model.parameters()), num_tasks=1)
    accumulator.backward(0, model(torch.tensor([[3, 7, 0], [7, 9, 11]]), 0))

    entry = accumulator._rows[0][0]

    assert entry.rows.tolist() == [0, 3, 7, 9, 11]
    assert entry.values.shape == (5, 4)
