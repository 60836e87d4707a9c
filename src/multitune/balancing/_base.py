"""The balancer base class shared by every loss-balancing method."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ReduceFn = Callable[[Tensor], Tensor]
"""A function that returns the mean of a tensor over all distributed ranks."""

NonFinitePolicy = Literal["skip", "raise"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a task loss is NaN or infinite and the balancer was built with ``on_nonfinite="raise"``."""


class Balancer(nn.Module):
    r"""Combine per-task losses into the one total loss that a training loop back-propagates.

    A balancer is built with the task names and its typed hyper-parameters, then called with a
    mapping of task name to scalar loss tensor. It returns the total loss, so it works in any loop
    that owns ``.backward()``: plain PyTorch, the Hugging Face ``Trainer`` or Lightning.

    Life cycle of one call (:meth:`forward`):

    1. The losses are validated: every name must be one of ``task_names`` and every loss a scalar.
       Tasks missing from the mapping are allowed; they keep their state and get no weight.
    2. A NaN or infinite loss never reaches :meth:`combine`, so it never enters the balancer's
       state. With ``on_nonfinite="skip"`` that task is left out of the total and one warning is
       logged per task (later occurrences are counted in :attr:`nonfinite_counts`). With
       ``on_nonfinite="raise"`` a :class:`NonFiniteLossError` names the task.
    3. :meth:`combine` (one per method) returns the total and the weights it used.

    State lives in buffers, parameters and :meth:`get_extra_state`, so ``state_dict()`` and
    ``load_state_dict()`` of :class:`torch.nn.Module` hold everything a resumed run needs.

    Distributed runs: a method that derives statistics from the losses or from gradient norms
    passes them through :meth:`reduce` before they change its state. :meth:`reduce` applies the
    function set by :meth:`set_reduce_fn` (for example an all-reduce mean over ranks), and is the
    identity by default, so every rank makes the same state update. Per-task statistics go
    through :meth:`reduce_task_stats`, which averages a task only over the ranks that have it.
    NOTE: a reduce function such as an all-reduce is a collective call, which every rank must
    reach the same number of times. A rank whose losses are all missing or non-finite skips
    :meth:`combine` and so its calls.

    Args:
        task_names: names of the tasks, unique and non-empty.
        on_nonfinite: ``"skip"`` (default) leaves a NaN or infinite loss out of the total and the
            state update with one warning per task; ``"raise"`` raises :class:`NonFiniteLossError`.
    """

    #: Registry name of the method, for configs and ``multitune compare``.
    name: str = ""
    #: Whether the constructor needs the model's shared parameters (gradient-based methods).
    requires_shared_parameters: bool = False

    def __init__(self, task_names: Sequence[str], *, on_nonfinite: NonFinitePolicy = "skip") -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = _validate_task_names(task_names)
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.task_index: dict[str, int] = {name: i for i, name in enumerate(self.task_names)}
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._last_weights = _WeightRecord()
        self._reduce_fn: ReduceFn | None = None
        self.nonfinite_counts: dict[str, int] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def weights(self) -> dict[str, float]:
        """Weights used in the last call, by task; tasks absent from that call are not listed."""
        return self._last_weights.as_dict(self.task_names)

    def set_reduce_fn(self, fn: ReduceFn | None) -> None:
        """Set the function that averages statistics over distributed ranks (``None``: identity)."""
        self._reduce_fn = fn

    def reduce(self, tensor: Tensor) -> Tensor:
        """Return the mean of ``tensor`` over ranks with the function set by :meth:`set_reduce_fn`."""
        if self._reduce_fn is None:
            return tensor
        return self._reduce_fn(tensor)

    def reduce_task_stats(self, *stats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        r"""Average per-task statistics over ranks, counting a task only on the ranks where it is present.

        Each argument maps the tasks present in this call to a scalar statistic (a loss, a gradient
        norm); every mapping has the same tasks. The statistics are packed into one tensor of shape
        ``(len(stats) + 1, num_tasks)`` in the order of ``task_names``. Row ``k`` contains statistic
        ``k`` (zero for an absent task) and the last row is 1 where the task is present. That
        tensor passes through :meth:`reduce` once, so a distributed run makes one collective call
        per step, and the mean of a task over the ranks that have it is

        .. math:: \bar{s}_i = \frac{\operatorname{mean}_r(s_{r,i}\,m_{r,i})}{\operatorname{mean}_r(m_{r,i})}.

        Returns:
            ``(means, present)``: ``means`` of shape ``(len(stats), num_tasks)``, zero where no
            rank has the task, and ``present``, a bool tensor of shape ``(num_tasks,)``.
        """
        if not stats or not stats[0]:
            raise ValueError("reduce_task_stats needs at least one non-empty mapping of task name to statistic")
        names = list(stats[0])
        for column in stats[1:]:
            if list(column) != names:
                raise ValueError(f"reduce_task_stats: every mapping needs the tasks {names}, got {list(column)}")

        first = stats[0][names[0]]
        dtype = torch.promote_types(first.dtype, torch.float32)
        rows = [torch.stack([column[name].detach().reshape(()) for name in names]).to(dtype) for column in stats]
        if names == list(self.task_names):
            values = torch.stack(rows)
            presence = torch.ones((1, self.num_tasks), dtype=dtype, device=first.device)
        else:
            index = torch.tensor([self.task_index[name] for name in names], device=first.device)
            values = torch.zeros((len(stats), self.num_tasks), dtype=dtype, device=first.device)
            values.index_copy_(1, index, torch.stack(rows))
            presence = torch.zeros((1, self.num_tasks), dtype=dtype, device=first.device)
            presence.index_fill_(1, index, 1.0)

        if self._reduce_fn is None:
            return values, presence[0] > 0

        reduced = self.reduce(torch.cat([values, presence]))
        count = reduced[-1]
        present = count > 0
        means = torch.where(present, reduced[:-1] / torch.where(present, count, torch.ones_like(count)), 0.0)
        return means, present

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        finite = self._finite_losses(losses)
        if not finite:
            self._last_weights.clear()
            self.step.add_(1)
            return _zero_total(losses)

        total, weights = self.combine(finite)
        self._last_weights.store(type(self).__name__, list(finite), weights)
        self.step.add_(1)
        return total

    def backward(self, losses: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        """Compute the total of ``losses``, back-propagate it and return it (detached).

        Gradient-based methods override this to write the combined gradient into ``.grad``
        themselves. Extra keyword arguments (such as ``features``) are ignored here.
        """
        total = self(losses)
        if total.requires_grad:
            total.backward()
        return total.detach()

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, Mapping[str, float | Tensor] | Tensor]:
        """Return the total loss and the weight of each task, for finite losses only.

        ``losses`` contains at least one task, in the order of ``task_names``. The weights are a
        mapping of task name to weight, or a 1-D tensor with one weight per task of ``losses``
        in that order. Tensor weights are copied to the host only when :attr:`weights` is read.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"tasks={list(self.task_names)}"

    # Validation --------------------------------------------------------------------------------

    def _finite_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"{type(self).__name__} expects a mapping of task name to loss tensor, got {type(losses).__name__}")

        unknown = [name for name in losses if name not in self.task_index]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown} passed to {type(self).__name__}; known tasks: {list(self.task_names)}")

        present: dict[str, Tensor] = {}
        for name in self.task_names:
            if name not in losses:
                continue
            loss = losses[name]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"task {name!r}: loss must be a scalar tensor, got {shape}; reduce it with .mean() first")
            present[name] = loss if loss.dim() == 0 else loss.reshape(())
        if not present:
            return {}

        flags = _finite_flags(list(present.values()))
        elsewhere = self._nonfinite_on_other_ranks(present, flags) if self._reduce_fn is not None else set()
        finite: dict[str, Tensor] = {}
        for (name, loss), is_finite in zip(present.items(), flags):
            if not is_finite:
                self._handle_nonfinite(name, loss)
            elif name in elsewhere:
                self._note_nonfinite_elsewhere(name)
            else:
                finite[name] = loss
        return finite

    def _nonfinite_on_other_ranks(self, present: dict[str, Tensor], flags: list[bool]) -> set[str]:
        """Return the tasks whose loss is non-finite on some rank, through one :meth:`reduce` call.

        Every rank then leaves the same tasks out, so every rank makes the same collective calls
        in :meth:`combine` (a rank that skipped them would leave the others waiting).
        """
        first = next(iter(present.values()))
        nonfinite = torch.zeros(self.num_tasks, dtype=torch.float32, device=first.device)
        for name, is_finite in zip(present, flags):
            if not is_finite:
                nonfinite[self.task_index[name]] = 1.0
        reduced = self.reduce(nonfinite).tolist()
        return {name for name in present if reduced[self.task_index[name]] > 0}

    def _note_nonfinite_elsewhere(self, name: str) -> None:
        count = self.nonfinite_counts.get(name, 0) + 1
        self.nonfinite_counts[name] = count
        if count == 1:
            logger.warning(
                "task %r: loss is NaN or inf on another rank at step %d; the task is left out of this step "
                "on every rank (later occurrences are counted in nonfinite_counts, not logged)",
                name,
                int(self.step),
            )

    def _handle_nonfinite(self, name: str, loss: Tensor) -> None:
        value = loss.detach().item()
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"task {name!r}: loss is {value} at step {int(self.step)}; "
                "lower the learning rate, check the task's data, or build the balancer with on_nonfinite='skip'"
            )
        count = self.nonfinite_counts.get(name, 0) + 1
        self.nonfinite_counts[name] = count
        if count == 1:
            logger.warning(
                "task %r: loss is %s at step %d; the task is left out of this step's total and "
                "state update (later occurrences are counted in nonfinite_counts, not logged)",
                name,
                value,
                int(self.step),
            )


class _WeightRecord:
    """Weights of the last call. Tensor weights are copied to the host on the first read, so a
    training step does not wait for the device only to fill :attr:`Balancer.weights`."""

    __slots__ = ("floats", "tensor_names", "tensor_values")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.floats: dict[str, float] = {}
        self.tensor_names: list[str] = []
        self.tensor_values: Tensor | None = None

    def store(self, owner: str, names: list[str], weights: Mapping[str, float | Tensor] | Tensor) -> None:
        self.clear()
        if isinstance(weights, Tensor):
            if weights.shape != (len(names),):
                raise ValueError(
                    f"{owner}.combine returned weights of shape {tuple(weights.shape)}; "
                    f"expected one weight per task in the call, shape ({len(names)},)"
                )
            # Copied, so a later in-place update of a weight buffer does not change these values.
            self.tensor_names = names
            self.tensor_values = weights.detach().clone()
            return

        values: list[Tensor] = []
        for name, weight in weights.items():
            if isinstance(weight, Tensor):
                self.tensor_names.append(name)
                values.append(weight.detach().reshape(()))
            else:
                self.floats[name] = float(weight)
        if values:
            dtype = torch.float32
            for value in values:
                dtype = torch.promote_types(dtype, value.dtype)
            # torch.stack copies, so a later in-place update of a weight buffer does not change these values.
            self.tensor_values = torch.stack([value.to(dtype) for value in values])

    def as_dict(self, order: Sequence[str]) -> dict[str, float]:
        if self.tensor_values is not None:
            self.floats.update(zip(self.tensor_names, self.tensor_values.tolist()))
            self.tensor_names = []
            self.tensor_values = None
        return {name: self.floats[name] for name in order if name in self.floats}


def _validate_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(task_names, str):
        raise TypeError(f"task_names must be a sequence of names, got the string {task_names!r}")
    names = tuple(task_names)
    if not names:
        raise ValueError("task_names is empty; a balancer needs at least one task")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names must be non-empty strings, got {name!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names: {duplicates}")
    return names


def _finite_flags(losses: list[Tensor]) -> list[bool]:
    """Return whether each scalar loss is finite, with one device synchronisation when all share a device."""
    if len({loss.device for loss in losses}) == 1:
        return torch.isfinite(torch.stack([loss.detach() for loss in losses])).tolist()
    return [bool(torch.isfinite(loss.detach()).item()) for loss in losses]


def _zero_total(losses: Mapping[str, Tensor]) -> Tensor:
    """Return a zero total for a step in which no loss was finite, so its backward changes nothing."""
    device = None
    for loss in losses.values():
        if isinstance(loss, Tensor):
            device = loss.device
            break
    return torch.zeros((), device=device, requires_grad=True)


def stack_losses(losses: Mapping[str, Tensor]) -> Tensor:
    """Stack scalar losses into a 1-D tensor in the mapping's order."""
    return torch.stack([loss.reshape(()) for loss in losses.values()])


def check_nonnegative(name: str, value: float, *, owner: str) -> float:
    """Return ``value`` as a float, or raise naming the hyper-parameter when it is negative or not finite."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value}")
    return value
