"""evaluate: test accuracy, per-class precision and recall, a confusion matrix and the worst mistakes.

Everything is logged to the training run in MLflow, so one run holds the model and its evaluation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, tracking
from . import model as model_lib
from .core import StepError, cli, field, write_json_atomic

log = logging.getLogger("mlsteps.evaluate")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(tracking.RunStepConfig):
    model_path: str = field(help="the trained Keras model (model.keras) written by train")
    batch_size: int = field(512, help="examples per inference batch")
    max_mistakes: int = field(25, help="misclassified examples shown in the grid")


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per class; a class never predicted (or never present) scores 0."""
    hits = np.diag(matrix).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(hits / matrix.sum(axis=0))
        recall = np.nan_to_num(hits / matrix.sum(axis=1))
    return precision, recall


def confident_mistakes(labels: np.ndarray, probabilities: np.ndarray, limit: int) -> np.ndarray:
    """Indexes of up to ``limit`` misclassified examples, the most confident mistakes first.

    Those are what a reviewer should look at: a model sure of a wrong answer is the one to worry about.
    """
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    # stable: equally confident mistakes keep the test set's order.
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]


MAX_LABELLED_CLASSES = 30  # classes up to which the confusion matrix plot shows counts and class names


def _plots(out: Path, matrix: np.ndarray, class_names: list[str], images: np.ndarray, labels: np.ndarray,
           probabilities: np.ndarray, max_mistakes: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    # One 0.6-inch cell per class, at least 4 inches (the title of 2 classes fits) and at most 20: past
    # MAX_LABELLED_CLASSES classes the counts and names are left to report.json (n^2 labels, a picture of
    # thousands of pixels a side took minutes and a gigabyte), and the colour says it.
    side = min(20.0, max(4.0, 1 + 0.6 * n))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues", vmin=0)  # from 0: the text colours below follow the same scale
    if n <= MAX_LABELLED_CLASSES:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {np.trace(matrix) / max(1, matrix.sum()):.2%})")
    fig.tight_layout()
    paths = [out / "confusion_matrix.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    predicted = probabilities.argmax(axis=1)
    wrong = confident_mistakes(labels, probabilities, max_mistakes)
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"true {class_names[labels[i]]}\npred {class_names[predicted[i]]} "
                     f"{probabilities[i, predicted[i]]:.0%}", fontsize=7)
    fig.suptitle(f"{len(wrong)} most confident mistakes")
    fig.tight_layout()
    paths.append(out / "misclassified.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def run(config: EvaluateConfig) -> dict[str, Any]:
    if config.batch_size < 1 or config.max_mistakes < 0:
        raise StepError(f"--batch-size must be at least 1 (got {config.batch_size}) and --max-mistakes at least 0 "
                        f"(got {config.max_mistakes})")
    manifest = data.load_manifest(config.manifest)
    model = model_lib.load_trained(config.model_path, manifest)
    images, labels = data.arrays(manifest, "test")
    probabilities = model.predict(images.astype(np.float32), batch_size=config.batch_size, verbose=0)
    predicted = probabilities.argmax(axis=1)
    class_names = manifest["class_names"]
    matrix = confusion(labels, predicted, len(class_names))
    precision, recall = per_class(matrix)
    accuracy = float(np.mean(predicted == labels)) if len(labels) else 0.0
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], eps, 1))))
    metrics = {"test_accuracy": accuracy, "test_loss": loss}
    metrics |= {f"test_precision_{i}": float(p) for i, p in enumerate(precision)}
    metrics |= {f"test_recall_{i}": float(r) for i, r in enumerate(recall)}

    out = tracking.run_dir(config.data_root, config.run_key) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, matrix, class_names, images, labels, probabilities, config.max_mistakes)
    report = {"metrics": metrics, "confusion_matrix": matrix.tolist(), "class_names": class_names,
              "examples": int(len(labels))}
    write_json_atomic(out / "report.json", report)

    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    run_id = tracking.run_for(mlflow, config.run_key, experiment=config.experiment, create=False)
    now = int(time.time() * 1000)
    # A retry (or a cleared task) scoring the same model again adds no second point to each metric's history.
    logged = client.get_run(run_id).data.metrics
    fresh = {k: v for k, v in metrics.items() if logged.get(k) != v}
    if fresh:
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, now, 0) for k, v in fresh.items()])
    for plot in plots:
        client.log_artifact(run_id, str(plot), "evaluation")
    client.log_dict(run_id, report, "evaluation/report.json")
    worst = int(np.argmin(recall))
    log.info("test accuracy %.4f on %d examples; weakest class %s (recall %.3f)", accuracy, len(labels),
             class_names[worst], recall[worst])
    return {"mlflow_run_id": run_id, "metrics": {"test_accuracy": accuracy, "test_loss": loss},
            "report": str(out / "report.json")}


def main(argv: list[str] | None = None) -> int:
    return cli(run, EvaluateConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
