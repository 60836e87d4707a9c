"""Tests of EqualWeighting and StaticWeighting: totals, gradients and weight validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import EqualWeighting, StaticWeighting, build_balancer

NAMES = ("a", "b", "c")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

finite_losses = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
weights_st = st.floats(min_value=0.0, max_value=1e3, allow_nan=False)


@given(st.lists(finite_losses, min_size=3, max_size=3))
@PROPERTY_SETTINGS
def test_equal_total_is_sum(values):
    losses = {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(NAMES, values)}
    total = EqualWeighting(NAMES)(losses)
    assert math.isclose(float(total), math.fsum(values), rel_tol=1e-12, abs_tol=1e-9)


def test_equal_weights_and_gradient():
    layer = torch.nn.Linear(3, 3, dtype=torch.float64)
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    balancer = EqualWeighting(NAMES)

    out = layer(x)
    balancer({name: out[:, i].pow(2).mean() for i, name in enumerate(NAMES)}).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    out = layer(x)
    sum(out[:, i].pow(2).mean() for i in range(3)).backward()

    assert balancer.weights == {"a": 1.0, "b": 1.0, "c": 1.0}
    for grad, parameter in zip(grads, layer.parameters()):
        assert torch.allclose(grad, parameter.grad, rtol=0, atol=1e-12)


def test_equal_missing_task():
    balancer = EqualWeighting(NAMES)
    total = balancer({"b": torch.tensor(2.0), "c": torch.tensor(float("nan"))})
    assert float(total) == 2.0
    assert balancer.weights == {"b": 1.0}


@given(st.lists(finite_losses, min_size=3, max_size=3), st.lists(weights_st, min_size=3, max_size=3))
@PROPERTY_SETTINGS
def test_static_total_is_weighted_sum(values, weights):
    balancer = StaticWeighting(NAMES, dict(zip(NAMES, weights)))
    losses = {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(NAMES, values)}
    expected = math.fsum(w * v for w, v in zip(weights, values))
    assert math.isclose(float(balancer(losses)), expected, rel_tol=1e-12, abs_tol=1e-6)
    assert balancer.weights == dict(zip(NAMES, weights))


def test_static_gradient_scaled_per_task():
    layer = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    balancer = StaticWeighting(["a", "b"], {"a": 3.0, "b": 0.0})

    out = layer(x)
    balancer({"a": out[0, 0], "b": out[0, 1]}).backward()

    # d(3 * out_0)/dW = 3 x in row 0; task b has weight 0 and contributes nothing.
    expected = torch.tensor([[3.0, 6.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(layer.weight.grad, expected)


def test_static_missing_and_nonfinite_tasks():
    balancer = StaticWeighting(NAMES, {"a": 2.0, "b": 5.0, "c": 0.5})
    total = balancer({"a": torch.tensor(1.0), "c": torch.tensor(float("inf"))})
    assert float(total) == 2.0
    assert balancer.weights == {"a": 2.0}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"a": 1.0, "b": 1.0}, "no weight for task\\(s\\) \\['c'\\]"),
        ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, "unknown task\\(s\\) \\['d'\\]"),
        ({"a": 1.0, "b": -0.5, "c": 1.0}, "the weight of task 'b' must be a finite number >= 0, got -0.5"),
        ({"a": float("nan"), "b": 1.0, "c": 1.0}, "the weight of task 'a' must be a finite number >= 0, got nan"),
        ({"a": 1.0, "b": 1.0, "c": float("inf")}, "the weight of task 'c' must be a finite number >= 0, got inf"),
    ],
)
def test_static_invalid_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        StaticWeighting(NAMES, weights)


def test_static_weights_must_be_mapping():
    with pytest.raises(TypeError, match="weights must be a mapping"):
        StaticWeighting(NAMES, [1.0, 1.0, 1.0])


def test_static_state_dict_has_no_weights():
    balancer = build_balancer("static", NAMES, weights={"a": 1.0, "b": 2.0, "c": 3.0})
    assert isinstance(balancer, StaticWeighting)
    assert list(balancer.state_dict()) == ["step"]
    assert list(balancer.parameters()) == []
