"""registry.Registry, promotion's MLflow client, against a stand-in MLflow REST server: retries, credentials.

The calls against a real MLflow server are in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import base64

import pytest
from dagsupport import JsonHandler, http_server


@pytest.fixture
def mlflow_stub():
    """Answers GET registered-models/alias: ``failures`` 503s first (or ``status`` every time), then version 4."""
    state = {"failures": 0, "status": 200, "requests": []}

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            state["requests"].append({"path": self.path, "authorization": self.headers.get("Authorization")})
            if state["failures"]:
                state["failures"] -= 1
                self.send_json(503, {"error_code": "TEMPORARILY_UNAVAILABLE"})
            elif state["status"] != 200:
                self.send_json(state["status"], state.get("body") or {"error_code": "PERMISSION_DENIED",
                                                                      "message": "no access"})
            else:
                self.send_json(200, {"model_version": {"name": "m", "version": "4"}})

    with http_server(Handler) as url:
        yield url, state


@pytest.fixture(autouse=True)
def no_mlflow_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_an_mlflow_answering_5xx_for_a_while_is_retried_until_it_answers(mlflow_stub):
    """A restarting MLflow server (a rollout of its Deployment) must not fail a promotion."""
    from mlops_airflow.registry import Registry

    url, state = mlflow_stub
    state["failures"] = 2
    assert Registry(url).alias("m", "champion") == "4"
    assert len(state["requests"]) == 3


def test_a_refusal_is_not_retried_and_names_the_call_and_mlflows_answer(mlflow_stub):
    from mlops_airflow.registry import Registry, RegistryError

    url, state = mlflow_stub
    state["status"] = 403
    with pytest.raises(RegistryError, match="refused to read alias champion of m: HTTP 403 .*no access"):
        Registry(url).alias("m", "champion")
    assert len(state["requests"]) == 1


@pytest.mark.parametrize(("status", "body", "missing"), [
    (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "Registered model alias champion not found."}, True),
    (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model with name=m not found"}, True),
    (404, {"detail": "Not Found"}, False),  # a proxy's or a tracking URI without its path prefix: not MLflow
    (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "Missing value for required parameter 'name'"}, False),
], ids=["alias-missing", "model-missing", "foreign-404", "other-400"])
def test_only_mlflows_own_not_found_answer_means_no_champion(mlflow_stub, status, body, missing):
    """Any 404 taken for "no champion" made every promotion a silent "nothing to serve"."""
    from mlops_airflow.registry import Registry, RegistryError

    url, state = mlflow_stub
    state["status"], state["body"] = status, body
    if missing:
        assert Registry(url).alias("m", "champion") is None
    else:
        with pytest.raises(RegistryError, match=f"refused to read alias champion of m: HTTP {status}"):
            Registry(url).alias("m", "champion")


@pytest.mark.parametrize(("env", "expected"), [
    ({"MLFLOW_TRACKING_TOKEN": "tok-123"}, "Bearer tok-123"),
    ({"MLFLOW_TRACKING_USERNAME": "airflow", "MLFLOW_TRACKING_PASSWORD": "s3cret"},
     "Basic " + base64.b64encode(b"airflow:s3cret").decode()),
    ({}, None),
], ids=["token", "username-password", "none"])
def test_the_registry_sends_the_credentials_mlflows_own_client_would(mlflow_stub, monkeypatch, env, expected):
    from mlops_airflow.registry import Registry

    url, state = mlflow_stub
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Registry(url).alias("m", "champion")
    assert state["requests"][0]["authorization"] == expected
    assert state["requests"][0]["path"].startswith("/api/2.0/mlflow/registered-models/alias?")


def test_promotion_refuses_a_tracking_uri_that_is_not_an_mlflow_server():
    from mlops_airflow.registry import Registry, RegistryError

    with pytest.raises(RegistryError, match="needs an MLflow tracking server"):
        Registry("sqlite:///mlflow.db")
