"""Every DAG file parses quickly and cleanly: no import errors, no heavy imports, no lookups, safe defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from dagsupport import DAG_FILES, DAGS, PLUGINS, airflow_env

HEAVY = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "optuna")

# Runs in a fresh interpreter: parse one DAG file the way the DAG processor does, with Variable and
# Connection lookups replaced by recorders, then report what was imported and looked up.
PARSE_PROBE = """
import json, sys, runpy
calls = []
from airflow.sdk import Connection, Variable
from airflow.sdk.bases.hook import BaseHook
def record(kind):
    def fn(*args, **kwargs):
        calls.append([kind, [str(a) for a in args]])
        raise RuntimeError(kind + " lookup at parse time")
    return fn
Variable.get = staticmethod(record("Variable.get"))
Connection.get = staticmethod(record("Connection.get"))
BaseHook.get_connection = classmethod(lambda cls, *a, **k: record("BaseHook.get_connection")(*a))
sys.path.insert(0, sys.argv[2])
runpy.run_path(sys.argv[1], run_name="dag_under_test")
print("PROBE" + json.dumps({"modules": sorted(sys.modules), "calls": calls}))
"""


def _probe(dag_file, runtime: str, tmp_path) -> dict:
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(dag_file), str(PLUGINS)],
                         env=airflow_env(tmp_path, runtime), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {d.fileloc for d in dagbag.dags.values()} >= {str(f) for f in DAG_FILES}
    assert "mnist_training" in dagbag.dags


@pytest.mark.parametrize("runtime", ["kubernetes", "local"])
@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[f.stem for f in DAG_FILES])
def test_parsing_imports_no_heavy_library_and_looks_up_nothing(dag_file, runtime, tmp_path):
    probe = _probe(dag_file, runtime, tmp_path)
    heavy = [m for m in probe["modules"] if m.split(".")[0] in HEAVY]
    assert heavy == [], f"{dag_file.name} imports {heavy[:5]} at parse time"
    assert probe["calls"] == []


def test_every_task_retries_with_backoff_and_has_a_timeout(dagbag):
    for dag in dagbag.dags.values():
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag.dag_id}.{task.task_id} retries={task.retries}"
            # A human-in-the-loop task waits for its answer up to response_timeout instead.
            timeout = task.execution_timeout or getattr(task, "response_timeout", None)
            assert isinstance(timeout, timedelta), f"{dag.dag_id}.{task.task_id} has no timeout"
            assert task.retry_exponential_backoff


def test_training_dag_is_nightly_without_catchup_and_one_run_at_a_time(dagbag):
    dag = dagbag.dags["mnist_training"]
    assert dag.timetable.expression == "0 2 * * *"
    assert str(dag.timetable.timezone) == "UTC"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and dag.tags
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["prep", "validate", "plan_search", "create_study", "tune", "select", "hyperparameters",
                     "train", "evaluate", "compress", "register", "gate", "plan_review", "approve", "promote",
                     "plan_rejection", "record_rejection"]


@pytest.mark.parametrize(("name", "value"), [("epochs", 0), ("dataset", "cifar"), ("learning_rate", 0),
                                           ("gpus", -1), ("node_selector", "gpu"), ("node_selector", {"pool": 1}),
                                           ("node_selector", {"gpu": True}),
                                           ("node_selector", {"pool": "gpu a100"}),
                                           ("node_selector", {"node pool": "gpu"}),
                                           ("node_selector", {"pool": "-gpu"}),
                                           ("node_selector", {"pool": "x" * 64}),
                                           ("node_selector", {"Example.com/pool": "gpu"}),
                                           ("node_selector", {"pool": "gpu\n"}), ("search_workers", 0),
                                           ("search_trials", 0), ("search_pruner", "asha"),
                                           ("search_reduction_factor", 1),
                                           ("search_space", "lr=0.1"), ("search", "maybe")],
                         ids=["zero-epochs", "unknown-dataset", "zero-lr", "negative-gpus", "selector-not-object",
                              "selector-number-value", "selector-boolean-value", "selector-value-with-space",
                              "selector-key-with-space", "selector-value-leading-dash", "selector-value-too-long",
                              "selector-prefix-uppercase", "selector-value-newline",
                              "no-workers", "no-trials", "unknown-pruner", "reduction-factor-one", "space-not-object",
                              "search-not-bool"])
def test_trigger_form_rejects_invalid_values(dagbag, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    param = dagbag.dags["mnist_training"].params.get_param(name)
    param.resolve()  # the default is valid
    with pytest.raises(ParamValidationError):
        param.resolve(value)


def test_node_selectors_kubernetes_accepts_are_accepted_by_the_form(dagbag):
    param = dagbag.dags["mnist_training"].params.get_param("node_selector")
    for good in ({"cloud.google.com/gke-nodepool": "gpu-a100"}, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                 {"pool": ""}, {"kubernetes.io/arch": "amd64", "tier_2": "a.b_c-d"}, {"k": "v" * 63}):
        assert param.resolve(good) == good


@pytest.mark.parametrize("dag_id", ["mnist_training", "model_promotion"])
def test_model_names_mlflow_or_the_server_urls_would_refuse_are_refused_by_the_form(dagbag, dag_id):
    from airflow.sdk.exceptions import ParamValidationError

    param = dagbag.dags[dag_id].params.get_param("model_name")
    for good in ("mnist_classifier", "fashion-v2.1", "M0"):
        assert param.resolve(good) == good
    # "name\n": Python's re.search (jsonschema's pattern) lets $ match before a final newline
    for bad in ("team/model", "team:model", " ", "-leading-dash", "with space", "x" * 201, "mnist_classifier\n"):
        with pytest.raises(ParamValidationError):  # else register fails after hours of training
            param.resolve(bad)


@pytest.mark.parametrize(("name", "value"), [("version", -1), ("version", 1.5), ("smoke_requests", 0),
                                           ("validation_requests", 0)])
def test_promotion_form_rejects_a_version_or_request_count_it_could_not_act_on(dagbag, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    param = dagbag.dags["model_promotion"].params.get_param(name)
    param.resolve()
    with pytest.raises(ParamValidationError):
        param.resolve(value)


@pytest.mark.parametrize(("dag_id", "first", "typo", "meant"), [("mnist_training", "prep", "epoch", "epochs"),
                                                              ("model_promotion", "plan", "verison", "version")],
                         ids=["training", "promotion"])
def test_a_config_key_that_is_not_a_param_fails_the_first_task_naming_the_param_meant(
        dagbag, airflow_db, capfd, dag_id, first, typo, meant):
    """Airflow passes such a key on unused: the run would go on with the defaults (epochs 5, the champion)."""
    dag = dagbag.dags[dag_id]
    # Every other task is marked done unrun: only the first one's check is under test.
    run = dag.test(run_conf={typo: 3}, mark_success_pattern=f"(?!{first}$).*")
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed" and states[first] == "failed"  # not up_for_retry: a retry cannot fix it
    log = capfd.readouterr().out
    assert f"{dag_id} does not take: '{typo}' (did you mean '{meant}'?)" in log


def test_a_batch_that_cannot_split_over_the_forms_gpus_fails_the_first_task_not_train(dagbag, airflow_db, capfd):
    """Without a search nothing checked it: train refused it after prep, validate and the wait for the node."""
    from mlops_airflow.search import batch_split_error

    dag = dagbag.dags["mnist_training"]
    run = dag.test(run_conf={"search": False, "gpus": 3, "batch_size": 128}, mark_success_pattern="(?!prep$).*")
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed" and states["prep"] == "failed"
    assert "batch_size 128 does not split evenly over the 3 GPUs" in capfd.readouterr().out
    assert "multiple of 3 (126 or 129)" in batch_split_error({"search": False, "gpus": 3, "batch_size": 128},
                                                           "kubernetes")
    for fine in ({"search": False, "gpus": 4, "batch_size": 128}, {"search": True, "gpus": 3, "batch_size": 128},
                 {"search": False, "gpus": 0, "batch_size": 100}):
        assert batch_split_error(fine, "kubernetes") is None, fine
    assert batch_split_error({"search": False, "gpus": 3, "batch_size": 128}, "local") is None


def test_a_config_with_every_param_as_the_form_sends_it_is_accepted(dagbag):
    from mlops_airflow.runconf import unknown_keys_error

    for dag in dagbag.dags.values():
        assert unknown_keys_error(dict(dag.params.validate()), dag.params.keys(), dag_id=dag.dag_id) is None
    error = unknown_keys_error({"epochs": 1, "gpu": 0, "zzz": 1}, ["epochs", "gpus"], dag_id="d")
    assert error is not None and "'gpu' (did you mean 'gpus'?), 'zzz'. " in error and "epochs, gpus" in error


def test_search_runs_one_worker_per_requested_slot_and_is_skipped_when_off():
    from mlops_airflow.search import plan_search

    plan = plan_search.function
    assert plan(params={"search": True, "search_workers": 3, "search_trials": 20}) == [
        ["--worker", "0"], ["--worker", "1"], ["--worker", "2"]]
    # no more workers than trials: the others would only wait, each holding a pod
    assert plan(params={"search": True, "search_workers": 3, "search_trials": 2}) == [["--worker", "0"],
                                                                                      ["--worker", "1"]]
    assert plan(params={"search": False, "search_workers": 3, "search_trials": 20}) == []  # skips the search


class _TI:
    def __init__(self, select_result):
        self.select_result = select_result

    def xcom_pull(self, task_ids):
        assert task_ids == "select"
        return self.select_result


FORM = {"learning_rate": 0.003, "batch_size": 128, "width": 32, "dropout": 0.2}


def test_train_gets_the_best_trial_when_the_search_ran_and_the_form_otherwise():
    from mlops_airflow.search import hyperparameters

    pick = hyperparameters.function
    best = {"hyperparameters": {"learning_rate": 0.01, "batch_size": 64, "width": 48, "dropout": 0.1},
            "search_run_id": "abc", "trial": 4, "value": 0.91, "objective": "val_accuracy"}
    tuned = pick(params={**FORM, "search": True}, ti=_TI(best))
    assert {k: tuned[k] for k in FORM} == best["hyperparameters"]
    assert (tuned["source"], tuned["search_run_id"], tuned["trial"]) == ("search", "abc", 4)
    # A space that fixes some values (or omits them) still yields every hyperparameter train needs.
    partial = {**best, "hyperparameters": {"learning_rate": 0.02}}
    assert {k: pick(params={**FORM, "search": True}, ti=_TI(partial))[k] for k in FORM} == {
        **FORM, "learning_rate": 0.02}
    skipped = pick(params={**FORM, "search": False}, ti=_TI(None))
    assert {k: skipped[k] for k in FORM} == FORM
    assert (skipped["source"], skipped["search_run_id"], skipped["trial"]) == ("trigger form", None, None)


def test_train_never_falls_back_to_the_form_when_the_search_was_on_but_produced_nothing():
    from airflow.sdk.exceptions import AirflowFailException
    from mlops_airflow.search import hyperparameters

    with pytest.raises(AirflowFailException, match="no hyperparameters"):
        hyperparameters.function(params={**FORM, "search": True}, ti=_TI(None))


def test_select_waits_for_every_worker_and_train_runs_whether_or_not_the_search_ran(dagbag):
    dag = dagbag.dags["mnist_training"]
    # select runs even if every worker failed for good (it names the cause and closes the search's MLflow
    # runs), but not when the search was skipped
    assert dag.get_task("select").trigger_rule == "none_skipped"
    chosen = dag.get_task("hyperparameters")
    assert chosen.trigger_rule == "none_failed_min_one_success"
    assert {"select", "validate"} <= chosen.upstream_task_ids
    assert dag.get_task("plan_search").ignore_downstream_trigger_rules is False  # skips only the search tasks


class _GateTI:
    def __init__(self, verdict):
        self.verdict = verdict

    def xcom_pull(self, task_ids):
        assert task_ids == "gate"
        return self.verdict


@pytest.mark.parametrize(("mode", "passed", "expected"), [
    ("approval", True, ["approve"]), ("auto", True, ["promote"]), ("none", True, []),
    ("approval", False, []), ("auto", False, []),
], ids=["approval", "auto", "none", "failed-gate-is-not-offered", "failed-gate-is-not-promoted"])
def test_review_path_follows_the_form_and_never_promotes_a_failed_gate(mode, passed, expected):
    from mlops_airflow.review import plan_review

    assert plan_review.function(params={"review": mode}, ti=_GateTI({"passed": passed})) == expected


@pytest.mark.parametrize(("shown", "waits"), [
    ("03:00", timedelta(hours=18)),  # the nightly's own card: 18 h, over by 21:00
    ("14:00", timedelta(hours=11, minutes=45)),  # a manual run's card: over at 01:45, before the 02:00 run
    ("01:00", timedelta(hours=2)),  # shown just before the next run: still two hours (that run starts late)
], ids=["nightly-card", "afternoon-card", "card-just-before-the-next-run"])
def test_an_unanswered_card_never_holds_back_the_next_nightly_run_for_long(dagbag, shown, waits):
    from datetime import UTC, datetime

    approve = dagbag.dags["mnist_training"].get_task("approve")
    assert approve.dag.schedule == "0 2 * * *"  # the card reads its DAG's schedule
    hour, minute = map(int, shown.split(":"))
    assert approve.timeout_for(datetime(2026, 12, 7, hour, minute, tzinfo=UTC)) == waits


def test_the_cards_deadline_follows_the_schedules_time_zone(dagbag):
    """With Airflow's default_timezone Europe/Berlin the nightly run is due at 01:00 UTC in winter."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    approve = dagbag.dags["mnist_training"].get_task("approve")
    assert str(approve.dag.timezone) in ("UTC", "Timezone('UTC')")  # this project's default
    shown = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
    assert approve.timeout_for(shown, ZoneInfo("Europe/Berlin")) == timedelta(hours=10, minutes=45)


def test_the_card_is_given_its_timeout_when_it_is_shown(dagbag, monkeypatch):
    import copy

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    approve = copy.deepcopy(dagbag.dags["mnist_training"].get_task("approve"))
    seen = {}
    monkeypatch.setattr(ApprovalOperator, "execute", lambda self, context: seen.setdefault("timeout",
                                                                                           self.response_timeout))
    monkeypatch.setattr(type(approve), "timeout_for", lambda self, now: timedelta(hours=5))
    approve.execute({})
    assert seen["timeout"] == timedelta(hours=5)


def test_rejection_skips_promotion_only_and_is_recorded_whatever_happened(dagbag):
    dag = dagbag.dags["mnist_training"]
    approve, promote, check, record = (dag.get_task(t) for t in ("approve", "promote", "plan_rejection",
                                                                 "record_rejection"))
    assert approve.downstream_task_ids == {"promote"}  # what ApprovalOperator skips on Reject
    assert promote.trigger_rule == "none_failed_min_one_success"  # runs on the auto path, approve skipped
    # after any review outcome, never after a failure upstream (a failed run must not record a rejection)
    assert check.trigger_rule == "none_failed" and "promote" in check.upstream_task_ids
    assert record.upstream_task_ids == {"plan_rejection"}
    assert approve.defaults == ["Reject"] and approve.response_timeout.total_seconds() > 0


class _ReviewTI:
    def __init__(self, plan, answer):
        self.results = {"plan_review": plan, "approve": answer}

    def xcom_pull(self, task_ids):
        return self.results[task_ids]


@pytest.mark.parametrize(("plan", "answer", "expected"), [
    (["approve"], None, True), (["approve"], {"chosen_options": ["Approve"]}, False),
    (["promote"], None, False), ([], None, False), (None, None, False),
], ids=["rejected-or-timed-out", "approved", "auto", "no-review-or-failed-gate", "plan-review-skipped"])
def test_record_rejection_starts_its_pod_only_for_a_rejection(plan, answer, expected):
    from mlops_airflow.review import plan_rejection

    assert plan_rejection.function(ti=_ReviewTI(plan, answer)) is expected


def test_the_forms_hyperparameter_limits_are_the_searchs_domains(dagbag):
    """One set of limits: with the search off the form refuses what a search space may not hold either."""
    sys.path.insert(0, str(DAGS.parent))
    try:
        from mlsteps.search import DOMAINS
    finally:
        sys.path.remove(str(DAGS.parent))
    params = dagbag.dags["mnist_training"].params
    for name, (lowest, highest, low_ok, high_ok, _) in DOMAINS.items():
        schema = params.get_param(name).schema
        assert schema.get("minimum" if low_ok else "exclusiveMinimum") == lowest, (name, schema)
        assert schema.get("maximum" if high_ok else "exclusiveMaximum") == highest, (name, schema)


def test_scheduled_training_and_promotion_use_the_model_the_deployment_names(monkeypatch):
    """A deployment serving another registered model: the nightly run registers it, and the promotions the
    schedule and the webhook start (which take the form's defaults) deploy it; else approving it deploys nothing."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLOPS_MODEL_NAME", "fashion_classifier")
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    for dag_id in ("mnist_training", "model_promotion"):
        assert bag.dags[dag_id].params.validate()["model_name"] == "fashion_classifier", dag_id


@pytest.mark.parametrize("name", ["team/model", "", "with space"])
def test_a_model_name_the_server_could_not_serve_is_refused_naming_the_variable(monkeypatch, name):
    from mlops_airflow import settings

    monkeypatch.setenv("MLOPS_MODEL_NAME", name)
    with pytest.raises(ValueError, match="MLOPS_MODEL_NAME="):
        settings.load()


def test_scheduled_runs_train_on_the_dataset_the_deployment_names(monkeypatch):
    """Nightly runs take the form's defaults: MLOPS_DEFAULT_DATASET (and _SOURCE_DIR) set them."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLOPS_DEFAULT_DATASET", "fashion_mnist")
    monkeypatch.setenv("MLOPS_DEFAULT_SOURCE_DIR", "/data/incoming/fashion")
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    defaults = bag.dags["mnist_training"].params.validate()
    assert (defaults["dataset"], defaults["source_dir"]) == ("fashion_mnist", "/data/incoming/fashion")


@pytest.mark.parametrize(("env", "words"), [
    ({"MLOPS_DEFAULT_DATASET": "fashion-mnist"}, "MLOPS_DEFAULT_DATASET='fashion-mnist' is not one of mnist, "
                                                 "fashion_mnist, custom"),
    ({"MLOPS_DEFAULT_DATASET": "custom"}, "MLOPS_DEFAULT_DATASET=custom needs MLOPS_DEFAULT_SOURCE_DIR"),
    ({"MLOPS_DEPLOY_TARGET": "k8s"}, "MLOPS_DEPLOY_TARGET='k8s' is not one of kubernetes, local"),
    ({"MLOPS_RUNTIME": "docker"}, "MLOPS_RUNTIME='docker' is not one of kubernetes, local"),
    ({"MLOPS_POD_START_TIMEOUT": "0"}, "MLOPS_POD_START_TIMEOUT='0': give a whole number of seconds (at least 1)"),
], ids=["unknown-dataset", "custom-without-its-folder", "unknown-deploy-target", "unknown-runtime",
        "no-time-to-start-a-pod"])
def test_a_setting_the_dags_could_not_run_with_is_an_import_error_naming_the_variable(
        monkeypatch, env, words):
    from airflow.dag_processing.dagbag import DagBag

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAGS))
    errors = "\n".join(bag.import_errors.values())
    assert words in errors


def test_the_settings_know_the_datasets_prep_knows():
    from mlops_airflow.settings import DATASETS

    sys.path.insert(0, str(DAGS.parent))
    try:
        from mlsteps.datasets import DATASET_NAMES
    finally:
        sys.path.remove(str(DAGS.parent))
    assert tuple(DATASETS) == tuple(DATASET_NAMES)


def _readme_params(heading: str) -> dict[str, str]:
    """The param table under ``heading`` in README.md: {name: default as written}."""
    from dagsupport import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    table = section[section.index("| param | default | meaning |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        name, default = (cell.strip() for cell in line.split("|")[1:3])
        rows[name.strip("`")] = default
    return rows


def _written(default: object) -> str:
    """A default as the README writes it: JSON for booleans and objects, numbers as numbers, strings in code."""
    if isinstance(default, (bool, dict, list)):
        return f"`{json.dumps(default)}`"
    return f"`{default}`" if isinstance(default, str) else str(default)


@pytest.mark.parametrize(("dag_id", "heading"), [("mnist_training", "## The training DAG"),
                                                  ("model_promotion", "`model_promotion` keeps serving")])
def test_the_readme_gives_every_trigger_form_param_with_the_default_the_form_has(dag_id, heading):
    """What a scheduled run does is what these defaults say (a nightly run waits for a reviewer, trains on a
    GPU, gates at 0.5 pt): the README is where users read them."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    defaults = bag.dags[dag_id].params.validate()
    documented = _readme_params(heading)
    assert sorted(documented) == sorted(defaults)
    for name, value in defaults.items():
        if documented[name].startswith(("`$MLOPS_DEFAULT_", "`$MLOPS_MODEL_NAME`")):  # set by the deployment
            continue
        assert documented[name] == _written(value), name
