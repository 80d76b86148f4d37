"""A run triggered through Airflow's REST API with trigger-form params, executed by the real scheduler.

`airflow standalone` starts the API server, scheduler, DAG processor and triggerer, as `make airflow-ui`
does; the test authenticates like the UI, triggers mnist_training with a conf, and waits for the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import idxdata
import pytest
from services import request as _request
from services import standalone

pytestmark = pytest.mark.integration

MODEL = "api_classifier"


@pytest.fixture(scope="module")
def standalone_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standalone") / "standalone.log"


@pytest.fixture(scope="module")
def airflow_api(airflow_home, standalone_log):
    # only runs triggered here: no nightly run (default params, real MNIST) queued in front of them
    with standalone(airflow_home, standalone_log.parent, wait_for_dag="mnist_training",
                    AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False") as api:
        yield api


def test_trigger_form_values_out_of_range_are_refused(airflow_api):
    base, token = airflow_api
    status, body = _request("POST", f"{base}/api/v2/dags/mnist_training/dagRuns",
                            {"logical_date": None, "conf": {"epochs": 0}}, token)
    assert status == 400, body
    assert "epochs" in json.dumps(body)


def _trigger(base: str, token: str, conf: dict) -> tuple[str, str]:
    status, run = _request("POST", f"{base}/api/v2/dags/mnist_training/dagRuns",
                           {"logical_date": None, "conf": conf}, token)
    assert status == 200, run
    assert _request("PATCH", f"{base}/api/v2/dags/mnist_training", {"is_paused": False}, token)[0] == 200
    return run["dag_run_id"], f"{base}/api/v2/dags/mnist_training/dagRuns/{run['dag_run_id']}"


def _answer_approval(url: str, token: str, log: Path, option: str, comment: str) -> None:
    """Wait for the review card, then answer it as a reviewer does from Required Actions.

    The answer waits until the scheduler has seen the pausing worker exit (its "TaskInstance Finished ...
    state=awaiting_input" line). Airflow 3.3.2 takes an exit it sees only after the answer has queued the
    resume for a task killed from outside, and retries the task, which asks again (docs/operations.md). A
    person answers seconds later; a loaded machine can take that long to see the exit.
    """
    run_id = url.rsplit("/", 1)[1]
    paused = f"task_id=approve, run_id={run_id}, "
    deadline = time.monotonic() + 600
    while True:
        ti = _request("GET", f"{url}/taskInstances/approve", token=token)[1]
        if ti.get("state") == "awaiting_input" and any(
                "TaskInstance Finished:" in line and paused in line and "state=awaiting_input" in line
                for line in log.read_text(errors="replace").splitlines()):
            break
        assert ti.get("state") not in ("success", "failed", "skipped", "upstream_failed"), ti
        assert time.monotonic() < deadline, f"approval never asked: {ti.get('state')}"
        time.sleep(2)
    status, body = _request("PATCH", f"{url}/taskInstances/approve/-1/hitlDetails",
                            {"chosen_options": [option], "params_input": {"comment": comment}}, token)
    assert status == 200, body


def _finish(url: str, token: str) -> list[dict]:
    deadline = time.monotonic() + 600
    while (state := _request("GET", url, token=token)[1]["state"]) not in ("success", "failed"):
        assert time.monotonic() < deadline, f"run still {state}"
        time.sleep(3)
    tasks = _request("GET", f"{url}/taskInstances", token=token)[1]["task_instances"]
    assert state == "success", {t["task_id"]: t["state"] for t in tasks}
    return tasks


def test_run_triggered_through_the_api_is_scheduled_registers_and_is_approved(airflow_api, standalone_log,
                                                                            mlflow_server, tmp_path):
    base, token = airflow_api
    source = idxdata.write_dataset(tmp_path / "idx", train=300, test=100)
    # Floor 0: this test is about the approval, not about the model (the gate's rules have their own tests).
    conf = {"dataset": "custom", "source_dir": str(source), "epochs": 1, "batch_size": 32, "model_name": MODEL,
            "search_trials": 2, "search_workers": 2, "search_epochs": 1, "search_space": {"width": 8},
            "compress_finetune_epochs": 1, "gate_min_accuracy": 0.0, "review": "approval"}
    run_id, url = _trigger(base, token, conf)
    _answer_approval(url, token, standalone_log, "Approve", "looks right")
    tasks = _finish(url, token)
    assert {(t["task_id"], t["map_index"]): t["state"] for t in tasks} == {
        **dict.fromkeys([(task, -1) for task in ("prep", "validate", "plan_search", "create_study", "select",
                                                 "hyperparameters", "train", "evaluate", "compress", "register",
                                                 "gate", "plan_review", "approve", "promote",
                                                 "plan_rejection")], "success"),
        ("record_rejection", -1): "skipped",  # approved: no rejection to record, no pod started
        ("tune", 0): "success", ("tune", 1): "success"}
    # The scheduler ran the two trial workers at the same time.
    first, second = sorted((t for t in tasks if t["task_id"] == "tune"), key=lambda t: t["start_date"])
    assert second["start_date"] < first["end_date"], (first, second)
    xcom = _request("GET", f"{url}/taskInstances/register/xcomEntries/return_value", token=token)[1]
    registered = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert registered["model_name"] == MODEL and registered["alias"] == "challenger"
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    assert int(version["version"]) == registered["version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["dag_run_id"] == run_id
    # The approval moved champion to this version and recorded who, when and why.
    champion = mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert champion["version"] == version["version"]
    assert (tags["review.decision"], tags["review.reviewer"], tags["review.comment"]) == (
        "approved", "admin", "looks right")
    assert tags["review.time"].startswith("20")


def test_a_rejected_version_is_tagged_and_champion_stays(airflow_api, standalone_log, mlflow_server, tmp_path):
    base, token = airflow_api
    champion_before = mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    # The first test's data: the gate compares with a champion judged on the same test set only.
    source = idxdata.write_dataset(tmp_path / "idx", train=300, test=100)
    conf = {"dataset": "custom", "source_dir": str(source), "epochs": 1, "batch_size": 32, "model_name": MODEL,
            "search": False, "width": 8, "compress_finetune_epochs": 1, "gate_min_accuracy": 0.0,
            "gate_max_regression": 100, "review": "approval"}
    _, url = _trigger(base, token, conf)
    _answer_approval(url, token, standalone_log, "Reject", "worse on shirts")
    tasks = {t["task_id"]: t["state"] for t in _finish(url, token)}
    assert (tasks["approve"], tasks["promote"], tasks["plan_rejection"], tasks["record_rejection"]) == (
        "success", "skipped", "success", "success")
    # search off: the search tasks are skipped, select too (it runs after failed workers, never skipped ones)
    assert {tasks[t] for t in ("create_study", "tune", "select")} == {"skipped"}
    assert tasks["hyperparameters"] == "success"
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    assert version["version"] != champion_before["version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["review.decision"] == "rejected"
    # Who rejected and why, though the rejecting approval returned nothing (it skipped promote).
    assert (tags["review.reviewer"], tags["review.comment"]) == ("admin", "worse on shirts")
    champion = mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert champion["version"] == champion_before["version"]
