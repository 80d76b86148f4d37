"""What show_model.py and predict_champion.py share: the MLflow server they ask, and an alias lookup that
tells "no such version" from "the server cannot be asked" (both used to print the first for the second)."""

from __future__ import annotations

import os
import sys
from typing import Any

# A server that is down is reported in seconds: MLflow's default (7 retries with backoff) takes minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, which must name a server: unset, MLflow would create an empty mlflow.db here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        sys.exit(f"error: set MLFLOW_TRACKING_URI to the MLflow server's http(s) URL (got {uri or 'nothing'}); "
                 "the local one: export MLFLOW_TRACKING_URI=$(mlflow/server.sh url)")
    return uri


def version_by_alias(client: Any, uri: str, name: str, alias: str) -> Any | None:
    """The version ``alias`` names; None if the model has none. Exits (1) naming the problem otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":  # the model exists, the alias does not
            return None
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            sys.exit(f"error: {uri} has no registered model {name!r}; check --model-name (or run mnist_training)")
        if exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):  # no connection, or a 5xx
            sys.exit(f"error: MLflow at {uri} does not answer (connection refused, timed out, or a server error); "
                     "is it running? (make mlflow-start)")
        sys.exit(f"error: MLflow at {uri} refused the lookup: {exc.error_code}: {str(exc).splitlines()[0][:200]}")
