r"""Metrics of regression in the targets' original units.

With errors :math:`e_i = \hat y_i - y_i` over the kept elements:

.. math::
    \mathrm{RMSE} = \sqrt{\tfrac{1}{n}\textstyle\sum_i e_i^2}, \qquad
    \mathrm{MAE} = \tfrac{1}{n}\textstyle\sum_i |e_i|.

Pearson's :math:`r` is the covariance of predictions and targets divided by the product of their
standard deviations; Spearman's :math:`\rho` is Pearson's :math:`r` of their ranks (ties get the
average rank).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.stats import rankdata

from multitune.metrics._arrays import to_numpy


def regression_metrics(predictions: Any, labels: Any) -> dict[str, float]:
    """Compute ``rmse``, ``mae``, ``pearson`` and ``spearman`` of regression predictions.

    Args:
        predictions: predictions in the targets' units, shape ``[N]`` or ``[N, K]``.
        labels: targets of the same shape (``[N]`` and ``[N, 1]`` are interchangeable). NaN
            targets are missing and ignored element-wise.

    ``rmse`` and ``mae`` pool all kept elements of all ``K`` targets. ``pearson`` and ``spearman``
    are computed per target and averaged over targets. A target with fewer than two kept values,
    or with constant predictions or targets, has no defined correlation, so they are NaN.

    Raises:
        ValueError: if the shapes differ or every target is NaN.
    """
    predicted = _as_columns(to_numpy(predictions, name="predictions").astype(np.float64))
    true = _as_columns(to_numpy(labels, name="labels").astype(np.float64))
    if predicted.shape != true.shape:
        raise ValueError(f"regression predictions have shape {predicted.shape} but labels have shape {true.shape}; pass one prediction per target")

    keep = ~np.isnan(true)
    if not keep.any():
        raise ValueError("regression metrics need at least one target; every label is NaN")

    errors = predicted[keep] - true[keep]
    pearson = [_pearson(predicted[keep[:, k], k], true[keep[:, k], k]) for k in range(true.shape[1])]
    spearman = [_spearman(predicted[keep[:, k], k], true[keep[:, k], k]) for k in range(true.shape[1])]

    return {
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "mae": float(np.mean(np.abs(errors))),
        "pearson": float(np.mean(pearson)),
        "spearman": float(np.mean(spearman)),
    }


def _as_columns(values: np.ndarray) -> np.ndarray:
    if values.ndim == 1:
        return values[:, None]
    if values.ndim == 2:
        return values
    raise ValueError(f"regression values must have shape [N] or [N, K], got {values.shape}")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return float("nan")
    # A constant input has no correlation. Its centred values need not be exactly zero, because
    # the float mean of equal values can differ from them in the last bit.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    x_centered = x - x.mean()
    y_centered = y - y.mean()
    denominator = np.sqrt(np.sum(x_centered**2) * np.sum(y_centered**2))
    if denominator == 0 or not np.isfinite(denominator):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = np.sum(x_centered * y_centered) / denominator
    return float(np.clip(value, -1.0, 1.0))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    return _pearson(rankdata(x), rankdata(y))
