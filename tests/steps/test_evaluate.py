"""evaluate: confusion matrix and per-class precision/recall on hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest

from mlsteps import evaluate


def test_confusion_counts_true_rows_against_predicted_columns() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
    expected = np.array([
        [2, 1, 0],
        [0, 1, 1],
        [1, 0, 3],
    ])
    matrix = evaluate.confusion(labels, predicted, 3)
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64
    assert matrix.sum() == len(labels)


def test_confusion_keeps_absent_classes_as_zero_rows_and_columns() -> None:
    matrix = evaluate.confusion(np.array([1, 1]), np.array([1, 1]), 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[1, 1] = 2
    np.testing.assert_array_equal(matrix, expected)


def test_per_class_precision_and_recall_match_hand_computation() -> None:
    matrix = np.array([
        [2, 1, 0],
        [0, 1, 1],
        [1, 0, 3],
    ])
    precision, recall = evaluate.per_class(matrix)
    # Precision divides by the predicted column, recall by the true row.
    np.testing.assert_allclose(precision, [2 / 3, 1 / 2, 3 / 4])
    np.testing.assert_allclose(recall, [2 / 3, 1 / 2, 3 / 4])


def test_per_class_on_asymmetric_matrix() -> None:
    matrix = np.array([
        [5, 0],
        [5, 10],
    ])
    precision, recall = evaluate.per_class(matrix)
    np.testing.assert_allclose(precision, [0.5, 1.0])
    np.testing.assert_allclose(recall, [1.0, 2 / 3])


@pytest.mark.parametrize(
    ("matrix", "precision", "recall"),
    [
        (np.array([[3, 0], [0, 0]]), [1.0, 0.0], [1.0, 0.0]),
        (np.array([[0, 2], [0, 4]]), [0.0, 4 / 6], [0.0, 1.0]),
        (np.zeros((3, 3), dtype=np.int64), [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
    ],
    ids=["class-never-present", "class-never-predicted", "empty"],
)
def test_per_class_scores_zero_instead_of_nan(matrix, precision, recall) -> None:
    got_precision, got_recall = evaluate.per_class(matrix)
    assert not np.isnan(got_precision).any() and not np.isnan(got_recall).any()
    np.testing.assert_allclose(got_precision, precision)
    np.testing.assert_allclose(got_recall, recall)


def test_perfect_predictions_give_diagonal_and_unit_scores() -> None:
    labels = np.arange(10).repeat(3)
    matrix = evaluate.confusion(labels, labels, 10)
    np.testing.assert_array_equal(matrix, 3 * np.eye(10, dtype=np.int64))
    precision, recall = evaluate.per_class(matrix)
    np.testing.assert_array_equal(precision, np.ones(10))
    np.testing.assert_array_equal(recall, np.ones(10))
