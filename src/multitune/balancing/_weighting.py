"""Fixed task weights: equal weighting and user-given static weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ._base import Balancer, NonFinitePolicy, check_nonnegative
from ._registry import register_balancer


@register_balancer
class EqualWeighting(Balancer):
    r"""Sum the task losses with weight 1 each.

    .. math:: \mathcal{L} = \sum_{i \in P} \mathcal{L}_i

    where :math:`P` is the set of tasks present in the call with a finite loss. This is the
    usual multi-task baseline: the gradient is the plain ``sum(losses).backward()`` gradient.

    Args:
        task_names: names of the tasks.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "equal"

    def __init__(self, task_names: Sequence[str], *, on_nonfinite: NonFinitePolicy = "skip") -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = list(losses.values())
        total = values[0]
        for loss in values[1:]:
            total = total + loss
        return total, dict.fromkeys(losses, 1.0)


@register_balancer
class StaticWeighting(Balancer):
    r"""Weight each task loss by a fixed, user-given weight.

    .. math:: \mathcal{L} = \sum_{i \in P} w_i \, \mathcal{L}_i

    where :math:`P` is the set of tasks present in the call with a finite loss. The weights are
    hyper-parameters, not state: they are not renormalised and not saved in ``state_dict()``.

    Args:
        task_names: names of the tasks.
        weights: weight of every task, each a finite number ``>= 0``.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.

    Raises:
        ValueError: a task has no weight, a weight names an unknown task, or a weight is negative
            or not finite.
    """

    name = "static"

    def __init__(
        self,
        task_names: Sequence[str],
        weights: Mapping[str, float],
        *,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        if not isinstance(weights, Mapping):
            raise TypeError(f"StaticWeighting: weights must be a mapping of task name to weight, got {type(weights).__name__}")

        unknown = [name for name in weights if name not in self.task_index]
        if unknown:
            raise ValueError(f"StaticWeighting: weights given for unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
        missing = [name for name in self.task_names if name not in weights]
        if missing:
            raise ValueError(f"StaticWeighting: no weight for task(s) {missing}; give every task a weight in weights=")

        self.static_weights: dict[str, float] = {
            name: check_nonnegative(f"the weight of task {name!r}", weights[name], owner="StaticWeighting")
            for name in self.task_names
        }

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        weights = {name: self.static_weights[name] for name in losses}
        terms = [weights[name] * loss for name, loss in losses.items()]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total, weights

    def extra_repr(self) -> str:
        return f"weights={self.static_weights}"
