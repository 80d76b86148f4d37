"""register: make the trained model a new version of the registered model, with lineage tags and alias.

In the pipeline the model is compress's pyfunc (the chosen .tflite run by LiteRT) and its tags say which
variant it is; the float Keras model stays in the training run (tag ``float_model_uri``) and its evaluation
becomes tags ``float_model.<metric>`` (``metric.<metric>`` would read as the registered model's own).

Idempotent per pipeline run: re-running it for a run key that already has a version returns that
version instead of creating a second one. The new version gets the alias ``challenger``; a re-run for an
older run key leaves the alias on a version registered after it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from . import __version__, tracking
from .core import StepError, cli, field

log = logging.getLogger("mlsteps.register")

CHALLENGER = "challenger"


@dataclass(frozen=True)
class RegisterConfig:
    model_uri: str = field(help="MLflow URI of the logged model to register (compress's result in the DAG; train's "
                                "for a float model)")
    run_key: str = field(help="identifies the pipeline run (DAG id / run id); one model version per key")
    dataset: str = field(help="dataset name, recorded as a tag")
    dataset_digest: str = field(help="content digest of the prepared dataset, recorded as a tag")
    metrics: str = field("{}", help="JSON object of this model's metrics, recorded as version tags metric.<name>")
    float_metrics: str = field("{}", help="JSON object of the float model's metrics when --model-uri is a compressed "
                                          "one (evaluate's result), recorded as version tags float_model.<name>")
    tags: str = field("{}", help="JSON object of extra version tags (e.g. compress's result: variant, size)")
    float_model_uri: str = field("", help="the float model when --model-uri is a compressed one, recorded as a tag")
    model_name: str = field("mnist_classifier", help="registered model name")
    alias: str = field(CHALLENGER, help="alias set on the new version")
    dag_id: str = field("", help="Airflow DAG id, recorded as a tag")
    dag_run_id: str = field("", help="Airflow DAG run id, recorded as a tag")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")  # as the DAGs' MODEL_NAME_PATTERN


def code_version() -> str:
    """The steps package version, plus the commit baked into the image when there is one."""
    commit = os.environ.get("MLSTEPS_GIT_COMMIT", "")
    return f"{__version__}+{commit[:12]}" if commit else __version__


def _json_object(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StepError(f"{flag} must be a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise StepError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _metric_tags(prefix: str, metrics: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}{k}": f"{float(v):.6f}" for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _check_source(client: Any, model_uri: str) -> None:
    """Refuse a runs:/ or logged-model models:/m-... URI that MLflow does not hold, before register_model would
    create the registered model and then fail (an empty model left in the registry, and a retry that fails the
    same way)."""
    from mlflow.exceptions import MlflowException

    run = re.fullmatch(r"runs:/([^/]+)/.+", model_uri)
    logged = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", model_uri)
    try:
        if run:
            client.get_run(run.group(1))
        elif logged:
            client.get_logged_model(logged.group(1))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            what = f"run {run.group(1)}" if run else f"logged model {logged.group(1)}"
            raise StepError(f"--model-uri {model_uri}: MLflow has no {what} (another tracking server, or it was "
                            "deleted); pass the model_uri that train or compress returned") from None
        raise


def run(config: RegisterConfig) -> dict[str, Any]:
    if not MODEL_NAME.fullmatch(config.model_name):
        raise StepError(f"--model-name {config.model_name!r}: use letters, digits, '_', '.' and '-', starting with a "
                        "letter or digit (MLflow refuses '/' and ':'; the model server puts the name in its URLs)")
    tracking.check_alias("--alias", config.alias, CHALLENGER)
    metrics = _json_object("--metrics", config.metrics)
    float_metrics = _json_object("--float-metrics", config.float_metrics)
    extra_tags = {str(k): str(v) for k, v in _json_object("--tags", config.tags).items()}
    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(
        f"name = {tracking.quote(config.model_name)} and tags.`{tracking.RUN_KEY_TAG}` = {tracking.quote(config.run_key)}",
        order_by=["version_number ASC"])  # two tries at once may both have registered: the first, always
    if existing:
        version = existing[0]
        # MLflow 3 records a logged model's models:/<model id> URI as the version's source.
        if config.model_uri.startswith("models:/") and version.source.startswith("models:/") \
                and version.source != config.model_uri:
            raise StepError(
                f"run {config.run_key} is already registered as {config.model_name} version {version.version} "
                f"from {version.source}, but --model-uri is {config.model_uri}: the model changed after "
                "registration (train or compress re-ran with other settings); trigger a new DAG run to register it")
        log.info("run %s already registered as %s version %s", config.run_key, config.model_name, version.version)
        newer = tracking.version_by_alias(client, config.model_name, config.alias)
        if newer is not None and int(newer.version) > int(version.version):
            # A retry of an older run (its task cleared) after a later run registered its version.
            log.info("alias %s stays at version %s, registered after this run's", config.alias, newer.version)
            return _result(config, version, existing=True)
    else:
        _check_source(client, config.model_uri)
        tags = {tracking.RUN_KEY_TAG: config.run_key, "dataset": config.dataset,
                "dataset_digest": config.dataset_digest, "code_version": code_version(),
                "dag_id": config.dag_id, "dag_run_id": config.dag_run_id}
        tags |= _metric_tags("metric.", metrics) | _metric_tags("float_model.", float_metrics)
        tags |= extra_tags
        if config.float_model_uri:
            tags["float_model_uri"] = config.float_model_uri
        version = mlflow.register_model(config.model_uri, config.model_name, tags=tags)
        log.info("registered %s version %s from %s", config.model_name, version.version, config.model_uri)
    client.set_registered_model_alias(config.model_name, config.alias, version.version)
    return _result(config, version, existing=bool(existing))


def _result(config: RegisterConfig, version: Any, *, existing: bool) -> dict[str, Any]:
    return {"model_name": config.model_name, "version": int(version.version), "alias": config.alias,
            "model_uri": f"models:/{config.model_name}/{version.version}", "run_id": version.run_id,
            "created": not existing}


def main(argv: list[str] | None = None) -> int:
    return cli(run, RegisterConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
