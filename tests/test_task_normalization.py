"""Tests of TaskNormalization against the EMA formula written with Python floats."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import TaskNormalization, build_balancer

NAMES = ("a", "b", "c")
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


class ReferenceTaskNormalization:
    """m_i(t) = beta m_i(t-1) + (1 - beta) L_i(t), m_i(t0) = L_i(t0); total = sum_i w_i L_i / max(m_i(t), eps)."""

    def __init__(self, beta, weights, eps=1e-8):
        self.beta = beta
        self.weights = weights
        self.eps = eps
        self.ema: dict[str, float] = {}

    def step(self, losses: dict[str, float]) -> tuple[float, dict[str, float]]:
        for name, value in losses.items():
            if name in self.ema:
                self.ema[name] = self.beta * self.ema[name] + (1.0 - self.beta) * value
            else:
                self.ema[name] = value
        factors = {name: self.weights[name] / max(self.ema[name], self.eps) for name in losses}
        return math.fsum(factors[name] * value for name, value in losses.items()), factors


def tensors(values: dict[str, float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in values.items()}


step_losses = st.dictionaries(st.sampled_from(NAMES), st.floats(min_value=1e-3, max_value=1e3), min_size=1)


@given(
    st.lists(step_losses, min_size=1, max_size=12),
    st.floats(min_value=0.0, max_value=0.999),
    st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=3, max_size=3),
)
@PROPERTY_SETTINGS
def test_matches_reference(steps, beta, static):
    weights = dict(zip(NAMES, static))
    balancer = TaskNormalization(NAMES, beta=beta, weights=weights).double()
    reference = ReferenceTaskNormalization(beta, weights)

    for values in steps:
        values = {name: values[name] for name in NAMES if name in values}
        losses = tensors(values)
        total = balancer(losses)
        expected_total, expected_factors = reference.step(values)
        total.backward()

        assert math.isclose(total.item(), expected_total, rel_tol=1e-12, abs_tol=1e-12)
        for name in values:
            # The EMA is a constant for autograd: dL/dL_i = w_i / m_i(t), with m_i(t) including L_i(t).
            assert math.isclose(losses[name].grad.item(), expected_factors[name], rel_tol=1e-12)
            assert math.isclose(balancer.weights[name], expected_factors[name], rel_tol=1e-12)
        assert set(balancer.weights) == set(values)


def test_first_ratio_is_one():
    balancer = TaskNormalization(NAMES, beta=0.9).double()
    total = balancer(tensors({"a": 0.3, "b": 40.0, "c": 7.0}))
    assert total.item() == 3.0
    assert balancer.ema.tolist() == [0.3, 40.0, 7.0]


def test_division_uses_updated_ema():
    balancer = TaskNormalization(["a"], beta=0.5).double()
    balancer(tensors({"a": 2.0}))
    total = balancer(tensors({"a": 4.0}))
    # m(1) = 0.5 * 2 + 0.5 * 4 = 3, so the ratio is 4 / 3 (with m(0) = 2 it would be 2).
    assert math.isclose(total.item(), 4.0 / 3.0, rel_tol=1e-15)


def test_beta_zero_divides_by_current_loss():
    balancer = TaskNormalization(NAMES, beta=0.0, weights={"a": 1.0, "b": 2.0, "c": 0.5}).double()
    for values in ({"a": 1.0, "b": 5.0, "c": 2.0}, {"a": 9.0, "b": 0.1, "c": 30.0}):
        assert math.isclose(balancer(tensors(values)).item(), 3.5, rel_tol=1e-15)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\)"):
        TaskNormalization(NAMES, beta=beta)


def test_invalid_eps_and_weights():
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        TaskNormalization(NAMES, eps=0.0)
    with pytest.raises(ValueError, match="no weight for task\\(s\\) \\['c'\\]"):
        TaskNormalization(NAMES, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="unknown task\\(s\\) \\['x'\\]"):
        TaskNormalization(NAMES, weights={"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0})
    with pytest.raises(ValueError, match="the weight of task 'a' must be a finite number >= 0"):
        TaskNormalization(NAMES, weights={"a": -1.0, "b": 1.0, "c": 1.0})


def test_zero_loss_guard():
    balancer = TaskNormalization(["a", "b"], eps=1e-6).double()
    losses = tensors({"a": 0.0, "b": 2.0})
    total = balancer(losses)
    total.backward()
    assert total.item() == 1.0
    assert losses["a"].grad.item() == pytest.approx(1e6)
    assert math.isfinite(losses["b"].grad.item())


def test_missing_task_keeps_ema():
    balancer = TaskNormalization(NAMES, beta=0.5).double()
    balancer(tensors({"a": 2.0, "b": 4.0, "c": 8.0}))
    balancer(tensors({"a": 4.0}))
    balancer(tensors({"a": 4.0, "c": float("nan")}))
    assert balancer.ema.tolist() == [3.5, 4.0, 8.0]
    assert balancer.initialized.tolist() == [True, True, True]


def test_task_first_seen_later():
    balancer = TaskNormalization(NAMES, beta=0.5).double()
    balancer(tensors({"a": 2.0}))
    total = balancer(tensors({"a": 2.0, "b": 6.0}))
    assert total.item() == 2.0
    assert balancer.initialized.tolist() == [True, True, False]


def test_eval_mode_freezes_ema():
    balancer = TaskNormalization(["a", "b"], beta=0.5).double()
    balancer(tensors({"a": 2.0}))
    balancer.eval()
    total = balancer(tensors({"a": 6.0, "b": 3.0}))
    # a: 6 / 2 with the frozen EMA; b has no EMA yet and is divided by its own loss.
    assert total.item() == 4.0
    assert balancer.ema.tolist() == [2.0, 0.0]
    assert balancer.initialized.tolist() == [True, False]


def test_reduce_fn_averages_ema_input():
    balancer = TaskNormalization(["a", "b"], beta=0.5).double()
    other_rank = torch.tensor([[10.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # 1-D tensors are the per-task flags of non-finite losses, none of them set on either rank.
    balancer.set_reduce_fn(lambda tensor: tensor / 2.0 if tensor.dim() == 1 else (tensor + other_rank) / 2.0)
    total = balancer(tensors({"a": 2.0, "b": 3.0}))
    # Rank mean of a is (2 + 10) / 2 = 6; b is only on this rank.
    assert balancer.ema.tolist() == [6.0, 3.0]
    assert math.isclose(total.item(), 2.0 / 6.0 + 1.0, rel_tol=1e-15)


def test_state_dict_round_trip():
    balancer = TaskNormalization(NAMES, beta=0.8).double()
    for values in ({"a": 1.0, "b": 2.0}, {"a": 3.0, "c": 5.0}):
        balancer(tensors(values))

    resumed = TaskNormalization(NAMES, beta=0.8).double()
    resumed.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert set(balancer.state_dict()) == {"step", "ema", "initialized"}
    for values in ({"a": 2.0, "b": 1.0, "c": 4.0}, {"b": 7.0}):
        assert resumed(tensors(values)).item() == balancer(tensors(values)).item()
    assert torch.equal(resumed.ema, balancer.ema)


def test_float32_losses_and_registry():
    balancer = build_balancer("task_normalization", ["a", "b"], beta=0.5)
    assert isinstance(balancer, TaskNormalization)
    assert list(balancer.parameters()) == []
    total = balancer({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    assert total.dtype == torch.float32
    assert total.item() == 2.0
