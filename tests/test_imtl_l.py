"""Tests of IMTL-L (learnable loss scales with the -s regulariser)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import IMTLL, build_balancer

TASKS = ("sentiment", "topic", "rating")


def _losses(values: list[float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(TASKS, values)}


def _balancer(log_scales: list[float]) -> IMTLL:
    balancer = IMTLL(TASKS).double()
    with torch.no_grad():
        balancer.log_scales.copy_(torch.tensor(log_scales, dtype=torch.float64))
    return balancer


def test_total_matches_formula() -> None:
    log_scales = [-0.7, 0.0, 1.3]
    values = [2.5, 0.4, 0.05]
    balancer = _balancer(log_scales)

    total = balancer(_losses(values))

    expected = sum(math.exp(s) * loss - s for s, loss in zip(log_scales, values))
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_weights_are_exp_scales() -> None:
    log_scales = [-0.7, 0.0, 1.3]
    balancer = _balancer(log_scales)

    balancer(_losses([2.5, 0.4, 0.05]))

    for name, s in zip(TASKS, log_scales):
        assert balancer.weights[name] == pytest.approx(math.exp(s), rel=1e-12)


def test_scale_gradient_matches_formula() -> None:
    log_scales = [-0.7, 0.0, 1.3]
    values = [2.5, 0.4, 0.05]
    balancer = _balancer(log_scales)

    balancer(_losses(values)).backward()

    assert balancer.log_scales.grad is not None
    expected = [math.exp(s) * loss - 1.0 for s, loss in zip(log_scales, values)]
    torch.testing.assert_close(balancer.log_scales.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_negative_total_is_kept() -> None:
    balancer = _balancer([3.0, 3.0, 3.0])

    total = balancer(_losses([1e-3, 1e-3, 1e-3]))

    assert total.item() == pytest.approx(3 * (math.exp(3.0) * 1e-3 - 3.0), rel=1e-12)
    assert total.item() < 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=1e-4, max_value=1e4), min_size=3, max_size=3))
def test_optimum_scales_every_loss_to_one(values: list[float]) -> None:
    balancer = _balancer([-math.log(value) for value in values])

    balancer(_losses(values)).backward()

    assert balancer.log_scales.grad is not None
    assert balancer.log_scales.grad.abs().max().item() < 1e-9
    for name, value in zip(TASKS, values):
        assert balancer.weights[name] * value == pytest.approx(1.0, rel=1e-9)


def test_training_scales_reaches_inverse_losses() -> None:
    balancer = IMTLL(TASKS).double()
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)
    values = [4.0, 0.5, 0.02]

    for _ in range(1500):
        optimizer.zero_grad()
        balancer(_losses(values)).backward()
        optimizer.step()

    expected = torch.tensor([-math.log(value) for value in values], dtype=torch.float64)
    torch.testing.assert_close(balancer.log_scales.detach(), expected, rtol=0, atol=1e-3)


def test_missing_task_gets_no_gradient() -> None:
    balancer = _balancer([0.5, 0.5, 0.5])

    balancer({"sentiment": torch.tensor(2.0, dtype=torch.float64), "rating": torch.tensor(3.0, dtype=torch.float64)}).backward()

    assert balancer.log_scales.grad is not None
    assert balancer.log_scales.grad[1].item() == 0.0
    assert balancer.log_scales.grad[0].item() != 0.0
    assert set(balancer.weights) == {"sentiment", "rating"}


def test_nan_loss_gets_no_gradient() -> None:
    balancer = _balancer([0.0, 0.0, 0.0])

    total = balancer({"sentiment": torch.tensor(math.nan, dtype=torch.float64), "topic": torch.tensor(2.0, dtype=torch.float64)})
    total.backward()

    assert math.isfinite(total.item())
    assert balancer.log_scales.grad is not None
    assert balancer.log_scales.grad[0].item() == 0.0
    assert balancer.nonfinite_counts == {"sentiment": 1}


def test_state_round_trip() -> None:
    first = IMTLL(TASKS)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    for values in ([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]):
        optimizer.zero_grad()
        first({name: torch.tensor(value) for name, value in zip(TASKS, values)}).backward()
        optimizer.step()
    second = IMTLL(TASKS)
    second.load_state_dict(first.state_dict())

    losses = {name: torch.tensor(value) for name, value in zip(TASKS, [0.3, 0.6, 0.9])}

    assert first(losses).item() == second(losses).item()
    assert first.weights == second.weights
    assert int(first.step) == int(second.step) == 3


def test_init_log_scale_and_registry() -> None:
    balancer = build_balancer("imtl_l", TASKS, init_log_scale=0.5)

    assert isinstance(balancer, IMTLL)
    torch.testing.assert_close(balancer.log_scales.detach(), torch.full((3,), 0.5))


def test_matches_torchjd_imtll() -> None:
    scalarization = pytest.importorskip("torchjd.scalarization")
    log_scales = [-0.7, 0.0, 1.3]
    values = [2.5, 0.4, 0.05]
    ours = _balancer(log_scales)
    peer = scalarization.IMTLL(3).double()
    with torch.no_grad():
        peer.log_scale.copy_(torch.tensor(log_scales, dtype=torch.float64))

    total = ours(_losses(values))
    total.backward()
    peer_total = peer(torch.tensor(values, dtype=torch.float64))
    peer_total.backward()

    assert total.item() == pytest.approx(peer_total.item(), rel=1e-12)
    assert ours.log_scales.grad is not None
    assert peer.log_scale.grad is not None
    torch.testing.assert_close(ours.log_scales.grad, peer.log_scale.grad, rtol=1e-12, atol=1e-14)
