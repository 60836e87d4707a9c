"""Tests of dynamic weight average."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import DWA, build_balancer

TASKS = ("segmentation", "depth", "normals")


def _losses(values: list[float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(TASKS, values)}


def _dwa_weights(recent: list[float], earlier: list[float], temperature: float = 2.0) -> list[float]:
    """The DWA formula in plain Python floats."""
    exponentials = [math.exp(r / e / temperature) for r, e in zip(recent, earlier)]
    return [len(recent) * value / sum(exponentials) for value in exponentials]


def _mean(rows: list[list[float]], column: int) -> float:
    return sum(row[column] for row in rows) / len(rows)


EPOCH_1 = [[2.0, 1.0, 0.5], [1.8, 0.9, 0.45], [1.6, 0.95, 0.4]]
EPOCH_2 = [[1.2, 0.8, 0.1], [1.0, 0.85, 0.08], [1.1, 0.7, 0.07]]
EPOCH_3 = [[0.9, 0.7, 0.05], [0.8, 0.6, 0.06]]


def _run_epochs(balancer: DWA, epochs: list[list[list[float]]], *, call_end_epoch: bool) -> list[list[float]]:
    seen = []
    for epoch in epochs:
        for values in epoch:
            balancer(_losses(values))
            seen.append([balancer.weights[name] for name in TASKS])
        if call_end_epoch:
            balancer.end_epoch()
    return seen


def test_first_two_epochs_weight_one() -> None:
    balancer = DWA(TASKS).double()

    seen = _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)

    assert all(weight == 1.0 for weights in seen for weight in weights)


def test_third_epoch_weights_match_formula() -> None:
    balancer = DWA(TASKS).double()
    _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)

    seen = _run_epochs(balancer, [EPOCH_3], call_end_epoch=False)

    recent = [_mean(EPOCH_2, i) for i in range(3)]
    earlier = [_mean(EPOCH_1, i) for i in range(3)]
    expected = _dwa_weights(recent, earlier)
    for weights in seen:
        assert weights == pytest.approx(expected, rel=1e-12)


def test_third_epoch_total_matches_formula() -> None:
    balancer = DWA(TASKS, temperature=0.5).double()
    _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)

    total = balancer(_losses([0.3, 0.2, 0.1]))

    recent = [_mean(EPOCH_2, i) for i in range(3)]
    earlier = [_mean(EPOCH_1, i) for i in range(3)]
    expected = sum(w * loss for w, loss in zip(_dwa_weights(recent, earlier, 0.5), [0.3, 0.2, 0.1]))
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_slowest_falling_task_gets_largest_weight() -> None:
    balancer = DWA(TASKS).double()
    _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)

    balancer(_losses([1.0, 1.0, 1.0]))

    # depth fell least (ratio ~0.83), normals most (~0.18).
    assert balancer.weights["depth"] > balancer.weights["segmentation"] > balancer.weights["normals"]


def test_steps_per_epoch_same_as_end_epoch() -> None:
    manual = DWA(TASKS).double()
    automatic = DWA(TASKS, steps_per_epoch=3).double()

    manual_weights = _run_epochs(manual, [EPOCH_1, EPOCH_2, EPOCH_2], call_end_epoch=True)
    automatic_weights = _run_epochs(automatic, [EPOCH_1, EPOCH_2, EPOCH_2], call_end_epoch=False)

    assert automatic_weights == manual_weights
    assert automatic.periods_completed == 3


def test_window_weights_match_sliding_means() -> None:
    window = 2
    rows = [[2.0, 1.0, 0.5], [1.9, 1.0, 0.4], [1.5, 0.9, 0.3], [1.4, 0.95, 0.2], [1.0, 0.9, 0.15], [0.9, 0.8, 0.1], [0.7, 0.8, 0.09]]
    balancer = DWA(TASKS, window=window).double()

    for t, values in enumerate(rows):
        balancer(_losses(values))
        observed = [balancer.weights[name] for name in TASKS]

        if t < 2 * window:
            assert observed == [1.0, 1.0, 1.0]
            continue
        recent = [_mean(rows[t - window : t], i) for i in range(3)]
        earlier = [_mean(rows[t - 2 * window : t - window], i) for i in range(3)]
        assert observed == pytest.approx(_dwa_weights(recent, earlier), rel=1e-12)


def test_end_epoch_does_nothing_with_window() -> None:
    balancer = DWA(TASKS, window=1).double()
    for values in EPOCH_1:
        balancer(_losses(values))
    before = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in balancer.state_dict().items()}

    balancer.end_epoch()

    after = balancer.state_dict()
    assert torch.equal(before["window_losses"], after["window_losses"])
    assert before["_extra_state"] == after["_extra_state"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=1e-3, max_value=1e3)),
        min_size=1,
        max_size=8,
    ),
    st.floats(min_value=0.05, max_value=10.0),
)
def test_weights_positive_and_sum_to_task_count(averages: list[tuple[float, float]], temperature: float) -> None:
    names = [f"task{i}" for i in range(len(averages))]
    balancer = DWA(names, temperature=temperature).double()
    for period in range(2):
        balancer({name: torch.tensor(pair[period], dtype=torch.float64) for name, pair in zip(names, averages)})
        balancer.end_epoch()

    balancer({name: torch.tensor(1.0, dtype=torch.float64) for name in names})

    weights = list(balancer.weights.values())
    assert min(weights) >= 0.0
    assert sum(weights) == pytest.approx(len(names), rel=1e-9)
    ratios = [recent / earlier for earlier, recent in averages]
    if (max(ratios) - min(ratios)) / temperature < 500:
        # Otherwise exp() of the spread underflows in float64 and the smallest weight rounds to 0.
        assert min(weights) > 0.0


def test_missing_task_not_renormalised() -> None:
    balancer = DWA(TASKS).double()
    _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)
    balancer(_losses([1.0, 1.0, 1.0]))
    full = balancer.weights

    total = balancer({"segmentation": torch.tensor(2.0, dtype=torch.float64)})

    assert balancer.weights == {"segmentation": full["segmentation"]}
    assert total.item() == pytest.approx(2.0 * full["segmentation"], rel=1e-12)


def test_task_absent_for_an_epoch_gets_ratio_one() -> None:
    balancer = DWA(TASKS).double()
    for values in EPOCH_1:
        balancer(_losses(values))
    balancer.end_epoch()
    for values in EPOCH_2:
        balancer({"segmentation": torch.tensor(values[0], dtype=torch.float64), "depth": torch.tensor(values[1], dtype=torch.float64)})
    balancer.end_epoch()

    balancer(_losses([1.0, 1.0, 1.0]))

    recent = [_mean(EPOCH_2, 0), _mean(EPOCH_2, 1), 1.0]
    earlier = [_mean(EPOCH_1, 0), _mean(EPOCH_1, 1), 1.0]
    assert [balancer.weights[name] for name in TASKS] == pytest.approx(_dwa_weights(recent, earlier), rel=1e-12)


def test_nan_loss_not_recorded() -> None:
    balancer = DWA(TASKS).double()

    balancer({"segmentation": torch.tensor(math.nan, dtype=torch.float64), "depth": torch.tensor(2.0, dtype=torch.float64)})
    balancer({"segmentation": torch.tensor(4.0, dtype=torch.float64), "depth": torch.tensor(1.0, dtype=torch.float64)})
    balancer.end_epoch()

    assert balancer.last_average[0].item() == 4.0
    assert balancer.last_average[1].item() == 1.5
    assert math.isnan(balancer.last_average[2].item())


def test_epoch_averages_pass_through_reduce() -> None:
    # A second rank that saw segmentation losses 2 and 4 and depth 1 in its first step only. Each
    # call reduces one flag per task (non-finite losses, none here) and then the step's losses and counts.
    other_steps = [
        torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64),
        torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64),
    ]

    def mean_with_other_rank(local: torch.Tensor) -> torch.Tensor:
        other = torch.zeros_like(local) if local.dim() == 1 else other_steps.pop(0)
        return (local + other) / 2

    balancer = DWA(TASKS).double()
    balancer.set_reduce_fn(mean_with_other_rank)

    balancer(_losses([1.0, 3.0, 5.0]))
    balancer(_losses([2.0, 5.0, 7.0]))
    balancer.end_epoch()

    assert not other_steps
    expected = torch.tensor([(3.0 + 6.0) / 4, (8.0 + 1.0) / 3, 12.0 / 2], dtype=torch.float64)
    torch.testing.assert_close(balancer.last_average, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("options", [{}, {"window": 2}, {"steps_per_epoch": 2}])
def test_state_round_trip(options: dict[str, int]) -> None:
    first = DWA(TASKS, **options).double()
    _run_epochs(first, [EPOCH_1, EPOCH_2[:2]], call_end_epoch=not options)
    second = DWA(TASKS, **options).double()
    second.load_state_dict(first.state_dict())

    for values in EPOCH_2 + EPOCH_3:
        assert first(_losses(values)).item() == second(_losses(values)).item()
        assert first.weights == second.weights
        if not options:
            first.end_epoch()
            second.end_epoch()


def test_invalid_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="both"):
        DWA(TASKS, steps_per_epoch=10, window=5)
    with pytest.raises(ValueError, match="temperature"):
        DWA(TASKS, temperature=0.0)
    with pytest.raises(ValueError, match="window"):
        DWA(TASKS, window=0)


def test_built_from_registry() -> None:
    balancer = build_balancer("dwa", TASKS, temperature=3.0, window=4)

    assert isinstance(balancer, DWA)
    assert balancer.temperature == 3.0
    assert balancer.window == 4


def test_matches_torchjd_dwa() -> None:
    scalarization = pytest.importorskip("torchjd.scalarization")
    ours = DWA(TASKS, temperature=1.5).double()
    peer = scalarization.DWA(temperature=1.5)

    for epoch in [EPOCH_1, EPOCH_2, EPOCH_3, EPOCH_2]:
        for values in epoch:
            total = ours(_losses(values))
            peer_total = peer(torch.tensor(values, dtype=torch.float64))
            assert total.item() == pytest.approx(peer_total.item(), rel=1e-12)
        ours.end_epoch()
        peer.step()


def test_task_weights_preview_next_call() -> None:
    balancer = DWA(TASKS).double()
    _run_epochs(balancer, [EPOCH_1, EPOCH_2], call_end_epoch=True)

    preview = balancer.task_weights()
    balancer(_losses([1.0, 1.0, 1.0]))

    assert preview == balancer.weights
