"""Dynamic weight average: weights from the rate at which each task's loss falls."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import Balancer, NonFinitePolicy
from ._registry import register_balancer


@register_balancer
class DWA(Balancer):
    r"""Dynamic weight average (DWA): tasks whose loss falls more slowly get larger weights.

    From *End-to-End Multi-Task Learning with Attention* (Liu, Johns & Davison, CVPR 2019,
    https://arxiv.org/abs/1803.10704). With :math:`T` tasks and temperature :math:`\tau`,

    .. math::

        w_i(t) = \frac{T \exp\bigl(r_i(t-1) / \tau\bigr)}{\sum_{j=1}^{T} \exp\bigl(r_j(t-1) / \tau\bigr)},
        \qquad
        r_i(t-1) = \frac{\bar L_i(t-1)}{\bar L_i(t-2)},

    where :math:`\bar L_i(t)` is the average loss of task :math:`i` over period :math:`t`, and
    :math:`\mathcal{L} = \sum_i w_i L_i`. The weights sum to :math:`T` and are positive, except that
    a weight rounds to 0 when the ratios differ by hundreds of temperatures.
    A period is one of:

    * an epoch (default): the training loop calls :meth:`end_epoch` at each epoch boundary, or
      the balancer ends a period itself every ``steps_per_epoch`` calls;
    * a sliding window (``window=k``): :math:`\bar L_i(t-1)` averages the last :math:`k` calls and
      :math:`\bar L_i(t-2)` the :math:`k` calls before them, so the weights change at every step.
      :meth:`end_epoch` does nothing in this mode.

    The weights are 1 until two periods are complete (the first two epochs, or the first
    :math:`2k` calls), as in the paper. A task with no finite loss in either of the two periods,
    or whose earlier average is not positive, gets :math:`r_i = 1`. A task missing from a call
    gets no weight, and the other tasks keep the weights computed over all :math:`T` tasks (they
    are not renormalised), so a task's weight does not depend on which other tasks are in the
    batch. Period averages pass through :meth:`reduce`, so in a distributed run they are
    averages over all ranks (the per-rank loss sums and counts are averaged before dividing).

    State (all in ``state_dict()``): the running sums and counts of the current period, the
    averages of the last two periods and the call counters. With ``window=k``, the per-call sums
    and counts of the last :math:`2k` calls replace the period sums and averages.

    Args:
        task_names: names of the tasks.
        temperature: softmax temperature :math:`\tau > 0` (default 2, the paper's value); a larger
            value gives weights closer to 1.
        steps_per_epoch: if set, end a period every ``steps_per_epoch`` calls; then the training
            loop must not call :meth:`end_epoch` as well.
        window: if set, use sliding windows of ``window`` calls instead of epochs. Exclusive with
            ``steps_per_epoch``.
        on_nonfinite: see :class:`~multitune.balancing.Balancer`.
    """

    name = "dwa"

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        temperature: float = 2.0,
        steps_per_epoch: int | None = None,
        window: int | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(task_names, on_nonfinite=on_nonfinite)
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"DWA: temperature must be a finite number > 0, got {temperature}")
        if steps_per_epoch is not None and window is not None:
            raise ValueError(
                f"DWA: steps_per_epoch={steps_per_epoch} and window={window} were both set; "
                "set steps_per_epoch for epoch averages or window for sliding windows, not both"
            )
        for label, value in (("steps_per_epoch", steps_per_epoch), ("window", window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DWA: {label} must be an integer >= 1 or None, got {value!r}")
        self.temperature = temperature
        self.steps_per_epoch = steps_per_epoch
        self.window = window

        num_tasks = self.num_tasks
        if window is None:
            self.register_buffer("period_loss_sum", torch.zeros(num_tasks))
            self.register_buffer("period_loss_count", torch.zeros(num_tasks))
            self.register_buffer("last_average", torch.full((num_tasks,), math.nan))
            self.register_buffer("previous_average", torch.full((num_tasks,), math.nan))
        else:
            # Entry ``calls % (2 * window)`` contains the loss sums (row 0) and counts (row 1) of that call.
            self.register_buffer("window_losses", torch.zeros(2 * window, 2, num_tasks))

        # Counters live on the host (saved by get_extra_state), so no call waits for the device to read them.
        self.calls = 0
        self.steps_in_period = 0
        self.periods_completed = 0
        self._current_losses: dict[str, Tensor] = {}

    # Weights -----------------------------------------------------------------------------------

    def task_weights(self) -> dict[str, float]:
        """Return the weights that the next call gives each task, by name."""
        return dict(zip(self.task_names, self._all_task_weights().tolist()))

    def _all_task_weights(self) -> Tensor:
        recent, earlier = self._period_averages()
        known = torch.isfinite(recent) & torch.isfinite(earlier) & (earlier > 0)
        ratios = torch.where(known, recent / torch.where(known, earlier, torch.ones_like(earlier)), torch.ones_like(recent))
        return self.num_tasks * torch.softmax(ratios / self.temperature, dim=0)

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        all_weights = self._all_task_weights()
        reference = next(iter(losses.values()))
        on_device = all_weights.to(device=reference.device, dtype=reference.dtype)

        terms = []
        weights: dict[str, Tensor] = {}
        for name, loss in losses.items():
            index = self.task_index[name]
            terms.append(on_device[index] * loss)
            weights[name] = all_weights[index]
        self._current_losses = {name: loss.detach() for name, loss in losses.items()}
        return torch.stack(terms).sum(), weights

    # Statistics --------------------------------------------------------------------------------

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        # A call without any finite loss skips combine() but is still recorded (as an empty
        # step), so windows and steps_per_epoch count calls and every rank calls reduce().
        self._current_losses = {}
        total = super().forward(losses)
        self._record(self._current_losses)
        self._current_losses = {}
        return total

    def end_epoch(self) -> None:
        """Close the current period: its averages become :math:`\\bar L(t-1)` for the next calls.

        Each call's losses passed through :meth:`reduce` when they were recorded, so the period's
        sums are the same on every rank and a checkpoint of any rank restores them. In a
        distributed run every rank must still call this at the same point. Does nothing with
        ``window`` set.
        """
        if self.window is not None:
            return

        totals = torch.stack([self.period_loss_sum, self.period_loss_count])

        self.previous_average.copy_(self.last_average)
        self.last_average.copy_(_average(totals.unsqueeze(0)))
        self.period_loss_sum.zero_()
        self.period_loss_count.zero_()
        self.periods_completed += 1
        self.steps_in_period = 0

    def _record(self, losses: Mapping[str, Tensor]) -> None:
        """Add one call's finite losses (possibly none) to the statistics of the current period."""
        reference = self.window_losses if self.window is not None else self.period_loss_sum
        step_losses = torch.zeros(2, self.num_tasks, dtype=reference.dtype, device=reference.device)
        for name, loss in losses.items():
            step_losses[0, self.task_index[name]] = loss.to(device=reference.device, dtype=reference.dtype)
            step_losses[1, self.task_index[name]] = 1.0
        call_index = self.calls
        self.calls += 1

        # One reduce per call, in both modes, so every rank stores the same statistics.
        step_losses = self.reduce(step_losses)
        if self.window is not None:
            self.window_losses[call_index % (2 * self.window)] = step_losses
            return

        self.period_loss_sum += step_losses[0]
        self.period_loss_count += step_losses[1]
        self.steps_in_period += 1
        if self.steps_per_epoch is not None and self.steps_in_period >= self.steps_per_epoch:
            self.end_epoch()

    def _period_averages(self) -> tuple[Tensor, Tensor]:
        """Return :math:`(\\bar L(t-1), \\bar L(t-2))` for all tasks, NaN where unknown."""
        if self.window is None:
            return self.last_average, self.previous_average

        window = self.window
        if self.calls < 2 * window:
            unknown = torch.full((self.num_tasks,), math.nan, dtype=self.window_losses.dtype, device=self.window_losses.device)
            return unknown, unknown

        # After the roll, entries 0 ... k-1 are calls t-k ... t-1 and entries k ... 2k-1 are calls t-2k ... t-k-1.
        start = (self.calls - window) % (2 * window)
        rolled = torch.roll(self.window_losses, shifts=-start, dims=0)
        return _average(rolled[:window]), _average(rolled[window:])

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls, "steps_in_period": self.steps_in_period, "periods_completed": self.periods_completed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])
        self.steps_in_period = int(state["steps_in_period"])
        self.periods_completed = int(state["periods_completed"])

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, temperature={self.temperature}"
        if self.steps_per_epoch is not None:
            text += f", steps_per_epoch={self.steps_per_epoch}"
        if self.window is not None:
            text += f", window={self.window}"
        return text


def _average(rows: Tensor) -> Tensor:
    """Average loss per task from rows of (sums, counts); NaN for a task with no count."""
    sums = rows[:, 0].sum(dim=0)
    counts = rows[:, 1].sum(dim=0)
    return torch.where(counts > 0, sums / counts.clamp(min=torch.finfo(counts.dtype).tiny), torch.full_like(sums, math.nan))
