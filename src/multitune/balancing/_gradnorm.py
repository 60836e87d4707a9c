"""GradNorm: learn task weights that balance the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from multitune.distributed import is_distributed

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer

logger = logging.getLogger(__name__)

OptimizerName = Literal["adam", "sgd"]
InitialLosses = Literal["first"] | int | Mapping[str, float]


@register_balancer
class GradNorm(Balancer):
    r"""GradNorm task weighting.

    From Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018 (https://arxiv.org/abs/1711.02257),
    Algorithm 1. The model is trained on :math:`\mathcal{L} = \sum_i w_i(t)\,\mathcal{L}_i(t)`,
    and the weights :math:`w_i` are learned so that every task's gradient norm at the shared
    parameters :math:`W` (typically the weight of the last shared layer) follows its training rate:

    .. math::

        G_i &= \lVert \nabla_W\, w_i \mathcal{L}_i \rVert_2 = w_i \lVert \nabla_W \mathcal{L}_i \rVert_2,
        \qquad \bar{G} = \tfrac{1}{T}\textstyle\sum_j G_j,

        \tilde{\mathcal{L}}_i &= \mathcal{L}_i(t) / \mathcal{L}_i(0), \qquad
        r_i = \tilde{\mathcal{L}}_i \big/ \tfrac{1}{T}\textstyle\sum_j \tilde{\mathcal{L}}_j,

        \mathcal{L}_{\text{grad}} &= \textstyle\sum_i \big\lvert G_i - \operatorname{sg}[\bar{G}\, r_i^{\alpha}] \big\rvert .

    :math:`\operatorname{sg}` stops the gradient: the whole target :math:`\bar{G} r_i^\alpha` is a
    constant. A task that trains slower (larger :math:`\tilde{\mathcal{L}}_i`, so :math:`r_i > 1`)
    gets a larger target and so a larger weight. Because :math:`G_i` is linear in :math:`w_i`, the
    gradient is computed in closed form, without a second-order graph:

    .. math:: \frac{\partial \mathcal{L}_{\text{grad}}}{\partial w_i}
              = \operatorname{sign}\big(G_i - \bar{G} r_i^{\alpha}\big)\, \lVert \nabla_W \mathcal{L}_i \rVert_2 .

    Each norm costs one ``torch.autograd.grad(L_i, W, retain_graph=True)``, which runs back only
    from the task's loss to :math:`W`. Those :math:`T` passes each end in the weight-gradient
    product of :math:`W`'s layer, the main cost of the method. :meth:`backward` reuses them: the
    model's gradient at :math:`W` is :math:`\sum_i w_i(t) \nabla_W \mathcal{L}_i`, which is
    summed from the per-task gradients while the total is back-propagated to every other
    parameter only, so a weight-update step computes :math:`T` weight-gradient products at
    :math:`W` instead of :math:`T + 1` (see ``reuse_gradients``). The measured cost of a step is
    on the benchmark page (``benchmarks/step_overhead.py``).

    The closed-form gradient is written into the weights' ``.grad`` and the weights' own
    optimizer takes a step. Then the weights are clamped to ``min_weight`` and
    renormalised so that :math:`\sum_i w_i = T`. The model's gradient in the same step uses the
    weights from before this update (:math:`w_i(t)`): the returned total is
    :math:`\sum_i \operatorname{sg}[w_i(t)]\, \mathcal{L}_i`, so :math:`\nabla \mathcal{L}_{\text{grad}}`
    reaches only the weights and never the model's parameters.

    Weights are stored in the buffer :attr:`task_weights`, not in an ``nn.Parameter``, so passing
    ``balancer.parameters()`` to the model's optimizer does not optimise them a second time. The
    buffer, the initial losses and the weights' optimizer state (Adam moments) are all in
    ``state_dict()``, so a resumed run continues with the same weights.

    Missing tasks: a step updates only the tasks present in it, and the present tasks are
    renormalised so that their weight sum is unchanged (the absent tasks keep their weights and
    their optimizer moments, so :math:`\sum_i w_i = T` still holds). A weight update needs at
    least two tasks with a known initial loss in the step, so a step with one such task leaves
    the weights unchanged.

    Distributed runs: the task losses and the norms :math:`\lVert \nabla_W \mathcal{L}_i \rVert`
    pass through :meth:`~multitune.balancing.Balancer.reduce_task_stats` before they are used, so
    every rank makes the same update. NOTE: each rank's norm is taken on its own batch, and the
    mean of per-rank norms is at least the norm of the mean gradient (triangle inequality).

    In ``eval()`` mode, and when no loss requires grad, the weights and the initial losses are
    not updated.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters :math:`W` at which the gradient norms are taken,
            one tensor or several, whose gradients count as one vector for the norm. A tensor
            listed more than once counts once. Pass the
            last shared layer, e.g. ``model.encoder.layer[-1].output.dense.weight``. The
            balancer keeps references to them and does not register them as its parameters.
        alpha: strength :math:`\alpha \ge 0` of the restoring force toward equal training rates;
            default 1.5. ``alpha=0`` asks for equal gradient norms.
        lr: learning rate of the weights' optimizer; default 0.025.
        optimizer: ``"adam"`` (default, ``torch.optim.Adam``) or ``"sgd"`` (plain
            ``torch.optim.SGD``) for the weights.
        initial_losses: how :math:`\mathcal{L}_i(0)` is set, per task: ``"first"`` (default) uses
            the task's first loss; an int ``k`` uses the mean of the task's first ``k`` losses, and
            the task's weight is not updated before then; a mapping gives the value of every task
            (e.g. :math:`\log C` for a ``C``-class cross-entropy at chance).
        update_every: update the weights every this many calls (counted by
            :attr:`~multitune.balancing.Balancer.step`); the other calls cost a plain weighted
            sum, without gradient norms. Default 1.
        min_weight: lower bound of a weight after each optimizer step, ``> 0``; default 1e-4.
        per_task_backward: ``False`` (default): :meth:`backward` takes each norm with
            ``autograd.grad`` at ``shared_parameters`` and then back-propagates the total once.
            ``True``: :meth:`backward` runs one backward pass per task through the whole model
            and takes each task's norm from that pass's gradient (the square root of the Gramian
            diagonal, :func:`multitune.gradients.task_gradient_norms`), while the same passes
            accumulate the gradient of the total into ``.grad``. Use it with ``shared_parameters``
            set to *all* shared parameters, for norms over the whole shared network at the cost
            of :math:`T` backward passes and no more.
        reuse_gradients: whether :meth:`backward` builds the model's gradient at ``shared_parameters``
            from the per-task gradients of a weight-update step, instead of computing it again in
            the backward pass of the total. ``None`` (default): yes, unless a ``torch.distributed``
            process group is initialised. ``True``: always. ``False``: never. A graph with a
            reentrant ``torch.utils.checkpoint`` segment (``use_reentrant=True``) always takes
            the plain backward pass. Calling the balancer and ``.backward()`` on the total,
            instead of :meth:`backward`, never reuses. NOTE: with reuse, gradient hooks at
            ``shared_parameters`` see other gradients. Post-accumulate-grad hooks do not run,
            so ``DistributedDataParallel``, which all-reduces from them, needs ``None`` or
            ``False``. Tensor hooks (``W.register_hook``) run once per task on the unweighted
            task gradient and never on the total's, so a hook that is not linear (clipping, for
            example) changes the result.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "gradnorm"
    requires_shared_parameters = True

    task_weights: Tensor
    initial_losses: Tensor
    initial_loss_count: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Tensor | Iterable[Tensor],
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: OptimizerName = "adam",
        initial_losses: InitialLosses = "first",
        update_every: int = 1,
        min_weight: float = 1e-4,
        per_task_backward: bool = False,
        reuse_gradients: bool | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        self._shared_parameters: tuple[Tensor, ...] = _validate_shared_parameters(shared_parameters)
        self.alpha = _check_float("alpha", alpha, minimum=0.0, inclusive=True)
        self.lr = _check_float("lr", lr, minimum=0.0, inclusive=False)
        self.min_weight = _check_float("min_weight", min_weight, minimum=0.0, inclusive=False)
        if self.min_weight >= 1.0:
            raise ValueError(f"GradNorm: min_weight must be < 1 (the mean weight is 1), got {self.min_weight}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"GradNorm: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer_name: OptimizerName = optimizer
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"GradNorm: update_every must be an int >= 1, got {update_every!r}")
        self.update_every = update_every
        self.per_task_backward = bool(per_task_backward)
        self._precomputed_norms: dict[str, Tensor] | None = None
        if reuse_gradients is not None and not isinstance(reuse_gradients, bool):
            raise ValueError(f"GradNorm: reuse_gradients must be None, True or False, got {reuse_gradients!r}")
        self.reuse_gradients = reuse_gradients
        # Filled by the weight update while backward() reuses the per-task gradients.
        self._reuse: _GradientReuse | None = None

        self.register_buffer("task_weights", torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("initial_loss_count", torch.zeros(self.num_tasks, dtype=torch.long))
        self.initial_loss_steps = self._set_initial_losses(initial_losses)

        self._optimizer = self._make_optimizer()
        self._known: list[bool] | None = None
        self._last_grad_norms: tuple[Tensor, Tensor] | None = None
        self._warned_no_update = False
        self._warned_nonfinite_norms = False

    # Public read-outs --------------------------------------------------------------------------

    @property
    def shared_parameters(self) -> tuple[Tensor, ...]:
        """The shared parameters :math:`W` at which the gradient norms are taken."""
        return self._shared_parameters

    @property
    def grad_norms(self) -> dict[str, float]:
        r"""Gradient norms :math:`G_i = w_i(t) \lVert \nabla_W \mathcal{L}_i \rVert` of the last weight update, by task.

        Only the tasks that took part in that update are listed; empty before the first update.
        The norms are the values after :meth:`~multitune.balancing.Balancer.reduce_task_stats`.
        """
        if self._last_grad_norms is None:
            return {}
        norms, active = self._last_grad_norms
        return {name: norm for name, norm, used in zip(self.task_names, norms.tolist(), active.tolist()) if used}

    # Balancer ------------------------------------------------------------------------------------

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        stacked = torch.stack(list(losses.values()))
        if len(losses) == self.num_tasks:
            # Cloned, because the update below changes task_weights in place while autograd
            # keeps these values for the backward pass of the total.
            weights = self.task_weights.clone()
        else:
            index = torch.tensor([self.task_index[name] for name in losses], device=self.task_weights.device)
            weights = self.task_weights[index]
        total = (weights.to(stacked.dtype) * stacked).sum()
        if self._reuse is not None:
            self._reuse.total_tasks = list(losses)

        if self.training and (self._precomputed_norms is not None or any(loss.requires_grad for loss in losses.values())):
            if not all(self._known_tasks()):
                self._record_initial_losses(losses)
            if self.update_every == 1 or int(self.step) % self.update_every == 0:
                self._update_weights(losses)
        return total, weights

    def backward(self, losses: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        r"""Back-propagate the weighted total and update the weights; return the total, detached.

        With ``per_task_backward=False`` the gradients are those of ``self(losses).backward()``;
        on a weight-update step the per-task gradients at ``shared_parameters`` are reused for
        the model's gradient there (see ``reuse_gradients``). With ``True`` the :math:`T`
        per-task backward passes give both the norms and the model's gradient of
        :math:`\sum_i w_i(t) \mathcal{L}_i`, so no further backward pass runs.
        """
        if not self.training:
            return super().backward(losses, **kwargs)
        if not self.per_task_backward:
            return self._backward_reusing_gradients(losses)

        finite = self._finite_losses(losses)
        if not finite or not all(loss.requires_grad for loss in finite.values()):
            return super().backward(losses, **kwargs)

        from multitune.gradients import task_gradient_norms

        index = [self.task_index[name] for name in finite]
        weights = self.task_weights[index].detach().clone()
        norms = task_gradient_norms(list(finite.values()), self._shared_parameters, weights=weights)
        self._precomputed_norms = {name: norm.to(weights.dtype) for name, norm in zip(finite, norms)}
        detached = {name: loss.detach() for name, loss in finite.items()}
        try:
            total = self(detached)
        finally:
            self._precomputed_norms = None
        return total.detach()

    def _backward_reusing_gradients(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Back-propagate the total; on an update step sum the gradient at ``W`` from the task gradients."""
        reuse = None
        if self._reuse_allowed():
            # The graph is read before the call changes any state: a graph that the backward pass
            # below cannot restrict to some leaves takes the plain path from the start.
            leaves = _graph_leaves([loss for loss in losses.values() if isinstance(loss, Tensor) and loss.grad_fn is not None])
            if leaves is not None:
                reuse = _GradientReuse(self._shared_parameters, leaves)
        self._reuse = reuse
        try:
            total = self(losses)
        finally:
            self._reuse = None
        if not total.requires_grad:
            return total.detach()

        if reuse is None or not reuse.covers_total():
            total.backward()
            return total.detach()

        if reuse.other_leaves:
            torch.autograd.backward(total, inputs=reuse.other_leaves)
        reuse.add_to_grad()
        return total.detach()

    def _reuse_allowed(self) -> bool:
        if self.reuse_gradients is False or not all(parameter.is_leaf for parameter in self._shared_parameters):
            return False
        if self.reuse_gradients is None and is_distributed():
            return False
        return self.update_every == 1 or int(self.step) % self.update_every == 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self._weight_optimizer().state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._weight_optimizer().load_state_dict(state["optimizer"])
        self._known = None
        self._last_grad_norms = None

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.task_names)}, alpha={self.alpha}, lr={self.lr}, optimizer={self.optimizer_name!r}, "
            f"update_every={self.update_every}"
        )

    # Initial losses ------------------------------------------------------------------------------

    def _set_initial_losses(self, initial_losses: InitialLosses) -> int:
        """Validate ``initial_losses``, fill the buffers for a mapping and return the steps per task."""
        if isinstance(initial_losses, str):
            if initial_losses != "first":
                raise ValueError(f"GradNorm: initial_losses must be 'first', an int >= 1 or a mapping, got {initial_losses!r}")
            return 1

        if isinstance(initial_losses, Mapping):
            unknown = [name for name in initial_losses if name not in self.task_index]
            if unknown:
                raise ValueError(f"GradNorm: initial_losses given for unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
            missing = [name for name in self.task_names if name not in initial_losses]
            if missing:
                raise ValueError(f"GradNorm: initial_losses has no value for task(s) {missing}; give every task a value > 0")
            for i, name in enumerate(self.task_names):
                value = float(initial_losses[name])
                if not (math.isfinite(value) and value > 0.0):
                    raise ValueError(f"GradNorm: the initial loss of task {name!r} must be a finite number > 0, got {value}")
                self.initial_losses[i] = value
            self.initial_loss_count.fill_(1)
            return 1

        if isinstance(initial_losses, bool) or not isinstance(initial_losses, int) or initial_losses < 1:
            raise ValueError(f"GradNorm: initial_losses must be 'first', an int >= 1 or a mapping, got {initial_losses!r}")
        return initial_losses

    def _known_tasks(self) -> list[bool]:
        """Return, per task, whether its initial loss is known (a host copy of the count buffer)."""
        if self._known is None:
            self._known = (self.initial_loss_count >= self.initial_loss_steps).tolist()
        return self._known

    def _record_initial_losses(self, losses: dict[str, Tensor]) -> None:
        means, present = self.reduce_task_stats(losses)
        take = present & (self.initial_loss_count < self.initial_loss_steps)
        count = self.initial_loss_count + take.long()
        running_mean = self.initial_losses + (means[0].to(self.initial_losses.dtype) - self.initial_losses) / count.clamp_min(1)
        self.initial_losses.copy_(torch.where(take, running_mean, self.initial_losses))
        self.initial_loss_count.copy_(count)
        self._known = None

    # Weight update -------------------------------------------------------------------------------

    def _update_weights(self, losses: dict[str, Tensor]) -> None:
        known = self._known_tasks()
        candidates = [name for name in losses if known[self.task_index[name]]]
        distributed = self._reduce_fn is not None
        if sum(known) < 2 or (not distributed and len(candidates) < 2):
            self._warn_no_update(len(candidates))
            return
        if not candidates:
            # Every rank takes part in the collective call, also one without tasks to add.
            self.reduce(torch.zeros((3, self.num_tasks), device=self.task_weights.device))
            return

        if self._precomputed_norms is not None:
            norms = {name: self._precomputed_norms[name] for name in candidates}
        else:
            norms = {name: self._gradient_norm(name, losses[name]) for name in candidates}
        means, present = self.reduce_task_stats({name: losses[name] for name in candidates}, norms)
        finite_norms = torch.isfinite(means[1]) | ~present
        if not bool(finite_norms.all()):
            self._warn_nonfinite_norms([name for name, finite in zip(self.task_names, finite_norms.tolist()) if not finite])
            return
        dtype = self.task_weights.dtype
        loss_ratios = means[0].to(dtype) / self.initial_losses.clamp_min(torch.finfo(dtype).tiny)
        gradient, weighted_norms = gradnorm_weight_gradient(self.task_weights, means[1].to(dtype), loss_ratios, present, self.alpha)
        self._step_weights(gradient, present)
        self._last_grad_norms = (weighted_norms, present)

    def _gradient_norm(self, name: str, loss: Tensor) -> Tensor:
        hint = (
            "pass the weight of the last shared layer as shared_parameters "
            "(e.g. model.encoder.layer[-1].output.dense.weight)"
        )
        if not loss.requires_grad:
            raise ValueError(f"GradNorm: the loss of task {name!r} does not require grad, so it does not reach shared_parameters; {hint}")
        grads = torch.autograd.grad(loss, self._shared_parameters, retain_graph=True, allow_unused=True)
        if self._reuse is not None:
            self._reuse.add(name, self.task_weights[self.task_index[name]], grads)
        reached = [grad for grad in grads if grad is not None]
        if not reached:
            raise ValueError(f"GradNorm: the loss of task {name!r} does not depend on shared_parameters; {hint}")
        if len(reached) == 1:
            return torch.linalg.vector_norm(reached[0])
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad) for grad in reached]))

    def _step_weights(self, gradient: Tensor, active: Tensor) -> None:
        """Take one optimizer step on the active weights, then clamp and renormalise them."""
        optimizer = self._weight_optimizer()
        weights = self.task_weights
        before = weights.clone()
        state = optimizer.state.get(weights, {})
        state_before = {key: value.clone() for key, value in state.items() if isinstance(value, Tensor) and value.shape == weights.shape}

        weights.grad = gradient
        optimizer.step()
        weights.grad = None

        with torch.no_grad():
            # An absent task keeps its weight and its optimizer moments.
            weights.copy_(torch.where(active, weights, before))
            for key, value in state_before.items():
                state[key].copy_(torch.where(active, state[key], value))

            weights.copy_(torch.where(active, weights.clamp_min(self.min_weight), weights))
            inactive_sum = torch.where(active, 0.0, weights).sum()
            active_sum = torch.where(active, weights, 0.0).sum()
            scale = (self.num_tasks - inactive_sum) / active_sum
            weights.copy_(torch.where(active, weights * scale, weights))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam([self.task_weights], lr=self.lr)
        return torch.optim.SGD([self.task_weights], lr=self.lr)

    def _weight_optimizer(self) -> torch.optim.Optimizer:
        """Return the weights' optimizer, rebuilt with its state after ``.to()`` replaced the buffer."""
        if self._optimizer.param_groups[0]["params"][0] is not self.task_weights:
            state = self._optimizer.state_dict()
            self._optimizer = self._make_optimizer()
            self._optimizer.load_state_dict(state)
        return self._optimizer

    def _warn_nonfinite_norms(self, tasks: list[str]) -> None:
        if self._warned_nonfinite_norms:
            return
        self._warned_nonfinite_norms = True
        logger.warning(
            "GradNorm: the gradient norm of task(s) %s at shared_parameters is NaN or inf although the loss is finite; "
            "the weights are not updated in such steps (this message is logged once)",
            tasks,
        )

    def _warn_no_update(self, num_candidates: int) -> None:
        if self._warned_no_update or (self.initial_loss_steps > 1 and not all(self._known_tasks())):
            return
        self._warned_no_update = True
        logger.warning(
            "GradNorm: a step had %d task(s) with a known initial loss; the weights are updated only in "
            "steps with two or more such tasks (this message is logged once)",
            num_candidates,
        )


class _GradientReuse:
    r"""The running sum :math:`\sum_i w_i(t) \nabla_W \mathcal{L}_i` of one step's task gradients at ``W``."""

    def __init__(self, shared_parameters: tuple[Tensor, ...], leaves: list[Tensor]) -> None:
        self.shared_parameters = shared_parameters
        shared_ids = {id(parameter) for parameter in shared_parameters}
        self.other_leaves = [leaf for leaf in leaves if id(leaf) not in shared_ids]
        self.sums: list[Tensor | None] = [None] * len(shared_parameters)
        self.tasks: list[str] = []
        self.total_tasks: list[str] | None = None

    def add(self, name: str, weight: Tensor, grads: Sequence[Tensor | None]) -> None:
        self.tasks.append(name)
        for k, grad in enumerate(grads):
            if grad is None:
                continue
            term = weight.to(grad.dtype)
            current = self.sums[k]
            self.sums[k] = grad * term if current is None else current.addcmul_(grad, term)

    def covers_total(self) -> bool:
        """Return whether every task of the total, and no other, gave its gradient."""
        return self.total_tasks is not None and sorted(self.tasks) == sorted(self.total_tasks)

    def add_to_grad(self) -> None:
        """Add the sums into ``.grad`` in place, or set ``.grad`` where it is ``None``; no gradient hook runs."""
        with torch.no_grad():
            for parameter, summed in zip(self.shared_parameters, self.sums):
                if summed is None:
                    continue
                summed = summed.to(parameter.dtype)
                if parameter.grad is None:
                    parameter.grad = summed
                else:
                    parameter.grad.add_(summed)


def _graph_leaves(roots: Sequence[Tensor]) -> list[Tensor] | None:
    """Return the leaf tensors that a backward pass from ``roots`` accumulates into.

    Returns ``None`` when the graph contains a reentrant ``torch.utils.checkpoint`` segment, because
    torch rejects ``inputs=`` in a backward pass through one.
    """
    leaves: list[Tensor] = []
    seen: set[Any] = set()
    stack = [root.grad_fn for root in roots]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "CheckpointFunctionBackward":
            return None
        for next_node, _ in node.next_functions:
            if next_node is None or next_node in seen:
                continue
            seen.add(next_node)
            variable = getattr(next_node, "variable", None)
            if variable is not None:
                leaves.append(variable)
            else:
                stack.append(next_node)
    return leaves


def gradnorm_weight_gradient(
    weights: Tensor,
    norms: Tensor,
    loss_ratios: Tensor,
    active: Tensor,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    r"""Return the gradient of GradNorm's :math:`\mathcal{L}_{\text{grad}}` with respect to the weights.

    All arguments are vectors over the tasks: ``weights`` :math:`w_i`, ``norms``
    :math:`\lVert \nabla_W \mathcal{L}_i \rVert`, ``loss_ratios``
    :math:`\tilde{\mathcal{L}}_i = \mathcal{L}_i(t)/\mathcal{L}_i(0)` and the bool mask ``active``
    of the tasks that take part (means run over these). With :math:`G_i = w_i \lVert \nabla_W
    \mathcal{L}_i \rVert` and the target :math:`\bar{G} r_i^{\alpha}` held constant, the gradient
    is :math:`\operatorname{sign}(G_i - \bar{G} r_i^{\alpha}) \lVert \nabla_W \mathcal{L}_i \rVert`
    for an active task and 0 otherwise.

    Returns:
        ``(gradient, weighted_norms)``, both of the shape of ``weights``; ``weighted_norms`` is
        :math:`G_i`.
    """
    mask = active.to(weights.dtype)
    count = mask.sum().clamp_min(1.0)
    weighted_norms = weights.detach() * norms
    mean_norm = (weighted_norms * mask).sum() / count

    mean_ratio = (loss_ratios * mask).sum() / count
    relative_rates = loss_ratios / mean_ratio.clamp_min(torch.finfo(weights.dtype).tiny)
    targets = mean_norm * relative_rates.pow(alpha)

    gradient = torch.where(active, torch.sign(weighted_norms - targets) * norms, 0.0)
    return gradient, weighted_norms


def _validate_shared_parameters(shared_parameters: Tensor | Iterable[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(shared_parameters, Tensor):
        parameters: tuple[Tensor, ...] = (shared_parameters,)
    else:
        parameters = tuple(shared_parameters)
    if not parameters:
        raise ValueError("GradNorm: shared_parameters is empty; pass the weight of the last shared layer")
    for i, parameter in enumerate(parameters):
        if not isinstance(parameter, Tensor):
            raise TypeError(f"GradNorm: shared_parameters[{i}] must be a tensor, got {type(parameter).__name__}")
        if not parameter.requires_grad:
            raise ValueError(
                f"GradNorm: shared_parameters[{i}] (shape {tuple(parameter.shape)}) does not require grad; "
                "pass a trainable parameter of the last shared layer"
            )

    # A tensor listed twice (a tied weight reached through two modules) counts once.
    unique: dict[int, Tensor] = {}
    for parameter in parameters:
        unique.setdefault(id(parameter), parameter)
    return tuple(unique.values())


def _check_float(name: str, value: float, *, minimum: float, inclusive: bool) -> float:
    value = float(value)
    bound_ok = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and bound_ok):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"GradNorm: {name} must be a finite number {relation} {minimum}, got {value}")
    return value
