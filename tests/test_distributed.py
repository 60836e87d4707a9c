"""Tests of multitune.distributed in one process and in a real two-process gloo group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multitune.balancing import Balancer
from multitune.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    all_reduce_mean,
    get_rank,
    get_world_size,
    is_distributed,
    mean_across_ranks,
)

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 120.0


class LossMeanBalancer(Balancer):
    """Sums the losses with weight 1 and stores the rank-mean of the losses it received."""

    def __init__(self, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.register_buffer("mean_losses", torch.zeros(len(task_names)))

    def combine(self, losses):
        statistics = torch.stack([loss.detach() for loss in losses.values()])
        self.mean_losses.copy_(self.reduce(statistics))
        total = torch.stack(list(losses.values())).sum()
        return total, {name: 1.0 for name in losses}


# One process ------------------------------------------------------------------------------------


def test_single_process_rank_and_size():
    assert not is_distributed()
    assert get_rank() == 0
    assert get_world_size() == 1


def test_single_process_mean_is_copy():
    tensor = torch.tensor([1.5, -2.0, 3.25], requires_grad=True)

    result = all_reduce_mean(tensor)

    torch.testing.assert_close(result, tensor.detach(), rtol=0, atol=0)
    assert result.data_ptr() != tensor.data_ptr()
    assert not result.requires_grad
    result.add_(1.0)
    torch.testing.assert_close(tensor.detach(), torch.tensor([1.5, -2.0, 3.25]), rtol=0, atol=0)


def test_single_process_mean_keeps_dtype():
    tensor = torch.tensor([0.5, 1.5], dtype=torch.bfloat16)
    result = mean_across_ranks(tensor)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result, tensor, rtol=0, atol=0)


def test_integer_tensor_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        all_reduce_mean(torch.tensor([1, 2, 3]))


def test_balancer_reduce_single_process():
    balancer = LossMeanBalancer(["a", "b"])
    balancer.set_reduce_fn(mean_across_ranks)

    balancer({"a": torch.tensor(2.0), "b": torch.tensor(5.0)})

    torch.testing.assert_close(balancer.mean_losses, torch.tensor([2.0, 5.0]))


# Two processes ----------------------------------------------------------------------------------


def _rank_values(rank: int) -> torch.Tensor:
    """Per-rank input: [1, 2, 3, -4] on rank 0 and twice that on rank 1."""
    return torch.tensor([1.0, 2.0, 3.0, -4.0]) * (rank + 1)


def _rank_losses(rank: int) -> dict[str, torch.Tensor]:
    """Per-rank task losses: a=1 and b=10 on rank 0, a=3 and b=30 on rank 1."""
    scale = 1.0 + 2.0 * rank
    return {
        "a": torch.tensor(1.0 * scale, requires_grad=True),
        "b": torch.tensor(10.0 * scale, requires_grad=True),
    }


class _GradientModule(torch.nn.Module):
    """Parameters whose values differ by rank: every entry is r + 1 on rank r."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        value = float(rank + 1)
        self.both = torch.nn.Parameter(torch.full((4,), value))
        self.rank0_only = torch.nn.Parameter(torch.full((2,), value))
        self.none = torch.nn.Parameter(torch.full((3,), value))
        self.low_precision = torch.nn.Parameter(torch.full((2,), value, dtype=torch.bfloat16))
        self.frozen = torch.nn.Parameter(torch.full((2,), value), requires_grad=False)
        self.register_buffer("count", torch.tensor([rank + 10]))


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    # Gloo exchanges data over TCP after the file rendezvous, and the loopback interface keeps it on 127.0.0.1.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        results: dict[str, object] = {
            "is_distributed": is_distributed(),
            "rank": get_rank(),
            "world_size": get_world_size(),
        }

        values = _rank_values(rank)
        results["mean"] = all_reduce_mean(values)
        results["input_after"] = values
        results["mean_bfloat16"] = all_reduce_mean(values.to(torch.bfloat16))
        results["mean_scalar"] = mean_across_ranks(torch.tensor(float(rank)))

        balancer = LossMeanBalancer(["a", "b"])
        balancer.set_reduce_fn(mean_across_ranks)
        losses = _rank_losses(rank)
        total = balancer(losses)
        total.backward()
        results["balancer_mean"] = balancer.mean_losses.clone()
        results["total"] = total.detach()
        results["grad_a"] = losses["a"].grad

        # Task "b" is present only on rank 0, so its mean counts rank 0 alone.
        partial = {"a": torch.tensor(4.0 * (rank + 1))}
        if rank == 0:
            partial["b"] = torch.tensor(7.0)
        results["task_means"], results["task_present"] = balancer.reduce_task_stats(partial)

        # Gradients: "both" has a gradient on both ranks, "rank0_only" on rank 0 only, "none" on neither,
        # "low_precision" is bfloat16; "frozen" does not require grad.
        module = _GradientModule(rank)
        module.both.grad = _rank_values(rank)
        if rank == 0:
            module.rank0_only.grad = torch.tensor([6.0, -2.0])
        module.low_precision.grad = (_rank_values(rank)[:2] * 0.5).to(torch.bfloat16)
        all_reduce_gradients(module.parameters())
        results["gradients"] = {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}

        broadcast_target = _GradientModule(rank)
        broadcast_parameters(broadcast_target)
        results["broadcast"] = {name: tensor.clone() for name, tensor in broadcast_target.state_dict().items()}

        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, object]]:
    """Run ``_worker`` on two gloo ranks once and load what each rank saved."""
    directory: Path = tmp_path_factory.mktemp("gloo")
    init_file = directory / "rendezvous"
    context = mp.spawn(_worker, args=(str(init_file), str(directory)), nprocs=WORLD_SIZE, join=False)

    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {WORLD_SIZE}-process gloo group did not finish within {SPAWN_TIMEOUT_S} s")

    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_ranks_see_group(rank_results):
    for rank, results in enumerate(rank_results):
        assert results["is_distributed"] is True
        assert results["rank"] == rank
        assert results["world_size"] == WORLD_SIZE


def test_all_reduce_mean_two_ranks(rank_results):
    expected = (_rank_values(0) + _rank_values(1)) / 2
    for rank, results in enumerate(rank_results):
        torch.testing.assert_close(results["mean"], expected)
        torch.testing.assert_close(results["mean_scalar"], torch.tensor(0.5))


def test_all_reduce_mean_leaves_input(rank_results):
    for rank, results in enumerate(rank_results):
        torch.testing.assert_close(results["input_after"], _rank_values(rank), rtol=0, atol=0)


def test_all_reduce_mean_bfloat16(rank_results):
    expected = ((_rank_values(0) + _rank_values(1)) / 2).to(torch.bfloat16)
    for results in rank_results:
        assert results["mean_bfloat16"].dtype == torch.bfloat16
        torch.testing.assert_close(results["mean_bfloat16"], expected)


def test_balancer_reduce_sees_rank_mean(rank_results):
    # Rank 0 has losses (1, 10) and rank 1 has (3, 30): every rank must store the mean (2, 20).
    for results in rank_results:
        torch.testing.assert_close(results["balancer_mean"], torch.tensor([2.0, 20.0]))


def test_balancer_total_stays_local(rank_results):
    for rank, results in enumerate(rank_results):
        local = _rank_losses(rank)
        torch.testing.assert_close(results["total"], (local["a"] + local["b"]).detach())
        torch.testing.assert_close(results["grad_a"], torch.tensor(1.0))


def test_reduce_task_stats_counts_present_ranks(rank_results):
    for results in rank_results:
        torch.testing.assert_close(results["task_means"], torch.tensor([[6.0, 7.0]]))
        assert results["task_present"].tolist() == [True, True]


def test_all_reduce_gradients_mean_over_ranks(rank_results):
    for results in rank_results:
        gradients = results["gradients"]
        torch.testing.assert_close(gradients["both"], (_rank_values(0) + _rank_values(1)) / 2)


def test_all_reduce_gradients_missing_counts_as_zero(rank_results):
    # Rank 1 had no gradient for "rank0_only": the mean is (g_0 + 0) / 2 on both ranks.
    for results in rank_results:
        torch.testing.assert_close(results["gradients"]["rank0_only"], torch.tensor([3.0, -1.0]))


def test_all_reduce_gradients_none_everywhere_stays_none(rank_results):
    for results in rank_results:
        assert results["gradients"]["none"] is None
        assert results["gradients"]["frozen"] is None


def test_all_reduce_gradients_bfloat16(rank_results):
    expected = ((_rank_values(0)[:2] + _rank_values(1)[:2]) * 0.25).to(torch.bfloat16)
    for results in rank_results:
        assert results["gradients"]["low_precision"].dtype == torch.bfloat16
        torch.testing.assert_close(results["gradients"]["low_precision"], expected)


def test_broadcast_parameters_copies_rank_0(rank_results):
    expected = _GradientModule(0).state_dict()
    for results in rank_results:
        for name, tensor in expected.items():
            torch.testing.assert_close(results["broadcast"][name], tensor, rtol=0, atol=0)
