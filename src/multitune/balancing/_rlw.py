"""Random loss weighting: fresh random task weights at every step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer

WeightDistribution = Literal["normal", "dirichlet", "uniform"]


@register_balancer
class RLW(Balancer):
    r"""Random loss weighting (RLW): task weights drawn from a distribution at every step.

    From *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning*
    (Lin, Ye, Zhang & Tsang, TMLR 2022, https://arxiv.org/abs/2111.10603; the first arXiv
    version is titled *A Closer Look at Loss Weighting in Multi-Task Learning*). With :math:`T`
    tasks, each call draws :math:`\lambda \in \Delta^{T-1}` (all :math:`T` entries, whichever
    tasks are present) and weights task :math:`i` by :math:`w_i = T \lambda_i`:

    .. math::

        \text{normal (default):}\quad \lambda = \operatorname{softmax}(z),\ z \sim \mathcal{N}(0, I_T);
        \qquad
        \text{dirichlet:}\quad \lambda \sim \operatorname{Dir}(\alpha \mathbf{1}_T);
        \qquad
        \text{uniform:}\quad \lambda = u / \textstyle\sum_j u_j,\ u \sim \mathcal{U}(0, 1)^T .

    :math:`\mathcal{L} = \sum_i w_i L_i`. The weights of all :math:`T` tasks sum to :math:`T`, so
    the expected weight of every task is 1, as in equal weighting. A task missing from a call
    still draws a weight, but that weight is left out of the total. The other tasks' weights are
    not renormalised, so a task's weight does not depend on which other tasks are in the batch.

    The draws come from a NumPy PCG64 generator seeded with ``seed``. Its state is saved by
    ``state_dict()`` (through :meth:`get_extra_state`), so a resumed run draws the same weights
    as an uninterrupted one. In a distributed run every rank must build the balancer with the
    same seed to draw the same weights. The default seed, :func:`torch.initial_seed`, is the same
    on every rank when every rank seeded PyTorch with the same value.

    Args:
        task_names: names of the tasks.
        distribution: ``"normal"`` (default), ``"dirichlet"`` or ``"uniform"``, as above.
        alpha: concentration :math:`\alpha > 0` of the Dirichlet distribution (default 1, uniform
            on the simplex); used only with ``distribution="dirichlet"``.
        seed: seed of the generator; ``None`` (default) uses :func:`torch.initial_seed`.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "rlw"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        distribution: WeightDistribution = "normal",
        alpha: float = 1.0,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        if distribution not in ("normal", "dirichlet", "uniform"):
            raise ValueError(f"RLW: distribution must be 'normal', 'dirichlet' or 'uniform', got {distribution!r}")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"RLW: alpha must be a finite number > 0, got {alpha}")
        self.distribution: WeightDistribution = distribution
        self.alpha = alpha
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self._generator = np.random.default_rng(self.seed)

    def sample_weights(self) -> Tensor:
        """Draw the weights of all tasks for one step (float64, on the CPU, summing to ``num_tasks``)."""
        if self.distribution == "normal":
            logits = self._generator.standard_normal(self.num_tasks)
            simplex = np.exp(logits - logits.max())
        elif self.distribution == "dirichlet":
            simplex = self._generator.dirichlet(np.full(self.num_tasks, self.alpha))
        else:
            simplex = self._generator.uniform(0.0, 1.0, self.num_tasks)
        simplex = simplex / simplex.sum()
        return torch.from_numpy(self.num_tasks * simplex)

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        sampled = self.sample_weights()
        reference = next(iter(losses.values()))
        on_device = sampled.to(device=reference.device, dtype=reference.dtype)

        terms = []
        weights: dict[str, Tensor] = {}
        for name, loss in losses.items():
            index = self.task_index[name]
            terms.append(on_device[index] * loss)
            weights[name] = sampled[index]
        return torch.stack(terms).sum(), weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self._generator.bit_generator.state}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator = np.random.default_rng(self.seed)
        self._generator.bit_generator.state = state["generator"]

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, distribution={self.distribution!r}, seed={self.seed}"
        if self.distribution == "dirichlet":
            text += f", alpha={self.alpha}"
        return text
