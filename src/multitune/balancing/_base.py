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
    identity by default, so every rank makes the same state update.

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
        self._weights: dict[str, float] = {}
        self._reduce_fn: ReduceFn | None = None
        self.nonfinite_counts: dict[str, int] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def weights(self) -> dict[str, float]:
        """Weights used in the last call, by task; tasks absent from that call are not listed."""
        return dict(self._weights)

    def set_reduce_fn(self, fn: ReduceFn | None) -> None:
        """Set the function that averages statistics over distributed ranks (``None``: identity)."""
        self._reduce_fn = fn

    def reduce(self, tensor: Tensor) -> Tensor:
        """Return the mean of ``tensor`` over ranks with the function set by :meth:`set_reduce_fn`."""
        if self._reduce_fn is None:
            return tensor
        return self._reduce_fn(tensor)

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        finite = self._finite_losses(losses)
        if not finite:
            self._weights = {}
            self.step += 1
            return _zero_total(losses)

        total, weights = self.combine(finite)
        self._weights = {name: float(w) for name, w in weights.items()}
        self.step += 1
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

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, Mapping[str, float | Tensor]]:
        """Return the total loss and the weight of each task, for finite losses only.

        ``losses`` holds at least one task, in the order of ``task_names``.
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

        finite: dict[str, Tensor] = {}
        for name in self.task_names:
            if name not in losses:
                continue
            loss = losses[name]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"task {name!r}: loss must be a scalar tensor, got {shape}; reduce it with .mean() first")
            loss = loss.reshape(())
            if torch.isfinite(loss.detach()).item():
                finite[name] = loss
                continue
            self._handle_nonfinite(name, loss)
        return finite

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


def _zero_total(losses: Mapping[str, Tensor]) -> Tensor:
    """A zero total for a step in which no loss was finite; its backward changes nothing."""
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
