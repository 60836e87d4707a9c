"""Evaluation metrics per task kind, constant-predictor baselines and the multi-task change Δm%."""

from multitune.metrics._arrays import IGNORE_INDEX
from multitune.metrics._baselines import baseline_metrics, baseline_predictions
from multitune.metrics._classification import classification_metrics, multilabel_metrics
from multitune.metrics._compute import TASK_KINDS, TaskKind, compute_metrics, metric_higher_is_better, primary_metric, validate_kind
from multitune.metrics._delta_m import delta_m, delta_m_terms
from multitune.metrics._regression import regression_metrics
from multitune.metrics._tokens import is_iob_scheme, token_classification_metrics

__all__ = [
    "IGNORE_INDEX",
    "TASK_KINDS",
    "TaskKind",
    "baseline_metrics",
    "baseline_predictions",
    "classification_metrics",
    "compute_metrics",
    "delta_m",
    "delta_m_terms",
    "is_iob_scheme",
    "metric_higher_is_better",
    "multilabel_metrics",
    "primary_metric",
    "regression_metrics",
    "token_classification_metrics",
    "validate_kind",
]
