"""Task-mixing probabilities: exact values from each strategy's formula, and empirical task frequencies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from multitune.data import (
    MixingSpec,
    MixingStage,
    MultiTaskSampler,
    annealed_probabilities,
    annealing_alpha,
    proportional_probabilities,
    task_probabilities,
    temperature_probabilities,
)

SMALL = [2, 8]
SKEWED = [500, 50_000]


def normalised(values: list[float]) -> list[float]:
    total = math.fsum(values)
    return [value / total for value in values]


@pytest.mark.parametrize("sizes", [SMALL, SKEWED])
def test_proportional_matches_size_ratio(sizes: list[int]) -> None:
    expected = normalised([float(n) for n in sizes])
    assert task_probabilities("proportional", sizes) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("sizes", "cap"), [(SMALL, 4), (SKEWED, 1000), (SKEWED, 10**6)])
def test_proportional_cap_limits_large_tasks(sizes: list[int], cap: int) -> None:
    expected = normalised([float(min(n, cap)) for n in sizes])
    assert proportional_probabilities(sizes, cap) == pytest.approx(expected, abs=1e-15)


def test_proportional_cap_values() -> None:
    assert proportional_probabilities(SMALL, 4) == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    assert proportional_probabilities(SKEWED, 1000) == pytest.approx([1 / 3, 2 / 3], abs=1e-15)


@pytest.mark.parametrize("sizes", [SMALL, SKEWED])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0, 10.0])
def test_temperature_matches_power_formula(sizes: list[int], temperature: float) -> None:
    expected = normalised([float(n) ** (1.0 / temperature) for n in sizes])
    assert temperature_probabilities(sizes, temperature) == pytest.approx(expected, rel=1e-12)


def test_temperature_two_values() -> None:
    # sqrt(8) / sqrt(2) = 2 and sqrt(50000) / sqrt(500) = 10.
    assert task_probabilities("temperature", SMALL, temperature=2.0) == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    assert task_probabilities("temperature", SKEWED, temperature=2.0) == pytest.approx([1 / 11, 10 / 11], abs=1e-15)


def test_temperature_one_is_proportional() -> None:
    assert temperature_probabilities(SKEWED, 1.0) == pytest.approx(proportional_probabilities(SKEWED), abs=1e-15)


def test_temperature_infinite_is_uniform() -> None:
    assert temperature_probabilities(SKEWED, math.inf) == [0.5, 0.5]
    assert temperature_probabilities(SKEWED, 1e9) == pytest.approx([0.5, 0.5], abs=1e-8)


def test_temperature_with_cap() -> None:
    expected = normalised([min(n, 1000) ** 0.5 for n in SKEWED])
    assert temperature_probabilities(SKEWED, 2.0, cap=1000) == pytest.approx(expected, rel=1e-12)


def test_temperature_small_does_not_overflow() -> None:
    probabilities = temperature_probabilities(SKEWED, 0.01)
    assert all(math.isfinite(p) for p in probabilities)
    # p_0 / p_1 = (500 / 50000) ** 100 = 1e-200, while 50000 ** 100 alone overflows float64.
    assert probabilities[0] == pytest.approx(1e-200, rel=1e-9)
    assert probabilities[1] == 1.0


@pytest.mark.parametrize("strategy", ["uniform", "round_robin"])
def test_uniform_strategies(strategy: str) -> None:
    assert task_probabilities(strategy, SKEWED) == [0.5, 0.5]
    assert task_probabilities(strategy, [3, 4, 5, 6]) == [0.25] * 4


def test_weights_normalised() -> None:
    assert task_probabilities("weights", SMALL, weights=[1.0, 3.0]) == pytest.approx([0.25, 0.75], abs=1e-15)
    by_name = task_probabilities("weights", {"a": 2, "b": 8}, weights={"b": 1.0, "a": 4.0})
    assert by_name == pytest.approx({"a": 0.8, "b": 0.2}, abs=1e-15)
    assert list(by_name) == ["a", "b"]


@pytest.mark.parametrize(("epoch", "alpha"), [(1, 1.0), (2, 0.8), (3, 0.6), (4, 0.4), (5, 0.2)])
def test_annealing_alpha_schedule(epoch: int, alpha: float) -> None:
    assert annealing_alpha(epoch, 5) == pytest.approx(alpha, abs=1e-15)


def test_annealing_alpha_single_epoch_and_clipping() -> None:
    assert annealing_alpha(1, 1) == 1.0
    assert annealing_alpha(9, 5) == pytest.approx(0.2, abs=1e-15)
    assert annealing_alpha(0, 5) == 1.0


@pytest.mark.parametrize("sizes", [SMALL, SKEWED])
@pytest.mark.parametrize("epoch", [1, 2, 3, 4, 5])
def test_annealed_matches_formula(sizes: list[int], epoch: int) -> None:
    alpha = 1.0 - 0.8 * (epoch - 1) / (5 - 1)
    expected = normalised([float(n) ** alpha for n in sizes])
    assert annealed_probabilities(sizes, epoch, 5) == pytest.approx(expected, rel=1e-12)
    assert task_probabilities("annealed", sizes, epoch=epoch, num_epochs=5) == pytest.approx(expected, rel=1e-12)


def test_annealed_first_epoch_is_proportional() -> None:
    assert annealed_probabilities(SKEWED, 1, 3) == pytest.approx(proportional_probabilities(SKEWED), rel=1e-12)


def test_all_tasks_share_follows_batch_sizes() -> None:
    assert task_probabilities("all_tasks", SMALL, batch_sizes=[4, 12]) == pytest.approx([0.25, 0.75], abs=1e-15)
    assert task_probabilities("all_tasks", SMALL) == [0.5, 0.5]


def test_mapping_in_gives_mapping_out() -> None:
    result = task_probabilities("proportional", {"x": 2, "y": 8})
    assert result == pytest.approx({"x": 0.2, "y": 0.8}, abs=1e-15)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: task_probabilities("proportional", [0, 5]), "integers >= 1"),
        (lambda: task_probabilities("proportional", []), "non-empty"),
        (lambda: task_probabilities("weights", SMALL), "needs weights"),
        (lambda: task_probabilities("weights", SMALL, weights=[0.0, 0.0]), "not all zero"),
        (lambda: task_probabilities("weights", {"a": 1, "b": 2}, weights={"a": 1.0}), "no value for task(s) ['b']"),
        (lambda: task_probabilities("annealed", SMALL), "num_epochs"),
        (lambda: task_probabilities("nope", SMALL), "unknown mixing strategy 'nope'"),  # type: ignore[call-overload]
        (lambda: temperature_probabilities(SMALL, 0.0), "temperature must be > 0"),
    ],
)
def test_invalid_arguments_rejected(call, message: str) -> None:
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


def test_mixing_spec_rejects_unknown_field() -> None:
    with pytest.raises(ValidationError) as error:
        MixingSpec.model_validate({"strategy": "uniform", "temprature": 2.0})
    assert "temprature" in str(error.value)


def test_mixing_spec_rejects_unordered_stages() -> None:
    with pytest.raises(ValidationError) as error:
        MixingSpec(stages=[MixingStage(start_step=10), MixingStage(start_step=5)])
    assert "strictly increasing" in str(error.value)


def test_mixing_spec_rejects_negative_weight() -> None:
    with pytest.raises(ValidationError) as error:
        MixingSpec(strategy="weights", weights={"a": -1.0})
    assert "weights['a']" in str(error.value)


def test_mixing_spec_options_at_step() -> None:
    spec = MixingSpec(strategy="uniform", stages=[MixingStage(start_step=5, strategy="temperature", temperature=3.0)])
    assert spec.options_at(4).strategy == "uniform"
    assert spec.options_at(5).strategy == "temperature"
    assert spec.options_at(500).temperature == 3.0


# Empirical frequencies ------------------------------------------------------------------------


CHI_SQUARE_SIZES = {"small": 500, "large": 50_000, "medium": 5_000}


@pytest.mark.parametrize(
    "mixing",
    [
        MixingSpec(strategy="temperature", temperature=2.0),
        MixingSpec(strategy="proportional", cap=8_000),
        MixingSpec(strategy="weights", weights={"small": 1.0, "large": 2.0, "medium": 5.0}),
    ],
    ids=["temperature", "proportional-cap", "weights"],
)
def test_mixed_steps_follow_probabilities(mixing: MixingSpec) -> None:
    draws = 20_000
    sampler = MultiTaskSampler(CHI_SQUARE_SIZES, mixing, batch_size=20, seed=3, max_steps=draws // 20, world_size=1, rank=0)
    counts = dict.fromkeys(CHI_SQUARE_SIZES, 0)
    for step in sampler:
        for task, indices in step.items():
            counts[task] += len(indices)

    probabilities = sampler.probabilities()
    observed = np.array([counts[name] for name in CHI_SQUARE_SIZES], dtype=np.float64)
    expected = np.array([probabilities[name] * draws for name in CHI_SQUARE_SIZES])
    assert observed.sum() == draws
    assert chisquare(observed, expected).pvalue > 1e-3


def test_homogeneous_micro_batches_follow_probabilities() -> None:
    draws = 20_000
    mixing = MixingSpec(strategy="temperature", temperature=3.0, step_shape="homogeneous", micro_batches_per_step=4)
    sampler = MultiTaskSampler(CHI_SQUARE_SIZES, mixing, batch_size=1, seed=11, max_steps=draws // 4, world_size=1, rank=0)
    counts = dict.fromkeys(CHI_SQUARE_SIZES, 0)
    for step in sampler:
        for micro_batch in step:
            (task,) = micro_batch
            counts[task] += 1

    expected_p = normalised([float(n) ** (1 / 3) for n in CHI_SQUARE_SIZES.values()])
    observed = np.array(list(counts.values()), dtype=np.float64)
    assert observed.sum() == draws
    assert chisquare(observed, np.array(expected_p) * draws).pvalue > 1e-3


def test_frequencies_reject_wrong_probabilities() -> None:
    # The same counts tested against proportional probabilities must fail, so the check above can fail.
    draws = 20_000
    sampler = MultiTaskSampler(
        CHI_SQUARE_SIZES, MixingSpec(strategy="uniform"), batch_size=20, seed=3, max_steps=draws // 20, world_size=1, rank=0
    )
    counts = dict.fromkeys(CHI_SQUARE_SIZES, 0)
    for step in sampler:
        for task, indices in step.items():
            counts[task] += len(indices)
    observed = np.array(list(counts.values()), dtype=np.float64)
    wrong = np.array(normalised([float(n) for n in CHI_SQUARE_SIZES.values()])) * draws
    assert chisquare(observed, wrong).pvalue < 1e-6
