"""Tests of the Balancer base class: validation, non-finite losses, the reduce hook and the registry."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from multitune.balancing import (
    Balancer,
    EqualWeighting,
    GradNorm,
    NonFiniteLossError,
    StaticWeighting,
    TaskNormalization,
    available_balancers,
    build_balancer,
    get_balancer_class,
)

NAMES = ("a", "b", "c")


class RecordingBalancer(Balancer):
    """Sums the losses and records what ``combine`` received; returns its weights as tensors."""

    name = ""

    def __init__(self, task_names, **kwargs):
        super().__init__(task_names, **kwargs)
        self.calls: list[dict[str, float]] = []
        self.register_buffer("weight_buffer", torch.arange(1.0, len(task_names) + 1.0))

    def combine(self, losses):
        self.calls.append({name: float(loss.detach()) for name, loss in losses.items()})
        weights = {name: self.weight_buffer[self.task_index[name]] for name in losses}
        total = sum(weights[name].detach() * loss for name, loss in losses.items())
        return total, weights


def scalar(value: float, *, requires_grad: bool = False) -> Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=requires_grad)


# Task names and losses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_names", "error", "match"),
    [
        ([], ValueError, "empty"),
        ("ab", TypeError, "string"),
        (["a", "a", "b"], ValueError, "duplicate task names: \\['a'\\]"),
        (["a", ""], ValueError, "non-empty strings"),
        (["a", 3], ValueError, "non-empty strings"),
    ],
)
def test_invalid_task_names(task_names, error, match):
    with pytest.raises(error, match=match):
        EqualWeighting(task_names)


def test_invalid_nonfinite_policy():
    with pytest.raises(ValueError, match="on_nonfinite must be 'skip' or 'raise', got 'ignore'"):
        EqualWeighting(NAMES, on_nonfinite="ignore")


def test_unknown_task_raises():
    balancer = EqualWeighting(NAMES)
    with pytest.raises(KeyError, match="unknown task\\(s\\) \\['z'\\]"):
        balancer({"a": scalar(1.0), "z": scalar(2.0)})


@pytest.mark.parametrize("loss", [torch.ones(2), torch.ones(2, 3), 1.0])
def test_non_scalar_loss_raises(loss):
    balancer = EqualWeighting(NAMES)
    with pytest.raises(ValueError, match="task 'b': loss must be a scalar tensor"):
        balancer({"a": scalar(1.0), "b": loss})


def test_one_element_loss_accepted():
    balancer = EqualWeighting(NAMES)
    total = balancer({"a": torch.tensor([2.0]), "b": torch.tensor([[3.0]])})
    assert total.shape == ()
    assert float(total) == 5.0


def test_non_mapping_raises():
    balancer = EqualWeighting(NAMES)
    with pytest.raises(TypeError, match="expects a mapping"):
        balancer([scalar(1.0)])


def test_missing_tasks_not_in_weights():
    balancer = RecordingBalancer(NAMES)
    balancer({"c": scalar(1.0), "a": scalar(2.0)})
    assert balancer.calls == [{"a": 2.0, "c": 1.0}]
    assert list(balancer.calls[0]) == ["a", "c"]
    assert balancer.weights == {"a": 1.0, "c": 3.0}


# Non-finite losses -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_raise_policy(bad):
    balancer = RecordingBalancer(NAMES, on_nonfinite="raise")
    with pytest.raises(NonFiniteLossError, match=f"task 'b': loss is {bad} at step 0"):
        balancer({"a": scalar(1.0), "b": scalar(bad)})
    assert balancer.calls == []


def test_nonfinite_skip_leaves_task_out(caplog):
    balancer = RecordingBalancer(NAMES)
    loss_a = scalar(2.0, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="multitune.balancing._base"):
        total = balancer({"a": loss_a, "b": scalar(float("nan")), "c": scalar(4.0)})
        balancer({"a": scalar(1.0), "b": scalar(float("inf"))})

    assert total.item() == 1.0 * 2.0 + 3.0 * 4.0
    assert balancer.calls[0] == {"a": 2.0, "c": 4.0}
    assert balancer.calls[1] == {"a": 1.0}
    assert balancer.nonfinite_counts == {"b": 2}
    assert balancer.weights == {"a": 1.0}
    warnings = [record for record in caplog.records if "task 'b'" in record.getMessage()]
    assert len(warnings) == 1


def test_nonfinite_check_mixed_dtypes():
    balancer = RecordingBalancer(NAMES)
    balancer({"a": torch.tensor(1.0, dtype=torch.float16), "b": scalar(float("nan")), "c": torch.tensor(2.0)})
    assert balancer.calls == [{"a": 1.0, "c": 2.0}]


def test_all_nonfinite_step():
    layer = torch.nn.Linear(2, 1)
    loss = layer(torch.ones(1, 2)).sum() * float("nan")
    balancer = RecordingBalancer(NAMES)
    balancer({"a": scalar(1.0)})
    assert balancer.weights == {"a": 1.0}

    total = balancer({"a": loss, "b": scalar(float("inf"))})
    assert balancer.calls == [{"a": 1.0}]
    assert total.item() == 0.0
    assert total.requires_grad
    total.backward()
    assert layer.weight.grad is None
    assert balancer.weights == {}
    assert int(balancer.step) == 2


def test_empty_mapping_is_a_zero_step():
    balancer = RecordingBalancer(NAMES)
    total = balancer({})
    assert total.item() == 0.0
    assert balancer.calls == []
    assert int(balancer.step) == 1


# Weights, step and backward ----------------------------------------------------------------------


def test_weights_are_floats_of_that_call():
    balancer = RecordingBalancer(NAMES)
    balancer({"a": scalar(1.0), "b": scalar(1.0)})
    balancer.weight_buffer.mul_(10.0)
    weights = balancer.weights
    assert weights == {"a": 1.0, "b": 2.0}
    assert all(type(value) is float for value in weights.values())


def test_step_counts_calls():
    balancer = EqualWeighting(NAMES)
    for _ in range(3):
        balancer({"a": scalar(1.0)})
    assert int(balancer.step) == 3
    assert balancer.state_dict()["step"].item() == 3


def test_default_backward_fills_grads():
    layer = torch.nn.Linear(3, 1, dtype=torch.float64)
    x = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    balancer = StaticWeighting(["a", "b"], {"a": 2.0, "b": 0.5})

    returned = balancer.backward({"a": layer(x).pow(2).mean(), "b": layer(x).abs().mean()}, features=x)
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    expected = 2.0 * layer(x).pow(2).mean() + 0.5 * layer(x).abs().mean()
    expected.backward()

    assert not returned.requires_grad
    assert torch.allclose(returned, expected.detach(), rtol=0, atol=1e-12)
    for grad, parameter in zip(grads, layer.parameters()):
        assert torch.allclose(grad, parameter.grad, rtol=0, atol=1e-12)


# Reduce hook -------------------------------------------------------------------------------------


def test_reduce_identity_by_default():
    balancer = EqualWeighting(NAMES)
    tensor = torch.tensor([1.0, 2.0])
    assert balancer.reduce(tensor) is tensor


def test_reduce_task_stats_packs_one_tensor():
    balancer = EqualWeighting(NAMES)
    received: list[Tensor] = []

    def record(tensor: Tensor) -> Tensor:
        received.append(tensor.clone())
        return tensor

    balancer.set_reduce_fn(record)
    means, present = balancer.reduce_task_stats({"a": scalar(2.0), "c": scalar(5.0)}, {"a": scalar(0.5), "c": scalar(7.0)})

    assert len(received) == 1
    expected_packed = torch.tensor([[2.0, 0.0, 5.0], [0.5, 0.0, 7.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(received[0], expected_packed)
    assert torch.equal(means, expected_packed[:2])
    assert present.tolist() == [True, False, True]


def test_reduce_task_stats_two_rank_mean():
    """A reduce function that averages with a second rank's tensor, as an all-reduce mean would."""
    balancer = EqualWeighting(NAMES)
    other_rank = torch.tensor([[4.0, 9.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    balancer.set_reduce_fn(lambda tensor: (tensor + other_rank) / 2.0)

    means, present = balancer.reduce_task_stats({"a": scalar(2.0)})

    # Task a is on both ranks (mean 3), b only on the other rank (9), c on none.
    assert means.tolist() == [[3.0, 9.0, 0.0]]
    assert present.tolist() == [True, True, False]


def test_reduce_task_stats_without_reduce_fn():
    balancer = EqualWeighting(NAMES)
    means, present = balancer.reduce_task_stats({"b": scalar(2.0)})
    assert means.tolist() == [[0.0, 2.0, 0.0]]
    assert present.tolist() == [False, True, False]


def test_reduce_task_stats_mismatched_tasks():
    balancer = EqualWeighting(NAMES)
    with pytest.raises(ValueError, match="every mapping needs the tasks"):
        balancer.reduce_task_stats({"a": scalar(1.0)}, {"b": scalar(1.0)})
    with pytest.raises(ValueError, match="at least one non-empty mapping"):
        balancer.reduce_task_stats({})


@pytest.mark.parametrize("method", ["task_normalization", "gradnorm"])
def test_reduce_hook_gets_losses(method):
    layer = torch.nn.Linear(2, 2, dtype=torch.float64)
    balancer = build_balancer(method, ["a", "b"], shared_parameters=[layer.weight])
    balancer.double()
    received: list[Tensor] = []

    def record(tensor: Tensor) -> Tensor:
        received.append(tensor.clone())
        return tensor

    balancer.set_reduce_fn(record)
    out = layer(torch.ones(1, 2, dtype=torch.float64))
    loss_a, loss_b = out[0, 0] ** 2 + 1.0, out[0, 1] ** 2 + 2.0
    balancer({"a": loss_a, "b": loss_b})

    # The first call agrees on non-finite losses across ranks: one flag per task, none set here.
    assert received[0].tolist() == [0.0, 0.0]
    assert len(received) > 1
    for packed in received[1:]:
        assert packed[0].tolist() == [loss_a.item(), loss_b.item()]
        assert packed[-1].tolist() == [1.0, 1.0]


# Registry ----------------------------------------------------------------------------------------


def test_registry_names():
    names = available_balancers()
    for name in ("equal", "static", "task_normalization", "gradnorm"):
        assert name in names
    assert get_balancer_class("gradnorm") is GradNorm
    assert get_balancer_class("task_normalization") is TaskNormalization


def test_registry_unknown_name():
    with pytest.raises(KeyError, match="unknown balancer 'gradnrom'"):
        get_balancer_class("gradnrom")


def test_build_balancer_shared_parameters():
    layer = torch.nn.Linear(2, 2)
    balancer = build_balancer("gradnorm", ["a", "b"], shared_parameters=[layer.weight], alpha=0.5)
    assert isinstance(balancer, GradNorm)
    assert balancer.alpha == 0.5
    assert balancer.shared_parameters[0] is layer.weight
    with pytest.raises(ValueError, match="needs the model's shared parameters"):
        build_balancer("gradnorm", ["a", "b"])
    static = build_balancer("static", ["a"], shared_parameters=[layer.weight], weights={"a": 3.0})
    assert static.static_weights == {"a": 3.0}
