r"""Aligned-MTL: align the principal components of the task gradients to equal magnitude."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._base import NonFinitePolicy
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._gramian_tools import gramian_to_numpy, weights_like
from ._registry import register_balancer

AlignedScale = Literal["min", "median", "rmse"]


def balance_transformation(gramian: Tensor, *, scale: AlignedScale = "min") -> Tensor:
    r"""Return :math:`B` such that the rows of :math:`BJ` have the Gramian :math:`\sigma^2 P_{\operatorname{range}(G)}`.

    With the eigendecomposition :math:`G = V \Lambda V^\top` restricted to the :math:`r`
    eigenvalues above :math:`\lambda_{\max} \cdot k \cdot \varepsilon` (:math:`\varepsilon` of the
    Gramian's dtype),

    .. math::

        B = \sigma\, V_r \Lambda_r^{-1/2} V_r^\top ,

    so that :math:`(BJ)(BJ)^\top = B G B = \sigma^2 V_r V_r^\top`: every nonzero singular value of
    :math:`BJ` equals :math:`\sigma` and its condition number is 1. :math:`\sigma^2` is the
    smallest kept eigenvalue (``scale="min"``, the choice of Senushkin et al.), their median
    (``"median"``, the lower middle value for an even count) or their mean (``"rmse"``, the root
    mean square of the singular values). When every eigenvalue is
    zero, :math:`B = I`.
    """
    matrix = gramian_to_numpy(gramian)
    k = matrix.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    threshold = float(eigenvalues.max()) * k * torch.finfo(gramian.dtype).eps
    keep = eigenvalues > max(threshold, 0.0)
    if not keep.any():
        return weights_like(np.eye(k), gramian)
    eigenvalues = eigenvalues[keep]
    eigenvectors = eigenvectors[:, keep]

    if scale == "min":
        sigma_squared = float(eigenvalues.min())
    elif scale == "median":
        # The lower of the two middle values for an even count, as torch.median returns.
        sigma_squared = float(np.sort(eigenvalues)[(eigenvalues.size - 1) // 2])
    elif scale == "rmse":
        sigma_squared = float(eigenvalues.mean())
    else:
        raise ValueError(f"balance_transformation: scale must be 'min', 'median' or 'rmse', got {scale!r}")

    transformation = np.sqrt(sigma_squared) * (eigenvectors / np.sqrt(eigenvalues)[None, :]) @ eigenvectors.T
    return weights_like(transformation, gramian)


def aligned_mtl_weights(gramian: Tensor, preference: Tensor | None = None, *, scale: AlignedScale = "min") -> Tensor:
    r"""Return :math:`\alpha = B w` (:func:`balance_transformation`), the coefficients of :math:`(BJ)^\top w = J^\top B w`.

    ``preference`` is :math:`w`, shape (k,); the default is :math:`\mathbf{1}/k`.
    """
    k = gramian.shape[0]
    transformation = balance_transformation(gramian, scale=scale).to(torch.float64).cpu()
    if preference is None:
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    else:
        weights = preference.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if weights.shape != (k,):
            raise ValueError(f"aligned_mtl_weights: preference must have shape ({k},), got {tuple(preference.shape)}")
    return weights_like((transformation @ weights).numpy(), gramian)


@register_balancer
class AlignedMTL(GradientBalancer):
    r"""Aligned-MTL: make the linear system of task gradients perfectly conditioned, then weight it.

    From *Independent Component Alignment for Multi-Task Learning* (Senushkin, Patakin,
    Kuznetsov & Konushin, CVPR 2023, https://arxiv.org/abs/2305.19000), Algorithm 1. The paper
    takes the condition number of the gradient matrix :math:`J` as a measure of conflicting
    and dominating gradients, and replaces :math:`J = V \Sigma U^\top` by the aligned matrix

    .. math::

        \hat J = \sigma\, V U^\top = B J, \qquad
        B = \sigma\, V \Sigma^{-1} V^\top, \qquad \sigma = \sigma_{\min}(J) ,

    whose nonzero singular values all equal :math:`\sigma` (condition number 1). :math:`V` and
    :math:`\Sigma^2` are the eigenvectors and eigenvalues of the Gramian :math:`G = JJ^\top`, so
    the update :math:`\hat J^\top w = J^\top (B w)` has the coefficients :math:`\alpha = B w`
    (:func:`aligned_mtl_weights`), with the task weights :math:`w` (``preference``, default
    :math:`1/T` each). Eigenvalues below :math:`\lambda_{\max} T \varepsilon` count as zero, so
    linearly dependent gradients are handled on the range of :math:`G`.

    The paper's Aligned-MTL-UB applies the same to the gradients with respect to the shared
    representation: ``gradients="features"``.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        preference: task weight :math:`w_i` by task name (default :math:`1/T` for every task;
            when tasks are missing from a step, the present tasks get :math:`1/k` each). Tasks
            not named get 0.
        scale: :math:`\sigma^2` is the smallest eigenvalue (``"min"``, default, the paper), the
            median (``"median"``) or the mean (``"rmse"``) of the kept eigenvalues.
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "aligned_mtl"

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        preference: Mapping[str, float] | None = None,
        scale: AlignedScale = "min",
        gradients: GradientSource = "shared",
        task_gradients: TaskGradientPolicy = "unweighted",
        task_parameters: Mapping[str, Iterable[Tensor]] | None = None,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(
            task_names,
            shared_parameters,
            gradients=gradients,
            task_gradients=task_gradients,
            task_parameters=task_parameters,
            seed=seed,
            on_nonfinite=on_nonfinite,
        )
        owner = type(self).__name__
        if scale not in ("min", "median", "rmse"):
            raise ValueError(f"{owner}: scale must be 'min', 'median' or 'rmse', got {scale!r}")
        self.scale: AlignedScale = scale
        self.preference: dict[str, float] | None = None
        if preference is not None:
            unknown = [name for name in preference if name not in self.task_index]
            if unknown:
                raise KeyError(f"{owner}: preference has unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
            self.preference = {name: float(preference.get(name, 0.0)) for name in self.task_names}

    def weigh(self, gramian: Tensor) -> Tensor:
        preference = None
        if self.preference is not None:
            names = self.present_tasks if len(self.present_tasks) == gramian.shape[0] else self.task_names
            preference = torch.tensor([self.preference[name] for name in names], dtype=torch.float64)
        return aligned_mtl_weights(gramian, preference, scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale!r}"
