"""Tests of uncertainty weighting (learned homoscedastic log-variances)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import UncertaintyWeighting, build_balancer

TASKS = ("depth", "semantic", "instance")


def _losses(values: list[float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(TASKS, values)}


def _balancer(log_variances: list[float], **kwargs: object) -> UncertaintyWeighting:
    balancer = UncertaintyWeighting(TASKS, **kwargs).double()  # type: ignore[arg-type]
    with torch.no_grad():
        balancer.log_variances.copy_(torch.tensor(log_variances, dtype=torch.float64))
    return balancer


def test_regression_form_by_default() -> None:
    log_variances = [-1.2, 0.4, 2.0]
    values = [3.0, 0.7, 0.01]
    balancer = _balancer(log_variances)

    total = balancer(_losses(values))

    expected = sum(0.5 * math.exp(-s) * loss + 0.5 * s for s, loss in zip(log_variances, values))
    assert total.item() == pytest.approx(expected, rel=1e-12)
    for name, s in zip(TASKS, log_variances):
        assert balancer.weights[name] == pytest.approx(0.5 * math.exp(-s), rel=1e-12)


def test_forms_chosen_per_task() -> None:
    log_variances = [-1.2, 0.4, 2.0]
    values = [3.0, 0.7, 0.01]
    balancer = _balancer(log_variances, task_types={"semantic": "classification", "instance": "multilabel"})

    total = balancer(_losses(values))

    regression = 0.5 * math.exp(1.2) * 3.0 + 0.5 * -1.2
    classification = math.exp(-0.4) * 0.7 + 0.5 * 0.4
    multilabel = math.exp(-2.0) * 0.01 + 0.5 * 2.0
    assert total.item() == pytest.approx(regression + classification + multilabel, rel=1e-12)
    assert balancer.weights["semantic"] == pytest.approx(math.exp(-0.4), rel=1e-12)
    assert balancer.weights["depth"] == pytest.approx(0.5 * math.exp(1.2), rel=1e-12)


def test_log_variance_gradient_matches_formula() -> None:
    log_variances = [-1.2, 0.4, 2.0]
    values = [3.0, 0.7, 0.01]
    balancer = _balancer(log_variances, task_types={"semantic": "token_classification"})

    balancer(_losses(values)).backward()

    expected = [
        -0.5 * math.exp(1.2) * 3.0 + 0.5,
        -math.exp(-0.4) * 0.7 + 0.5,
        -0.5 * math.exp(-2.0) * 0.01 + 0.5,
    ]
    assert balancer.log_variances.grad is not None
    torch.testing.assert_close(balancer.log_variances.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=1e-4, max_value=1e4), min_size=3, max_size=3))
def test_gradient_vanishes_at_optimum(values: list[float]) -> None:
    # Regression optimum s = log L; classification optimum s = log 2L.
    optimum = [math.log(values[0]), math.log(2 * values[1]), math.log(values[2])]
    balancer = _balancer(optimum, task_types={"semantic": "classification"})

    balancer(_losses(values)).backward()

    assert balancer.log_variances.grad is not None
    assert balancer.log_variances.grad.abs().max().item() < 1e-9


def test_negative_total_not_clipped() -> None:
    balancer = _balancer([-5.0, -5.0, -5.0])

    total = balancer(_losses([1e-4, 1e-4, 1e-4]))

    expected = 3 * (0.5 * math.exp(5.0) * 1e-4 - 2.5)
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert total.item() < 0


def test_missing_task_gets_no_gradient() -> None:
    balancer = _balancer([0.0, 0.0, 0.0])

    balancer({"depth": torch.tensor(2.0, dtype=torch.float64)}).backward()

    assert balancer.log_variances.grad is not None
    assert balancer.log_variances.grad[1:].abs().max().item() == 0.0
    assert set(balancer.weights) == {"depth"}


def test_nan_loss_skipped() -> None:
    balancer = _balancer([0.0, 0.0, 0.0])

    total = balancer({"depth": torch.tensor(math.nan, dtype=torch.float64), "semantic": torch.tensor(2.0, dtype=torch.float64)})
    total.backward()

    assert total.item() == pytest.approx(1.0, rel=1e-12)
    assert balancer.log_variances.grad is not None
    assert balancer.log_variances.grad[0].item() == 0.0


def test_state_round_trip() -> None:
    first = UncertaintyWeighting(TASKS, task_types={"semantic": "classification"})
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    for values in ([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]):
        optimizer.zero_grad()
        first({name: torch.tensor(value) for name, value in zip(TASKS, values)}).backward()
        optimizer.step()
    second = UncertaintyWeighting(TASKS, task_types={"semantic": "classification"})
    second.load_state_dict(first.state_dict())

    losses = {name: torch.tensor(value) for name, value in zip(TASKS, [0.3, 0.6, 0.9])}

    assert first(losses).item() == second(losses).item()
    assert first.weights == second.weights


def test_unknown_task_type_rejected() -> None:
    with pytest.raises(ValueError, match="'semantic'.*one of"):
        UncertaintyWeighting(TASKS, task_types={"semantic": "ranking"})  # type: ignore[dict-item]


def test_task_types_for_unknown_task_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        UncertaintyWeighting(TASKS, task_types={"edges": "regression"})


def test_built_from_registry() -> None:
    balancer = build_balancer("uncertainty", TASKS, init_log_variance=1.0)

    assert isinstance(balancer, UncertaintyWeighting)
    assert balancer.log_variances.detach().tolist() == [1.0, 1.0, 1.0]
    assert [parameter.shape for parameter in balancer.parameters()] == [torch.Size([3])]


def test_matches_torchjd_uw() -> None:
    scalarization = pytest.importorskip("torchjd.scalarization")
    log_variances = [-1.2, 0.4, 2.0]
    values = [3.0, 0.7, 0.01]
    ours = _balancer(log_variances)
    peer = scalarization.UW(3).double()
    with torch.no_grad():
        peer.log_var.copy_(torch.tensor(log_variances, dtype=torch.float64))

    total = ours(_losses(values))
    total.backward()
    peer_total = peer(torch.tensor(values, dtype=torch.float64))
    peer_total.backward()

    assert total.item() == pytest.approx(peer_total.item(), rel=1e-12)
    assert ours.log_variances.grad is not None
    assert peer.log_var.grad is not None
    torch.testing.assert_close(ours.log_variances.grad, peer.log_var.grad, rtol=1e-12, atol=1e-14)
