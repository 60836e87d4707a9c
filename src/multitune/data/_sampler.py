"""The multi-task sampler: per training step, which tasks appear and which of their examples.

Determinism. The tasks of step ``t`` are drawn with a generator seeded by ``(seed, t)`` only,
and pass ``p`` of a task is a permutation seeded by ``(seed, task name, p)``. The sampler's
state is therefore a few integers per task (pass, position in the pass), which
:meth:`MultiTaskSampler.state_dict` saves and :meth:`~MultiTaskSampler.load_state_dict`
restores, so a resumed run draws exactly the steps it would have drawn.

Passes. Each task's examples cycle forever: a pass visits every example of the task (of this
rank's shard) once, in a fresh order, and a batch that reaches the end of a pass continues in
the next one. Consecutive passes never share an order: in the rare case that a new permutation
equals the previous one, its first two entries are swapped (with two examples, the two orders
alternate).

Distributed runs. All ranks draw the same tasks per step, because the task draws do not depend
on the rank. Pass ``p`` of a task is one permutation shared by all ranks. Rank ``r`` of ``W``
takes its entries ``r, r + W, r + 2W, ...`` after dropping the last ``n mod W``. Ranks therefore
never see the same example in a pass, and each rank's pass has ``n // W`` examples. The dropped
examples change from pass to pass.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np

from ._mixing import MixingSpec, _StrategyOptions, task_probabilities

logger = logging.getLogger(__name__)

MixedStep = dict[str, list[int]]
"""One mixed step: task name to example indices, for the tasks drawn in the step."""
HomogeneousStep = list[dict[str, list[int]]]
"""One homogeneous step: a list of single-task micro-batches, each a one-entry ``{task: indices}``."""
Step = Union[MixedStep, HomogeneousStep]

_SCHEDULE_STREAM = 0
_ORDER_STREAM = 1


class _TaskStream:
    """The endless stream of one task's example indices on one rank.

    With ``materialize=False`` the stream tracks positions only; the sampler uses such copies to
    count the steps of a run without drawing permutations.
    """

    def __init__(self, name: str, size: int, *, seed: int, rank: int, world_size: int, materialize: bool = True) -> None:
        self.name = name
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.materialize = materialize
        self.pass_length = size // world_size
        self._key = zlib.crc32(name.encode("utf-8"))
        self.pass_index = 0
        self.position = 0
        self.variant: int | None = 0
        self._permutation: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._previous: np.ndarray | None = None

    def copy_positions(self) -> _TaskStream:
        clone = _TaskStream(self.name, self.size, seed=self.seed, rank=self.rank, world_size=self.world_size, materialize=False)
        clone.pass_index, clone.position = self.pass_index, self.position
        return clone

    def _base_permutation(self, pass_index: int) -> np.ndarray:
        generator = np.random.default_rng([self.seed, _ORDER_STREAM, self._key, pass_index])
        return generator.permutation(self.size)

    def _current_order(self) -> np.ndarray:
        if self._order is None:
            permutation = self._base_permutation(self.pass_index)
            if self.variant is None:
                repeats = self._previous is not None and self.size > 1 and np.array_equal(permutation, self._previous)
                self.variant = 1 if repeats else 0
                self._previous = None
            if self.variant:
                permutation = permutation.copy()
                permutation[[0, 1]] = permutation[[1, 0]]
            self._permutation = permutation
            usable = self.pass_length * self.world_size
            self._order = permutation[self.rank : usable : self.world_size]
        return self._order

    def _start_next_pass(self) -> None:
        self._previous = self._permutation
        self._permutation = None
        self._order = None
        self.pass_index += 1
        self.position = 0
        self.variant = None

    @property
    def consumed(self) -> int:
        """Number of indices taken so far on this rank."""
        return self.pass_index * self.pass_length + self.position

    def take(self, count: int) -> np.ndarray | None:
        """Take the next ``count`` indices, continuing into the next pass when this one ends.

        Returns ``None`` without ``materialize``.
        """
        parts = []
        taken = 0
        while taken < count:
            step = min(count - taken, self.pass_length - self.position)
            if self.materialize:
                parts.append(self._current_order()[self.position : self.position + step])
            self.position += step
            taken += step
            if self.position == self.pass_length:
                self._start_next_pass()
        if not self.materialize:
            return None
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def state_dict(self) -> dict[str, int]:
        if self.variant is None:
            self._current_order()
        return {"pass": self.pass_index, "position": self.position, "variant": int(self.variant or 0)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        position = int(state["position"])
        if not 0 <= position < self.pass_length:
            raise ValueError(f"task {self.name!r}: position {position} is outside a pass of {self.pass_length} examples")
        self.pass_index = int(state["pass"])
        self.position = position
        self.variant = int(state["variant"])
        self._permutation = self._order = self._previous = None


class MultiTaskSampler:
    """Draw, for every training step, the tasks of the step and their example indices.

    Iterating yields one step at a time until the run ends: a :data:`MixedStep`
    ``{task: [indices]}`` for ``step_shape="mixed"``, and a :data:`HomogeneousStep` (a list of
    one-entry ``{task: [indices]}`` micro-batches) for ``step_shape="homogeneous"``. Indices are
    rows of the task's training split. Iteration continues from the current state, so a new
    ``iter()`` after :meth:`load_state_dict` resumes the run; :meth:`reset` starts it over.

    Step contents by strategy and shape:

    - mixed: ``batch_size`` examples split among tasks by one multinomial draw with the
      strategy's probabilities. ``round_robin`` assigns the step's example slots to the tasks in
      turn, continuing from the previous step. ``all_tasks`` gives each task its own batch size.
    - homogeneous: ``micro_batches_per_step`` micro-batches, each from one task drawn with the
      strategy's probabilities (``round_robin``: the next task in turn), of that task's batch
      size. ``all_tasks`` gives one micro-batch per task.

    A task's batch size is ``task_batch_sizes[task]`` when given, else ``batch_size``.

    The run ends after ``max_steps`` steps, or after ``epochs`` passes over ``epoch_task``
    (``epochs`` may be fractional: the run then ends after ``round(epochs * n)`` of its ``n``
    examples per rank). With ``stopping="first_exhausted"`` or ``"all_exhausted"`` it ends when
    the first (or the last) task finishes its first pass. The draw that ends the run takes only
    the examples left until that point, and a homogeneous step ends with the micro-batch that
    ends the run.
    ``max_steps`` also caps the exhaustion strategies.

    Annealed mixing counts epochs with ``epoch_task`` (epoch ``e`` is its pass ``e - 1``) when the
    run is set in epochs, else in blocks of ``max_steps / E`` steps.

    Args:
        sizes: number of training examples of each task, in task order.
        mixing: the mixing specification (default: proportional, mixed steps, stop after steps).
        batch_size: examples per step (mixed) or per micro-batch (homogeneous).
        seed: seed of every random draw; a non-negative integer.
        rank: this process's rank; default from :mod:`multitune.distributed`, else 0.
        world_size: number of processes; default from :mod:`multitune.distributed`, else 1.
        max_steps: number of steps of the run.
        epochs: number of passes over ``epoch_task`` in the run (> 0, may be fractional); set this
            or ``max_steps``.
        epoch_task: the task whose passes count as epochs; default: the largest task.
        task_batch_sizes: per-task batch sizes (``all_tasks`` and homogeneous micro-batches).
        task_weights: per-task weights of the ``weights`` strategy when ``mixing.weights`` is unset.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        mixing: MixingSpec | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_steps: int | None = None,
        epochs: float | None = None,
        epoch_task: str | None = None,
        task_batch_sizes: Mapping[str, int] | None = None,
        task_weights: Mapping[str, float | None] | None = None,
    ) -> None:
        self.mixing = mixing if mixing is not None else MixingSpec()
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.task_names: list[str] = list(sizes)
        self.sizes: dict[str, int] = {name: int(sizes[name]) for name in self.task_names}
        self.batch_size = batch_size
        self.seed = seed
        self.max_steps = max_steps
        self.epochs = epochs
        self.epoch_task = epoch_task
        self._validate_run()
        self.task_batch_sizes = self._resolve_batch_sizes(task_batch_sizes)
        self._task_weights = {name: weight for name, weight in (task_weights or {}).items() if weight is not None}
        self._probability_cache: dict[tuple[int, int], np.ndarray] = {}
        self._validate_strategies()

        self._streams = [self._new_stream(name) for name in self.task_names]
        self._step = 0
        self._cursor = 0
        self._finished = False
        self._length: int | None = None

    # Validation ----------------------------------------------------------------------------

    def _validate_run(self) -> None:
        if not self.task_names:
            raise ValueError("sizes is empty; the sampler needs at least one task")
        for name, size in self.sizes.items():
            if size < self.world_size:
                raise ValueError(
                    f"task {name!r} has {size} training examples, fewer than the {self.world_size} ranks; "
                    "every rank needs at least one example per pass"
                )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None:
            if not self.epochs > 0:
                raise ValueError(f"epochs must be > 0, got {self.epochs}")
            if self.max_steps is not None:
                raise ValueError("set max_steps or epochs, not both")
            if self.mixing.stopping != "steps":
                raise ValueError(f"epochs needs stopping='steps', got stopping={self.mixing.stopping!r}")
            if self.epoch_task is None:
                self.epoch_task = max(self.task_names, key=lambda name: self.sizes[name])
                if len(self.task_names) > 1:
                    logger.info("epochs count passes over the largest task %r (epoch_task is unset)", self.epoch_task)
        if self.epoch_task is not None:
            if self.epoch_task not in self.sizes:
                raise ValueError(f"epoch_task {self.epoch_task!r} is not a task; tasks: {self.task_names}")
            if self.epochs is None:
                raise ValueError(f"epoch_task={self.epoch_task!r} is set without epochs; set epochs too")

    def _resolve_batch_sizes(self, task_batch_sizes: Mapping[str, int] | None) -> dict[str, int]:
        given = {name: size for name, size in (task_batch_sizes or {}).items() if size is not None}
        unknown = sorted(set(given) - set(self.task_names))
        if unknown:
            raise ValueError(f"task_batch_sizes names unknown task(s) {unknown}; tasks: {self.task_names}")
        for name, size in given.items():
            if size < 1:
                raise ValueError(f"task {name!r}: batch size must be >= 1, got {size}")
        return {name: int(given.get(name, self.batch_size)) for name in self.task_names}

    def _all_options(self) -> list[_StrategyOptions]:
        return [self.mixing, *self.mixing.stages]

    def _validate_strategies(self) -> None:
        for stage_index, options in enumerate(self._all_options()):
            where = "mixing" if stage_index == 0 else f"mixing stage {stage_index} (start_step={options.start_step})"  # type: ignore[attr-defined]
            if options.strategy == "annealed":
                if (options.anneal_epochs or self.epochs) is None:
                    raise ValueError(f"{where}: annealed mixing needs anneal_epochs (E), or a run set in epochs")
                if self.epoch_task is None and self.max_steps is None:
                    raise ValueError(f"{where}: annealed mixing counts epochs in steps, so it needs max_steps or epochs")
            if options.strategy == "weights":
                self._weights_for(options, where)
            probabilities = self._probabilities(stage_index, epoch=1)
            if self.epoch_task is not None and probabilities[self.task_names.index(self.epoch_task)] == 0:
                raise ValueError(f"{where}: epoch_task {self.epoch_task!r} has probability 0, so the run would never end")
            if self.mixing.stopping == "all_exhausted" and np.any(probabilities == 0):
                zero = [name for name, p in zip(self.task_names, probabilities) if p == 0]
                raise ValueError(f"{where}: task(s) {zero} have probability 0, so all_exhausted would never end")

    def _weights_for(self, options: _StrategyOptions, where: str) -> dict[str, float]:
        weights = dict(options.weights) if options.weights is not None else self._task_weights
        missing = [name for name in self.task_names if name not in weights]
        if missing:
            raise ValueError(
                f"{where}: the 'weights' strategy has no weight for task(s) {missing}; set mixing weights "
                "or each task's weight"
            )
        unknown = [name for name in weights if name not in self.sizes]
        if unknown:
            raise ValueError(f"{where}: weights name unknown task(s) {unknown}; tasks: {self.task_names}")
        return {name: weights[name] for name in self.task_names}

    # Probabilities -------------------------------------------------------------------------

    def _stage_index(self, step: int) -> int:
        index = 0
        for position, stage in enumerate(self.mixing.stages, start=1):
            if stage.start_step > step:
                break
            index = position
        return index

    def _num_epochs(self, options: _StrategyOptions) -> int | None:
        if options.anneal_epochs is not None:
            return options.anneal_epochs
        return math.ceil(self.epochs) if self.epochs is not None else None

    def _epoch(self, step: int, options: _StrategyOptions, streams: list[_TaskStream]) -> int:
        if options.strategy != "annealed":
            return 1
        num_epochs = self._num_epochs(options) or 1
        if self.epoch_task is not None:
            epoch = streams[self.task_names.index(self.epoch_task)].pass_index + 1
        else:
            assert self.max_steps is not None
            epoch = step * num_epochs // self.max_steps + 1
        return min(epoch, num_epochs)

    def _probabilities(self, stage_index: int, epoch: int) -> np.ndarray:
        key = (stage_index, epoch)
        if key not in self._probability_cache:
            options = self._all_options()[stage_index]
            weights = self._weights_for(options, "mixing") if options.strategy == "weights" else None
            probabilities = task_probabilities(
                options.strategy,
                list(self.sizes.values()),
                cap=options.cap,
                temperature=options.temperature,
                weights=list(weights.values()) if weights is not None else None,
                epoch=epoch,
                num_epochs=self._num_epochs(options),
                batch_sizes=list(self.task_batch_sizes.values()),
            )
            self._probability_cache[key] = np.asarray(probabilities, dtype=np.float64)
        return self._probability_cache[key]

    def probabilities(self, step: int | None = None) -> dict[str, float]:
        """Return the task probabilities in effect at ``step`` (default: the next step)."""
        step = self._step if step is None else step
        stage_index = self._stage_index(step)
        options = self._all_options()[stage_index]
        epoch = self._epoch(step, options, self._streams)
        return dict(zip(self.task_names, self._probabilities(stage_index, epoch).tolist()))

    # Drawing steps -------------------------------------------------------------------------

    def _draws(self, step: int, cursor: int, streams: list[_TaskStream]) -> tuple[list[list[tuple[int, int]]], int]:
        """Return the step's draws (each a list of (task index, count)) and the new round-robin cursor.

        A mixed step is one draw holding every task of the step; a homogeneous step has one
        draw per micro-batch.
        """
        stage_index = self._stage_index(step)
        options = self._all_options()[stage_index]
        num_tasks = len(self.task_names)
        batch_sizes = list(self.task_batch_sizes.values())
        homogeneous = self.mixing.step_shape == "homogeneous"

        if options.strategy == "all_tasks":
            pairs = [(index, batch_sizes[index]) for index in range(num_tasks)]
            return ([[pair] for pair in pairs] if homogeneous else [pairs]), cursor

        if options.strategy == "round_robin":
            if homogeneous:
                count = self.mixing.micro_batches_per_step
                draws = [[((cursor + slot) % num_tasks, batch_sizes[(cursor + slot) % num_tasks])] for slot in range(count)]
                return draws, cursor + count
            counts = np.bincount((cursor + np.arange(self.batch_size)) % num_tasks, minlength=num_tasks)
            return [_nonzero(counts)], cursor + self.batch_size

        probabilities = self._probabilities(stage_index, self._epoch(step, options, streams))
        generator = np.random.default_rng([self.seed, _SCHEDULE_STREAM, step])
        if homogeneous:
            tasks = generator.choice(num_tasks, size=self.mixing.micro_batches_per_step, p=probabilities)
            return [[(int(task), batch_sizes[int(task)])] for task in tasks], cursor
        counts = generator.multinomial(self.batch_size, probabilities)
        return [_nonzero(counts)], cursor

    def _epoch_target(self) -> int:
        """Return the number of ``epoch_task`` examples (per rank) after which the run ends."""
        stream = self._streams[self.task_names.index(self.epoch_task)]  # type: ignore[arg-type]
        return max(1, round(self.epochs * stream.pass_length))  # type: ignore[operator]

    def _draw_limit(self, task_index: int, streams: list[_TaskStream]) -> int | None:
        """Return how many more examples the task may give before the run ends, or ``None`` without a limit."""
        stream = streams[task_index]
        stopping = self.mixing.stopping
        if stopping == "first_exhausted":
            return stream.pass_length - stream.consumed
        if stopping == "all_exhausted":
            others_done = all(other.pass_index >= 1 for i, other in enumerate(streams) if i != task_index)
            return stream.pass_length - stream.consumed if others_done and stream.pass_index == 0 else None
        if self.epoch_task is not None and self.task_names[task_index] == self.epoch_task:
            return self._epoch_target() - stream.consumed
        return None

    def _stop_condition_met(self, streams: list[_TaskStream]) -> bool:
        """Return whether the exhaustion or epoch condition of the run is met (``max_steps`` is checked per step)."""
        stopping = self.mixing.stopping
        if stopping == "first_exhausted":
            return any(stream.pass_index >= 1 for stream in streams)
        if stopping == "all_exhausted":
            return all(stream.pass_index >= 1 for stream in streams)
        if self.epoch_task is not None:
            return streams[self.task_names.index(self.epoch_task)].consumed >= self._epoch_target()
        return False

    def _advance(self, step: int, cursor: int, streams: list[_TaskStream]) -> tuple[list[dict[str, np.ndarray | None]], int, bool]:
        """Take the examples of step ``step`` from ``streams``; return its draws, the new cursor and whether the run ended."""
        draws, cursor = self._draws(step, cursor, streams)
        taken_draws: list[dict[str, np.ndarray | None]] = []
        for draw in draws:
            taken: dict[str, np.ndarray | None] = {}
            for task_index, count in draw:
                limit = self._draw_limit(task_index, streams)
                if limit is not None:
                    count = min(count, limit)
                if count <= 0:
                    continue
                taken[self.task_names[task_index]] = streams[task_index].take(count)
            taken_draws.append(taken)
            if self._stop_condition_met(streams):
                return taken_draws, cursor, True
        return taken_draws, cursor, self.max_steps is not None and step + 1 >= self.max_steps

    def __iter__(self) -> Iterator[Step]:
        while not self._finished:
            yield self.next_step()

    def next_step(self) -> Step:
        """Draw the next step and advance the state; raises :class:`StopIteration` when the run has ended."""
        if self._finished:
            raise StopIteration
        draws, self._cursor, self._finished = self._advance(self._step, self._cursor, self._streams)
        self._step += 1
        steps = [{task: indices.tolist() for task, indices in draw.items()} for draw in draws]  # type: ignore[union-attr]
        if self.mixing.step_shape == "homogeneous":
            return steps
        return steps[0]

    # Run length ----------------------------------------------------------------------------

    @property
    def is_finite(self) -> bool:
        return self.max_steps is not None or self.epochs is not None or self.mixing.stopping != "steps"

    def __len__(self) -> int:
        """Return the total number of steps of the run (from step 0), counted without drawing examples."""
        if not self.is_finite:
            raise TypeError("the sampler runs forever: set max_steps, epochs or an exhaustion stopping strategy")
        if self._length is None:
            if self.mixing.stopping == "steps" and self.epochs is None:
                self._length = self.max_steps
            else:
                self._length = self._count_steps()
        return self._length  # type: ignore[return-value]

    def _count_steps(self) -> int:
        streams = [self._new_stream(name).copy_positions() for name in self.task_names]
        step, cursor, finished = 0, 0, False
        while not finished:
            _, cursor, finished = self._advance(step, cursor, streams)
            step += 1
        return step

    @property
    def step(self) -> int:
        """Number of steps drawn so far."""
        return self._step

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def epoch_progress(self) -> dict[str, float]:
        """Passes completed by each task on this rank, with the fraction of the current pass."""
        return {stream.name: stream.pass_index + stream.position / stream.pass_length for stream in self._streams}

    # State ---------------------------------------------------------------------------------

    def _new_stream(self, name: str) -> _TaskStream:
        return _TaskStream(name, self.sizes[name], seed=self.seed, rank=self.rank, world_size=self.world_size)

    def reset(self) -> None:
        """Start the run over from step 0."""
        self._streams = [self._new_stream(name) for name in self.task_names]
        self._step = 0
        self._cursor = 0
        self._finished = False

    def state_dict(self) -> dict[str, Any]:
        """Return the position of the run; it is the same on every rank, so one rank's state restores all."""
        return {
            "step": self._step,
            "cursor": self._cursor,
            "finished": self._finished,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "sizes": dict(self.sizes),
            "tasks": {stream.name: stream.state_dict() for stream in self._streams},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            ValueError: the state comes from a run with other tasks, task sizes, seed, batch size
                or world size, so it would not reproduce that run's examples.
        """
        for key, current in (
            ("sizes", self.sizes),
            ("seed", self.seed),
            ("world_size", self.world_size),
            ("batch_size", self.batch_size),
        ):
            saved = state.get(key)
            if saved != current:
                raise ValueError(
                    f"the sampler state has {key}={saved!r} but this sampler has {key}={current!r}; "
                    "resume with the same tasks, data, seed, batch size and world size"
                )
        for stream in self._streams:
            stream.load_state_dict(state["tasks"][stream.name])
        self._step = int(state["step"])
        self._cursor = int(state["cursor"])
        self._finished = bool(state["finished"])


def _nonzero(counts: np.ndarray) -> list[tuple[int, int]]:
    return [(int(index), int(count)) for index, count in enumerate(counts) if count > 0]


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        default_rank, default_world_size = _distributed_defaults()
        rank = default_rank if rank is None else rank
        world_size = default_world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _distributed_defaults() -> tuple[int, int]:
    try:
        from multitune import distributed  # type: ignore[attr-defined]
    except ImportError:
        return 0, 1
    get_rank = getattr(distributed, "get_rank", None)
    get_world_size = getattr(distributed, "get_world_size", None)
    if get_rank is None or get_world_size is None:
        return 0, 1
    return int(get_rank()), int(get_world_size())
