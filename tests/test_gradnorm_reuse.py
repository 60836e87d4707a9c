r"""Cases where ``GradNorm.backward()`` with reused gradients at W must match ``reuse_gradients=False``.

The reused gradient is :math:`\sum_i w_i(t) \nabla_W L_i`, summed from the per-task gradients of
the weight update, while the total is back-propagated with ``inputs=`` set to the other leaves of
the graph. Each test builds two copies of one float64 model and compares the gradients of
``reuse_gradients=None`` (the default) with those of ``reuse_gradients=False``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitune.balancing import GradNorm

NAMES = ("a", "b", "c")


class TiedNet(nn.Module):
    """An embedding tied to an output projection (task "a"), a shared layer and two heads, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(11, 6, dtype=torch.float64)
        self.shared = nn.Linear(6, 6, dtype=torch.float64)
        self.output = nn.Linear(6, 11, bias=False, dtype=torch.float64)
        self.output.weight = self.embedding.weight
        self.heads = nn.ModuleList(nn.Linear(6, 1, dtype=torch.float64) for _ in range(2))

    def task_losses(self, step: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, 11, (4, 5), generator=generator)
        features = torch.tanh(self.shared(self.embedding(ids)))
        pooled = features.mean(1)
        targets = torch.randn(2, 4, generator=generator, dtype=torch.float64)
        return {
            "a": nn.functional.cross_entropy(self.output(features).reshape(-1, 11), ids.reshape(-1)),
            "b": (self.heads[0](pooled).squeeze(-1) - targets[0]).pow(2).mean(),
            "c": (self.heads[1](pooled).squeeze(-1) - targets[1]).pow(2).mean(),
        }


class ReentrantCheckpointNet(nn.Module):
    """A block under ``checkpoint(use_reentrant=True)`` before the shared layer, then three heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, 5, dtype=torch.float64)
        self.block = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.Tanh())
        self.shared = nn.Linear(6, 6, dtype=torch.float64)
        self.heads = nn.ModuleList(nn.Linear(6, 1, dtype=torch.float64) for _ in NAMES)

    def task_losses(self, step: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        targets = torch.randn(len(NAMES), 8, generator=generator, dtype=torch.float64)
        # The block's input requires grad (it comes from self.embed), as a reentrant checkpoint needs.
        features = torch.tanh(self.shared(checkpoint(self.block, self.embed(x), use_reentrant=True)))
        return {name: (head(features).squeeze(-1) - targets[i]).pow(2).mean() for i, (name, head) in enumerate(zip(NAMES, self.heads))}


def assert_same_gradients(reusing_model: nn.Module, plain_model: nn.Module) -> None:
    for (name, got), (_, expected) in zip(reusing_model.named_parameters(), plain_model.named_parameters()):
        assert (got.grad is None) == (expected.grad is None), name
        if got.grad is not None:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-14, msg=lambda detail: f"{name}: {detail}")


def test_reuse_duplicate_shared_tensor() -> None:
    """A tensor listed twice in shared_parameters (a tied weight) gets the total's gradient once."""
    reusing_model = TiedNet()
    plain_model = copy.deepcopy(reusing_model)
    # The parameters of two submodules that share a tied weight, concatenated without deduplication.
    reusing_shared = list(reusing_model.embedding.parameters()) + list(reusing_model.output.parameters())
    plain_shared = list(plain_model.embedding.parameters()) + list(plain_model.output.parameters())
    reusing = GradNorm(NAMES, reusing_shared)
    plain = GradNorm(NAMES, plain_shared, reuse_gradients=False)

    for step in range(2):
        reusing_model.zero_grad(set_to_none=True)
        plain_model.zero_grad(set_to_none=True)
        reusing.backward(reusing_model.task_losses(step))
        plain.backward(plain_model.task_losses(step))
        assert_same_gradients(reusing_model, plain_model)


def test_reuse_reentrant_checkpoint_before_w() -> None:
    """A reentrant checkpoint below W, which plain backward supports, does not make backward() raise."""
    reusing_model = ReentrantCheckpointNet()
    plain_model = copy.deepcopy(reusing_model)
    reusing = GradNorm(NAMES, reusing_model.shared.weight)
    plain = GradNorm(NAMES, plain_model.shared.weight, reuse_gradients=False)

    for step in range(2):
        reusing_model.zero_grad(set_to_none=True)
        plain_model.zero_grad(set_to_none=True)
        plain.backward(plain_model.task_losses(step))
        # torch rejects `inputs=` on a graph that contains a reentrant checkpoint, so backward()
        # must run the plain backward pass of the total there.
        reusing.backward(reusing_model.task_losses(step))
        assert_same_gradients(reusing_model, plain_model)
        torch.testing.assert_close(reusing.task_weights, plain.task_weights, rtol=1e-12, atol=0.0)
