r"""GradDrop: keep, per coordinate, only the gradient signs drawn in proportion to their purity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ._base import NonFinitePolicy
from ._gradient_base import GradientBalancer, GradientSource, TaskGradientPolicy
from ._registry import register_balancer

PurityFunction = Callable[[Tensor], Tensor]


def graddrop_aggregate(
    jacobian: Tensor,
    uniform: Tensor,
    *,
    leak: Tensor | None = None,
    purity_fn: PurityFunction | None = None,
) -> Tensor:
    r"""Return GradDrop's combined gradient for the Jacobian ``jacobian`` (k, P) and uniform draws ``uniform`` (P,).

    .. math::

        \mathcal P = \tfrac12\Bigl(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Bigr), \quad
        M_i = \mathbb 1[f(\mathcal P) > U]\,\mathbb 1[g_i > 0] + \mathbb 1[f(\mathcal P) < U]\,\mathbb 1[g_i < 0], \quad
        d = \sum_i \bigl(\ell_i + (1-\ell_i) M_i\bigr) \odot g_i ,

    all per coordinate. Where every :math:`g_i` is zero, :math:`\mathcal P = 1/2`.

    Args:
        jacobian: the task gradients, one row per task.
        uniform: :math:`U`, draws from :math:`\mathcal U(0, 1)`, one per column.
        leak: :math:`\ell`, shape (k,), in [0, 1] (default 0).
        purity_fn: :math:`f`, applied to :math:`\mathcal P` (default: identity).
    """
    if jacobian.dim() != 2 or uniform.shape != (jacobian.shape[1],):
        raise ValueError(
            f"graddrop_aggregate: expected a (k, P) Jacobian and (P,) uniform draws, got {tuple(jacobian.shape)} "
            f"and {tuple(uniform.shape)}"
        )
    total = jacobian.sum(dim=0)
    magnitude = jacobian.abs().sum(dim=0)
    ratio = torch.where(magnitude > 0, total / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)), 0.0)
    purity = 0.5 * (1.0 + ratio)
    if purity_fn is not None:
        purity = purity_fn(purity)

    # M_i is the positive-sign decision where g_i > 0 and the negative-sign one elsewhere (a zero
    # entry adds nothing either way).
    mask = torch.where(jacobian > 0, (purity > uniform).unsqueeze(0), (purity < uniform).unsqueeze(0))
    if leak is None:
        return torch.where(mask, jacobian, 0.0).sum(dim=0)
    leak = leak.to(device=jacobian.device, dtype=jacobian.dtype).reshape(-1, 1)
    return ((leak + (1.0 - leak) * mask) * jacobian).sum(dim=0)


@register_balancer
class GradDrop(GradientBalancer):
    r"""Gradient sign dropout: per coordinate, keep the gradients of one sign, chosen by sign purity.

    From *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout* (Chen,
    Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS 2020,
    https://arxiv.org/abs/2010.06808), Algorithm 1. For each coordinate, the positive sign purity

    .. math::

        \mathcal P = \frac12 \Bigl(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Bigr) \in [0, 1]

    is the probability of keeping the positive gradients there (and :math:`1 - \mathcal P` of
    keeping the negative ones): with :math:`U \sim \mathcal U(0,1)` drawn per coordinate,
    :math:`M_i = \mathbb 1[f(\mathcal P) > U]\,\mathbb 1[g_i > 0] + \mathbb 1[f(\mathcal P) < U]\,\mathbb 1[g_i < 0]`
    and the update is :math:`\sum_i (\ell_i + (1-\ell_i) M_i) \odot g_i`
    (:func:`graddrop_aggregate`). The leak :math:`\ell_i` lets a fraction of task :math:`i`'s
    gradient through unmasked, so :math:`\ell_i = 1` keeps a task (for example the main task of a
    transfer setting) out of the dropout. :math:`f` is a monotonically increasing map of
    :math:`[0, 1]` onto itself, the identity by default.

    The mask depends on the signs of :math:`J`, not only on its Gramian, so this method builds
    the full Jacobian (memory: T times the size of the shared gradient) and is not available with
    ``gradients="last_shared_layer"``. The draws come from :attr:`generator` (seeded by
    ``seed``, saved in ``state_dict``). On an accelerator, a generator on that device is seeded
    from it at every step. :attr:`weights` reports 1 for every task, since the update is not a
    weighted sum of the task gradients.

    NOTE: the paper applies GradDrop to the gradients with respect to a layer of activations,
    multiplied by the sign of the activations and summed over the batch before computing
    :math:`\mathcal P`. Here :math:`\mathcal P` is computed per coordinate of what ``gradients``
    selects (parameters, or each element of ``features``), as TorchJD's GradDrop does.

    Args:
        task_names: names of the tasks.
        shared_parameters: the shared parameters, see
            :class:`~multitune.balancing.GradientBalancer`.
        leak: :math:`\ell`, one value for every task or a value by task name (default 0; tasks
            not named get 0), each in [0, 1].
        purity_fn: :math:`f` (default: identity).
        gradients, task_gradients, task_parameters, seed, on_nonfinite: see
            :class:`~multitune.balancing.GradientBalancer`.
    """

    name = "graddrop"
    needs_jacobian = True

    def __init__(
        self,
        task_names: Sequence[str],
        shared_parameters: Iterable[Tensor],
        *,
        leak: float | Mapping[str, float] = 0.0,
        purity_fn: PurityFunction | None = None,
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
        if isinstance(leak, Mapping):
            unknown = [name for name in leak if name not in self.task_index]
            if unknown:
                raise KeyError(f"{owner}: leak has unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
            values = {name: float(leak.get(name, 0.0)) for name in self.task_names}
        else:
            values = {name: float(leak) for name in self.task_names}
        for name, value in values.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{owner}: leak for task {name!r} must be in [0, 1], got {value}")
        self.leak: dict[str, float] = values
        self.purity_fn = purity_fn

    def aggregate(self, jacobian: Tensor) -> Tensor:
        k = jacobian.shape[0]
        names = self.present_tasks if len(self.present_tasks) == k else self.task_names[:k]
        leak = None
        if any(self.leak[name] != 0.0 for name in names):
            leak = torch.tensor([self.leak[name] for name in names], dtype=jacobian.dtype, device=jacobian.device)
        uniform = self._draw_uniform(jacobian.shape[1], jacobian)
        return graddrop_aggregate(jacobian, uniform, leak=leak, purity_fn=self.purity_fn)

    def _draw_uniform(self, size: int, like: Tensor) -> Tensor:
        if like.device.type == "cpu":
            return torch.rand(size, generator=self.generator, dtype=like.dtype)
        # NOTE: this branch (a generator on the Jacobian's device) is not covered by the CPU-only tests.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        device_generator = torch.Generator(device=like.device)
        device_generator.manual_seed(seed)
        return torch.rand(size, generator=device_generator, dtype=like.dtype, device=like.device)
