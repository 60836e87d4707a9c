"""Tests of the scale-invariant balancer (sum of log losses)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import ScaleInvariant, build_balancer

TASKS = ("depth", "segmentation", "normals")


def _losses(values: list[float], *, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64, requires_grad=requires_grad) for name, value in zip(TASKS, values)}


def test_total_is_sum_of_logs() -> None:
    balancer = ScaleInvariant(TASKS)
    values = [0.25, 3.0, 17.5]

    total = balancer(_losses(values))

    assert total.item() == pytest.approx(math.log(0.25) + math.log(3.0) + math.log(17.5), rel=1e-12)


def test_weights_are_inverse_losses() -> None:
    balancer = ScaleInvariant(TASKS)
    values = [0.25, 3.0, 17.5]

    balancer(_losses(values))

    for name, value in zip(TASKS, values):
        assert balancer.weights[name] == pytest.approx(1.0 / value, rel=1e-12)


def test_loss_gradients_are_inverse_losses() -> None:
    balancer = ScaleInvariant(TASKS)
    losses = _losses([0.5, 2.0, 8.0], requires_grad=True)

    balancer(losses).backward()

    for loss in losses.values():
        assert loss.grad is not None
        assert loss.grad.item() == pytest.approx(1.0 / loss.item(), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    scales=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=3, max_size=3),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_gradient_invariant_to_loss_scaling(scales: list[float], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, dtype=torch.float64, generator=generator)
    targets = torch.randn(3, 4, dtype=torch.float64, generator=generator)

    def gradient(factors: list[float]) -> torch.Tensor:
        parameters = theta.clone().requires_grad_(True)
        losses = {name: factor * ((parameters - targets[i]) ** 2).sum() for i, (name, factor) in enumerate(zip(TASKS, factors))}
        ScaleInvariant(TASKS)(losses).backward()
        assert parameters.grad is not None
        return parameters.grad

    torch.testing.assert_close(gradient(scales), gradient([1.0, 1.0, 1.0]), rtol=1e-9, atol=1e-12)


def test_missing_task_left_out() -> None:
    balancer = ScaleInvariant(TASKS)

    total = balancer({"depth": torch.tensor(2.0), "normals": torch.tensor(5.0)})

    assert total.item() == pytest.approx(math.log(2.0) + math.log(5.0), rel=1e-6)
    assert set(balancer.weights) == {"depth", "normals"}


def test_nonpositive_loss_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    balancer = ScaleInvariant(TASKS)
    losses = {"depth": torch.tensor(0.0), "segmentation": torch.tensor(4.0)}

    with caplog.at_level(logging.WARNING):
        first = balancer(losses)
        balancer(losses)

    assert first.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert set(balancer.weights) == {"segmentation"}
    assert balancer.nonpositive_counts == {"depth": 2}
    assert sum("'depth'" in record.getMessage() for record in caplog.records) == 1


def test_nonpositive_loss_raises_when_asked() -> None:
    balancer = ScaleInvariant(TASKS, on_nonpositive="raise")

    with pytest.raises(ValueError, match="'segmentation'.*not positive"):
        balancer({"depth": torch.tensor(1.0), "segmentation": torch.tensor(-0.5)})


def test_all_nonpositive_gives_zero_gradient() -> None:
    balancer = ScaleInvariant(TASKS)
    loss = torch.tensor(0.0, requires_grad=True)

    total = balancer({"depth": loss})
    total.backward()

    assert total.item() == 0.0
    assert loss.grad is not None
    assert loss.grad.item() == 0.0
    assert balancer.weights == {}


def test_nan_loss_skipped() -> None:
    balancer = ScaleInvariant(TASKS)

    total = balancer({"depth": torch.tensor(math.nan), "segmentation": torch.tensor(3.0)})

    assert total.item() == pytest.approx(math.log(3.0), rel=1e-6)
    assert balancer.nonfinite_counts == {"depth": 1}


def test_state_round_trip() -> None:
    first = ScaleInvariant(TASKS)
    first(_losses([1.0, 2.0, 3.0]))
    second = ScaleInvariant(TASKS)
    second.load_state_dict(first.state_dict())

    values = _losses([0.5, 4.0, 9.0])

    assert first(values).item() == second(values).item()
    assert int(first.step) == int(second.step) == 2


def test_built_from_registry() -> None:
    balancer = build_balancer("scale_invariant", TASKS, on_nonpositive="raise")

    assert isinstance(balancer, ScaleInvariant)
    assert balancer.on_nonpositive == "raise"


def test_invalid_policy_rejected() -> None:
    with pytest.raises(ValueError, match="on_nonpositive"):
        ScaleInvariant(TASKS, on_nonpositive="clip")  # type: ignore[arg-type]
