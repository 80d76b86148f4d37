"""model_promotion end to end on the local target: a real MLflow registry, the supervised model server
(scripts/serving.sh), `airflow dags test`, and clients calling the server the whole time.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from services import ROOT, STEPS_PYTHON, airflow, free_port

pytestmark = pytest.mark.integration

MODEL = "promo_classifier"


@pytest.fixture(scope="module")
def versions(mlflow_server) -> list[int]:
    """Versions 1 and 2 serve; version 3 downloads but does not load."""
    out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "tests" / "integration" / "register_versions.py"), MODEL,
                          "good", "good", "broken"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _alias(mlflow_server, version: int) -> None:
    mlflow_server.post("registered-models/alias", {"name": MODEL, "alias": "champion", "version": str(version)})


def _champion(mlflow_server) -> str:
    return mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]["version"]


def _tags(mlflow_server, version: int) -> dict[str, str]:
    found = mlflow_server.get("model-versions/get", name=MODEL, version=str(version))["model_version"]
    return {t["key"]: t["value"] for t in found.get("tags", [])}


@pytest.fixture(scope="module")
def serving(versions, mlflow_server, tmp_path_factory):
    """The local model server as `scripts/serving.sh start` runs it, first serving the champion (version 1)."""
    _alias(mlflow_server, versions[0])
    env = {**os.environ, "MLOPS_VAR": str(tmp_path_factory.mktemp("serving_var")), "SERVING_PORT": str(free_port()),
           "MODEL_NAME": MODEL, "MLFLOW_TRACKING_URI": mlflow_server.url}
    script = str(ROOT / "scripts" / "serving.sh")
    out = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    deadline = time.monotonic() + 120
    while _served(url) != str(versions[0]):
        assert time.monotonic() < deadline, "the model server never served the champion"
        time.sleep(0.5)
    yield {"url": url, "env": env}
    subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60)


def _served(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/v1/models/{MODEL}", timeout=5) as response:
            status = json.load(response)["model_version_status"][0]
    except OSError:
        return None
    return status["version"] if status["state"] == "AVAILABLE" else None


class Clients:
    """Three clients predicting in a loop: every answer's status and version, in order."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(3)]

    def _loop(self) -> None:
        body = json.dumps({"instances": [[[float((i * 7) % 256) for i in range(28)]] * 28]}).encode()
        while not self._stop.is_set():
            request = urllib.request.Request(f"{self.url}/v1/models/{MODEL}:predict", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    self.answers.append((response.status, response.headers["X-Model-Version"]))
            except urllib.error.HTTPError as exc:
                self.answers.append((exc.code, exc.headers.get("X-Model-Version")))
            except OSError as exc:
                self.answers.append((0, type(exc).__name__))
            time.sleep(0.01)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _promote(airflow_home, serving, conf: dict) -> tuple[str, dict[str, str]]:
    env = {**airflow_home, "MLOPS_DEPLOY_TARGET": "local", "MLOPS_SERVING_URL": serving["url"],
           "MLOPS_SERVING_ADMIN_TOKEN_FILE": os.path.join(serving["env"]["MLOPS_VAR"], "serving", "admin-token")}
    out = airflow(env, "dags", "test", "model_promotion", "-c", json.dumps({"model_name": MODEL, **conf}))
    log = out.stdout + out.stderr
    listing = airflow(env, "dags", "list-runs", "model_promotion", "-o", "json").stdout
    run = json.loads(listing.strip().splitlines()[-1])[0]  # newest first
    states = airflow(env, "tasks", "states-for-dag-run", "model_promotion", run["run_id"], "-o", "json").stdout
    tasks = {t["task_id"]: t["state"] for t in json.loads(states.strip().splitlines()[-1])}
    return run["state"], tasks, log


def test_a_run_is_a_no_op_when_serving_already_runs_the_champion(airflow_home, serving, versions):
    state, tasks, log = _promote(airflow_home, serving, {})
    assert state == "success", log[-4000:]
    assert tasks["plan"] == "success"
    assert {tasks[t] for t in ("infra_validate", "deploy", "smoke_test", "record", "rollback")} == {"skipped"}
    assert _served(serving["url"]) == str(versions[0])


def test_a_new_champion_is_validated_deployed_and_tagged_without_a_failed_request(airflow_home, serving, versions,
                                                                                mlflow_server):
    first, second, _ = versions
    _alias(mlflow_server, second)  # what a reviewer does in the MLflow UI
    with Clients(serving["url"]) as clients:
        state, tasks, log = _promote(airflow_home, serving, {})
    assert state == "success", log[-4000:]
    assert [tasks[t] for t in ("plan", "infra_validate", "deploy", "smoke_test", "record", "rollback")] == [
        "success"] * 5 + ["skipped"]
    assert _served(serving["url"]) == str(second)
    assert {status for status, _ in clients.answers} == {200}, [a for a in clients.answers if a[0] != 200][:5]
    seen = [version for _, version in clients.answers]
    assert seen[0] == str(first) and seen[-1] == str(second)
    tags = _tags(mlflow_server, second)
    assert tags["promotion.status"] == "serving" and tags["promotion.previous_version"] == str(first)
    assert tags["promotion.infra_validation"].startswith("passed")
    assert tags["promotion.smoke_test"].startswith("passed")
    replaced = _tags(mlflow_server, first)
    assert replaced["promotion.status"] == "replaced" and replaced["promotion.replaced_by"] == str(second)


def test_a_champion_that_fails_to_load_is_rolled_back_and_serving_never_stops(airflow_home, serving, versions,
                                                                            mlflow_server):
    _, second, broken = versions
    _alias(mlflow_server, broken)
    with Clients(serving["url"]) as clients:
        state, tasks, log = _promote(airflow_home, serving, {})
    assert state == "failed", log[-4000:]
    assert (tasks["infra_validate"], tasks["deploy"], tasks["rollback"]) == ("failed", "upstream_failed", "failed")
    assert _champion(mlflow_server) == str(second)  # the alias is back
    assert _served(serving["url"]) == str(second)
    assert clients.answers and set(clients.answers) == {(200, str(second))}
    tags = _tags(mlflow_server, broken)
    assert tags["promotion.status"] == "failed" and tags["promotion.rolled_back_to"] == str(second)
    assert tags["promotion.infra_validation"].startswith("failed: the model server could not load it")


def test_a_version_given_by_hand_is_deployed_and_the_alias_follows(airflow_home, serving, versions, mlflow_server):
    first = versions[0]
    state, tasks, log = _promote(airflow_home, serving, {"version": first})
    assert state == "success", log[-4000:]
    assert _served(serving["url"]) == str(first)
    assert _champion(mlflow_server) == str(first)
    assert _tags(mlflow_server, first)["promotion.trigger"] == "manual"


def test_registry_calls_from_airflow_against_the_real_mlflow_server(mlflow_server, versions):
    import sys

    sys.path.insert(0, str(ROOT / "plugins"))
    from mlops_airflow.registry import Registry

    registry = Registry(mlflow_server.url)
    assert registry.alias(MODEL, "no_such_alias") is None
    assert registry.alias("no_such_model", "champion") is None
    assert registry.version(MODEL, "999") is None
    assert registry.exists(MODEL) and not registry.exists("no_such_model")
    registry.set_alias(MODEL, "staging", str(versions[1]))
    assert registry.alias(MODEL, "staging") == str(versions[1])
    registry.delete_alias(MODEL, "staging")
    assert registry.alias(MODEL, "staging") is None
    registry.delete_alias(MODEL, "staging")  # deleting what is gone is fine
    registry.set_tags(MODEL, str(versions[1]), {"promotion.note": "x" * 6000})  # long values are cut, not refused
    assert registry.version(MODEL, str(versions[1]))["tags"]["promotion.note"] == "x" * 5000
    registry.set_tags(MODEL, str(versions[2]), {"promotion.note": "found"})
    assert registry.versions_tagged(MODEL, "promotion.note", "found") == [str(versions[2])]
    assert registry.versions_tagged(MODEL, "promotion.note", "nobody") == []
