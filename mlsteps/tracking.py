"""MLflow helpers: one MLflow run per pipeline run, found again by its run key on retries."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import NodeError, StepError, field, safe_name, without_password

log = logging.getLogger("mlsteps.tracking")

RUN_KEY_TAG = "pipeline.run_key"
ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")  # MLflow's alias rule; "latest" and v<number> are its own
# On a training run trained again with other settings: those values (JSON), the params keeping the first try's.
TRAIN_SETTINGS_CHANGED = "train.settings_changed"


@dataclass(frozen=True, kw_only=True)
class RunStepConfig:
    """Fields shared by the steps that work inside one pipeline run (validate, train, evaluate)."""

    manifest: str = field(help="manifest.json written by prep")
    data_root: str = field(help="root folder; this run's files go to <data_root>/runs/<run key, made safe>/")
    run_key: str = field(help="identifies the pipeline run (DAG id / run id); one MLflow run per key")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    experiment: str = field("mnist_training", help="MLflow experiment name")


MAX_RUN_DIR_PREFIX = 200  # bytes (UTF-8) of the run key a run folder's name keeps (then "-" and 8 of its hash)


def run_dir(data_root: str, run_key: str) -> Path:
    """The folder where one pipeline run keeps checkpoints, models and reports.

    The run key made filesystem-safe, plus the first 8 hex digits of its SHA-256 when that changed it: two
    keys that differ only in characters the safe name replaces (``retrain:v2``, ``retrain+v2``) would
    otherwise share a folder, and one run's train would delete the other's model.
    """
    name = safe_name(run_key)
    if len(name.encode()) > MAX_RUN_DIR_PREFIX:
        # Airflow takes run ids of up to 250 characters; a folder name stops at 255 bytes (errno 36, "File name
        # too long", on every step): a long key keeps its start, and its hash tells it from others that share it.
        name = name.encode()[:MAX_RUN_DIR_PREFIX].decode(errors="ignore")
    if name != run_key:
        name += "-" + hashlib.sha256(run_key.encode()).hexdigest()[:8]
    return Path(data_root).resolve() / "runs" / name


def quote(value: str) -> str:
    """A string literal for MLflow's search filter syntax."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class TrackingUnavailable(NodeError):
    """The MLflow tracking server did not answer: one line, exit 1, and the runner retries the step."""


PROBE_TIMEOUT_S = 10  # per try; 3 tries, 1 s and 2 s apart


def unreachable(exc: BaseException) -> bool:
    """No answer at all (refused, reset, timed out, a TLS handshake that failed): the server is down, not up
    yet, or not where the URI says.

    MLflow reports it as an ``MlflowException`` (INTERNAL_ERROR, after its own HTTP retries) raised while
    handling the ``requests`` error: the chain of causes says which.
    """
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def not_found(exc: BaseException) -> bool:
    """MLflow answered that what was asked for does not exist (no such alias, version or run), as opposed to
    failing to answer: callers take the first for "none", and let the second fail the step (retried)."""
    return str(getattr(exc, "error_code", "")) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def transient(exc: BaseException) -> bool:
    """A registry failure worth trying again: no answer, a 5xx or 429, or MLflow's own retries ending in one.

    MLflow reports a 503 as TEMPORARILY_UNAVAILABLE and other server errors (and a failed artifact download) as
    INTERNAL_ERROR; a version or alias that does not exist (RESOURCE_DOES_NOT_EXIST) is not retried, nor is an
    artifact store answering 403 or 404 (``requests.HTTPError``, an OSError), nor a file of the model missing or
    unreadable once downloaded (FileNotFoundError, h5py's OSError: a damaged model, whatever the tries).
    """
    import socket

    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status >= 500 or status == 429
    if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError | socket.gaierror):
        return True  # requests' connection errors and timeouts, a refused or reset socket, DNS
    return isinstance(exc, MlflowException) and exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _probe(uri: str) -> None:
    """Fail in seconds, in one line, when an http(s) tracking server does not answer: MLflow's client would
    retry the step's first call for about two minutes, then end it with a page of traceback.

    The probe is one cheap MLflow call, made the way the step's own are (its TLS, credential and proxy
    settings), with MLflow's retries off; any answer, a refusal included, passes: the step's calls judge it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

    if not uri.startswith(("http://", "https://")):
        return  # a file store or a database: MLflow reports those itself
    client = mlflow.MlflowClient(uri)

    @retry(stop=stop_after_attempt(3), wait=wait_exponential(min=1, max=2), reraise=True,
           retry=retry_if_exception(unreachable))
    def answered() -> None:
        with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S)):
            try:
                client.search_experiments(max_results=1)
            except MlflowException as exc:
                if unreachable(exc):
                    raise

    try:
        answered()
    except Exception as exc:  # noqa: BLE001 - only what unreachable() let through reaches here
        found = re.findall(r"\[Errno -?\d+\][^'\")]*|\[SSL[^\]]*\][^'\")]*|timed out", str(exc))
        reason = found[-1].strip() if found else type(exc).__name__
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking server {without_password(uri)} ({reason}): start it, or point "
            "--tracking-uri / MLFLOW_TRACKING_URI at it") from None


def connect(tracking_uri: str | None, *, probe: bool = True) -> Any:
    """Import MLflow, point it at the tracking server (flag, else MLFLOW_TRACKING_URI), return the module.

    ``probe``: first check that an http(s) server answers (TrackingUnavailable if not).
    """
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise StepError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if probe:
        _probe(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def log_params_once(mlflow: Any, run_id: str, params: dict[str, Any], changed_tag: str) -> dict[str, str]:
    """Log the ``params`` the run lacks; return (and keep in tag ``changed_tag``, JSON) those it has with other
    values.

    MLflow params never change: when a step runs again under the same run key with other inputs (a retry after
    the data was fixed, another trial selected), logging them again would fail the step for good. The tag
    goes once the values agree with the params again.
    """
    import json

    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()
                                     if k not in logged.params])
    changed = {k: str(v) for k, v in params.items() if k in logged.params and logged.params[k] != str(v)}
    if changed:
        log.warning("run %s ran again with other values; its params keep the first ones, tag %s has these: %s",
                    run_id, changed_tag, changed)
        client.set_tag(run_id, changed_tag, json.dumps(changed, sort_keys=True))
    elif changed_tag in logged.tags:
        client.delete_tag(run_id, changed_tag)
    return changed


def run_for(mlflow: Any, run_key: str, *, experiment: str, run_name: str | None = None, tag: str = RUN_KEY_TAG,
            tags: dict[str, str] | None = None, create: bool = True) -> str:
    """Return the id of the MLflow run whose ``tag`` is ``run_key``, creating it (and the experiment) if needed.

    ``tags`` are set on a run this call creates. ``create=False``: a StepError when there is none (a step that
    adds to the training run must not start an empty run of its own under a mistyped key).
    """
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":  # MLflow refuses new runs in it, and its name
        raise StepError(f"MLflow experiment {experiment!r} (id {exp.experiment_id}) was deleted: restore it with "
                        f"`mlflow experiments restore --experiment-id {exp.experiment_id}` (MLFLOW_TRACKING_URI "
                        "set), or delete it for good with `mlflow gc` on the server to reuse the name")
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{tag}` = {quote(run_key)}", max_results=1)
    if found:
        return found[0].info.run_id
    if not create:
        raise StepError(f"no MLflow run for run key {run_key!r} in experiment {experiment!r}: this step adds to "
                        "the training run, which validate and train make; check --run-key and --experiment, or "
                        "run train first")
    run = client.create_run(exp_id, run_name=run_name or safe_name(run_key), tags={**(tags or {}), tag: run_key})
    log.info("created MLflow run %s for %s", run.info.run_id, run_key)
    return run.info.run_id


def registered_version(client: Any, name: str, version: str | int) -> Any:
    """The model version, or a StepError (exit 2, no retry) if MLflow says it does not exist; an outage or
    any other MLflow error is raised as it is (exit 1: the runner retries)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise StepError(f"{name} version {version} is not registered in MLflow; check the model name and the "
                            "version number") from None
        raise


def check_alias(flag: str, alias: str, example: str) -> None:
    """A StepError naming ``flag`` unless ``alias`` is one MLflow lets a version have. MLflow answers an invalid
    one with the error code of "no such alias" (version_by_alias: none), and resolves "latest" itself."""
    if not ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise StepError(f"{flag} {alias!r}: use letters, digits, '_' and '-' (MLflow keeps 'latest' and v<number> "
                        f"for itself), e.g. {example}")


def version_by_alias(client: Any, name: str, alias: str) -> Any:
    """The model version ``alias`` names, or None when MLflow says it names none (or the model does not exist);
    an outage or any other MLflow error is raised as it is (exit 1: the runner retries). Taken for "no alias",
    an outage would stick: a gate verdict against no champion, an approval refused for good."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


def run_url(mlflow: Any, run_id: str) -> str:
    run = mlflow.MlflowClient().get_run(run_id)
    return f"{mlflow.get_tracking_uri().rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
