"""Helpers shared by the gradient-based balancers that solve small problems on the task Gramian."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor


def gramian_to_numpy(gramian: Tensor) -> np.ndarray:
    """Return a float64 NumPy copy of a (k, k) Gramian, made exactly symmetric."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian of shape (k, k), got {tuple(gramian.shape)}")
    matrix = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    return 0.5 * (matrix + matrix.T)


def weights_like(values: np.ndarray, gramian: Tensor) -> Tensor:
    """Return ``values`` as a tensor with the Gramian's dtype and device."""
    return torch.as_tensor(values, dtype=torch.float64).to(device=gramian.device, dtype=gramian.dtype)


def draw_task_orders(num_tasks: int, generator: torch.Generator) -> list[list[int]]:
    """Return, for each task ``i``, the other tasks in a uniformly random order drawn from ``generator``."""
    orders: list[list[int]] = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        permutation = torch.randperm(len(others), generator=generator).tolist()
        orders.append([others[p] for p in permutation])
    return orders


def positive_definite(matrix: np.ndarray, *, ridge: float) -> np.ndarray:
    """Return ``matrix`` shifted by a multiple of the identity so that its smallest eigenvalue is at least ``ridge``.

    A Gramian computed in floating point can have eigenvalues slightly below zero; solvers that
    need a positive definite matrix (quadprog's Cholesky factorisation) reject those.
    """
    smallest = float(np.linalg.eigvalsh(matrix)[0])
    shift = max(ridge - smallest, 0.0)
    if shift == 0.0:
        return matrix
    return matrix + shift * np.eye(matrix.shape[0])


class SolverWarnings:
    """Log a solver problem at WARNING the first time and then every ``every``-th time, with a count."""

    def __init__(self, logger: logging.Logger, *, every: int = 100) -> None:
        self.logger = logger
        self.every = every
        self.count = 0

    def warn(self, message: str, *args: object) -> None:
        self.count += 1
        if self.count == 1 or self.count % self.every == 0:
            self.logger.warning(message + " (occurrence %d)", *args, self.count)
