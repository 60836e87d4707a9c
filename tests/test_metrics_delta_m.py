"""Δm% against single-task baselines: hand examples, sign convention and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.metrics import delta_m, delta_m_terms


def test_delta_m_hand_example() -> None:
    metrics = {"topic/accuracy": 0.90, "score/rmse": 1.5, "tags/entity_f1": 0.60}
    baselines = {"topic/accuracy": 0.80, "score/rmse": 2.0, "tags/entity_f1": 0.75}
    higher = {"topic/accuracy": True, "score/rmse": False, "tags/entity_f1": True}

    # accuracy: -(0.90 - 0.80) / 0.80 = -12.5 %; rmse: +(1.5 - 2.0) / 2.0 = -25 %;
    # entity F1: -(0.60 - 0.75) / 0.75 = +20 %. Mean: (-12.5 - 25 + 20) / 3.
    expected = (-12.5 - 25.0 + 20.0) / 3

    assert delta_m(metrics, baselines, higher) == pytest.approx(expected)
    assert delta_m_terms(metrics, baselines, higher) == pytest.approx({"topic/accuracy": -12.5, "score/rmse": -25.0, "tags/entity_f1": 20.0})


def test_delta_m_matches_nash_mtl_formula() -> None:
    # The vectorised form used in the Nash-MTL experiments: mean((-1)**sign * (a - base) / base) * 100.
    base = np.array([0.3830, 0.6376, 0.6754, 0.2780])
    values = np.array([0.40, 0.65, 0.60, 0.30])
    sign = np.array([1, 1, 0, 0])
    expected = float(((-1.0) ** sign * (values - base) / base).mean() * 100.0)
    names = ["miou", "pixacc", "abs", "rel"]

    result = delta_m(dict(zip(names, values)), dict(zip(names, base)), dict(zip(names, sign.astype(bool))))

    assert result == pytest.approx(expected)


def test_better_model_has_negative_delta_m() -> None:
    assert delta_m({"acc": 0.9}, {"acc": 0.8}, {"acc": True}) < 0
    assert delta_m({"rmse": 0.9}, {"rmse": 1.0}, {"rmse": False}) < 0
    assert delta_m({"acc": 0.7}, {"acc": 0.8}, {"acc": True}) > 0


def test_negative_baseline_keeps_direction() -> None:
    # A correlation that improves from -0.5 to -0.25 is better, so its term must be negative.
    assert delta_m({"pearson": -0.25}, {"pearson": -0.5}, {"pearson": True}) == pytest.approx(-50.0)


def test_delta_m_missing_baseline_names_key() -> None:
    with pytest.raises(KeyError, match="metric 'score/rmse' has no baseline"):
        delta_m({"topic/accuracy": 0.9, "score/rmse": 1.0}, {"topic/accuracy": 0.8}, {"topic/accuracy": True, "score/rmse": False})


def test_delta_m_missing_direction_names_key() -> None:
    with pytest.raises(KeyError, match="metric 'acc' has no entry in higher_is_better"):
        delta_m({"acc": 0.9}, {"acc": 0.8}, {})


def test_delta_m_zero_baseline_names_key() -> None:
    with pytest.raises(ValueError, match="metric 'tags/entity_f1': baseline is 0.0"):
        delta_m({"tags/entity_f1": 0.4}, {"tags/entity_f1": 0.0}, {"tags/entity_f1": True})


def test_delta_m_rejects_nan_and_empty() -> None:
    with pytest.raises(ValueError, match="value is nan"):
        delta_m({"pearson": math.nan}, {"pearson": 0.5}, {"pearson": True})
    with pytest.raises(ValueError, match="metrics is empty"):
        delta_m({}, {}, {})


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.01, 100), st.booleans()), min_size=1, max_size=6),
    st.integers(0, 5),
    st.floats(0.001, 10),
)
def test_delta_m_properties(entries: list[tuple[float, bool]], index: int, step: float) -> None:
    names = [f"m{i}" for i in range(len(entries))]
    baselines = {name: value for name, (value, _) in zip(names, entries)}
    higher = {name: direction for name, (_, direction) in zip(names, entries)}

    assert delta_m(baselines, baselines, higher) == pytest.approx(0.0, abs=1e-12)

    improved = dict(baselines)
    name = names[index % len(names)]
    improved[name] = baselines[name] + step if higher[name] else baselines[name] * (1 - min(step, 0.5))
    assert delta_m(improved, baselines, higher) < 0
