r"""Task mixing: which tasks a training step draws from, and with which probabilities.

Every strategy turns the task sizes :math:`n_i` (training examples of task :math:`i`) into
sampling probabilities :math:`p_i`:

- ``proportional`` (examples-proportional mixing of T5, Raffel et al. 2020, "Exploring the
  Limits of Transfer Learning with a Unified Text-to-Text Transformer"):
  :math:`p_i = \min(n_i, K) / \sum_j \min(n_j, K)` with an optional cap :math:`K`;
- ``temperature`` (temperature-scaled mixing of the same paper):
  :math:`p_i \propto \min(n_i, K)^{1/T}`, so :math:`T = 1` is proportional and
  :math:`T \to \infty` uniform;
- ``uniform``: :math:`p_i = 1/N`;
- ``round_robin``: tasks in turn, one draw each, so the long-run frequencies are :math:`1/N`;
- ``weights``: :math:`p_i = w_i / \sum_j w_j` with explicit weights;
- ``annealed`` (Stickland & Murray 2019, "BERT and PALs: Projected Attention Layers for
  Efficient Adaptation in Multi-Task Learning"):
  :math:`p_i \propto n_i^{\alpha}` with :math:`\alpha = 1 - 0.8\,(e - 1)/(E - 1)` in epoch
  :math:`e = 1, \dots, E`, moving from proportional towards uniform sampling;
- ``all_tasks``: every task in every step with its own batch size :math:`b_i`; its share of a
  step's examples is :math:`b_i / \sum_j b_j`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Strategy = Literal["proportional", "temperature", "uniform", "round_robin", "weights", "annealed", "all_tasks"]
STRATEGIES: tuple[str, ...] = ("proportional", "temperature", "uniform", "round_robin", "weights", "annealed", "all_tasks")
StepShape = Literal["mixed", "homogeneous"]
Stopping = Literal["steps", "first_exhausted", "all_exhausted"]


class _StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = Field(default="proportional", description="How task probabilities follow from task sizes.")
    cap: int | None = Field(default=None, ge=1, description="Size cap K of proportional, temperature and annealed mixing.")
    temperature: float = Field(default=1.0, gt=0.0, description="Temperature T of temperature mixing; inf gives uniform.")
    weights: dict[str, float] | None = Field(
        default=None, description="Task weights of the 'weights' strategy; unset: each task's weight field."
    )
    anneal_epochs: int | None = Field(
        default=None, ge=1, description="Number of epochs E of annealed mixing; unset: the run's epochs."
    )

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is None:
            return None
        for task, weight in weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights[{task!r}] must be a finite number >= 0, got {weight}")
        if weights and sum(weights.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return weights


class MixingStage(_StrategyOptions):
    """Mixing options that take effect from training step ``start_step`` (0-based) on."""

    start_step: int = Field(ge=0, description="First step (0-based) of this stage.")


class MixingSpec(_StrategyOptions):
    """How a multi-task run mixes its tasks: the strategy, the shape of a step and when the run stops.

    Attributes:
        strategy, cap, temperature, weights, anneal_epochs: the strategy of the first stage (see
            the module documentation for the formulas).
        stages: later stages, each with its own strategy options, from its ``start_step`` on.
        step_shape: ``"mixed"`` (default) splits each step's ``batch_size`` examples among tasks
            with one multinomial draw over the task probabilities, so one step contains several
            tasks. ``"homogeneous"`` draws ``micro_batches_per_step`` tasks, each of which gives
            one single-task micro-batch.
        micro_batches_per_step: number of single-task micro-batches of a homogeneous step.
        stopping: ``"steps"`` (default) ends the run after ``max_steps`` steps, or after ``epochs``
            passes over ``epoch_task``; ``"first_exhausted"`` ends it when the first task has been
            seen once, and ``"all_exhausted"`` when every task has been seen at least once (tasks
            seen earlier start a new pass), as the stopping strategies of
            :func:`datasets.interleave_datasets`.
    """

    stages: list[MixingStage] = Field(default_factory=list)
    step_shape: StepShape = "mixed"
    micro_batches_per_step: int = Field(default=1, ge=1)
    stopping: Stopping = "steps"

    @model_validator(mode="after")
    def _check_stages(self) -> MixingSpec:
        starts = [stage.start_step for stage in self.stages]
        if any(later <= earlier for earlier, later in zip(starts, starts[1:])):
            raise ValueError(f"stages must have strictly increasing start_step values, got {starts}")
        return self

    def options_at(self, step: int) -> _StrategyOptions:
        """Return the strategy options in effect at ``step`` (0-based)."""
        active: _StrategyOptions = self
        for stage in self.stages:
            if stage.start_step > step:
                break
            active = stage
        return active


# Probability functions ---------------------------------------------------------------------


def _sizes_array(sizes: Sequence[int]) -> np.ndarray:
    array = np.asarray(list(sizes), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"sizes must be a non-empty list of task sizes, got {list(sizes)}")
    if np.any(array < 1) or np.any(array != np.floor(array)):
        raise ValueError(f"task sizes must be integers >= 1, got {list(sizes)}")
    return array


def _capped(sizes: Sequence[int], cap: int | None) -> np.ndarray:
    array = _sizes_array(sizes)
    if cap is not None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        array = np.minimum(array, float(cap))
    return array


def _softmax(logits: np.ndarray) -> list[float]:
    shifted = np.exp(logits - logits.max())
    return (shifted / shifted.sum()).tolist()


def proportional_probabilities(sizes: Sequence[int], cap: int | None = None) -> list[float]:
    r"""Return :math:`p_i = \min(n_i, K) / \sum_j \min(n_j, K)` (T5 examples-proportional mixing)."""
    capped = _capped(sizes, cap)
    return (capped / capped.sum()).tolist()


def temperature_probabilities(sizes: Sequence[int], temperature: float, cap: int | None = None) -> list[float]:
    r"""Return :math:`p_i \propto \min(n_i, K)^{1/T}` (T5 temperature-scaled mixing); ``inf`` gives uniform.

    The power is taken in log space, so small temperatures do not overflow.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    capped = _capped(sizes, cap)
    if math.isinf(temperature):
        return uniform_probabilities(len(capped))
    return _softmax(np.log(capped) / temperature)


def uniform_probabilities(num_tasks: int) -> list[float]:
    """Return :math:`p_i = 1/N`."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return [1.0 / num_tasks] * num_tasks


def weight_probabilities(weights: Sequence[float]) -> list[float]:
    r"""Return :math:`p_i = w_i / \sum_j w_j`."""
    array = np.asarray(list(weights), dtype=np.float64)
    if array.size == 0 or not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    return (array / array.sum()).tolist()


def annealing_alpha(epoch: int, num_epochs: int) -> float:
    r"""Return :math:`\alpha = 1 - 0.8\,(e - 1)/(E - 1)` of annealed sampling (1 when :math:`E = 1`).

    ``epoch`` is 1-based and clipped to ``[1, num_epochs]``.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if num_epochs == 1:
        return 1.0
    epoch = min(max(epoch, 1), num_epochs)
    return 1.0 - 0.8 * (epoch - 1) / (num_epochs - 1)


def annealed_probabilities(sizes: Sequence[int], epoch: int, num_epochs: int, cap: int | None = None) -> list[float]:
    r"""Return :math:`p_i \propto \min(n_i, K)^{\alpha}` with :math:`\alpha` from :func:`annealing_alpha` (BERT and PALs)."""
    capped = _capped(sizes, cap)
    return _softmax(annealing_alpha(epoch, num_epochs) * np.log(capped))


@overload
def task_probabilities(
    strategy: Strategy,
    sizes: Mapping[str, int],
    *,
    cap: int | None = ...,
    temperature: float = ...,
    weights: Mapping[str, float] | Sequence[float] | None = ...,
    epoch: int = ...,
    num_epochs: int | None = ...,
    batch_sizes: Mapping[str, int] | Sequence[int] | None = ...,
) -> dict[str, float]: ...


@overload
def task_probabilities(
    strategy: Strategy,
    sizes: Sequence[int],
    *,
    cap: int | None = ...,
    temperature: float = ...,
    weights: Mapping[str, float] | Sequence[float] | None = ...,
    epoch: int = ...,
    num_epochs: int | None = ...,
    batch_sizes: Mapping[str, int] | Sequence[int] | None = ...,
) -> list[float]: ...


def task_probabilities(
    strategy: Strategy,
    sizes: Mapping[str, int] | Sequence[int],
    *,
    cap: int | None = None,
    temperature: float = 1.0,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    epoch: int = 1,
    num_epochs: int | None = None,
    batch_sizes: Mapping[str, int] | Sequence[int] | None = None,
) -> dict[str, float] | list[float]:
    """Return the probability of each task under ``strategy``.

    A mapping of task name to size gives a dict in the same order; a sequence of sizes gives a
    list. ``weights`` and ``batch_sizes`` follow the same form as ``sizes``.

    Args:
        strategy: one of ``proportional``, ``temperature``, ``uniform``, ``round_robin``
            (long-run frequencies, uniform), ``weights``, ``annealed`` and ``all_tasks`` (each
            task's share of a step, proportional to ``batch_sizes``, uniform without them).
        sizes: number of training examples of each task.
        cap: size cap ``K`` of proportional, temperature and annealed mixing.
        temperature: temperature ``T`` of temperature mixing.
        weights: task weights of the ``weights`` strategy.
        epoch: current epoch ``e`` (1-based) of annealed mixing.
        num_epochs: number of epochs ``E`` of annealed mixing.
        batch_sizes: per-task batch sizes of ``all_tasks`` mixing.
    """
    names = list(sizes) if isinstance(sizes, Mapping) else None
    values = [sizes[name] for name in names] if names is not None else list(sizes)

    if strategy == "proportional":
        probabilities = proportional_probabilities(values, cap)
    elif strategy == "temperature":
        probabilities = temperature_probabilities(values, temperature, cap)
    elif strategy in ("uniform", "round_robin"):
        _sizes_array(values)
        probabilities = uniform_probabilities(len(values))
    elif strategy == "weights":
        if weights is None:
            raise ValueError("the 'weights' strategy needs weights")
        probabilities = weight_probabilities(_aligned(weights, names, len(values), "weights"))
    elif strategy == "annealed":
        if num_epochs is None:
            raise ValueError("the 'annealed' strategy needs num_epochs (E)")
        probabilities = annealed_probabilities(values, epoch, num_epochs, cap)
    elif strategy == "all_tasks":
        _sizes_array(values)
        if batch_sizes is None:
            probabilities = uniform_probabilities(len(values))
        else:
            probabilities = weight_probabilities(_aligned(batch_sizes, names, len(values), "batch_sizes"))
    else:
        raise ValueError(f"unknown mixing strategy {strategy!r}; available: {', '.join(STRATEGIES)}")

    if names is None:
        return probabilities
    return dict(zip(names, probabilities))


def _aligned(
    values: Mapping[str, float] | Sequence[float], names: list[str] | None, count: int, what: str
) -> list[float]:
    if isinstance(values, Mapping):
        if names is None:
            raise ValueError(f"{what} is a mapping but sizes is a sequence; give both as mappings or both as sequences")
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"{what} has no value for task(s) {missing}")
        unknown = [name for name in values if name not in names]
        if unknown:
            raise ValueError(f"{what} names unknown task(s) {unknown}; tasks: {names}")
        return [float(values[name]) for name in names]
    aligned = [float(value) for value in values]
    if len(aligned) != count:
        raise ValueError(f"{what} has {len(aligned)} values for {count} tasks")
    return aligned
