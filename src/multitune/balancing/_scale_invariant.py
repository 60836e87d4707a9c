"""Scale-invariant loss: the sum of the logarithms of the task losses."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer

logger = logging.getLogger(__name__)

NonPositivePolicy = Literal["skip", "raise"]


@register_balancer
class ScaleInvariant(Balancer):
    r"""Sum of the logarithms of the task losses, which is invariant to rescaling any loss.

    The "scale-invariant" (SI) baseline of *Multi-Task Learning as a Bargaining Game*
    (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022,
    https://arxiv.org/abs/2202.01017), also in the method list of the Nash-MTL and FAMO reference
    code as ``scaleinvls``:

    .. math::

        \mathcal{L} = \sum_{i} \log L_i ,
        \qquad
        \nabla_\theta \mathcal{L} = \sum_i \frac{1}{L_i} \nabla_\theta L_i .

    Multiplying one loss by a constant :math:`c > 0` adds :math:`\log c` to the total and leaves
    the gradient unchanged, so tasks whose losses live on different scales get gradients of
    comparable size. :attr:`weights` reports the gradient multipliers :math:`1 / L_i`.

    The logarithm needs positive losses. A loss :math:`\le 0` (for example a cross-entropy that
    underflows to exactly 0) is handled by ``on_nonpositive``: ``"skip"`` leaves that task out of
    the step with one warning per task (later ones are counted in :attr:`nonpositive_counts`),
    ``"raise"`` raises :class:`ValueError`. The method is stateless.

    Args:
        task_names: names of the tasks.
        on_nonpositive: ``"skip"`` (default) or ``"raise"`` for a loss :math:`\le 0`.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "scale_invariant"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        on_nonpositive: NonPositivePolicy = "skip",
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        self.on_nonpositive: NonPositivePolicy = check_nonpositive_policy(on_nonpositive, owner=type(self).__name__)
        self.nonpositive_counts: dict[str, int] = {}

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        positive = drop_nonpositive(self, losses)
        if not positive:
            return zero_total_like(losses), {}

        total = torch.stack([loss.log() for loss in positive.values()]).sum()
        weights = {name: 1.0 / loss.detach() for name, loss in positive.items()}
        return total, weights


def check_nonpositive_policy(policy: str, *, owner: str) -> NonPositivePolicy:
    """Return ``policy`` when it is ``"skip"`` or ``"raise"``, else raise naming ``owner``."""
    if policy not in ("skip", "raise"):
        raise ValueError(f"{owner}: on_nonpositive must be 'skip' or 'raise', got {policy!r}")
    return policy  # type: ignore[return-value]


def drop_nonpositive(
    balancer: Balancer,
    losses: Mapping[str, Tensor],
    offsets: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """Return the losses whose value minus its offset is positive, applying the balancer's policy to the others.

    ``balancer`` must have the attributes ``on_nonpositive`` and ``nonpositive_counts``. With
    ``"skip"`` the first drop of each task logs a warning and every drop is counted; with
    ``"raise"`` the first non-positive loss raises :class:`ValueError`.
    """
    positive: dict[str, Tensor] = {}
    for (name, loss), value in zip(losses.items(), _host_values(list(losses.values()))):
        offset = 0.0 if offsets is None else offsets.get(name, 0.0)
        if value - offset > 0:
            positive[name] = loss
            continue

        owner = type(balancer).__name__
        described = f"loss {value}" if offset == 0.0 else f"loss {value} minus min_loss {offset}"
        if balancer.on_nonpositive == "raise":
            raise ValueError(
                f"{owner}: task {name!r}: {described} is not positive, but the method takes its logarithm; "
                f"check the task's loss, or build the balancer with on_nonpositive='skip'"
            )
        count = balancer.nonpositive_counts.get(name, 0) + 1
        balancer.nonpositive_counts[name] = count
        if count == 1:
            logger.warning(
                "%s: task %r: %s is not positive at step %d; the task is left out of this step "
                "(later occurrences are counted in nonpositive_counts, not logged)",
                owner,
                name,
                described,
                int(balancer.step),
            )
    return positive


def _host_values(losses: list[Tensor]) -> list[float]:
    """Return the values of scalar losses as floats, with one device synchronisation when all share a device."""
    if not losses:
        return []
    if len({loss.device for loss in losses}) == 1:
        dtype = losses[0].dtype
        for loss in losses[1:]:
            dtype = torch.promote_types(dtype, loss.dtype)
        return torch.stack([loss.detach().to(dtype) for loss in losses]).tolist()
    return [float(loss.detach()) for loss in losses]


def zero_total_like(losses: Mapping[str, Tensor]) -> Tensor:
    """Return a zero total connected to the graph of ``losses``, so its backward leaves zero gradients."""
    return torch.stack([loss * 0.0 for loss in losses.values()]).sum()
