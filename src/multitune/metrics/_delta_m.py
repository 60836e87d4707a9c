r"""The multi-task performance change :math:`\Delta_m\%` against single-task baselines.

Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019
(https://arxiv.org/abs/1904.08918) measure a multi-task model by its average relative change
against single-task baselines. This module uses the sign convention of the Nash-MTL code
(Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
``experiments/nyuv2/utils.py::delta_fn`` in https://github.com/AvivNavon/nash-mtl):

.. math::
    \Delta_m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{l_k} \, \frac{M_{m,k} - M_{b,k}}{M_{b,k}},

where :math:`M_{m,k}` is the multi-task model's value of metric :math:`k`, :math:`M_{b,k}` the
baseline's and :math:`l_k = 1` when a higher value of metric :math:`k` is better.

**Lower is better**: a negative :math:`\Delta_m` means the multi-task model beats the baselines on
average. LibMTL's ``count_improvement`` reports the same quantity with the opposite sign (there,
higher is better), so compare numbers only after checking the convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def delta_m_terms(metrics: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    r"""Return each metric's term :math:`100\,(-1)^{l_k}(M_{m,k} - M_{b,k}) / |M_{b,k}|` of :func:`delta_m`.

    A negative term means the multi-task model is better than the baseline on that metric.
    The keys are those of ``metrics``; see :func:`delta_m` for the checks.
    """
    if not metrics:
        raise ValueError("delta_m needs at least one metric; metrics is empty")

    terms: dict[str, float] = {}
    for key, value in metrics.items():
        if key not in baselines:
            raise KeyError(f"metric {key!r} has no baseline; baselines has {sorted(baselines)}")
        if key not in higher_is_better:
            raise KeyError(f"metric {key!r} has no entry in higher_is_better; it has {sorted(higher_is_better)}")

        baseline = float(baselines[key])
        value = float(value)
        if baseline == 0.0 or not math.isfinite(baseline):
            raise ValueError(f"metric {key!r}: baseline is {baseline}, so the relative change is undefined; use a metric whose baseline is finite and non-zero")
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r}: value is {value}; delta_m needs finite values")

        # NOTE: the published formula divides by M_b; dividing by |M_b| gives the same value for
        # positive baselines and keeps "better lowers delta_m" for negative ones (correlations).
        sign = -1.0 if higher_is_better[key] else 1.0
        terms[key] = 100.0 * sign * (value - baseline) / abs(baseline)
    return terms


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    r"""Return :math:`\Delta_m\%`, the mean relative change of the multi-task model against baselines (lower is better).

    Args:
        metrics: the multi-task model's value of each metric, e.g. ``{"sentiment/macro_f1": 0.81}``.
            Every key counts once, so a task with two metrics weighs twice.
        baselines: the single-task (or other reference) value of each key of ``metrics``.
        higher_is_better: for each key of ``metrics``, whether a higher value is better.

    Returns:
        :math:`\Delta_m` in percent. Negative: the multi-task model is better on average.

    Raises:
        KeyError: a key of ``metrics`` is missing from ``baselines`` or ``higher_is_better``.
        ValueError: ``metrics`` is empty, or a baseline is zero or not finite, or a value is not finite.
    """
    terms = delta_m_terms(metrics, baselines, higher_is_better)
    return sum(terms.values()) / len(terms)
