"""An alias moved in MLflow reaches Airflow as a signed webhook and starts exactly one model_promotion run.

Real parts only: the MLflow server (SQLite backend, webhooks on) sends the event; the receiver plugin runs
in the real Airflow API server (`airflow standalone`); the real scheduler creates the asset-triggered run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from services import ROOT, STEPS_PYTHON, migrated_airflow_home, request, standalone

pytestmark = pytest.mark.integration

MODEL = "hook_classifier"
SECRET = "integration-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def airflow_api(mlflow_server, tmp_path_factory):
    # The scheduler creates asset-triggered runs only with job scheduling on. An Airflow home of this module's
    # own: in the shared one an earlier module unpaused mnist_training, whose nightly run (real MNIST, default
    # params) the scheduler would then start next to this test.
    home = migrated_airflow_home(tmp_path_factory.mktemp("webhook_airflow_home"), mlflow_server)
    with standalone(home, tmp_path_factory.mktemp("standalone"), wait_for_dag="model_promotion",
                    MLOPS_WEBHOOK_SECRET=SECRET, MLOPS_MODEL_NAME=MODEL, AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="True",
                    AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2") as api:
        yield api


@pytest.fixture
def request_finalizer(request):
    return request.addfinalizer


def _asset_runs(base: str, token: str) -> list[dict]:
    runs = request("GET", f"{base}/api/v2/dags/model_promotion/dagRuns?limit=100", token=token)[1]["dag_runs"]
    return [run for run in runs if run["run_type"] == "asset_triggered"]


def _our_events(base: str, token: str) -> list[dict]:
    # Airflow 3.3 answers 500 while an event's run is queued (its NULL start_date fails the response model,
    # apache/airflow#71360, fixed after 3.3.2): asked again once the run has started.
    deadline = time.monotonic() + 60
    while (answer := request("GET", f"{base}/api/v2/assets/events?limit=50", token=token))[0] == 500:
        assert time.monotonic() < deadline, "the asset events API kept answering 500"
        time.sleep(1)
    return [e for e in answer[1]["asset_events"] if (e.get("extra") or {}).get("model_name") == MODEL]


def test_a_champion_move_in_mlflow_triggers_a_promotion_run_and_a_challenger_move_nothing(airflow_api, mlflow_server, request_finalizer):
    base, token = airflow_api
    status, runs = request("GET", f"{base}/api/v2/dags/mnist_training/dagRuns", token=token)
    # 404: not parsed yet, so not run either
    assert status == 404 or runs["total_entries"] == 0, "mnist_training is not paused: the scheduler started it"
    status, answer = request("PATCH", f"{base}/api/v2/dags/model_promotion", {"is_paused": False}, token)
    assert status == 200, answer
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLOPS_WEBHOOK_SECRET": SECRET,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    # A secret that differs from the API server's: registered, and the check says so (MLflow logs no refusal).
    out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "scripts" / "mlflow_webhook.py"), "--airflow-url", base,
                          "--check"], env={**env, "MLOPS_WEBHOOK_SECRET": "not-the-api-servers-secret"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "401" in out.stderr and "MLOPS_WEBHOOK_SECRET differs" in out.stderr, out.stderr
    out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "scripts" / "mlflow_webhook.py"), "--airflow-url", base,
                          "--check"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "answered 200" in out.stdout and "ignored" in out.stdout  # MLflow's example event: not champion
    request_finalizer(lambda: subprocess.run(  # later alias moves must not post to a stopped Airflow
        [str(STEPS_PYTHON), "-c", "import mlflow; c = mlflow.MlflowClient(); "
         "[c.delete_webhook(w.webhook_id) for w in c.list_webhooks() if w.name == 'airflow-model-promotion']"],
        env=env, capture_output=True, timeout=120))
    out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "tests" / "integration" / "register_versions.py"), MODEL,
                          "good"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (version,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert _asset_runs(base, token) == []

    # What a reviewer does in the MLflow UI: MLflow now POSTs the signed event to Airflow's receiver.
    mlflow_server.post("registered-models/alias", {"name": MODEL, "alias": "champion", "version": str(version)})
    deadline = time.monotonic() + 120
    while not _asset_runs(base, token):
        assert time.monotonic() < deadline, "no asset-triggered model_promotion run"
        time.sleep(2)
    ours = _our_events(base, token)
    assert len(ours) == 1 and ours[0]["extra"]["version"] == str(version)
    assert ours[0]["extra"]["kind"] == "model_version_alias.created"

    # A forged event (wrong secret) is refused at the door; a challenger move is ignored.
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": MODEL, "alias": "champion", "version": str(version)}}).encode()
    status, answer = request("POST", f"{base}/mlops/webhooks/mlflow", raw=body,
                             headers={"X-MLflow-Signature": "v1,Zm9yZ2Vk", "X-MLflow-Delivery-Id": "forged",
                                      "X-MLflow-Timestamp": str(int(time.time()))})
    assert status == 401, answer
    mlflow_server.post("registered-models/alias", {"name": MODEL, "alias": "challenger", "version": str(version)})
    # Then champion set again, as a sentinel. MLflow delivers from a pool of threads, not strictly in order:
    # once the sentinel's event is in, a few seconds more for the challenger's, which must add no event.
    mlflow_server.post("registered-models/alias", {"name": MODEL, "alias": "champion", "version": str(version)})
    deadline = time.monotonic() + 120
    while len(ours := _our_events(base, token)) < 2:
        assert time.monotonic() < deadline, "the sentinel's event never came"
        time.sleep(2)
    time.sleep(3)  # a challenger event delivered out of order would land now
    assert len(_our_events(base, token)) == 2, ours
    assert len({e["extra"]["delivery_id"] for e in _our_events(base, token)}) == 2


@pytest.mark.parametrize("tracking_uri", [None, "sqlite:///mlflow.db"], ids=["unset", "not-a-server"])
def test_registering_the_webhook_without_the_servers_url_is_refused_and_creates_no_database(tmp_path, tracking_uri):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"MLOPS_WEBHOOK_SECRET": SECRET} | ({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})
    out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "scripts" / "mlflow_webhook.py"), "--airflow-url",
                          "http://127.0.0.1:8080"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "set MLFLOW_TRACKING_URI to the MLflow server's http(s) URL" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no mlflow.db quietly made here


def test_registering_again_finds_the_webhook_past_the_first_page_and_makes_no_second_one(mlflow_server):
    """MLflow lists 100 webhooks a page, newest first: with 100 newer ones, the first page missed it, and each
    run added a webhook (every alias move then delivered once per webhook: duplicate promotion runs)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLOPS_WEBHOOK_SECRET": SECRET}
    steps = r"""
import subprocess, sys, mlflow
c = mlflow.MlflowClient()
def register():
    out = subprocess.run([sys.executable, sys.argv[1], "--airflow-url", "http://127.0.0.1:9"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
def ours():
    found, token = [], None
    while True:
        page = c.list_webhooks(page_token=token)
        found += [w for w in page if w.name == "airflow-model-promotion"]
        if not (token := page.token):
            return found
register()
newer = [c.create_webhook(name=f"newer-{i}", url="http://127.0.0.1:9/x", events=["model_version_alias.created"],
                          status="DISABLED").webhook_id for i in range(100)]
try:
    register()
    print(len(ours()))
finally:
    for hook in [*newer, *(w.webhook_id for w in ours())]:
        c.delete_webhook(hook)
"""
    out = subprocess.run([str(STEPS_PYTHON), "-c", steps, str(ROOT / "scripts" / "mlflow_webhook.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1"]


def test_registering_again_deletes_a_second_webhook_of_the_same_name(mlflow_server):
    """Two at once (two registrations racing, an older version of this script): every alias move was delivered
    once per copy, each with a delivery id of its own, so the receiver could not tell them for redeliveries."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLOPS_WEBHOOK_SECRET": SECRET}
    steps = r"""
import subprocess, sys, mlflow
c = mlflow.MlflowClient()
made = [c.create_webhook(name="airflow-model-promotion", url="http://127.0.0.1:9/x",
                         events=["model_version_alias.created"], secret="x" * 16).webhook_id for _ in range(2)]
try:
    out = subprocess.run([sys.executable, sys.argv[1], "--airflow-url", "http://127.0.0.1:9"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    print(sum(w.name == "airflow-model-promotion" for w in c.list_webhooks()))
finally:
    for hook in c.list_webhooks():
        if hook.name == "airflow-model-promotion":
            c.delete_webhook(hook.webhook_id)
"""
    out = subprocess.run([str(STEPS_PYTHON), "-c", steps, str(ROOT / "scripts" / "mlflow_webhook.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1"]
