r"""The base class of gradient-based balancers (PCGrad, MGDA, CAGrad, IMTL-G, Nash-MTL, ...).

These methods replace the gradient of :math:`\sum_i L_i` with a combination of the per-task
gradients :math:`g_i = \nabla_\theta L_i`. For all of them except GradDrop the combination is
linear, :math:`d = \sum_i c_i g_i = J^\top c`, and the coefficients :math:`c` depend only on the
Gramian :math:`G = J J^\top` (and a random state), so a subclass implements :meth:`weigh`. A
method whose result is not of that form (GradDrop reads the signs of :math:`J`) sets
``needs_jacobian = True`` and implements :meth:`aggregate`.

The per-task gradients come from :mod:`multitune.gradients`: one ``torch.autograd.grad`` call per
task, so a step costs one forward pass plus T backward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..gradients import GradientAccumulator, accumulate_grads, graph_leaves
from ..gradients._graph import unique_tensors
from ._base import Balancer, NonFiniteLossError, NonFinitePolicy, _zero_total

logger = logging.getLogger(__name__)

GradientSource = Literal["shared", "last_shared_layer", "features"]
TaskGradientPolicy = Literal["unweighted", "weighted"]
Features = Tensor | Sequence[Tensor]

_SOURCES = ("shared", "last_shared_layer", "features")
_POLICIES = ("unweighted", "weighted")


@dataclass
class _Round:
    """Per-task gradients accumulated since the last :meth:`GradientBalancer.step_gradients`."""

    accumulator: GradientAccumulator
    loss_values: dict[int, Tensor] = field(default_factory=dict)
    losses: list[tuple[int, Tensor]] = field(default_factory=list)
    task_gradients: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)


class GradientBalancer(Balancer):
    r"""Base class of balancers that combine per-task gradients instead of losses.

    A subclass implements :meth:`weigh`, which maps the Gramian :math:`G = J J^\top` of the
    present tasks to coefficients :math:`c`; the combined gradient of the shared parameters is
    :math:`d = \sum_i c_i g_i`. A subclass whose result is not such a combination sets
    ``needs_jacobian = True`` and overrides :meth:`aggregate`, which receives the Jacobian.
    Subclasses pass ``gradients``, ``task_gradients``, ``task_parameters``, ``seed`` and
    ``on_nonfinite`` through to this constructor, and may use :attr:`present_tasks` (the tasks
    of the rows of :math:`G`) and :attr:`generator` (a CPU random generator, saved in
    ``state_dict``) inside :meth:`weigh` and :meth:`aggregate`.

    Three ways to use it:

    - Fast path, :meth:`backward` (``balancer.backward(losses)`` in place of
      ``total.backward()``): one ``torch.autograd.grad`` per task, then the combined gradient is
      written into ``.grad``. Cost: one forward plus T backward passes.
    - Task rounds, :meth:`accumulate` per micro-batch then :meth:`step_gradients` once per step:
      when tasks arrive in separate micro-batches, each task's gradient is summed over the round
      and the method combines the rows once.
    - Slow path, ``total = balancer(losses)`` then ``total.backward()``, for loops that own the
      backward call (Hugging Face ``Trainer``, Lightning): the coefficients are computed with T
      ``torch.autograd.grad`` calls that write no ``.grad``, and the returned total is
      :math:`\sum_i c_i L_i` with :math:`c` detached (plus zero-valued terms that correct the
      gradient where the result is not :math:`\sum_i c_i g_i`). Its backward produces the same
      ``.grad`` as the fast path at the cost of one extra backward pass.

    ``gradients`` selects what :math:`J` is taken over:

    - ``"shared"``: all of ``shared_parameters`` (the exact method; :math:`J` is T x P, and only
      :math:`G` is computed unless the method needs :math:`J`).
    - ``"last_shared_layer"``: ``shared_parameters`` are the last shared layer only. The
      coefficients come from that layer's Gramian and are applied to the full backward pass of
      :math:`\sum_i c_i L_i`. Cost: one forward, T backward passes through the heads and that
      layer, and one full backward. Not available when the method needs :math:`J`.
    - ``"features"``: gradients with respect to the shared representation passed as
      ``backward(losses, features=...)``, as in MGDA-UB (Sener and Koltun, "Multi-Task Learning
      as Multi-Objective Optimization", NeurIPS 2018). The combined representation gradient is
      then back-propagated once through the shared model, which by linearity gives
      :math:`\sum_i c_i \nabla_\theta L_i`. Cost: one forward, T backward passes through the
      heads, one full backward. Everything between ``features`` and a loss counts as that
      task's parameters.

    Task-specific parameters (heads) receive the gradient of their own task's loss with
    ``task_gradients="unweighted"`` (default), as TorchJD's ``mtl_backward`` and LibMTL do. With
    ``"weighted"`` they receive :math:`c_i \nabla L_i`, the gradient of :math:`\sum_i c_i L_i`.
    Reported :attr:`weights` are :math:`c`.

    NOTE: under ``DistributedDataParallel`` each rank computes :math:`c` from its own batch. With
    ``gradients="shared"`` the fast path writes ``.grad`` directly, which does not trigger DDP's
    gradient all-reduce, so average ``.grad`` over the ranks after :meth:`backward`. The other
    two sources end with an ordinary backward pass, which DDP reduces.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters (or, with ``gradients="last_shared_layer"``,
            the last shared layer's parameters), each requiring grad.
        gradients: ``"shared"`` (default), ``"last_shared_layer"`` or ``"features"``.
        task_gradients: ``"unweighted"`` (default) or ``"weighted"``, see above.
        task_parameters: the parameters of each task's head, by task name. ``None`` (default)
            finds them in each loss's autograd graph: the leaves that are not shared parameters
            (and, when ``features`` are given, not below the features). Required with
            ``gradients="last_shared_layer"`` and ``task_gradients="unweighted"``, because there
            the heads cannot be told apart from the layers below the given one.
        seed: seed of :attr:`generator`; ``None`` seeds it from the operating system.
        on_nonfinite: ``"skip"`` (default) leaves a task with a NaN or infinite loss or
            gradient out of the step; ``"raise"`` raises
            :class:`~multitune.balancing.NonFiniteLossError`.
    """

    requires_shared_parameters = True
    #: True when :meth:`aggregate` needs the full Jacobian, not only the Gramian.
    needs_jacobian: bool = False

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        gradients: GradientSource = "shared",
        task_gradients: TaskGradientPolicy = "unweighted",
        task_parameters: Mapping[str, Iterable[Tensor]] | None = None,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        owner = type(self).__name__
        if gradients not in _SOURCES:
            raise ValueError(f"{owner}: gradients must be one of {list(_SOURCES)}, got {gradients!r}")
        if task_gradients not in _POLICIES:
            raise ValueError(f"{owner}: task_gradients must be one of {list(_POLICIES)}, got {task_gradients!r}")
        self.gradients: GradientSource = gradients
        self.task_gradients: TaskGradientPolicy = task_gradients

        shared = _checked_parameters(shared_parameters, owner=owner)
        # A plain tuple, so the model's parameters are not registered as the balancer's own.
        self._shared_parameters: tuple[Tensor, ...] = tuple(shared)
        self._task_parameters = _checked_task_parameters(task_parameters, self.task_names, shared, owner=owner)

        if gradients == "last_shared_layer":
            if self._uses_jacobian():
                raise ValueError(
                    f"{owner} needs the full Jacobian, which gradients='last_shared_layer' does not provide; "
                    "use gradients='shared' or gradients='features'"
                )
            if task_gradients == "unweighted" and self._task_parameters is None:
                raise ValueError(
                    f"{owner}: gradients='last_shared_layer' with task_gradients='unweighted' needs "
                    "task_parameters= (the parameters of each task's head, by task name), or set "
                    "task_gradients='weighted'"
                )

        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

        #: Names of the tasks whose rows :meth:`weigh` and :meth:`aggregate` receive, in order.
        self.present_tasks: tuple[str, ...] = ()
        self._coefficients: Tensor | None = None
        self._coefficient_weights: dict[str, float] = {}
        self._round: _Round | None = None

    @property
    def shared_parameters(self) -> tuple[Tensor, ...]:
        return self._shared_parameters

    @property
    def weights(self) -> dict[str, float]:
        """Coefficients :math:`c` of the last step, by task; tasks absent from that step are not listed."""
        return dict(self._coefficient_weights)

    # Methods a subclass implements --------------------------------------------------------------

    def weigh(self, gramian: Tensor) -> Tensor:
        r"""Return the coefficients :math:`c` (shape (k,)) for the Gramian :math:`G` (shape (k, k)) of the present tasks."""
        raise NotImplementedError(f"{type(self).__name__} must implement weigh(gramian) or aggregate(jacobian)")

    def aggregate(self, jacobian: Tensor) -> Tensor:
        r"""Return the combined gradient (shape (P,)) for the Jacobian (shape (k, P)) of the present tasks.

        The default is :math:`J^\top c` with :math:`c` from :meth:`weigh` applied to :math:`J J^\top`.
        """
        coefficients = self._weigh_checked(jacobian @ jacobian.T)
        return coefficients.to(jacobian.dtype) @ jacobian

    # Fast path ---------------------------------------------------------------------------------

    def backward(self, losses: Mapping[str, Tensor], *, features: Features | None = None, **kwargs: Any) -> Tensor:
        r"""Write the combined gradient into ``.grad`` and return :math:`\sum_i c_i L_i` (detached).

        Equivalent to :meth:`accumulate` followed by :meth:`step_gradients`. Gradients are added
        to existing ``.grad`` values, as ``Tensor.backward`` does. The autograd graph is freed.

        Args:
            losses: scalar loss by task name; missing tasks take no part in this step.
            features: the shared representation (required with ``gradients="features"``; with
                ``"shared"`` it only bounds the search for task parameters).
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}.backward got unexpected keyword arguments {sorted(kwargs)}")
        self.accumulate(losses, features=features)
        return self.step_gradients()

    def accumulate(self, losses: Mapping[str, Tensor], *, features: Features | None = None) -> None:
        """Add the per-task gradients of one micro-batch to the current round.

        Call it once per micro-batch (each with its own forward pass, for any subset of the
        tasks), then :meth:`step_gradients` once. A task seen in several micro-batches gets the
        sum of their gradients. With ``gradients="features"`` a round has one call, because
        representation gradients of different inputs cannot be compared. With
        ``"last_shared_layer"`` every micro-batch's graph is kept until :meth:`step_gradients`.
        """
        finite = self._finite_losses(losses)
        feature_tensors = self._checked_features(features)
        if not finite:
            return

        round_ = self._round
        if round_ is None:
            inputs = feature_tensors if self.gradients == "features" else self._shared_parameters
            round_ = _Round(GradientAccumulator(inputs, self.num_tasks))
            self._round = round_
        elif self.gradients == "features":
            raise RuntimeError(
                f"{type(self).__name__}: gradients='features' combines the gradients of one representation, "
                "so accumulate() takes one call per step; call step_gradients() first, or use gradients='shared' "
                "for task rounds"
            )

        names = list(finite)
        for position, name in enumerate(names):
            index = self.task_index[name]
            loss = finite[name]
            task_parameters = self._task_parameters_for(name, loss, feature_tensors)
            keep_graph = self.gradients != "shared" or position < len(names) - 1
            task_grads = round_.accumulator.backward(
                index, loss, task_parameters=task_parameters, retain_graph=keep_graph
            )
            if self.gradients == "features" and all(entry is None for entry in round_.accumulator.row(index)):
                self._round = None
                raise ValueError(
                    f"{type(self).__name__}: the loss of task {name!r} does not depend on the features passed to "
                    "backward(); pass the shared representation computed in this step's forward pass"
                )

            value = loss.detach()
            round_.loss_values[index] = value if index not in round_.loss_values else round_.loss_values[index] + value
            if self.gradients == "last_shared_layer":
                round_.losses.append((index, loss))
            # Held until step_gradients(), so that a task dropped there writes no gradient at all.
            pairs = [(p, g) for p, g in zip(task_parameters, task_grads) if g is not None]
            round_.task_gradients.setdefault(index, []).extend(pairs)

    def step_gradients(self) -> Tensor:
        r"""Combine the gradients accumulated since the last call, write ``.grad`` and return :math:`\sum_i c_i L_i`.

        The returned value (detached) sums each task's accumulated loss values. With nothing
        accumulated, no ``.grad`` changes and zero is returned.
        """
        round_, self._round = self._round, None
        zero = torch.zeros((), device=self._shared_parameters[0].device)
        if round_ is None or not round_.accumulator.tasks:
            self._set_weights({})
            self.step += 1
            return zero

        tasks, coefficients, combined = self._solve(round_.accumulator)
        if not tasks:
            self._set_weights({})
            self.step += 1
            return zero
        self._write_gradients(round_, combined, coefficients, tasks)

        self._set_weights({self.task_names[i]: float(c) for i, c in zip(tasks, coefficients.tolist())})
        self.step += 1
        values = torch.stack([round_.loss_values[i].to(coefficients.dtype) for i in tasks])
        return (coefficients.to(values.device) * values).sum()

    # Slow path ---------------------------------------------------------------------------------

    def forward(self, losses: Mapping[str, Tensor], *, features: Features | None = None) -> Tensor:  # type: ignore[override]
        r"""Return a total whose ``.backward()`` writes the same ``.grad`` as :meth:`backward`.

        Its value is :math:`\sum_i c_i L_i` with :math:`c` detached. Computing :math:`c` costs T
        ``torch.autograd.grad`` calls (graph retained, no ``.grad`` written) before the caller's
        own backward pass.
        """
        finite = self._finite_losses(losses)
        feature_tensors = self._checked_features(features)
        if not finite:
            self._set_weights({})
            self.step += 1
            return _zero_total(losses)

        total, weights = self._combine(finite, feature_tensors)
        self._set_weights(weights)
        self.step += 1
        return total

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, Mapping[str, float | Tensor]]:
        """Return the slow-path total and the coefficients by task (see :meth:`forward`)."""
        return self._combine(losses, ())

    def _combine(self, losses: Mapping[str, Tensor], feature_tensors: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, float]]:
        if self.gradients == "features" and not feature_tensors:
            raise ValueError(f"{type(self).__name__}: gradients='features' needs features= (the shared representation)")
        inputs = feature_tensors if self.gradients == "features" else self._shared_parameters
        accumulator = GradientAccumulator(inputs, self.num_tasks)
        head_gradients: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for name, loss in losses.items():
            index = self.task_index[name]
            task_parameters = self._task_parameters_for(name, loss, feature_tensors)
            task_grads = accumulator.backward(index, loss, task_parameters=task_parameters, retain_graph=True)
            head_gradients[index] = [(p, g) for p, g in zip(task_parameters, task_grads) if g is not None]

        tasks, coefficients, aggregated = self._solve(accumulator, keep_rows=True)
        if not tasks:
            return _zero_total(losses), {}
        values = coefficients.tolist()
        total = torch.stack([losses[self.task_names[i]] * c for i, c in zip(tasks, values)]).sum()

        corrections: list[tuple[Tensor, Tensor]] = []
        if aggregated is not None:
            # The method's gradient is not sum_i c_i g_i; the difference enters through inputs.
            linear = accumulator.combine(coefficients)
            for tensor, target, part in zip(inputs, aggregated, linear):
                if target is not None:
                    corrections.append((tensor, target if part is None else target - part))
        if self.task_gradients == "unweighted":
            for i, c in zip(tasks, values):
                if c != 1.0:
                    corrections.extend((p, g * (1.0 - c)) for p, g in head_gradients.get(i, []))

        for tensor, direction in corrections:
            direction = direction.detach()
            # Zero in value; its gradient with respect to `tensor` is `direction`.
            total = total + ((tensor * direction).sum() - (tensor.detach() * direction).sum())
        return total, {self.task_names[i]: c for i, c in zip(tasks, values)}

    # Internals ---------------------------------------------------------------------------------

    def _set_weights(self, weights: Mapping[str, float]) -> None:
        self._coefficient_weights = {name: float(w) for name, w in weights.items()}

    def _uses_jacobian(self) -> bool:
        return self.needs_jacobian or type(self).aggregate is not GradientBalancer.aggregate

    def _weigh_checked(self, gramian: Tensor) -> Tensor:
        coefficients = self.weigh(gramian)
        k = gramian.shape[0]
        if not isinstance(coefficients, Tensor) or tuple(coefficients.shape) != (k,):
            shape = tuple(coefficients.shape) if isinstance(coefficients, Tensor) else type(coefficients).__name__
            raise ValueError(f"{type(self).__name__}.weigh must return a tensor of shape ({k},), got {shape}")
        coefficients = coefficients.detach()
        if not torch.isfinite(coefficients).all():
            raise FloatingPointError(
                f"{type(self).__name__}.weigh returned non-finite coefficients {coefficients.tolist()} "
                f"for the Gramian {gramian.tolist()}"
            )
        self._coefficients = coefficients
        return coefficients

    def _solve(
        self, accumulator: GradientAccumulator, *, keep_rows: bool = False
    ) -> tuple[list[int], Tensor, list[Tensor | None] | None]:
        """Return the tasks kept, their coefficients and, for Jacobian methods, the combined gradient per input.

        Tasks whose gradient is not finite are dropped first (see :meth:`_drop_nonfinite`). For
        Gramian methods the combined gradient is left to the caller (``None``).
        """
        if not self._uses_jacobian():
            gramian = accumulator.gramian()
            finite = torch.isfinite(gramian.diagonal()).tolist()
            if not all(finite):
                keep = self._drop_nonfinite(accumulator, finite)
                gramian = gramian[keep][:, keep]
            tasks = accumulator.tasks
            if not tasks:
                return [], gramian.new_zeros(0), None
            self.present_tasks = tuple(self.task_names[i] for i in tasks)
            self._coefficients = None
            return tasks, self._weigh_checked(gramian), None

        jacobian = accumulator.jacobian()
        finite = torch.isfinite(jacobian.sum(dim=1)).tolist()
        if not all(finite):
            keep = self._drop_nonfinite(accumulator, finite)
            jacobian = jacobian[keep]
        tasks = accumulator.tasks
        if not tasks:
            return [], jacobian.new_zeros(0), None

        self.present_tasks = tuple(self.task_names[i] for i in tasks)
        self._coefficients = None
        direction = self.aggregate(jacobian)
        if not isinstance(direction, Tensor) or tuple(direction.shape) != (jacobian.shape[1],):
            shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
            raise ValueError(f"{type(self).__name__}.aggregate must return a tensor of shape ({jacobian.shape[1]},), got {shape}")
        coefficients = self._coefficients
        if coefficients is None:
            coefficients = torch.ones(jacobian.shape[0], dtype=jacobian.dtype, device=jacobian.device)
        if not keep_rows:
            accumulator.reset()
        return tasks, coefficients, _split(direction.detach(), accumulator.inputs)

    def _write_gradients(
        self,
        round_: _Round,
        combined: list[Tensor | None] | None,
        coefficients: Tensor,
        tasks: list[int],
    ) -> None:
        accumulator = round_.accumulator
        values = coefficients.tolist()

        if self.gradients == "last_shared_layer":
            accumulator.reset()
            by_index = dict(zip(tasks, values))
            parts = [loss * by_index[i] for i, loss in round_.losses if i in by_index]
            torch.stack(parts).sum().backward()
        else:
            if combined is None:
                combined = accumulator.combine(coefficients)
            if self.gradients == "shared":
                accumulate_grads(accumulator.inputs, combined)
            else:
                pairs = [(t, g) for t, g in zip(accumulator.inputs, combined) if g is not None]
                torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])

        for i, c in zip(tasks, values):
            pairs = round_.task_gradients.get(i, [])
            factor = self._task_gradient_factor(c)
            if not pairs or factor is None:
                continue
            gradients = [g if factor == 1.0 else g.mul_(factor) for _, g in pairs]
            accumulate_grads([p for p, _ in pairs], gradients)

    def _task_gradient_factor(self, coefficient: float) -> float | None:
        """Return the factor on a task's head gradient that gives it the policy's gradient (``None``: add nothing)."""
        if self.gradients == "last_shared_layer":
            # The full backward of sum_i c_i L_i already gave the heads c_i g_i.
            return 1.0 - coefficient if self.task_gradients == "unweighted" else None
        return 1.0 if self.task_gradients == "unweighted" else coefficient

    def _drop_nonfinite(self, accumulator: GradientAccumulator, finite: list[bool]) -> list[int]:
        """Drop the rows whose gradient has a NaN or infinite entry (or raise, by ``on_nonfinite``).

        ``finite`` has one flag per task in ``accumulator.tasks``; returns the positions kept.
        """
        keep: list[int] = []
        for position, (index, ok) in enumerate(zip(accumulator.tasks, finite)):
            if ok:
                keep.append(position)
                continue
            name = self.task_names[index]
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"task {name!r}: gradient has NaN or infinite entries at step {int(self.step)}; "
                    "lower the learning rate, check the task's data, or build the balancer with on_nonfinite='skip'"
                )
            accumulator.drop(index)
            count = self.nonfinite_counts.get(name, 0) + 1
            self.nonfinite_counts[name] = count
            if count == 1:
                logger.warning(
                    "task %r: gradient has NaN or infinite entries at step %d; the task is left out of this step "
                    "(later occurrences are counted in nonfinite_counts, not logged)",
                    name,
                    int(self.step),
                )
        return keep

    def _task_parameters_for(self, name: str, loss: Tensor, features: tuple[Tensor, ...]) -> list[Tensor]:
        if self._task_parameters is not None:
            return self._task_parameters.get(name, [])
        if self.gradients == "last_shared_layer":
            return []
        return graph_leaves(loss, stop_at=features, exclude=self._shared_parameters)

    def _checked_features(self, features: Features | None) -> tuple[Tensor, ...]:
        if features is None:
            if self.gradients == "features":
                raise ValueError(
                    f"{type(self).__name__}: gradients='features' needs features= (the shared representation "
                    "that every head reads, for example the encoder's last hidden state)"
                )
            return ()
        tensors = (features,) if isinstance(features, Tensor) else tuple(features)
        for position, tensor in enumerate(tensors):
            if not isinstance(tensor, Tensor) or not tensor.requires_grad:
                raise ValueError(
                    f"{type(self).__name__}: features[{position}] must be a tensor that requires grad "
                    "(the output of the shared model, not detached)"
                )
        return tensors

    # State -------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Return the random generator's state (subclasses extend this dictionary)."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gradients={self.gradients!r}, task_gradients={self.task_gradients!r}"


def _checked_parameters(parameters: Iterable[Tensor], *, owner: str) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    result = unique_tensors(list(parameters))
    if not result:
        raise ValueError(f"{owner}: shared_parameters is empty; pass the shared model's parameters, e.g. model.encoder.parameters()")
    for position, parameter in enumerate(result):
        if not isinstance(parameter, Tensor) or not parameter.requires_grad:
            raise ValueError(
                f"{owner}: shared_parameters[{position}] does not require grad; pass only trainable parameters, "
                "e.g. [p for p in encoder.parameters() if p.requires_grad]"
            )
    return result


def _checked_task_parameters(
    task_parameters: Mapping[str, Iterable[Tensor]] | None,
    task_names: tuple[str, ...],
    shared: list[Tensor],
    *,
    owner: str,
) -> dict[str, list[Tensor]] | None:
    if task_parameters is None:
        return None
    unknown = [name for name in task_parameters if name not in task_names]
    if unknown:
        raise KeyError(f"{owner}: task_parameters has unknown task(s) {unknown}; known tasks: {list(task_names)}")
    shared_ids = {id(p) for p in shared}
    result: dict[str, list[Tensor]] = {}
    for name in task_names:
        parameters = unique_tensors(list(task_parameters.get(name, [])))
        overlap = [i for i, p in enumerate(parameters) if id(p) in shared_ids]
        if overlap:
            raise ValueError(
                f"{owner}: task_parameters[{name!r}] contains shared parameters (positions {overlap}); "
                "a parameter is either shared or task-specific"
            )
        result[name] = [p for p in parameters if p.requires_grad]
    return result


def _split(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor | None]:
    """Split a flat vector into views shaped like ``like``."""
    parts: list[Tensor | None] = []
    offset = 0
    for tensor in like:
        size = tensor.numel()
        parts.append(vector[offset : offset + size].view(tensor.shape))
        offset += size
    return parts
