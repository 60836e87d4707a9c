"""The multi-task loader: collated multi-task steps for training, ordered batches for evaluation."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch
from torch import Tensor

from ._load import TaskData
from ._mixing import MixingSpec
from ._sampler import MultiTaskSampler

logger = logging.getLogger(__name__)

TaskBatch = dict[str, Tensor]
"""One task's batch, as described in :mod:`multitune.data._collate`."""
MultiTaskBatch = dict[str, TaskBatch]
"""One mixed training step: task name to task batch."""
LoaderStep = Union[MultiTaskBatch, list[MultiTaskBatch]]
"""A mixed step, or a homogeneous step as a list of one-task :data:`MultiTaskBatch` micro-batches."""


class MultiTaskLoader:
    """Iterate the training steps of a multi-task run as collated batches.

    Each step of a mixed run is a ``dict[task, batch]``. Each step of a homogeneous run
    (``mixing.step_shape="homogeneous"``) is a list of micro-batches, each a one-entry
    ``{task: batch}``. A training loop runs forward and backward once per micro-batch and steps
    the optimizer once per list. The same task may appear in several micro-batches of a step. Which tasks and examples each step contains is decided by a
    :class:`MultiTaskSampler`; see its documentation for the strategies, the stopping rules,
    resuming and distributed sharding.

    The training splits are read once into tensors (:meth:`TaskData.tensors`), so a step costs
    one index gather per task.

    Args:
        tasks: the loaded tasks by name; the names must match ``TaskData.name``.
        mixing: the mixing specification (default :class:`MixingSpec`).
        batch_size: examples per step (mixed) or per micro-batch (homogeneous); a task's
            ``TaskSpec.batch_size`` replaces it for ``all_tasks`` and homogeneous micro-batches.
        seed, rank, world_size, max_steps, epochs, epoch_task: as for :class:`MultiTaskSampler`.
    """

    def __init__(
        self,
        tasks: Mapping[str, TaskData],
        mixing: MixingSpec | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_steps: int | None = None,
        epochs: float | None = None,
        epoch_task: str | None = None,
    ) -> None:
        for name, task in tasks.items():
            if name != task.name:
                raise ValueError(f"tasks maps the key {name!r} to the task {task.name!r}; use the task names as keys")
        self.tasks: dict[str, TaskData] = dict(tasks)
        self.sampler = MultiTaskSampler(
            {name: len(task.train) for name, task in self.tasks.items()},
            mixing,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            max_steps=max_steps,
            epochs=epochs,
            epoch_task=epoch_task,
            task_batch_sizes={name: task.spec.batch_size for name, task in self.tasks.items() if task.spec.batch_size},
            task_weights={name: task.spec.weight for name, task in self.tasks.items()},
        )
        self._tensors = {name: task.tensors("train") for name, task in self.tasks.items()}
        logger.info(
            "multi-task loader: %d task(s), %s mixing, %s steps, probabilities %s",
            len(self.tasks),
            self.mixing.strategy,
            self.mixing.step_shape,
            {name: round(p, 4) for name, p in self.sampler.probabilities(0).items()},
        )

    @property
    def mixing(self) -> MixingSpec:
        return self.sampler.mixing

    @property
    def step(self) -> int:
        """Number of steps yielded so far."""
        return self.sampler.step

    def __iter__(self) -> Iterator[LoaderStep]:
        for step in self.sampler:
            if isinstance(step, list):
                yield [self._collate(micro_batch) for micro_batch in step]
            else:
                yield self._collate(step)

    def _collate(self, indices: Mapping[str, list[int]]) -> MultiTaskBatch:
        return {task: self._tensors[task].batch(rows) for task, rows in indices.items()}

    def __len__(self) -> int:
        """Return the total number of steps of the run; raises :class:`TypeError` for an endless run."""
        return len(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        """Return the run position (see :meth:`MultiTaskSampler.state_dict`)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next step is the one the saved run would draw next."""
        self.sampler.load_state_dict(state)

    def reset(self) -> None:
        """Start the run over from step 0."""
        self.sampler.reset()

    def eval_batches(self, task: str | TaskData, batch_size: int, *, split: str = "eval") -> Iterator[TaskBatch]:
        """Return the ordered batches of one task's evaluation (or training) split; see :func:`eval_batches`."""
        task_data = self.tasks[task] if isinstance(task, str) else task
        return eval_batches(task_data, batch_size, split=split)


def eval_batches(
    task_data: TaskData,
    batch_size: int,
    *,
    split: str = "eval",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[TaskBatch]:
    """Yield the batches of one split in row order, without shuffling or dropping a short last batch.

    With ``world_size > 1``, rank ``r`` gets the rows ``r, r + W, r + 2W, ...`` (the ranks' row
    counts differ by at most one); the default gives every rank all rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    tensors = task_data.tensors(split)
    rows = torch.arange(rank, len(tensors), world_size)
    for start in range(0, len(rows), batch_size):
        yield tensors.batch(rows[start : start + batch_size])
