"""evaluate: confusion matrix and per-class precision/recall on hand-checked examples."""

from __future__ import annotations

import idxdata
import numpy as np
import pytest

from mlsteps import evaluate, tracking


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


def test_confident_mistakes_lists_only_mistakes_most_confident_first_up_to_the_limit() -> None:
    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array([
        [0.9, 0.1, 0.0],  # right
        [0.6, 0.4, 0.0],  # wrong at 60 %
        [0.0, 0.95, 0.05],  # wrong at 95 %
        [0.2, 0.0, 0.8],  # wrong at 80 %
        [0.0, 1.0, 0.0],  # right
    ])
    assert evaluate.confident_mistakes(labels, probabilities, 25).tolist() == [2, 3, 1]
    assert evaluate.confident_mistakes(labels, probabilities, 2).tolist() == [2, 3]
    assert evaluate.confident_mistakes(labels, probabilities, 0).tolist() == []


def _swapping_classifier(path, swap: tuple[int, int]) -> None:
    """A hand-weighted classifier of tests/idxdata's squares that answers class b for a and a for b."""
    import keras

    weights = np.zeros((28 * 28, 10), dtype=np.float32)
    for label in range(10):
        row, col = 2 + (label // 4) * 8, 2 + (label % 4) * 6
        square = np.zeros((28, 28), dtype=np.float32)
        square[row:row + 6, col:col + 6] = 1.0
        weights[:, label] = square.ravel() / 36 / 255 * 20  # a bright square scores ~17, noise ~1
    a, b = swap
    weights[:, [a, b]] = weights[:, [b, a]]
    inputs = keras.Input((28, 28))
    dense = keras.layers.Dense(10, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights, np.zeros(10, dtype=np.float32)])
    model.save(path)


def test_run_scores_the_test_split_and_logs_metrics_report_and_readable_plots(
        tmp_path, source_dir, data_root, prepare, mlflow_server) -> None:
    import json

    import matplotlib.image
    import mlflow

    manifest = prepare(source_dir)["manifest"]  # test split: 100 examples, 10 per class
    model_path = tmp_path / "model.keras"
    _swapping_classifier(model_path, (1, 2))
    config = evaluate.EvaluateConfig(manifest=manifest, data_root=str(data_root), run_key="eval-1",
                                     tracking_uri=mlflow_server, experiment="evaluate-test",
                                     model_path=str(model_path), max_mistakes=7)
    mlflow.set_tracking_uri(mlflow_server)
    training_run = tracking.run_for(mlflow, "eval-1", experiment="evaluate-test")  # what validate and train made
    result = evaluate.run(config)
    assert result["mlflow_run_id"] == training_run
    evaluate.run(config)  # a retry: the same scores add no second point to the metrics' history
    assert len(mlflow.MlflowClient().get_metric_history(training_run, "test_accuracy")) == 1

    assert result["metrics"]["test_accuracy"] == pytest.approx(0.8)  # every 1 and every 2 is wrong
    report = json.loads(open(result["report"]).read())
    matrix = np.array(report["confusion_matrix"])
    assert matrix[1, 2] == 10 and matrix[2, 1] == 10 and matrix.trace() == 80
    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.MlflowClient().get_run(result["mlflow_run_id"]).data.metrics
    assert logged["test_accuracy"] == pytest.approx(0.8)
    assert logged["test_recall_1"] == 0 and logged["test_precision_2"] == 0 and logged["test_recall_3"] == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["mlflow_run_id"], "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/misclassified.png",
            "evaluation/report.json"} <= artifacts

    out = data_root / "runs" / "eval-1" / "evaluation"
    confusion_png = matplotlib.image.imread(out / "confusion_matrix.png")
    assert confusion_png.shape[:2] == (700, 700)  # one 0.6-inch cell per class at 100 dpi, plus margins
    grid = matplotlib.image.imread(out / "misclassified.png")
    assert grid.shape[:2] == (440, 1000)  # 7 of the 20 mistakes: two rows of five panels
    assert grid[..., :3].std() > 0.05  # digits drawn, not a blank page


def test_a_run_key_without_a_training_run_is_refused_and_starts_no_run(tmp_path, source_dir, data_root, prepare,
                                                                       mlflow_server) -> None:
    """A mistyped --run-key (or --experiment) made an empty run of its own, left RUNNING, with the scores of
    a model it does not hold."""
    import mlflow

    manifest = prepare(source_dir)["manifest"]
    model_path = tmp_path / "model.keras"
    _swapping_classifier(model_path, (1, 2))
    config = evaluate.EvaluateConfig(manifest=manifest, data_root=str(data_root), run_key="no-such-training",
                                     tracking_uri=mlflow_server, experiment="evaluate-test",
                                     model_path=str(model_path))
    with pytest.raises(evaluate.StepError, match="no MLflow run for run key 'no-such-training'"):
        evaluate.run(config)
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("evaluate-test")
    assert experiment is None or not client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = 'no-such-training'")


def test_the_confusion_matrix_of_two_classes_keeps_its_title_and_of_many_stays_small(tmp_path) -> None:
    import matplotlib.image

    rng = np.random.default_rng(0)
    for n, side in ((2, 400), (150, 2000)):
        matrix = rng.integers(40, 60, size=(n, n))  # no cell 0: the palest cell's count stays legible
        labels = np.arange(n) % n
        probabilities = np.full((n, n), 1 / n)
        paths = evaluate._plots(tmp_path, matrix, [f"c{i}" for i in range(n)], np.zeros((n, 28, 28)), labels,
                                probabilities, 0)
        assert matplotlib.image.imread(paths[0]).shape[:2] == (side, side)


def test_run_refuses_a_negative_mistake_count_before_loading_anything(tmp_path) -> None:
    config = evaluate.EvaluateConfig(manifest=str(tmp_path / "missing.json"), data_root=str(tmp_path),
                                     run_key="k", model_path=str(tmp_path / "m.keras"), max_mistakes=-1)
    with pytest.raises(evaluate.StepError, match="--max-mistakes at least 0"):
        evaluate.run(config)


def test_a_damaged_model_file_is_an_input_error_naming_the_file(tmp_path, source_dir, data_root, prepare) -> None:
    """Keras says "File not found" of a file that is there; the step says what it is (exit 2: no retry)."""
    from mlsteps import core

    manifest = prepare(source_dir)["manifest"]
    damaged = tmp_path / "model.keras"
    damaged.write_bytes(b"not a keras archive\n" * 50)
    config = evaluate.EvaluateConfig(manifest=manifest, data_root=str(data_root), run_key="eval-damaged",
                                     model_path=str(damaged))
    with pytest.raises(core.StepError, match="cannot load the trained model.*damaged or not a Keras model") as caught:
        evaluate.run(config)
    assert str(damaged) in str(caught.value)


@pytest.mark.parametrize(("size", "classes", "words"), [
    (28, 3, r"takes images of \(28, 28\) and answers 10 classes, but dataset custom .* has images of \(28, 28\) "
            r"in 3 classes"),
    (32, 10, r"takes images of \(28, 28\) and answers 10 classes, but dataset custom .* has images of \(32, 32\) "
             r"in 10 classes"),
], ids=["other-class-count", "other-image-size"])
def test_a_model_of_other_data_is_an_input_error_naming_both_shapes(tmp_path, data_root, prepare, size, classes,
                                                                    words) -> None:
    from mlsteps import core

    other = prepare(idxdata.write_dataset(tmp_path / "source", train=60, test=30, classes=classes,
                                          size=size))["manifest"]
    model_path = tmp_path / "model.keras"
    _swapping_classifier(model_path, (1, 2))  # 28x28 images, ten classes
    config = evaluate.EvaluateConfig(manifest=other, data_root=str(data_root), run_key="eval-other",
                                     model_path=str(model_path))
    with pytest.raises(core.StepError, match=words):
        evaluate.run(config)
