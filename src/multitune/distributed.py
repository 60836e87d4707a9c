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
import os
from collections.abc import Iterable

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


def get_local_rank() -> int:
    """Return this process's rank on its machine, from the ``LOCAL_RANK`` variable that torchrun sets, else 0."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable LOCAL_RANK must be an integer, got {value!r}") from None


def launched_world_size() -> int:
    """Return the number of processes that the launcher started, from ``WORLD_SIZE`` (torchrun), else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None


def init_from_environment(*, use_cpu: bool = False) -> bool:
    """Initialise the default process group when a launcher such as torchrun started several processes.

    The launcher's variables (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) configure
    the group. The backend is NCCL when CUDA is available and ``use_cpu`` is false, and each
    process then uses the GPU of its ``LOCAL_RANK``. Otherwise it is gloo, on the CPU. Nothing
    happens in a one-process run or when the group is already initialised.

    Returns:
        Whether this call initialised the group (and so should also destroy it, with
        :func:`shutdown`).
    """
    if launched_world_size() <= 1 or is_distributed():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 requests a distributed run, but this PyTorch build has no torch.distributed; install a build with it or run one process")

    use_cuda = not use_cpu and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    logger.info("process group initialised: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Destroy the default process group, if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank reaches this call. Outside a distributed run it returns at once."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_parameters(module: torch.nn.Module, *, source: int = 0) -> None:
    """Copy the parameters and buffers of ``module`` on rank ``source`` to every other rank, in place."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source)


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    r"""Replace every parameter's ``.grad`` by its mean over the ranks, in place.

    .. math:: \bar{g} = \frac{1}{W} \sum_{r=0}^{W-1} g_r

    A rank whose parameter has no gradient (``.grad`` is ``None``) counts as a zero gradient, as in
    ``DistributedDataParallel``. A parameter without a gradient on every rank keeps ``None``, so
    the optimizer skips it as it would in a one-process run. The gradients are packed into one
    flat buffer per dtype and device, so a step makes one collective call per buffer plus one for
    the presence flags. Every rank must pass the same parameters in the same order.
    """
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not parameters or not is_distributed() or dist.get_world_size() == 1:
        return
    world_size = dist.get_world_size()
    device = parameters[0].device

    present = torch.tensor([parameter.grad is not None for parameter in parameters], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    reduced = [parameter for parameter, count in zip(parameters, present.tolist()) if count > 0]

    buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for parameter in reduced:
        buckets.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for (dtype, _), bucket in buckets.items():
        flat = torch.cat([
            (parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)).reshape(-1)
            for parameter in bucket
        ])
        summed = flat.float() if dtype in _HALF_PRECISION else flat
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        summed /= world_size
        mean = summed.to(dtype)
        offset = 0
        for parameter in bucket:
            count = parameter.numel()
            value = mean[offset : offset + count].view_as(parameter)
            offset += count
            if parameter.grad is None:
                parameter.grad = value.clone()
            else:
                parameter.grad.copy_(value)


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
