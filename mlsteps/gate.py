"""gate: the challenger against the current champion on the same test set; the verdict goes into version tags.

Both registered versions are loaded as MLflow pyfunc models (what serving runs: the compressed model
when compress chose one) and scored on this run's test split. The challenger passes if its accuracy
is at least ``--min-accuracy`` (the floor) and at most ``--max-regression`` points below the champion's.
Without a champion (the first model) only the floor applies. A champion of other data (its ``dataset`` tag,
its signature's image shape or class count, or the test set it was itself judged on, not this run's) is not
comparable: the challenger fails, saying so and how to deploy it by hand. A challenger trained on another
prepared dataset than ``--manifest`` is refused (exit 2); a registry or artifact-store failure exits 1
(retried); a champion that cannot be loaded fails the challenger, saying so (a challenger that cannot be
loaded fails the step). The step succeeds either way: the verdict
(``gate.verdict`` = passed | failed, ``gate.reasons``, both accuracies) is recorded on the challenger
version and returned for the review that follows; a version already judged is not judged again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import data, tracking
from .core import NodeError, StepError, cli, field

log = logging.getLogger("mlsteps.gate")

CHAMPION = "champion"
PASSED, FAILED = "passed", "failed"


@dataclass(frozen=True)
class GateConfig:
    manifest: str = field(help="manifest.json written by prep: the gate scores both models on its test split")
    model_name: str = field(help="registered model name")
    version: int = field(help="the challenger: the version register created")
    min_accuracy: float = field(0.85, help="floor: the challenger's test accuracy must be at least this (0..1)")
    max_regression: float = field(0.5, help="largest accepted accuracy drop against the champion, in points")
    champion_alias: str = field(CHAMPION, help="alias naming the version in production")
    batch_size: int = field(1024, help="images per predict call")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def decide(*, challenger: float, champion: float | None, min_accuracy: float,
           max_regression: float) -> tuple[str, list[str]]:
    """The verdict and its reasons, one per rule (accuracies in 0..1, regression in points)."""
    reasons = []
    ok = challenger >= min_accuracy
    reasons.append(f"accuracy {100 * challenger:.2f} % {'>=' if ok else '<'} floor {100 * min_accuracy:.2f} %")
    if champion is None:
        reasons.append("no champion yet: the floor is the only rule")
    else:
        regression = 100 * (champion - challenger)
        fine = regression <= max_regression + 1e-9
        ok = ok and fine
        side = "below" if regression > 0 else "above"
        reasons.append(f"{abs(regression):.2f} pt {side} the champion's {100 * champion:.2f} % "
                       f"({'within' if fine else 'beyond'} the {max_regression:g} pt drop allowed)")
    return (PASSED if ok else FAILED), reasons


def load(mlflow: Any, model_uri: str) -> Any:
    """A registered model, loaded the way serving loads it."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - the model's fault, unless the registry or its store failed
        if tracking.transient(exc):  # no answer, a 5xx, a failed download: says nothing about the model
            raise NodeError(f"{model_uri}: cannot load the model now ({type(exc).__name__}: {exc}); the MLflow "
                            "registry or its artifact store failed (retried)") from None
        raise StepError(f"{model_uri}: cannot load the model ({type(exc).__name__}: {exc})") from None


def test_set_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a test split's content (its images as bytes, its labels): recorded on each judged version as
    ``gate.test_digest``, so that a later gate knows whether the champion was judged on the same test set."""
    digest = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    predicted = [np.asarray(model.predict(images[i:i + batch_size])).argmax(axis=1)
                 for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate(predicted) == labels))


def incomparable_by_tags(version: Any, manifest: dict[str, Any], test_digest: str) -> str | None:
    """Why a champion cannot be scored on this run's test split as its tags tell (another dataset, or another
    test set: two custom datasets share the name), or None; known before loading it. Scored anyway, a
    Fashion-MNIST champion on MNIST images scores near chance (any MNIST model beats it), and a champion that
    trained on some of today's test images scores too high."""
    trained_on = version.tags.get("dataset")
    if trained_on and trained_on != manifest["dataset"]:
        return f"trained on {trained_on}"
    judged_on = version.tags.get("gate.test_digest")
    if judged_on and judged_on != test_digest:
        return f"judged on another test set (gate.test_digest {judged_on[:12]}..., this run's {test_digest[:12]}...)"
    return None


def incomparable_by_signature(model: Any, manifest: dict[str, Any]) -> str | None:
    """Why a loaded champion cannot be scored on this run's test split (another image size or class count: it
    would fail on the images, or score near chance), or None."""
    signature = model.metadata.signature if model.metadata else None
    try:
        takes = tuple(int(d) for d in signature.inputs.inputs[0].shape[1:])
        answers = int(signature.outputs.inputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None  # no tensor signature to compare: the dataset tag is all there is
    if takes != tuple(manifest["image_shape"]) or answers != manifest["num_classes"]:
        return f"takes images of {takes} and answers {answers} classes"
    return None


def run(config: GateConfig) -> dict[str, Any]:
    """Score challenger and champion, decide, tag the challenger version; return the verdict."""
    if not 0 <= config.min_accuracy <= 1:
        raise StepError(f"--min-accuracy is a fraction (0..1), got {config.min_accuracy}")
    if not config.max_regression >= 0:  # NaN too
        raise StepError(f"--max-regression is in points and cannot be negative, got {config.max_regression}")
    if config.batch_size < 1:
        raise StepError(f"--batch-size must be at least 1 image, got {config.batch_size}")
    # Invalid, MLflow answers it as an alias naming nothing: a verdict against no champion, kept for good.
    tracking.check_alias("--champion-alias", config.champion_alias, CHAMPION)
    manifest = data.load_manifest(config.manifest)
    if not manifest["splits"]["test"]["count"]:
        raise StepError(f"{config.manifest}: the test split is empty; the gate needs test data")
    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    name, version = config.model_name, str(config.version)
    challenger = tracking.registered_version(client, name, version)
    if challenger.tags.get("gate.verdict"):
        log.info("%s version %s already judged: %s", name, version, challenger.tags["gate.verdict"])
        return _result(challenger.tags, name, version)
    trained_on = challenger.tags.get("dataset_digest")
    if trained_on and trained_on != manifest["digest"]:
        raise StepError(f"{name} version {version} was trained on the prepared dataset {trained_on[:16]}, but "
                        f"--manifest {config.manifest} is {manifest['digest'][:16]}: pass the manifest of the "
                        "dataset it was trained on (its test split is the one it must be judged on)")
    # An outage fails the step (retried): judged as "no champion yet", it would stick (never judged again).
    champion = tracking.version_by_alias(client, name, config.champion_alias)
    # str(): MLflow's SQL store (a database --tracking-uri) numbers versions as int, its server as str.
    itself = champion is not None and str(champion.version) == version
    if itself:
        champion = None  # re-judging the champion itself (deployed by hand first): compare with nothing
    images, labels = data.arrays(manifest, "test")
    test_digest = test_set_digest(images, labels)
    images = images.astype(np.float32)
    challenger_accuracy = accuracy(load(mlflow, f"models:/{name}/{version}"), images, labels, config.batch_size)
    champion_accuracy, apart, unloadable = None, None, None
    if champion is not None:
        apart = incomparable_by_tags(champion, manifest, test_digest)
        if apart is None:
            try:
                champion_model = load(mlflow, f"models:/{name}/{champion.version}")
            except StepError as exc:  # not an outage (retried): the champion itself is broken
                unloadable = str(exc)
            else:
                apart = incomparable_by_signature(champion_model, manifest)
                if apart is None:
                    champion_accuracy = accuracy(champion_model, images, labels, config.batch_size)
    verdict, reasons = decide(challenger=challenger_accuracy, champion=champion_accuracy,
                              min_accuracy=config.min_accuracy, max_regression=config.max_regression)
    if itself:
        reasons[-1] = "this version is the champion already: the floor is the only rule"
    if unloadable is not None:
        # Failing the step would fail every run until someone moved the alias; the verdict says it instead.
        verdict = FAILED
        reasons[-1] = (f"champion version {champion.version} cannot be loaded ({unloadable}): serving cannot "
                       f"load it either; fix it or move alias {config.champion_alias}, or to replace it with this "
                       f"model trigger model_promotion with version {version}")
        log.warning("%s", reasons[-1])
    if apart is not None:
        # Not a better or worse model of the same task: another task. Never promoted by the pipeline's review;
        # a person who means to replace the champion with it deploys it by hand.
        verdict = FAILED
        reasons[-1] = (f"not comparable with champion version {champion.version} ({apart}; this run's test "
                       f"data: {manifest['dataset']}, images of {tuple(manifest['image_shape'])} in "
                       f"{manifest['num_classes']} classes): to replace the champion with this model, trigger "
                       f"model_promotion with version {version}")
    tags = {"gate.verdict": verdict, "gate.reasons": "; ".join(reasons),
            "gate.accuracy": f"{challenger_accuracy:.6f}", "gate.test_examples": str(len(labels)),
            "gate.dataset_digest": manifest["digest"], "gate.test_digest": test_digest,
            "gate.min_accuracy": f"{config.min_accuracy:g}",
            "gate.max_regression_points": f"{config.max_regression:g}",
            "gate.champion_version": str(champion.version) if champion is not None else "",
            "gate.champion_accuracy": f"{champion_accuracy:.6f}" if champion_accuracy is not None else ""}
    # The verdict goes last: its presence means the others are there too.
    for key, value in sorted(tags.items(), key=lambda kv: kv[0] == "gate.verdict"):
        client.set_model_version_tag(name, version, key, value)
    log.info("%s version %s: gate %s (%s)", name, version, verdict.upper(), "; ".join(reasons))
    return _result(tags, name, version)


def _result(tags: dict[str, str], name: str, version: str) -> dict[str, Any]:
    return {"model_name": name, "version": int(version), "verdict": tags["gate.verdict"],
            "passed": tags["gate.verdict"] == PASSED, "reasons": tags["gate.reasons"],
            "accuracy": float(tags["gate.accuracy"]),
            "champion_version": int(tags["gate.champion_version"]) if tags.get("gate.champion_version") else None,
            "champion_accuracy": float(tags["gate.champion_accuracy"]) if tags.get("gate.champion_accuracy")
            else None}


def main(argv: list[str] | None = None) -> int:
    """``python -m mlsteps.gate``: the step's CLI."""
    return cli(run, GateConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
