"""Helpers over :mod:`torch.distributed` that also work in a single process.

Every function here behaves as in a one-process run (rank 0, world size 1, identity mean) when
:mod:`torch.distributed` is unavailable or its default process group is not initialised, so
library code can call them without checking how it was launched.

A balancer averages its statistics over ranks once :func:`mean_across_ranks` is its reduce
function::

    balancer.set_reduce_fn(mean_across_ranks if is_distributed() else None)
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

_HALF_PRECISION = (torch.float16, torch.bfloat16)


def is_distributed() -> bool:
    """Return whether :mod:`torch.distributed` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's rank in the default process group, or 0 outside a distributed run."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Return the number of processes in the default process group, or 1 outside a distributed run."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_mean(tensor: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    r"""Return the element-wise mean of ``tensor`` over the ranks of ``group``.

    .. math::

        \bar{x} = \frac{1}{W} \sum_{r=0}^{W-1} x_r

    Every rank must call this with a tensor of the same shape and dtype, since the call is a
    collective ``all_reduce``. The input is never modified: the result is a new tensor, detached
    from the autograd graph, on the input's device. float16 and bfloat16 tensors are summed in
    float32 and the mean is returned in the input dtype. Outside a distributed run, or with one
    rank, the result is a detached copy of the input.

    Args:
        tensor: floating-point tensor of any shape.
        group: process group to average over; ``None`` (default) is the default group.

    Raises:
        TypeError: when ``tensor`` is not floating point (an integer mean would be truncated).
    """
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got dtype {tensor.dtype}; convert it with .float()")

    # NOTE: the result carries no gradient, because a balancer reduces statistics before a state
    # update. A differentiable mean would need torch.distributed.nn.functional.all_reduce.
    result = tensor.detach().clone()
    if not is_distributed():
        return result
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return result

    # The gloo backend has no AVG operation, so the mean is a SUM divided by the world size.
    buffer = result.float() if result.dtype in _HALF_PRECISION else result
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    buffer /= world_size
    return buffer.to(tensor.dtype)


def mean_across_ranks(tensor: Tensor) -> Tensor:
    """Return the mean of ``tensor`` over all ranks of the default group, for use as a balancer's reduce function.

    Pass it to :meth:`multitune.balancing.Balancer.set_reduce_fn` so that every rank makes the
    same state update from the same averaged statistics. See :func:`all_reduce_mean`.
    """
    return all_reduce_mean(tensor)
