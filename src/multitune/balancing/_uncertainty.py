"""Uncertainty weighting: learnable homoscedastic log-variances, one per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer

LikelihoodForm = Literal["regression", "classification", "multilabel", "token_classification"]

_CLASSIFICATION_FORMS = ("classification", "multilabel", "token_classification")


@register_balancer
class UncertaintyWeighting(Balancer):
    r"""Uncertainty weighting: each loss is scaled by a learned homoscedastic variance.

    From *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics*
    (Kendall, Gal & Cipolla, CVPR 2018, https://arxiv.org/abs/1705.07115). Each task :math:`i`
    has a learnable log-variance :math:`s_i = \log \sigma_i^2` (stored in :attr:`log_variances`,
    initialised to ``init_log_variance``). The paper derives two forms from the likelihood:

    .. math::

        \text{regression (Gaussian likelihood):} \quad
            \tfrac{1}{2} e^{-s_i} L_i + \tfrac{1}{2} s_i
            = \frac{1}{2\sigma_i^2} L_i + \log \sigma_i ,

        \text{classification (scaled softmax):} \quad
            e^{-s_i} L_i + \tfrac{1}{2} s_i
            = \frac{1}{\sigma_i^2} L_i + \log \sigma_i ,

    and the total is the sum of these terms over the tasks in the call. Setting the derivative
    to zero gives the optimum :math:`s_i = \log L_i` (regression) or :math:`s_i = \log 2L_i`
    (classification). The total is negative whenever some :math:`s_i < 0` outweighs the losses;
    that is valid and not clipped. :attr:`weights` reports the multipliers of :math:`L_i`:
    :math:`\tfrac{1}{2} e^{-s_i}` or :math:`e^{-s_i}`.

    The log-variances are :class:`torch.nn.Parameter`\ s: add ``balancer.parameters()`` to the
    optimizer, without weight decay (decay pulls every :math:`s_i` towards 0, a variance of 1).
    A task missing from a call gets no weight and no gradient for its :math:`s_i`.

    Args:
        task_names: names of the tasks.
        task_types: form per task, by name. ``"regression"`` selects the regression form.
            ``"classification"``, ``"multilabel"`` and ``"token_classification"`` select the
            classification form, so the task kinds of a multitune config can be passed unchanged.
            Tasks not listed use the regression form, which most implementations use for every task.
        init_log_variance: initial value of every :math:`s_i` (default 0, a variance of 1).
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "uncertainty"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        task_types: Mapping[str, LikelihoodForm] | None = None,
        init_log_variance: float = 0.0,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        self.task_types: dict[str, LikelihoodForm] = self._validate_task_types(task_types or {})
        self.log_variances = nn.Parameter(torch.full((self.num_tasks,), float(init_log_variance)))

        # 1/2 for the regression form, 1 for the classification form.
        factors = [1.0 if self.task_types.get(name) in _CLASSIFICATION_FORMS else 0.5 for name in self.task_names]
        self.register_buffer("loss_factors", torch.tensor(factors), persistent=False)

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        terms = []
        weights: dict[str, Tensor] = {}
        for name, loss in losses.items():
            index = self.task_index[name]
            log_variance = self.log_variances[index].to(device=loss.device, dtype=loss.dtype)
            multiplier = self.loss_factors[index].to(device=loss.device, dtype=loss.dtype) * torch.exp(-log_variance)
            terms.append(multiplier * loss + 0.5 * log_variance)
            weights[name] = multiplier.detach()
        return torch.stack(terms).sum(), weights

    def extra_repr(self) -> str:
        forms = {name: "classification" if self.task_types.get(name) in _CLASSIFICATION_FORMS else "regression" for name in self.task_names}
        return f"tasks={list(self.task_names)}, forms={forms}"

    def _validate_task_types(self, task_types: Mapping[str, str]) -> dict[str, LikelihoodForm]:
        unknown = [name for name in task_types if name not in self.task_index]
        if unknown:
            raise ValueError(f"UncertaintyWeighting: task_types names unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
        allowed = ("regression", *_CLASSIFICATION_FORMS)
        for name, form in task_types.items():
            if form not in allowed:
                raise ValueError(f"UncertaintyWeighting: task {name!r}: task type must be one of {list(allowed)}, got {form!r}")
        return dict(task_types)  # type: ignore[arg-type]
