"""Per-kind metrics cross-checked against scikit-learn, SciPy and hand-counted entities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

from multitune.metrics import (
    baseline_metrics,
    baseline_predictions,
    compute_metrics,
    is_iob_scheme,
    metric_higher_is_better,
    primary_metric,
)

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


# Classification ------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40))
def test_classification_matches_sklearn(pairs: list[tuple[int, int]]) -> None:
    labels = np.array([label for label, _ in pairs])
    predictions = np.array([prediction for _, prediction in pairs])

    metrics = compute_metrics("classification", predictions, labels)

    assert math.isclose(metrics["accuracy"], accuracy_score(labels, predictions))
    assert math.isclose(metrics["macro_f1"], f1_score(labels, predictions, average="macro", zero_division=0.0))


def test_classification_ignores_missing_labels() -> None:
    labels = torch.tensor([0, 1, -100, 2, 2, -100])
    predictions = torch.tensor([0, 2, 1, 2, 1, 0])

    metrics = compute_metrics("classification", predictions, labels)

    kept = [0, 1, 3, 4]
    assert math.isclose(metrics["accuracy"], accuracy_score(labels[kept], predictions[kept]))
    assert math.isclose(metrics["macro_f1"], f1_score(labels[kept], predictions[kept], average="macro"))


def test_classification_accepts_scores() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert compute_metrics("classification", scores, [1, 1, 1])["accuracy"] == pytest.approx(2 / 3)


def test_classification_rejects_all_missing() -> None:
    with pytest.raises(ValueError, match="every label is -100"):
        compute_metrics("classification", [0, 1], [-100, -100])


def test_classification_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics("classification", [0, 1, 1], [0, 1])


# Multilabel ----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(2, 5), st.integers(0, 2**16))
def test_multilabel_matches_sklearn(rows: int, columns: int, seed: int) -> None:
    # scikit-learn reads a single column as binary targets, not as multilabel, so C starts at 2.
    rng = np.random.default_rng(seed)
    labels = (rng.random((rows, columns)) < 0.4).astype(np.int64)
    predictions = (rng.random((rows, columns)) < 0.4).astype(np.int64)

    metrics = compute_metrics("multilabel", predictions, labels)

    present = [c for c in range(columns) if labels[:, c].any() or predictions[:, c].any()]
    expected_macro = f1_score(labels, predictions, average="macro", labels=present, zero_division=0.0) if present else 0.0
    assert math.isclose(metrics["micro_f1"], f1_score(labels, predictions, average="micro", zero_division=0.0))
    assert math.isclose(metrics["macro_f1"], expected_macro)
    assert math.isclose(metrics["subset_accuracy"], accuracy_score(labels, predictions))


def test_multilabel_ignores_missing_entries() -> None:
    labels = np.array([[1, 0, -100], [0, 1, 1], [-100, -100, -100]])
    predictions = np.array([[1, 1, 1], [0, 1, 0], [1, 1, 1]])

    metrics = compute_metrics("multilabel", predictions, labels)

    # Kept entries: TP = 2 (row 0 label 0, row 1 label 1), FP = 1 (row 0 label 1), FN = 1 (row 1 label 2).
    assert metrics["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # Per label: F1 = 1, 2/3, 0 (label 2 was missed once and its row-0 prediction is ignored).
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics["subset_accuracy"] == pytest.approx(0.0)


def test_multilabel_thresholds_probabilities() -> None:
    probabilities = np.array([[0.5, 0.49], [0.9, 0.1]])
    labels = np.array([[1, 0], [1, 0]])
    assert compute_metrics("multilabel", probabilities, labels)["subset_accuracy"] == 1.0


def test_multilabel_without_positives_is_zero() -> None:
    metrics = compute_metrics("multilabel", np.zeros((3, 2)), np.zeros((3, 2)))
    assert metrics["micro_f1"] == 0.0
    assert metrics["macro_f1"] == 0.0
    assert metrics["subset_accuracy"] == 1.0


# Regression ----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 30), st.integers(0, 2**16), st.booleans())
def test_regression_matches_sklearn_and_scipy(size: int, seed: int, with_ties: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.normal(size=size)
    predictions = labels + rng.normal(scale=0.5, size=size)
    if with_ties:
        labels = np.round(labels)
        predictions = np.round(predictions * 2) / 2
    if np.ptp(labels) == 0 or np.ptp(predictions) == 0:
        return

    metrics = compute_metrics("regression", predictions, labels)

    assert math.isclose(metrics["rmse"], math.sqrt(mean_squared_error(labels, predictions)), rel_tol=1e-9)
    assert math.isclose(metrics["mae"], mean_absolute_error(labels, predictions), rel_tol=1e-9)
    assert math.isclose(metrics["pearson"], stats.pearsonr(predictions, labels).statistic, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(metrics["spearman"], stats.spearmanr(predictions, labels).statistic, rel_tol=1e-9, abs_tol=1e-12)


def test_regression_multi_target_with_missing() -> None:
    labels = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 20.0]])
    predictions = np.array([[1.5, 12.0], [2.0, 99.0], [2.0, 28.0], [5.0, 21.0]])

    metrics = compute_metrics("regression", predictions, labels)

    errors = np.array([0.5, 0.0, -1.0, 1.0, 2.0, -2.0, 1.0])
    assert metrics["rmse"] == pytest.approx(math.sqrt(np.mean(errors**2)))
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(errors)))
    first = stats.pearsonr(predictions[:, 0], labels[:, 0]).statistic
    second = stats.pearsonr([12.0, 28.0, 21.0], [10.0, 30.0, 20.0]).statistic
    assert metrics["pearson"] == pytest.approx((first + second) / 2)


def test_regression_constant_predictions_have_nan_correlation() -> None:
    metrics = compute_metrics("regression", np.full(4, 2.0), np.array([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(metrics["pearson"])
    assert math.isnan(metrics["spearman"])
    assert metrics["rmse"] == pytest.approx(math.sqrt(1.5))


def test_constant_predictions_with_rounding_mean() -> None:
    """Equal predictions whose float mean is off in the last bit still have no correlation."""
    constant = np.full(300, 0.1, dtype=np.float64)
    assert constant.mean() != 0.1  # the rounding that made the centred values non-zero
    labels = np.linspace(-2.0, 3.0, 300)
    metrics = compute_metrics("regression", constant, labels)
    assert math.isnan(metrics["pearson"])
    assert math.isnan(metrics["spearman"])


def test_regression_column_and_flat_agree() -> None:
    labels = torch.tensor([1.0, 2.0, 4.0])
    predictions = torch.tensor([[1.0], [3.0], [3.5]])
    assert compute_metrics("regression", predictions, labels) == compute_metrics("regression", predictions[:, 0], labels)


# Token classification ------------------------------------------------------------------------


def test_entity_f1_by_hand() -> None:
    # Sentence 1: true PER(0-1), LOC(3); predicted PER(0-1) correct, LOC(3) typed as PER (wrong).
    # Sentence 2: true LOC(0-1); predicted LOC(0) only (boundary wrong) and a spurious PER(3).
    labels = [[1, 2, 0, 3, -100], [3, 4, 0, 0, -100]]
    predictions = [[1, 2, 0, 1, 4], [3, 0, 0, 1, 0]]

    metrics = compute_metrics("token_classification", predictions, labels, label_names=TAGS)

    # True entities 3, predicted 4, correct 1.
    assert metrics["entity_precision"] == pytest.approx(1 / 4)
    assert metrics["entity_recall"] == pytest.approx(1 / 3)
    assert metrics["entity_f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    # Correct tags: 3 of 4 kept positions in sentence 1, 2 of 4 in sentence 2.
    assert metrics["token_accuracy"] == pytest.approx(5 / 8)


def test_token_metrics_ragged_rows() -> None:
    labels = [[1, 2, 0], [0, 3]]
    predictions = [np.array([1, 2, 0]), torch.tensor([0, 3])]

    metrics = compute_metrics("token_classification", predictions, labels, label_names=TAGS)

    assert metrics["entity_f1"] == 1.0
    assert metrics["token_accuracy"] == 1.0


def test_token_metrics_fall_back_without_iob() -> None:
    labels = np.array([[0, 1, 2, -100]])
    predictions = np.array([[0, 1, 1, 2]])

    plain = compute_metrics("token_classification", predictions, labels, label_names=["NOUN", "VERB", "ADJ"])
    unnamed = compute_metrics("token_classification", predictions, labels)

    assert plain == {"token_accuracy": pytest.approx(2 / 3)}
    assert unnamed == plain
    assert primary_metric("token_classification", ["NOUN", "VERB", "ADJ"]) == ("token_accuracy", True)


def test_token_metrics_reject_unnamed_id() -> None:
    with pytest.raises(ValueError, match="label_names has 3 names"):
        compute_metrics("token_classification", [[0, 5]], [[0, 1]], label_names=["O", "B-X", "I-X"])


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (TAGS, True),
        (["O", "S-PER", "B-PER", "I-PER", "E-PER"], True),
        (["O"], False),
        (["PER", "LOC"], False),
        (None, False),
    ],
)
def test_iob_scheme_detection(names: list[str] | None, expected: bool) -> None:
    assert is_iob_scheme(names) is expected


# Primary metric and directions ---------------------------------------------------------------


def test_primary_metric_per_kind() -> None:
    assert primary_metric("classification") == ("macro_f1", True)
    assert primary_metric("multilabel") == ("micro_f1", True)
    assert primary_metric("regression") == ("rmse", False)
    assert primary_metric("token_classification") == ("entity_f1", True)
    assert primary_metric("token_classification", TAGS) == ("entity_f1", True)


def test_primary_metric_is_computed() -> None:
    cases = {
        "classification": ([0, 1], [0, 1]),
        "multilabel": ([[1, 0]], [[1, 0]]),
        "regression": ([1.0, 2.0], [1.0, 2.5]),
        "token_classification": ([[1, 2]], [[1, 2]]),
    }
    for kind, (predictions, labels) in cases.items():
        name, _ = primary_metric(kind)
        assert name in compute_metrics(kind, predictions, labels, label_names=TAGS)


def test_metric_directions() -> None:
    assert metric_higher_is_better("rmse") is False
    assert metric_higher_is_better("entity_f1") is True
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        metric_higher_is_better("bleu")


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
        compute_metrics("ranking", [1], [1])


# Baselines -----------------------------------------------------------------------------------


def test_majority_class_baseline() -> None:
    train = [2, 2, 1, 0, 2, -100, -100, -100]
    evaluation = np.array([2, 1, 0, 2])

    metrics = baseline_metrics("classification", train, evaluation)

    predictions = np.full(4, 2)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(f1_score(evaluation, predictions, average="macro", zero_division=0.0))


def test_mean_baseline() -> None:
    train = np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 20.0]])
    evaluation = np.array([[2.0, 15.0], [4.0, 25.0]])

    predictions = baseline_predictions("regression", train, evaluation)
    metrics = baseline_metrics("regression", train, evaluation)

    np.testing.assert_allclose(predictions, [[3.0, 15.0], [3.0, 15.0]])
    assert metrics["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1 + 100) / 4))
    assert math.isnan(metrics["pearson"])


def test_multilabel_majority_baseline() -> None:
    train = np.array([[1, 0, 1], [1, 0, -100], [0, 1, 0]])
    evaluation = np.array([[1, 1, 0], [1, 0, 0]])

    assert baseline_predictions("multilabel", train, evaluation).tolist() == [[1, 0, 0], [1, 0, 0]]
    assert baseline_metrics("multilabel", train, evaluation)["subset_accuracy"] == pytest.approx(0.5)


def test_token_majority_baseline() -> None:
    train = [[0, 0, 1, 2], [0, 3, -100]]
    evaluation = np.array([[0, 1, 2, -100], [3, 4, 0, 0]])

    metrics = baseline_metrics("token_classification", train, evaluation, label_names=TAGS)

    assert metrics["token_accuracy"] == pytest.approx(3 / 7)
    assert metrics["entity_f1"] == 0.0


def test_trained_predictor_beats_baseline() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 3, size=200)
    evaluation = rng.integers(0, 3, size=100)
    noisy = np.where(rng.random(100) < 0.8, evaluation, (evaluation + 1) % 3)

    baseline = baseline_metrics("classification", train, evaluation)
    trained = compute_metrics("classification", noisy, evaluation)

    assert trained["macro_f1"] > baseline["macro_f1"]
    assert trained["accuracy"] > baseline["accuracy"]
