r"""Shared features of a batch, and pooling of per-token states into one vector per example.

Masked mean pooling averages the states of the real tokens,

.. math::
    \bar h_b = \frac{\sum_t m_{b,t}\, h_{b,t}}{\max(1, \sum_t m_{b,t})},

with :math:`m` the attention mask (1 for tokens, 0 for padding). CLS pooling takes the state of the
first token, :math:`h_{b,0}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

Pooling = Literal["mean", "cls"]
"""Pooling mode that turns per-token states into one vector per example: masked mean or first (CLS) token."""

POOLING_MODES: tuple[str, ...] = get_args(Pooling)


@dataclass(frozen=True)
class Features:
    """Output of the shared backbone for one batch, read by every task head.

    Attributes:
        pooled: one vector per example, ``[B, H]``; classification, multilabel and regression
            heads read it.
        tokens: per-token states ``[B, L, H]``, or ``None`` when the backbone returns one
            vector per example; token classification heads read it.
        attention_mask: the batch's attention mask ``[B, L]``, or ``None``.
    """

    pooled: Tensor
    tokens: Tensor | None = None
    attention_mask: Tensor | None = None


def mean_pool(tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Return the mean of ``tokens`` ``[B, L, H]`` over the positions where ``attention_mask`` ``[B, L]`` is non-zero."""
    if attention_mask is None:
        return tokens.mean(dim=1)
    if attention_mask.shape != tokens.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the token states have {tuple(tokens.shape[:2])} (batch, length)")
    weights = attention_mask.to(device=tokens.device, dtype=tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def cls_pool(tokens: Tensor) -> Tensor:
    """Return the state of the first token of each example, ``tokens[:, 0]``."""
    return tokens[:, 0]


def pool(tokens: Tensor, attention_mask: Tensor | None, mode: Pooling) -> Tensor:
    """Pool ``tokens`` ``[B, L, H]`` into ``[B, H]`` with ``mode`` (``"mean"`` or ``"cls"``)."""
    if mode == "mean":
        return mean_pool(tokens, attention_mask)
    if mode == "cls":
        return cls_pool(tokens)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {list(POOLING_MODES)}")
