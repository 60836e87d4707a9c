"""Tests of the geometric loss strategy (geometric mean of the task losses)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import GeometricMean, build_balancer

TASKS = ("lane", "object", "freespace")


def _losses(values: list[float], *, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64, requires_grad=requires_grad) for name, value in zip(TASKS, values)}


def test_total_is_geometric_mean() -> None:
    balancer = GeometricMean(TASKS)
    values = [0.2, 1.5, 40.0]

    total = balancer(_losses(values))

    assert total.item() == pytest.approx(math.prod(values) ** (1.0 / 3.0), rel=1e-12)


def test_weights_are_loss_derivatives() -> None:
    balancer = GeometricMean(TASKS)
    values = [0.2, 1.5, 40.0]
    losses = _losses(values, requires_grad=True)

    balancer(losses).backward()

    geometric_mean = math.prod(values) ** (1.0 / 3.0)
    for name, value in zip(TASKS, values):
        expected = geometric_mean / (3.0 * value)
        assert balancer.weights[name] == pytest.approx(expected, rel=1e-12)
        assert losses[name].grad is not None
        assert losses[name].grad.item() == pytest.approx(expected, rel=1e-12)


def test_gradient_matches_product_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    theta = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)

    def task_losses() -> list[torch.Tensor]:
        return [((theta - targets[i]) ** 2).mean() + 0.1 for i in range(3)]

    GeometricMean(TASKS)(dict(zip(TASKS, task_losses()))).backward()
    assert theta.grad is not None
    ours = theta.grad.clone()

    theta.grad = None
    product = task_losses()
    (product[0] * product[1] * product[2]).pow(1.0 / 3.0).backward()

    torch.testing.assert_close(ours, theta.grad, rtol=1e-12, atol=1e-14)


def test_tiny_losses_do_not_underflow() -> None:
    names = [f"task{i}" for i in range(40)]
    balancer = GeometricMean(names)
    losses = {name: torch.tensor(1e-30, dtype=torch.float32) for name in names}

    total = balancer(losses)

    assert math.prod(float(loss) for loss in losses.values()) == 0.0
    assert total.item() == pytest.approx(1e-30, rel=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=3, max_size=3))
def test_between_min_and_arithmetic_mean(values: list[float]) -> None:
    total = GeometricMean(TASKS)(_losses(values)).item()

    assert total >= min(values) * (1 - 1e-12)
    assert total <= sum(values) / len(values) * (1 + 1e-12)


def test_missing_task_mean_over_present() -> None:
    balancer = GeometricMean(TASKS)

    total = balancer({"lane": torch.tensor(4.0, dtype=torch.float64), "freespace": torch.tensor(9.0, dtype=torch.float64)})

    assert total.item() == pytest.approx(6.0, rel=1e-12)
    assert set(balancer.weights) == {"lane", "freespace"}


def test_nonpositive_loss_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    balancer = GeometricMean(TASKS)
    losses = {"lane": torch.tensor(0.0), "object": torch.tensor(4.0), "freespace": torch.tensor(9.0)}

    with caplog.at_level(logging.WARNING):
        total = balancer(losses)
        balancer(losses)

    assert total.item() == pytest.approx(6.0, rel=1e-6)
    assert balancer.nonpositive_counts == {"lane": 2}
    assert sum("'lane'" in record.getMessage() for record in caplog.records) == 1


def test_nonpositive_loss_raises_when_asked() -> None:
    balancer = GeometricMean(TASKS, on_nonpositive="raise")

    with pytest.raises(ValueError, match="'object'.*not positive"):
        balancer({"lane": torch.tensor(1.0), "object": torch.tensor(-1.0)})


def test_nan_loss_skipped() -> None:
    balancer = GeometricMean(TASKS)

    total = balancer({"lane": torch.tensor(math.inf), "object": torch.tensor(4.0), "freespace": torch.tensor(9.0)})

    assert total.item() == pytest.approx(6.0, rel=1e-6)
    assert balancer.nonfinite_counts == {"lane": 1}


def test_state_round_trip() -> None:
    first = GeometricMean(TASKS)
    first(_losses([1.0, 2.0, 3.0]))
    second = GeometricMean(TASKS)
    second.load_state_dict(first.state_dict())

    values = _losses([0.5, 4.0, 9.0])

    assert first(values).item() == second(values).item()
    assert int(first.step) == int(second.step)


def test_built_from_registry() -> None:
    assert isinstance(build_balancer("gls", TASKS), GeometricMean)


def test_matches_torchjd_geometric_mean() -> None:
    scalarization = pytest.importorskip("torchjd.scalarization")
    values = [0.2, 1.5, 40.0]

    ours = GeometricMean(TASKS)(_losses(values))
    peer = scalarization.GeometricMean()(torch.tensor(values, dtype=torch.float64))

    assert ours.item() == pytest.approx(peer.item(), rel=1e-12)
