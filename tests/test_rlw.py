"""Tests of random loss weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.balancing import RLW, build_balancer

TASKS = ("ner", "pos", "chunk", "sentiment")


def _losses(values: list[float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(TASKS, values)}


def _expected_weights(distribution: str, seed: int, draws: int, *, alpha: float = 1.0) -> list[np.ndarray]:
    """Weights from an independent generator with the same seed, in float64."""
    generator = np.random.default_rng(seed)
    weights = []
    for _ in range(draws):
        if distribution == "normal":
            z = generator.standard_normal(len(TASKS))
            simplex = np.exp(z) / np.exp(z).sum()
        elif distribution == "dirichlet":
            simplex = generator.dirichlet([alpha] * len(TASKS))
        else:
            u = generator.uniform(0.0, 1.0, len(TASKS))
            simplex = u / u.sum()
        weights.append(len(TASKS) * simplex)
    return weights


@pytest.mark.parametrize("distribution", ["normal", "dirichlet", "uniform"])
def test_weights_match_independent_draws(distribution: str) -> None:
    balancer = RLW(TASKS, distribution=distribution, alpha=0.5, seed=7)  # type: ignore[arg-type]
    values = [0.3, 1.2, 2.5, 0.8]

    expected = _expected_weights(distribution, 7, 3, alpha=0.5)
    for step_weights in expected:
        total = balancer(_losses(values))

        assert [balancer.weights[name] for name in TASKS] == pytest.approx(step_weights.tolist(), rel=1e-12)
        assert total.item() == pytest.approx(float(np.dot(step_weights, values)), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    num_tasks=st.integers(min_value=1, max_value=12),
    distribution=st.sampled_from(["normal", "dirichlet", "uniform"]),
    alpha=st.floats(min_value=0.05, max_value=20.0),
)
def test_weights_positive_and_sum_to_task_count(seed: int, num_tasks: int, distribution: str, alpha: float) -> None:
    names = [f"task{i}" for i in range(num_tasks)]
    balancer = RLW(names, distribution=distribution, alpha=alpha, seed=seed)  # type: ignore[arg-type]

    for _ in range(3):
        balancer({name: torch.tensor(1.0) for name in names})
        weights = list(balancer.weights.values())

        assert min(weights) >= 0.0
        assert sum(weights) == pytest.approx(num_tasks, rel=1e-9)


def test_mean_weight_is_one() -> None:
    balancer = RLW(TASKS, seed=3)

    draws = torch.stack([balancer.sample_weights() for _ in range(20000)])

    torch.testing.assert_close(draws.mean(dim=0), torch.ones(len(TASKS), dtype=torch.float64), rtol=0, atol=0.03)


def test_state_round_trip_continues_same_draws() -> None:
    first = RLW(TASKS, seed=11)
    for _ in range(5):
        first(_losses([1.0, 1.0, 1.0, 1.0]))
    second = RLW(TASKS, seed=99)
    second.load_state_dict(first.state_dict())

    for _ in range(5):
        first(_losses([1.0, 2.0, 3.0, 4.0]))
        second(_losses([1.0, 2.0, 3.0, 4.0]))
        assert first.weights == second.weights
    assert second.seed == 11


def test_missing_task_keeps_other_weights() -> None:
    full = RLW(TASKS, seed=5)
    partial = RLW(TASKS, seed=5)

    full(_losses([1.0, 1.0, 1.0, 1.0]))
    total = partial({"ner": torch.tensor(2.0, dtype=torch.float64), "chunk": torch.tensor(3.0, dtype=torch.float64)})

    assert set(partial.weights) == {"ner", "chunk"}
    assert partial.weights["ner"] == full.weights["ner"]
    assert partial.weights["chunk"] == full.weights["chunk"]
    assert total.item() == pytest.approx(2.0 * full.weights["ner"] + 3.0 * full.weights["chunk"], rel=1e-12)


def test_nan_loss_skipped() -> None:
    balancer = RLW(TASKS, seed=1)

    total = balancer({"ner": torch.tensor(math.nan), "pos": torch.tensor(2.0)})

    assert math.isfinite(total.item())
    assert set(balancer.weights) == {"pos"}


def test_default_seed_is_torch_initial_seed() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1234)

        assert RLW(TASKS).seed == 1234


def test_same_seed_same_draws_different_seed_differs() -> None:
    first = RLW(TASKS, seed=2).sample_weights()
    second = RLW(TASKS, seed=2).sample_weights()
    other = RLW(TASKS, seed=3).sample_weights()

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_invalid_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="distribution"):
        RLW(TASKS, distribution="bernoulli")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        RLW(TASKS, distribution="dirichlet", alpha=0.0)


def test_built_from_registry() -> None:
    balancer = build_balancer("rlw", TASKS, distribution="dirichlet", seed=0)

    assert isinstance(balancer, RLW)
    assert balancer.distribution == "dirichlet"
