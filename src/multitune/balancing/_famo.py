"""FAMO: task weights adapted so that every task's log-loss falls at the same rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy, check_nonnegative
from ._registry import register_balancer
from ._scale_invariant import NonPositivePolicy, check_nonpositive_policy, drop_nonpositive, zero_total_like

FamoUpdate = Literal["next_step", "same_batch"]


@register_balancer
class FAMO(Balancer):
    r"""Fast adaptive multitask optimization (FAMO): weights that balance the rates of loss decrease.

    From *FAMO: Fast Adaptive Multitask Optimization* (Liu, Liu, Stone & Liu, NeurIPS 2023,
    https://arxiv.org/abs/2306.03792). The task weights are :math:`z = \operatorname{softmax}(\xi)`
    over learnable logits :math:`\xi` (a buffer, :attr:`logits`, initialised to 0). With losses
    :math:`L_i`, minimum losses :math:`l_i^*` (``min_losses``, default 0) and
    :math:`D_i = L_i - l_i^*`, the returned total is

    .. math::

        \mathcal{L} = \sum_i \frac{z_i}{c} \log D_i ,
        \qquad
        c = \sum_j \frac{z_j}{D_j} \ \text{(no gradient)},
        \qquad\text{so}\qquad
        \nabla_\theta \mathcal{L} = \sum_i \frac{z_i / D_i}{\sum_j z_j / D_j}\, \nabla_\theta L_i .

    :attr:`weights` reports these gradient multipliers, which are positive and sum to 1 over the
    tasks in the call; :meth:`task_weights` returns :math:`z`.

    After the model step the logits move against the observed improvement of each log-loss,

    .. math::

        \delta = \bigl(\nabla_\xi z\bigr)^\top \bigl(\log D(t) - \log D(t+1)\bigr)
               = z \odot \bigl(d - \langle z, d \rangle \mathbf{1}\bigr),
        \quad d = \log D(t) - \log D(t+1),

    followed by one Adam step on :math:`\xi` with gradient :math:`\delta + \gamma \xi` (step size
    ``logit_lr``, L2 decay ``gamma``), as in the official implementation. A task whose log-loss
    fell more than the :math:`z`-weighted average loses weight. Two ways to obtain
    :math:`D(t+1)`:

    * ``update="next_step"`` (default, no extra forward pass): each call uses its own losses as
      :math:`D(t+1)` and the previous call's as :math:`D(t)`, then weights the current losses with
      the updated logits. :math:`D(t+1)` then comes from the next batch, so :math:`d` mixes the
      effect of the step with the difference between two batches. A task must be in two
      consecutive calls to take part in an update.

      NOTE: when every batch contains a single task (task-sampled mixing), no two consecutive calls
      share a task, so the logits never change in this mode. Use ``"same_batch"`` there.
    * ``update="same_batch"`` (the paper's algorithm): after ``optimizer.step()`` the training
      loop recomputes the losses on the same batch (a second forward pass, under
      :func:`torch.no_grad`) and passes them to :meth:`update`.

    Only tasks present in both loss sets take part in an update: :math:`z`, :math:`d` and
    :math:`\delta` are computed over those tasks, and the logits and Adam moments of the other
    tasks are left unchanged (Adam's bias correction counts steps per task). The losses that
    update the logits pass through :meth:`reduce`, so in a distributed run every rank applies the
    same update.

    :math:`\log D_i` needs :math:`D_i > 0`. A loss with :math:`D_i \le 0` is handled by
    ``on_nonpositive``: ``"skip"`` leaves the task out of the call (no weight, no update) with one
    warning per task, ``"raise"`` raises :class:`ValueError`.

    Args:
        task_names: names of the tasks.
        logit_lr: Adam step size for the logits (default 0.025, the official implementation's value).
        gamma: L2 decay of the logits, :math:`\gamma \ge 0` (default 1e-3). In the official
            repository, ``famo.py`` defaults to 0.01, ``methods/weight_methods.py`` to 1e-5 and
            the quantum-chemistry run script passes 1e-3.
        betas: Adam's :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``, PyTorch's default).
        eps: Adam's :math:`\epsilon` (default 1e-8).
        min_losses: :math:`l_i^*` by task name (default 0 for every task); a loss must stay above
            its minimum.
        update: ``"next_step"`` (default) or ``"same_batch"``, as above.
        on_nonpositive: ``"skip"`` (default) or ``"raise"`` for :math:`D_i \le 0`.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "famo"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        logit_lr: float = 0.025,
        gamma: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_losses: Mapping[str, float] | None = None,
        update: FamoUpdate = "next_step",
        on_nonpositive: NonPositivePolicy = "skip",
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        owner = type(self).__name__
        self.logit_lr = check_nonnegative("logit_lr", logit_lr, owner=owner)
        self.gamma = check_nonnegative("gamma", gamma, owner=owner)
        self.eps = float(eps)
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"{owner}: eps must be a finite number > 0, got {eps}")
        beta1, beta2 = (float(beta) for beta in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"{owner}: betas must both be in [0, 1), got {tuple(betas)}")
        self.betas = (beta1, beta2)
        if update not in ("next_step", "same_batch"):
            raise ValueError(f"{owner}: update must be 'next_step' or 'same_batch', got {update!r}")
        self.update_mode: FamoUpdate = update
        self.on_nonpositive: NonPositivePolicy = check_nonpositive_policy(on_nonpositive, owner=owner)
        self.nonpositive_counts: dict[str, int] = {}
        self.min_losses: dict[str, float] = self._validate_min_losses(min_losses or {})

        num_tasks = self.num_tasks
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_steps", torch.zeros(num_tasks, dtype=torch.long))
        # log D of the last call, NaN for tasks absent from it (reduced over ranks).
        self.register_buffer("previous_log_losses", torch.full((num_tasks,), math.nan))
        offsets = [self.min_losses.get(name, 0.0) for name in self.task_names]
        self.register_buffer("min_loss_offsets", torch.tensor(offsets), persistent=False)
        # Whether a call happened since the last update(), for update="same_batch". It lives on
        # the host (saved by get_extra_state), so checking it does not wait for the device.
        self.update_pending = False

    # Weights and total -------------------------------------------------------------------------

    def task_weights(self) -> dict[str, float]:
        """Return :math:`z = \\operatorname{softmax}(\\xi)` over all tasks, by name."""
        return dict(zip(self.task_names, torch.softmax(self.logits, dim=0).tolist()))

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        # A call without any finite loss skips combine() but still records an empty step, so
        # the next call does not pair its losses with older ones and every rank calls reduce().
        self._combined = False
        total = super().forward(losses)
        if not self._combined:
            self._observe({})
        return total

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self._combined = True
        positive = drop_nonpositive(self, losses, self.min_losses)
        self._observe(positive)
        if not positive:
            return zero_total_like(losses), {}

        if len(positive) == self.num_tasks:
            z = torch.softmax(self.logits, dim=0)
        else:
            z = torch.softmax(self.logits[[self.task_index[name] for name in positive]], dim=0)

        gaps = [loss - self.min_losses.get(name, 0.0) for name, loss in positive.items()]
        reference = gaps[0]
        z = z.to(device=reference.device, dtype=reference.dtype)
        gap_values = torch.stack([gap.detach() for gap in gaps])
        normaliser = (z / gap_values).sum()

        total = torch.stack([z[k] / normaliser * gap.log() for k, gap in enumerate(gaps)]).sum()
        multipliers = z / (normaliser * gap_values)
        weights = {name: multipliers[k] for k, name in enumerate(positive)}
        return total, weights

    # Logit update ------------------------------------------------------------------------------

    def update(self, losses: Mapping[str, Tensor]) -> None:
        """Update the logits from the losses recomputed on the same batch after ``optimizer.step()``.

        Only for ``update="same_batch"``. ``losses`` maps task names to scalar losses, like a call;
        tasks missing from it, or from the last call, take no part. Raises :class:`RuntimeError`
        when no call happened since the last update.
        """
        if self.update_mode != "same_batch":
            raise RuntimeError(
                "FAMO.update() is only for update='same_batch'; with update='next_step' the logits are "
                "updated inside each call from the previous call's losses, so remove the update() call"
            )
        if not self.update_pending:
            raise RuntimeError(
                "FAMO.update() found no losses from a call since the last update; call the balancer on "
                "the step's losses, then optimizer.step(), then update() with the recomputed losses"
            )

        with torch.no_grad():
            finite = self._finite_losses(losses)
            positive = drop_nonpositive(self, finite, self.min_losses)
            current = self._reduced_log_losses(positive)
        self._update_logits(self.previous_log_losses, current)
        self.previous_log_losses.fill_(math.nan)
        self.update_pending = False

    def _observe(self, losses: Mapping[str, Tensor]) -> None:
        """Record one call's losses: update the logits first with ``"next_step"``, or keep them for :meth:`update`."""
        current = self._reduced_log_losses(losses)
        if self.update_mode == "next_step":
            self._update_logits(self.previous_log_losses, current)
        self.previous_log_losses.copy_(current)
        self.update_pending = True

    @torch.no_grad()
    def _update_logits(self, before: Tensor, after: Tensor) -> None:
        """Take one Adam step on the logits of the tasks known in both ``before`` and ``after``.

        The other tasks are masked out with :func:`torch.where` rather than indexed, so the step
        never reads a value back from the device.
        """
        mask = torch.isfinite(before) & torch.isfinite(after)
        logits = self.logits

        z = torch.softmax(torch.where(mask, logits, -math.inf), dim=0)
        z = torch.where(mask, z, 0.0)
        improvement = torch.where(mask, before - after, 0.0)
        delta = z * (improvement - (z * improvement).sum())
        gradient = delta + self.gamma * logits

        beta1, beta2 = self.betas
        steps = self.adam_steps + mask.long()
        exp_avg = beta1 * self.exp_avg + (1.0 - beta1) * gradient
        exp_avg_sq = beta2 * self.exp_avg_sq + (1.0 - beta2) * gradient.square()
        # Tasks that never took a step have steps == 0, whose entries the mask discards below.
        exponent = steps.clamp(min=1).to(logits.dtype)
        bias_correction1 = 1.0 - beta1**exponent
        bias_correction2 = 1.0 - beta2**exponent
        denominator = exp_avg_sq.sqrt() / bias_correction2.sqrt() + self.eps
        stepped = logits - self.logit_lr / bias_correction1 * exp_avg / denominator

        self.logits.copy_(torch.where(mask, stepped, logits))
        self.exp_avg.copy_(torch.where(mask, exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(mask, exp_avg_sq, self.exp_avg_sq))
        self.adam_steps.copy_(steps)

    def _reduced_log_losses(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Return :math:`\\log D` of all tasks averaged over ranks, NaN for tasks absent on every rank."""
        statistics = torch.zeros(2, self.num_tasks, dtype=self.logits.dtype, device=self.logits.device)
        for name, loss in losses.items():
            index = self.task_index[name]
            statistics[0, index] = loss.detach().to(device=self.logits.device, dtype=self.logits.dtype)
            statistics[1, index] = 1.0
        statistics = self.reduce(statistics)

        sums, counts = statistics[0], statistics[1]
        gaps = sums / counts.clamp(min=torch.finfo(counts.dtype).tiny) - self.min_loss_offsets.to(sums)
        return torch.where((counts > 0) & (gaps > 0), gaps.clamp(min=torch.finfo(gaps.dtype).tiny).log(), torch.full_like(gaps, math.nan))

    def _validate_min_losses(self, min_losses: Mapping[str, float]) -> dict[str, float]:
        unknown = [name for name in min_losses if name not in self.task_index]
        if unknown:
            raise ValueError(f"FAMO: min_losses names unknown task(s) {unknown}; known tasks: {list(self.task_names)}")
        values = {name: float(value) for name, value in min_losses.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise ValueError(f"FAMO: min_losses[{name!r}] must be finite, got {value}")
        return values

    def get_extra_state(self) -> dict[str, bool]:
        return {"update_pending": self.update_pending}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.update_pending = bool(state["update_pending"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, update={self.update_mode!r}, logit_lr={self.logit_lr}, gamma={self.gamma}"
