"""Cross-checks of the gradient-based balancers against TorchJD's aggregators (torchjd 0.18).

Every check aggregates random float64 Jacobians with both libraries and compares the combined
vectors. The definitions coincide except where noted:

- PCGrad and GradVac draw the order of the other tasks at random; TorchJD uses the global PyTorch
  random generator, multitune a generator of its own. With two tasks the order does not matter
  and the results are equal at every step. With three tasks, TorchJD's result must equal
  multitune's for one of the 2^3 combinations of orders.
- CAGrad: TorchJD does not rescale the direction; multitune's default divides it by 1 + c^2 as
  the official code does, so ``rescale="none"`` is compared. TorchJD solves the dual with cvxpy
  and Clarabel, multitune in closed form (two tasks) or with SciPy's SLSQP. With five tasks the
  directions differ by up to about 1e-4 relative, and multitune's reaches the larger value of the
  objective min_i <g_i, d>.
- Nash-MTL: both solve G alpha = 1/alpha (after dividing G by its Frobenius norm for
  conditioning) and clip the norm of the combined gradient to ``max_norm``. TorchJD runs the
  official sequence of convex programs (cvxpy, ECOS), multitune Newton steps; on these Jacobians
  the results differ by at most about 3e-8 (relative).
- GradDrop: both use the same formula; TorchJD draws U with the global generator, which the
  test seeds to give the same draws as those passed to multitune.
- IMTL-G: TorchJD computes pinv(G) sqrt(diag(G)), normalised to sum to 1. multitune computes the
  closed form of Liu et al. (ICLR 2021), alpha = g_1 U^T (D U^T)^{-1}. They are equal when G has full rank, which random
  Jacobians with at least as many columns as rows have.
- MGDA: both run Frank-Wolfe (Sener and Koltun, Algorithm 2); TorchJD's epsilon=1e-3 and
  max_iters=100 are passed to multitune as tol and max_iter.
- UPGrad and Aligned-MTL: same definitions and defaults.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from multitune.balancing._aligned_mtl import aligned_mtl_weights
from multitune.balancing._cagrad import cagrad_weights
from multitune.balancing._graddrop import graddrop_aggregate
from multitune.balancing._gradvac import gradvac_weights
from multitune.balancing._imtl_g import imtl_g_weights
from multitune.balancing._mgda import min_norm_weights
from multitune.balancing._nash_mtl import NashMTL
from multitune.balancing._pcgrad import pcgrad_weights
from multitune.balancing._upgrad import upgrad_weights

aggregation = pytest.importorskip("torchjd.aggregation")

SHAPES = [(2, 3), (2, 10), (3, 5), (4, 6), (5, 12)]


def _jacobians(shape: tuple[int, int], count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    scales = torch.rand(count, shape[0], 1, generator=generator, dtype=torch.float64) * 4 + 0.1
    base = torch.randn(count, *shape, generator=generator, dtype=torch.float64)
    return list(base * scales)


def _combined(weights: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    return weights.to(jacobian.dtype) @ jacobian


@pytest.mark.parametrize("shape", SHAPES)
def test_upgrad(shape):
    pytest.importorskip("qpsolvers")
    aggregator = aggregation.UPGrad()
    for jacobian in _jacobians(shape):
        ours = _combined(upgrad_weights(jacobian @ jacobian.T), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_mgda_frank_wolfe(shape):
    aggregator = aggregation.MGDA(epsilon=1e-3, max_iters=100)
    for jacobian in _jacobians(shape):
        ours = _combined(min_norm_weights(jacobian @ jacobian.T, solver="frank_wolfe", max_iter=100, tol=1e-3), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_imtl_g(shape):
    aggregator = aggregation.IMTLG()
    for jacobian in _jacobians(shape):
        ours = _combined(imtl_g_weights(jacobian @ jacobian.T), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl(shape, scale):
    aggregator = aggregation.AlignedMTL(scale_mode=scale)
    for jacobian in _jacobians(shape):
        ours = _combined(aligned_mtl_weights(jacobian @ jacobian.T, scale=scale), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-8, atol=1e-10)


def test_aligned_mtl_with_preference():
    preference = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    aggregator = aggregation.AlignedMTL(pref_vector=preference)
    for jacobian in _jacobians((3, 5)):
        ours = _combined(aligned_mtl_weights(jacobian @ jacobian.T, preference), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3), (2, 10)])
def test_pcgrad_two_tasks(shape):
    aggregator = aggregation.PCGrad()
    for jacobian in _jacobians(shape):
        ours = _combined(pcgrad_weights(jacobian @ jacobian.T, [[1], [0]]), jacobian)
        torch.testing.assert_close(ours, aggregator(jacobian), rtol=1e-10, atol=1e-12)


def _all_orders(num_tasks: int) -> list[list[list[int]]]:
    per_task = [list(itertools.permutations([j for j in range(num_tasks) if j != i])) for i in range(num_tasks)]
    return [[list(order) for order in combination] for combination in itertools.product(*per_task)]


def test_pcgrad_three_tasks_matches_one_order():
    aggregator = aggregation.PCGrad()
    torch.manual_seed(0)
    for jacobian in _jacobians((3, 4), count=8):
        gramian = jacobian @ jacobian.T
        reference = aggregator(jacobian)
        distances = [(_combined(pcgrad_weights(gramian, orders), jacobian) - reference).abs().max().item() for orders in _all_orders(3)]
        assert min(distances) < 1e-10


def test_gradvac_two_tasks_over_steps():
    beta = 0.3
    aggregator = aggregation.GradVac(beta=beta, eps=1e-8)
    targets = np.zeros((2, 2))
    for jacobian in _jacobians((2, 6), count=10):
        coefficients, targets = gradvac_weights(jacobian @ jacobian.T, targets, [[1], [0]], beta=beta, eps=1e-8)
        torch.testing.assert_close(_combined(coefficients, jacobian), aggregator(jacobian), rtol=1e-9, atol=1e-12)


def test_gradvac_three_tasks_matches_one_order():
    torch.manual_seed(0)
    for jacobian in _jacobians((3, 5), count=6):
        aggregator = aggregation.GradVac(beta=0.5, eps=1e-8)
        reference = aggregator(jacobian)
        gramian = jacobian @ jacobian.T
        distances = []
        for orders in _all_orders(3):
            coefficients, _ = gradvac_weights(gramian, np.zeros((3, 3)), orders, beta=0.5, eps=1e-8)
            distances.append((_combined(coefficients, jacobian) - reference).abs().max().item())
        assert min(distances) < 1e-10


@pytest.mark.parametrize("leak", [None, [0.0, 0.5, 1.0]])
def test_graddrop(leak):
    leak_tensor = None if leak is None else torch.tensor(leak, dtype=torch.float64)
    aggregator = aggregation.GradDrop(leak=leak_tensor)
    for index, jacobian in enumerate(_jacobians((3, 40))):
        torch.manual_seed(index)
        uniform = torch.rand(jacobian.shape[1], dtype=torch.float64)
        torch.manual_seed(index)
        reference = aggregator(jacobian)
        ours = graddrop_aggregate(jacobian, uniform, leak=leak_tensor)
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_cagrad(shape):
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    aggregator = aggregation.CAGrad(c=0.4)
    for jacobian in _jacobians(shape):
        ours = _combined(cagrad_weights(jacobian @ jacobian.T, c=0.4, rescale="none"), jacobian)
        reference = aggregator(jacobian)
        torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3 * reference.norm().item())
        # Both are feasible; the primal objective min_i <g_i, d> of ours is at least TorchJD's.
        g0 = jacobian.mean(dim=0)
        assert (ours - g0).norm() <= 0.4 * g0.norm() * (1 + 1e-9)
        assert (jacobian @ ours).min() >= (jacobian @ reference).min() - 1e-9 * jacobian.norm() ** 2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_mtl(shape, max_norm):
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    placeholder = torch.zeros(1, requires_grad=True)
    for jacobian in _jacobians(shape):
        # A common component keeps the random gradients away from Pareto stationarity, where
        # neither solver has a solution to agree on.
        jacobian = jacobian + jacobian.mean(dim=0, keepdim=True) * 2
        ours = NashMTL([f"task{i}" for i in range(shape[0])], [placeholder], max_norm=max_norm)
        aggregator = aggregation.NashMTL(n_tasks=shape[0], max_norm=max_norm, optim_niter=100)
        with warnings.catch_warnings():
            # cvxpy warns that the official problem is not DPP.
            warnings.simplefilter("ignore")
            reference = aggregator(jacobian)
        combined = _combined(ours.weigh(jacobian @ jacobian.T), jacobian)
        torch.testing.assert_close(combined, reference, rtol=1e-6, atol=1e-6 * reference.norm().item())
