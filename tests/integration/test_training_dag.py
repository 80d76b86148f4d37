"""mnist_training end to end: real Airflow (`airflow dags test`), real MLflow server, real TensorFlow."""

from __future__ import annotations

import json
import subprocess

import idxdata
import pytest
from services import STEPS_PYTHON, airflow

pytestmark = pytest.mark.integration

MODEL = "e2e_classifier"


@pytest.fixture(scope="module")
def finished_run(airflow_home, tmp_path_factory):
    """One complete DAG run on a tiny generated dataset: a 3-trial search by 2 workers, 5 epochs, compression,
    registration and the quality gate."""
    source = idxdata.write_dataset(tmp_path_factory.mktemp("idx"), train=300, test=100)
    # 5 epochs of 9 steps, at learning rates that learn that fast: batch-norm statistics need more steps than
    # the weights (after 3 epochs, learning rate 0.003 and width 16 train to 100 % but validate at 40 %; every
    # corner of this space validates at 100 % after 5).
    conf = {"dataset": "custom", "source_dir": str(source), "epochs": 5, "batch_size": 32, "model_name": MODEL,
            "search_trials": 3, "search_workers": 2, "search_epochs": 2,
            "search_space": {"batch_size": 32, "width": [8, 16], "learning_rate": {"low": 0.003, "high": 0.01}},
            "compress_finetune_epochs": 1, "review": "auto"}
    out = airflow(airflow_home, "dags", "test", "mnist_training", "-c", json.dumps(conf))
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    listing = airflow(airflow_home, "dags", "list-runs", "mnist_training", "-o", "json").stdout
    runs = json.loads(listing.strip().splitlines()[-1])  # warnings may precede the JSON line
    run = next(r for r in runs if r["state"] == "success")
    return run["run_id"]


def test_run_registers_challenger_version_with_lineage_tags(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["dataset"] == "custom"
    assert len(tags["dataset_digest"]) == 64
    assert tags["dag_id"] == "mnist_training"
    assert tags["dag_run_id"] == finished_run
    assert tags["pipeline.run_key"] == f"mnist_training/{finished_run}"
    assert tags["code_version"].startswith("0.")
    assert 0.0 <= float(tags["float_model.test_accuracy"]) <= 1.0
    assert not any(key.startswith("metric.") for key in tags), "evaluate scored the float model, not this version"


def test_run_logs_params_metrics_curves_and_evaluation_to_one_mlflow_run(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    run = mlflow_server.get("runs/get", run_id=version["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert {"accuracy", "val_accuracy", "loss", "test_accuracy", "test_precision_0", "test_recall_9"} <= metrics.keys()
    assert metrics["test_accuracy"] > 0.3  # ten well-separated synthetic classes: far above chance
    assert params["epochs"] == "5" and params["batch_size"] == "32" and params["dataset"] == "custom"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["data.validation"] == "passed"

    def listing(path: str) -> set[str]:
        found = mlflow_server.get("artifacts/list", run_id=version["run_id"], path=path)
        return {f["path"] for f in found.get("files", [])}

    assert "plots/learning_curves.png" in listing("plots")
    assert {"evaluation/confusion_matrix.png", "evaluation/misclassified.png"} <= listing("evaluation")
    assert "validation/report.json" in listing("validation")


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_search_logs_nested_trial_runs_and_train_uses_the_best_trial(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    training = mlflow_server.get("runs/get", run_id=version["run_id"])["run"]
    tags = _tags(training)
    assert tags["hyperparameters.source"] == "search"
    search = mlflow_server.get("runs/get", run_id=tags["search.run_id"])["run"]
    assert _tags(search)["pipeline.search_for"] == f"mnist_training/{finished_run}"
    assert search["info"]["status"] == "FINISHED"
    trials = mlflow_server.post("runs/search", {
        "experiment_ids": [search["info"]["experiment_id"]], "max_results": 100,
        "filter": f"tags.mlflow.parentRunId = '{search['info']['run_id']}'"})["runs"]
    states = sorted(_tags(t)["optuna.state"] for t in trials)
    assert len(trials) >= 3 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    best = next(t for t in trials if _tags(t)["optuna.trial_number"] == tags["search.trial_number"])
    best_params = {p["key"]: p["value"] for p in best["data"]["params"]}
    params = {p["key"]: p["value"] for p in training["data"]["params"]}
    assert (params["width"], params["learning_rate"]) == (best_params["width"], best_params["learning_rate"])
    assert params["batch_size"] == "32"  # fixed by the search space override
    # The best trial is the best complete one by validation accuracy.
    complete = [t for t in trials if _tags(t)["optuna.state"] == "COMPLETE"]
    score = {t["info"]["run_id"]: next(m["value"] for m in t["data"]["metrics"] if m["key"] == "val_accuracy")
             for t in complete}
    assert score[best["info"]["run_id"]] == max(score.values())
    # The search started from the form's values (no champion yet), as far as its space holds them: batch_size
    # is fixed there and the form's width 32 is not one of [8, 16], so the sampler chose the width.
    assert _tags(search)["search.start_point"] == '--start-from: {"dropout": 0.2, "learning_rate": 0.003}'
    [start] = [t for t in trials if _tags(t).get("search.start_point")]
    assert (start["info"]["run_name"], _tags(start)["optuna.trial_number"]) == ("trial 0 (start point)", "0")
    assert {p["key"]: p["value"] for p in start["data"]["params"]}["learning_rate"] == "0.003"
    listed = mlflow_server.get("artifacts/list", run_id=search["info"]["run_id"], path="search")
    assert {"search/trials.csv", "search/best.json", "search/optimization_history.png"} <= {
        f["path"] for f in listed.get("files", [])}


def test_registered_model_loads_and_predicts_class_probabilities(finished_run, mlflow_server):
    script = (
        "import mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@challenger')\n"
        "p = np.asarray(model.predict(np.zeros((3, 28, 28), np.float32)))\n"
        "print('SHAPE', p.shape, 'SUMS', [round(float(s), 3) for s in p.sum(axis=1)])\n"
        "print('FLAVORS', sorted(model.metadata.flavors), 'ARTIFACTS', sorted(model.metadata.flavors"
        "['python_function'].get('artifacts', {})))\n"
    )
    out = subprocess.run([str(STEPS_PYTHON), "-c", script], capture_output=True, text=True, timeout=300,
                         env={"MLFLOW_TRACKING_URI": mlflow_server.url, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHAPE (3, 10) SUMS [1.0, 1.0, 1.0]" in out.stdout
    # The version is compress's pyfunc (a .tflite run by LiteRT), not the Keras model.
    assert "FLAVORS ['python_function'] ARTIFACTS ['tflite']" in out.stdout


def test_gate_judges_the_first_version_against_the_floor_only(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    accuracy = float(tags["gate.accuracy"])
    assert tags["gate.verdict"] == ("passed" if accuracy >= 0.85 else "failed")
    # The trigger form's floor reached the gate, and the floor was the rule applied.
    assert tags["gate.min_accuracy"] == "0.85" and "floor 85.00 %" in tags["gate.reasons"]
    assert "no champion yet" in tags["gate.reasons"] and tags["gate.champion_version"] == ""
    # The gate scored the registered (compressed) model on the same test set compress measured it on.
    assert accuracy == pytest.approx(float(tags["compression.accuracy"]), abs=1e-6)


def test_auto_review_promotes_a_version_that_passed_the_gate(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    if tags["gate.verdict"] != "passed":
        pytest.fail(f"the synthetic model should pass the 85 % floor: {tags['gate.reasons']}")
    champion = mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert champion["version"] == version["version"]
    assert (tags["review.decision"], tags["review.reviewer"]) == ("auto", "pipeline")


def test_the_next_search_starts_from_the_promoted_champions_hyperparameters(finished_run, mlflow_server):
    # What the next run's create_study reads (search_start_from: champion): the hyperparameters of the run that
    # trained the version this run promoted.
    champion = mlflow_server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    run = mlflow_server.get("runs/get", run_id=champion["run_id"])["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    script = ("import json, mlflow\nfrom mlsteps import tune\n"
              f"print('START', json.dumps(tune.champion_start(mlflow.MlflowClient(), {MODEL!r})))\n")
    out = subprocess.run([str(STEPS_PYTHON), "-c", script], capture_output=True, text=True, timeout=300,
                         env={"MLFLOW_TRACKING_URI": mlflow_server.url, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [line for line in out.stdout.splitlines() if line.startswith("START ")]
    values, label = json.loads(line.removeprefix("START "))
    assert label == f"champion {MODEL} v{champion['version']}"
    assert values == {"learning_rate": float(params["learning_rate"]), "batch_size": 32,
                      "width": int(params["width"]), "dropout": float(params["dropout"])}


def test_registered_version_carries_the_compression_choice(finished_run, mlflow_server):
    version = mlflow_server.get("registered-models/alias", name=MODEL, alias="challenger")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["compression.variant"] in {"float", "float16", "dynamic", "int8", "pruned_int8"}
    assert int(tags["compression.size_bytes"]) > 0 and tags["compression.reason"]
    assert tags["float_model_uri"].startswith("models:/")
    run = mlflow_server.get("runs/get", run_id=version["run_id"])["run"]
    assert _tags(run)["compression.variant"] == tags["compression.variant"]
    listed = mlflow_server.get("artifacts/list", run_id=version["run_id"], path="compression")
    assert {"compression/variants.json", "compression/tradeoff.png"} <= {f["path"] for f in listed.get("files", [])}


def test_rerunning_train_and_register_of_the_same_run_creates_no_second_version(finished_run, airflow_home,
                                                                                  mlflow_server):
    before = mlflow_server.versions(MODEL)
    assert len(before) == 1
    train = airflow(airflow_home, "tasks", "test", "mnist_training", "train", finished_run)
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    assert "already trained with these settings" in train.stdout
    register = airflow(airflow_home, "tasks", "test", "mnist_training", "register", finished_run)
    assert register.returncode == 0, (register.stdout + register.stderr)[-3000:]
    assert "already registered" in register.stdout
    after = mlflow_server.versions(MODEL)
    assert [v["version"] for v in after] == [v["version"] for v in before]


def test_offline_mnist_fails_fast_without_retries_and_says_how_to_proceed(airflow_home, tmp_path):
    # A proxy that refuses connections makes every mirror unreachable, online or not.
    unreachable = "http://127.0.0.1:9"
    env = {**airflow_home, "MLOPS_DATA_ROOT": str(tmp_path / "data"), "http_proxy": unreachable,
           "https_proxy": unreachable, "no_proxy": "127.0.0.1,localhost"}
    out = airflow(env, "dags", "test", "mnist_training", "-c", json.dumps({"dataset": "mnist"}), timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "cannot obtain mnist file" in log
    assert "--source-dir" in log and "fashion_mnist" in log
    assert "AirflowFailException" in log  # bad input fails the task at once instead of retrying
    assert "mlsteps.validate" not in log  # nothing downstream ran
