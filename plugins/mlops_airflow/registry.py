"""The few MLflow registry calls promotion makes from Airflow, over MLflow's REST API.

Airflow's environment has no MLflow client (it lives in the steps image); these are seven calls to documented
endpoints (``/api/2.0/mlflow/registered-models/alias``: get, set, delete; ``registered-models/get``,
``model-versions/get``, ``model-versions/search``, ``model-versions/set-tag``). Credentials come
from the same variables MLflow's client reads: ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``. Connection errors and 5xx are retried (tenacity); 4xx are not.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential


class RegistryError(Exception):
    """MLflow refused a call (4xx; an MLflow that stays unreachable raises httpx's error after the retries)."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500


class Registry:
    def __init__(self, tracking_uri: str, timeout: float = 30.0) -> None:
        if not tracking_uri.startswith(("http://", "https://")):
            raise RegistryError(f"promotion needs an MLflow tracking server (http/https), got {tracking_uri!r}")
        auth = None
        headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self._http = httpx.Client(timeout=timeout, auth=auth, headers=headers)

    @retry(stop=stop_after_attempt(5), wait=wait_exponential(multiplier=0.5, max=10), reraise=True,
           retry=retry_if_exception(_transient))
    def _call(self, method: str, endpoint: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, self.base + endpoint, **kwargs)
        if response.status_code >= 500:
            response.raise_for_status()
        return response

    def _ok(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code != 200:
            raise RegistryError(f"MLflow refused to {what}: HTTP {response.status_code} {response.text[:500]}")
        return response.json()

    @staticmethod
    def _missing(response: httpx.Response) -> bool:
        """MLflow's own answer that the model, version or alias does not exist.

        MLflow 3 answers 404 RESOURCE_DOES_NOT_EXIST for a missing model or version, but 400
        INVALID_PARAMETER_VALUE "Registered model alias <a> not found." for a missing alias. Any other 404 (a
        proxy's, a tracking URI missing its path prefix) is an error: taken for "no champion", every promotion
        would end as "nothing to serve".
        """
        if response.status_code not in (400, 404):
            return False
        try:
            body = response.json()
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        code = body.get("error_code")
        return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE"
                                                      and "not found" in str(body.get("message", "")))

    def alias(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points at, or None if the alias (or the model) does not exist."""
        response = self._call("GET", "registered-models/alias", params={"name": name, "alias": alias})
        if self._missing(response):
            return None
        return str(self._ok(response, f"read alias {alias} of {name}")["model_version"]["version"])

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a registered model."""
        response = self._call("GET", "registered-models/get", params={"name": name})
        if self._missing(response):
            return False
        self._ok(response, f"read registered model {name}")
        return True

    def version(self, name: str, version: str) -> dict[str, Any] | None:
        """The model version (with ``tags`` as a dict), or None if it does not exist."""
        response = self._call("GET", "model-versions/get", params={"name": name, "version": version})
        if self._missing(response):
            return None
        found = self._ok(response, f"read {name} version {version}")["model_version"]
        found["tags"] = {t["key"]: t["value"] for t in found.get("tags", [])}
        return found

    def versions_tagged(self, name: str, key: str, value: str) -> list[str]:
        """The versions of ``name`` whose tag ``key`` is ``value``, lowest first (model names hold no quote: the
        DAGs' pattern and MLflow's rules)."""
        response = self._call("GET", "model-versions/search", params={
            "filter": f"name = '{name}' and tags.`{key}` = '{value}'", "max_results": 1000})
        found = self._ok(response, f"search versions of {name} tagged {key}={value}").get("model_versions", [])
        return sorted((str(v["version"]) for v in found), key=int)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._ok(self._call("POST", "registered-models/alias", json={"name": name, "alias": alias, "version": version}),
                 f"point alias {alias} of {name} at version {version}")

    def delete_alias(self, name: str, alias: str) -> None:
        response = self._call("DELETE", "registered-models/alias", json={"name": name, "alias": alias})
        if not self._missing(response):
            self._ok(response, f"delete alias {alias} of {name}")

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._ok(self._call("POST", "model-versions/set-tag",
                                json={"name": name, "version": version, "key": key, "value": value[:5000]}),
                     f"tag {name} version {version}")
