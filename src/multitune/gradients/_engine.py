r"""Per-task gradients, Jacobians, Gramians and gradient norms with one backward pass per task.

For task losses :math:`L_1, \dots, L_T` and tensors :math:`\theta` (the shared parameters, the
last shared layer, or the shared representation), the task Jacobian is

.. math::

    J = \begin{bmatrix} \nabla_\theta L_1 & \cdots & \nabla_\theta L_T \end{bmatrix}^\top
    \in \mathbb{R}^{T \times P}, \qquad G = J J^\top \in \mathbb{R}^{T \times T}.

Every function here runs one :func:`torch.autograd.grad` call per task, with ``retain_graph``
for all but the last, which is the cost of ``loss_i.backward(retain_graph=True)`` for each task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._accumulator import GradientAccumulator, _own
from ._graph import graph_leaves, unique_tensors


def task_jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
    """Return the (T, P) Jacobian of the scalar ``losses`` with respect to ``inputs`` (flattened, concatenated).

    Row ``i`` is the gradient of ``losses[i]``; an input that a loss does not reach contributes zeros.
    """
    accumulator = _accumulate(losses, inputs, retain_graph=retain_graph)
    return accumulator.jacobian()


def task_gramian(losses: Sequence[Tensor], inputs: Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
    r"""Return the (T, T) Gramian :math:`J J^\top` of the scalar ``losses`` with respect to ``inputs``.

    The Jacobian is never built: each entry is a sum of per-tensor dot products.
    """
    accumulator = _accumulate(losses, inputs, retain_graph=retain_graph)
    return accumulator.gramian()


def task_gradient_norms(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    weights: Tensor | Sequence[float] | None = None,
    retain_graph: bool = False,
) -> Tensor:
    r"""Return :math:`\|\nabla_\theta L_i\|_2` for each loss, shape (T,), detached.

    These are the square roots of the Gramian's diagonal. Only one task's gradient is held at a
    time, so the memory cost is one gradient, not the (T, P) Jacobian.

    With ``weights`` :math:`w`, the same backward passes also accumulate the gradient of
    :math:`\sum_i w_i L_i` into ``.grad`` of ``params`` and of every other leaf each loss reaches
    (task heads), as ``(sum(w_i * L_i)).backward()`` would. GradNorm (Chen et al., "GradNorm:
    Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018)
    with norms over all shared parameters then costs T backward passes in total. Pass
    ``weights`` only when ``params`` are all the shared parameters: with the last shared layer
    alone, the layers below it count as "other leaves" and each task's pass runs through them.

    Args:
        losses: scalar task losses.
        params: tensors the norms are taken over (the shared parameters).
        weights: optional loss weights, one per loss (used as constants).
        retain_graph: keep the graph after the last loss (needed to call backward on it again).
    """
    params = unique_tensors(list(params))
    if not params:
        raise ValueError("task_gradient_norms needs at least one parameter")
    if not losses:
        raise ValueError("task_gradient_norms needs at least one loss")
    weight_values = _weights(weights, len(losses))

    norms: list[Tensor] = []
    for index, loss in enumerate(losses):
        keep = retain_graph or index < len(losses) - 1
        others = graph_leaves(loss, exclude=params) if weight_values is not None else []
        inputs = params + others
        gradients = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)

        squares = [_squared_norm(g) for g in gradients[: len(params)] if g is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
        norms.append(total.sqrt())

        if weight_values is not None:
            owned = _own(gradients, inputs)
            scaled = [None if g is None else g.mul_(weight_values[index]) for g in owned]
            accumulate_grads(inputs, scaled)

    dtype = torch.promote_types(params[0].dtype, torch.float32)
    return torch.stack(norms).to(dtype)


def accumulate_grads(tensors: Sequence[Tensor], gradients: Sequence[Tensor | None]) -> None:
    """Add each gradient to the matching tensor's ``.grad``, as autograd's accumulation does.

    A tensor without ``.grad`` takes the given gradient object itself (no copy), so the caller
    must not modify it afterwards. ``None`` gradients leave ``.grad`` unchanged.
    """
    if len(tensors) != len(gradients):
        raise ValueError(f"got {len(tensors)} tensors but {len(gradients)} gradients")
    for tensor, gradient in zip(tensors, gradients):
        if gradient is None:
            continue
        if tensor.grad is None:
            tensor.grad = gradient.detach()
        else:
            tensor.grad.add_(gradient)


def _accumulate(losses: Sequence[Tensor], inputs: Sequence[Tensor], *, retain_graph: bool) -> GradientAccumulator:
    inputs = unique_tensors(list(inputs))
    if not losses:
        raise ValueError("expected at least one loss")
    accumulator = GradientAccumulator(inputs, num_tasks=len(losses))
    for index, loss in enumerate(losses):
        keep = retain_graph or index < len(losses) - 1
        accumulator.backward(index, loss, retain_graph=keep)
    return accumulator


def _squared_norm(gradient: Tensor) -> Tensor:
    flat = gradient.reshape(-1)
    return torch.dot(flat, flat).to(torch.float64)


def _weights(weights: Tensor | Sequence[float] | None, count: int) -> list[float] | None:
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        values = [float(v) for v in weights.detach().reshape(-1).tolist()]
    else:
        values = [float(v) for v in weights]
    if len(values) != count:
        raise ValueError(f"expected {count} weights (one per loss), got {len(values)}")
    return values
