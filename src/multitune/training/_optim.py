"""The optimizer (AdamW with decoupled weight decay) and the learning-rate schedule of a run."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

SchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup"]

# Parameters whose names end like this get no weight decay (biases and normalisation scales),
# as in the Hugging Face Trainer.
_NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln.weight")


def _decays(name: str, parameter: nn.Parameter) -> bool:
    if parameter.ndim <= 1:
        return False
    return not name.endswith(_NO_DECAY_SUFFIXES)


def build_optimizer(
    model: nn.Module,
    *,
    extra_parameters: Iterable[nn.Parameter] = (),
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """Build AdamW over the trainable parameters of ``model`` and ``extra_parameters``.

    Weight decay applies to the matrices of ``model`` only. Biases, normalisation weights and every
    extra parameter (a balancer's learnable weights, such as uncertainty weighting's
    log-variances, which decay would pull towards 0) are in a group without decay.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if _decays(name, parameter) else no_decay).append(parameter)

    extra = [p for p in extra_parameters if p.requires_grad and id(p) not in seen]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay + extra, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters; check model.lora and the frozen layers")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def warmup_steps_for(total_steps: int, *, warmup_steps: int, warmup_ratio: float) -> int:
    """Return the number of warm-up steps: ``warmup_steps`` when > 0, else ``ceil(warmup_ratio * total_steps)``."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    scheduler_type: SchedulerType,
    total_steps: int,
    warmup_steps: int,
) -> LambdaLR:
    r"""Build the learning-rate schedule as a multiplier :math:`m(t)` of the base rate at step :math:`t`.

    With :math:`W` warm-up steps and :math:`T` total steps, every schedule rises linearly,
    :math:`m(t) = t / W` for :math:`t < W`, except ``constant``, which is 1 throughout. After the
    warm-up ``linear`` decays as :math:`(T - t) / (T - W)`, ``cosine`` as
    :math:`\tfrac12 (1 + \cos(\pi (t - W) / (T - W)))` and ``constant_with_warmup`` stays at 1. These are the schedules of the same
    names in Hugging Face ``transformers.get_scheduler``.
    """
    warmup = max(0, int(warmup_steps))
    total = max(1, int(total_steps))

    def multiplier(step: int) -> float:
        if scheduler_type == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if scheduler_type == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if scheduler_type == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        raise ValueError(f"unknown lr_scheduler_type {scheduler_type!r}; use linear, cosine, constant or constant_with_warmup")

    return LambdaLR(optimizer, multiplier)
