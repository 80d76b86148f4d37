"""Each step renders to the pod that would be sent to Kubernetes, and that pod passes the API schema.

No cluster exists here: ``build_pod_request_obj(dry_run=True)`` builds the V1Pod the operator would
create, after the same template rendering a real run does, and kubernetes-validate checks it against
the Kubernetes OpenAPI schema (strict: unknown fields are errors).
"""

from __future__ import annotations

import copy
import json

import pytest
from dagsupport import DAGS, FakeTaskInstance

K8S_VERSION = "1.33"
RUN_ID = "manual__2026-11-26T02:00:00+00:00"
RESULTS = {  # what earlier steps would have pushed to XCom
    "prep": {"manifest": "/data/datasets/mnist/0123456789abcdef/manifest.json", "dataset": "mnist",
             "digest": "0123456789abcdef" * 4},
    "train": {"model_path": "/data/runs/x/model/model.keras", "model_uri": "models:/m-abc"},
    "evaluate": {"metrics": {"test_accuracy": 0.99}},
    "register": {"version": 3, "model_name": "mnist_classifier"},
    "compress": {"model_uri": "models:/m-tflite", "tags": {"compression.variant": "pruned_int8",
                                                          "compression.size_bytes": "97136"}},
    "hyperparameters": {"learning_rate": 0.0042, "batch_size": 64, "width": 48, "dropout": 0.1, "source": "search",
                        "search_run_id": "0123abcd", "trial": 7},
}
STEPS = {"prep": "prep", "validate": "validate", "create_study": "tune", "tune": "tune", "select": "select",
         "train": "train", "evaluate": "evaluate", "compress": "compress", "register": "register", "gate": "gate",
         "promote": "review", "record_rejection": "review"}  # pod tasks -> step module
SEARCH_TASKS = ("create_study", "tune", "select")


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["mnist_training"]


def render(dag, task_id: str, mapped: list[str] | None = None, results: dict | None = None, **params):
    """Render one task's templates with the trigger-form params and return its (dry-run) pod as a dict.

    A mapped task is rendered as its instance for ``mapped`` (the expanded extra arguments).
    """
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from kubernetes.client import ApiClient

    task = dag.get_task(task_id)
    if isinstance(task, MappedOperator):
        task = task.unmap({"extra_arguments": mapped or ["--worker", "0"]})
    else:
        task = copy.deepcopy(task)  # rendering replaces templates in place
    resolved = {**dag.params.validate(), **params}
    ti = FakeTaskInstance(task_id, RESULTS if results is None else results)
    context = {"params": resolved, "dag": dag, "run_id": RUN_ID, "ti": ti, "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod), task


@pytest.fixture(scope="module")
def rendered(dag):
    return {task_id: render(dag, task_id)[0] for task_id in STEPS}


def test_every_pod_task_is_rendered_here(dag):
    from mlops_airflow.pods import StepPodOperator

    pods = {t.task_id for t in dag.tasks if (getattr(t, "operator_class", None) or type(t)) is StepPodOperator}
    assert pods == set(STEPS)


@pytest.mark.parametrize("task_id", list(STEPS))
def test_pod_validates_against_kubernetes_schema(rendered, task_id):
    import kubernetes_validate

    kubernetes_validate.validate(rendered[task_id], desired_version=K8S_VERSION, strict=True)


@pytest.mark.parametrize("task_id", list(STEPS))
def test_pod_runs_the_step_cli_hardened_with_shared_volume_and_mlflow_secret(rendered, task_id):
    pod = rendered[task_id]
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["image"] == "ghcr.io/mlops-mnist/steps:0.1.0"
    assert container["command"] == ["python", "-m", f"mlsteps.{STEPS[task_id]}"]
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
    optuna = [{"secretRef": {"name": "optuna-storage", "optional": True}}] if task_id in SEARCH_TASKS else []
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}, *optuna]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "mlops-data"}} in spec["volumes"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    # The "restricted" Pod Security level demands a seccomp profile; fsGroup makes the data volume writable.
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["fsGroup"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["serviceAccountName"] == "mlops-steps"
    assert pod["metadata"]["namespace"] == "mlops"
    # The XCom sidecar reads the step's result file.
    (sidecar,) = [c for c in spec["containers"] if c["name"] == "airflow-xcom-sidecar"]
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in container["volumeMounts"]
    # ... and passes what a namespace enforcing the "restricted" Pod Security level and a ResourceQuota ask of
    # every container: without it the whole pod is refused.
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["resources"]["limits"]["cpu"] and sidecar["resources"]["limits"]["memory"]


TF_THREADS = {"prep": 1, "validate": 1, "create_study": 1, "tune": 4, "select": 1, "train": 4, "evaluate": 2,
              "compress": 2, "register": 1, "gate": 1, "promote": 1, "record_rejection": 1}  # 500m, 250m: 1


@pytest.mark.parametrize("task_id", list(STEPS))
def test_tensorflow_in_each_pod_runs_as_many_threads_as_its_cpu_limit_allows(rendered, task_id):
    """Unset, TensorFlow sizes its thread pools by the node's cores: 64 threads in a 4-CPU quota."""
    env = {e["name"]: e.get("value") for e in rendered[task_id]["spec"]["containers"][0]["env"]}
    expected = str(TF_THREADS[task_id])
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == (expected, expected)


@pytest.mark.parametrize(("quantity", "threads"), [("500m", 1), ("1", 1), ("1500m", 1), ("2.5", 2), ("16", 16)])
def test_a_fractional_cpu_limit_gives_the_whole_cpus_in_it_and_at_least_one(quantity, threads):
    from mlops_airflow.pods import cpu_threads

    assert cpu_threads(quantity) == threads


@pytest.mark.parametrize("task_id", ["train", "tune", "compress"])
def test_a_steps_progress_lines_reach_the_airflow_task_log(dag, task_id):
    """Epoch lines, trial verdicts: what users watch in the UI. Without get_logs the task log is silent."""
    _, task = render(dag, task_id)
    assert task.get_logs is True and task.logging_interval


def test_step_arguments_carry_params_and_earlier_results(rendered):
    args = rendered["train"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--manifest"] == RESULTS["prep"]["manifest"]
    assert flags["--run-key"] == f"mnist_training/{RUN_ID}"
    assert flags["--data-root"] == "/data"
    # Hyperparameters come from the hyperparameters task (the search's best trial), with their origin.
    assert (flags["--epochs"], flags["--batch-size"], flags["--width"]) == ("5", "64", "48")
    assert (flags["--learning-rate"], flags["--dropout"]) == ("0.0042", "0.1")
    assert (flags["--search-run-id"], flags["--search-trial"]) == ("0123abcd", "7")
    register = rendered["register"]["spec"]["containers"][0]["args"]
    flags = dict(zip(register[::2], register[1::2]))
    # The registered model is compress's choice, with its tags; the float model is recorded beside it.
    assert flags["--model-uri"] == "models:/m-tflite"
    assert flags["--float-model-uri"] == "models:/m-abc"
    assert json.loads(flags["--tags"]) == RESULTS["compress"]["tags"]
    assert flags["--float-metrics"] == '{"test_accuracy": 0.99}'
    assert "--metrics" not in flags, "evaluate scores the float model, not the compressed one registered"
    assert flags["--dataset-digest"] == RESULTS["prep"]["digest"]


def test_gate_pod_judges_the_registered_version_with_the_trigger_form_thresholds(dag):
    pod, _ = render(dag, "gate", gate_min_accuracy=0.9, gate_max_regression=0.2, model_name="digits")
    args = pod["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert (flags["--model-name"], flags["--version"]) == ("digits", "3")
    assert (flags["--min-accuracy"], flags["--max-regression"]) == ("0.9", "0.2")
    assert flags["--manifest"] == RESULTS["prep"]["manifest"]


REJECTED_ANSWER = {"chosen_options": ["Reject"], "params_input": {"comment": "worse on shirts"},
                   "responded_by_user": {"id": "8", "name": "grace"}, "responded_at": "2026-11-27T10:00:00+00:00"}
APPROVED = {"chosen_options": ["Approve"], "params_input": {"comment": "better on shirts"},
            "responded_by_user": {"id": "7", "name": "ada"}, "responded_at": "2026-11-27T09:00:00+00:00"}


TIMED_OUT = {**REJECTED_ANSWER, "responded_by_user": None, "params_input": {"comment": ""}}
EMPTIED = {**APPROVED, "params_input": {"comment": None}}  # the UI sends a comment typed and deleted as null


# returned: what approve returned (Approve only: on Reject the skip ends it first); kept: ReviewApproval's "answer".
@pytest.mark.parametrize(("task_id", "plan", "returned", "kept", "expected"), [
    ("promote", ["approve"], APPROVED, APPROVED, {"--decision": "approved", "--reviewer": "ada",
                                                  "--comment": "better on shirts",
                                                  "--decided-at": "2026-11-27T09:00:00+00:00"}),
    ("promote", ["promote"], None, None, {"--decision": "auto", "--reviewer": "pipeline", "--comment": ""}),
    ("record_rejection", ["approve"], None, REJECTED_ANSWER, {"--decision": "rejected", "--reviewer": "grace",
                                                              "--comment": "worse on shirts",
                                                              "--decided-at": "2026-11-27T10:00:00+00:00"}),
    ("record_rejection", ["approve"], None, TIMED_OUT, {"--decision": "rejected",
                                                        "--reviewer": "nobody: no answer in time"}),
    ("promote", ["approve"], EMPTIED, EMPTIED, {"--decision": "approved", "--reviewer": "ada", "--comment": ""}),
    ("record_rejection", ["approve"], APPROVED, APPROVED, {"--decision": "none"}),
    ("record_rejection", ["promote"], None, None, {"--decision": "none"}),
    ("record_rejection", [], None, None, {"--decision": "none"}),
], ids=["approved", "auto-without-approval", "rejected", "rejected-by-timeout", "approved-comment-emptied",
        "nothing-to-record-after-approval",
        "auto", "no-review"])
def test_review_pods_carry_the_reviewers_answer(dag, monkeypatch, task_id, plan, returned, kept, expected):
    monkeypatch.setitem(RESULTS, "plan_review", plan)
    monkeypatch.setitem(RESULTS, "approve", returned)
    monkeypatch.setitem(RESULTS, ("approve", "answer"), kept)
    pod, _ = render(dag, task_id)
    args = pod["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert {k: flags[k] for k in expected} == expected
    assert (flags["--model-name"], flags["--version"]) == ("mnist_classifier", "3")


@pytest.mark.parametrize("comment", ["lgtm", "", None], ids=["typed", "untouched", "typed-then-deleted"])
def test_the_approval_card_accepts_the_comment_however_the_ui_sends_it(dag, comment):
    """Airflow checks the reviewer's answer against the card's params when the task resumes: a refusal there
    loses the answer (the task is retried, the card shown again)."""
    task = copy.deepcopy(dag.get_task("approve"))
    task.validate_params_input({"comment": comment})
    assert task.params["comment"] == comment


def test_a_rejection_is_kept_for_record_rejection_though_skipping_promote_ends_the_approval_early(dag, monkeypatch):
    import datetime
    import types

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    class DownstreamTasksSkipped(Exception):  # what Airflow 3's skip() raises out of execute_complete on Reject
        pass

    def skip_promote(self, context, event):
        raise DownstreamTasksSkipped(["promote"])

    monkeypatch.setattr(ApprovalOperator, "execute_complete", skip_promote)
    pushed = {}
    ti = types.SimpleNamespace(xcom_push=lambda key, value: pushed.__setitem__(key, value))
    event = {"chosen_options": ["Reject"], "params_input": {"comment": "worse on shirts"},
             "responded_by_user": {"id": "8", "name": "grace"},
             "responded_at": datetime.datetime(2026, 11, 27, 10, tzinfo=datetime.timezone.utc)}
    with pytest.raises(DownstreamTasksSkipped):
        dag.get_task("approve").execute_complete({"ti": ti}, event)
    assert pushed["answer"] == {**event, "responded_at": "2026-11-27T10:00:00+00:00"}


@pytest.mark.parametrize(("champion", "shown"), [((0.905, 2), "90.50 % (version 2)"), ((None, None), "none yet")],
                         ids=["against-the-champion", "first-version"])
def test_approval_card_shows_the_version_against_the_champion_with_gate_and_compression(dag, monkeypatch, champion,
                                                                                        shown):
    monkeypatch.setitem(RESULTS, "gate", {"accuracy": 0.9123, "champion_accuracy": champion[0],
                                          "champion_version": champion[1], "verdict": "passed",
                                          "reasons": "accuracy 91.23 % >= floor 85.00 %"})
    monkeypatch.setitem(RESULTS, "compress", {**RESULTS["compress"], "variant": "pruned_int8", "size_bytes": 97136,
                                              "accuracy_drop_points": 0.2, "reason": "smallest of 4"})
    monkeypatch.setitem(RESULTS, "train", {**RESULTS["train"], "mlflow_run_id": "run123"})
    task = copy.deepcopy(dag.get_task("approve"))
    context = {"params": dag.params.validate(), "dag": dag, "run_id": RUN_ID, "task": task,
               "ti": FakeTaskInstance("approve", RESULTS)}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    assert task.subject == "Promote mnist_classifier version 3 to champion?"
    for words in ("91.23 %", shown, "Quality gate: passed", "`pruned_int8`, 97136 bytes",
                  "-0.20 pt", "/#/models/mnist_classifier/versions/3", "run123"):
        assert words in task.body, words
    assert task.options == ["Approve", "Reject"]


def test_compress_pod_takes_the_trained_model_and_the_trigger_form_settings(dag):
    pod, _ = render(dag, "compress", compress_sparsity=0.5, compress_method="quantization_aware",
                    compress_max_accuracy_drop=1.0, compress_finetune_epochs=3)
    args = pod["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--model-path"] == RESULTS["train"]["model_path"]
    assert flags["--manifest"] == RESULTS["prep"]["manifest"]
    assert (flags["--sparsity"], flags["--method"]) == ("0.5", "quantization_aware")
    assert (flags["--max-accuracy-drop"], flags["--finetune-epochs"]) == ("1.0", "3")
    # Latency is measured with as many interpreter threads as the pod has CPUs.
    assert flags["--threads"] == pod["spec"]["containers"][0]["resources"]["limits"]["cpu"]


def test_training_pod_requests_the_gpus_and_node_pool_from_the_trigger_form(dag):
    pod, task = render(dag, "train", gpus=2, node_selector={"cloud.google.com/gke-nodepool": "a100"})
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "a100"}
    assert {"name": "MLSTEPS_EXPECTED_GPUS", "value": "2"} in container["env"]  # the step checks it sees them
    assert pod["spec"]["activeDeadlineSeconds"] == int(task.execution_timeout.total_seconds())
    assert task.deferrable and task.logging_interval and task.do_xcom_push
    assert task.on_finish_action.value == "delete_succeeded_pod"


@pytest.mark.parametrize("task_id", ["tune", "train"])
def test_a_pod_pinned_to_a_node_pool_tolerates_its_gpu_taint_even_without_gpus(dag, task_id):
    """A CPU search (search_gpus 0) on the training GPU pool: GKE taints it nvidia.com/gpu, and the trial pods,
    not tolerating it, waited for a node until their start timeout, on every try."""
    pod, _ = render(dag, task_id, gpus=0, search_gpus=0, node_selector={"cloud.google.com/gke-nodepool": "a100"})
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "a100"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]


def test_whole_numbers_sent_as_json_floats_request_whole_gpus_and_fractions_fail_for_good(dag):
    """The form's integer schema passes 2.0 (JSON Schema counts it as an integer): an API client's conf."""
    from airflow.sdk.exceptions import AirflowFailException

    assert dag.params.get_param("gpus").resolve(2.0) == 2.0  # accepted by the form, as a float
    pod, _ = render(dag, "train", gpus=2.0, epochs=5.0)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "MLSTEPS_EXPECTED_GPUS", "value": "2"} in container["env"]
    assert "5.0" in container["args"]  # the step's CLI reads a whole-number float as that number (test_core)
    with pytest.raises(AirflowFailException, match="gpus must be a whole number >= 0, got '1.5'"):
        render(dag, "train", gpus=1.5)


@pytest.mark.parametrize(("name", "task_id", "empty"), [
    ("source_dir", "prep", ["--source-dir", ""]),
    ("search_space", "create_study", ["--search-space", "{}"]),
    ("node_selector", "train", None),
    ("node_selector", "tune", None),
], ids=["source-dir", "search-space", "node-selector-train", "node-selector-trial-workers"])
def test_a_form_field_the_user_empties_is_accepted_and_means_empty(dag, name, task_id, empty):
    """The trigger form sends an emptied text or JSON field as null: the form must take it (or the field's
    documented empty meaning, no folder, no overrides, no selector, is out of reach from the UI) and the
    pods must get the empty value, not the text "None" or "null"."""
    assert dag.params.get_param(name).resolve(None) is None
    pod, _ = render(dag, task_id, **{name: None})
    args = pod["spec"]["containers"][0]["args"]
    if empty:
        flag = args.index(empty[0])
        assert args[flag:flag + 2] == empty
    else:
        assert not pod["spec"].get("nodeSelector")
    assert "None" not in args and "null" not in args


def test_a_node_selector_that_is_not_strings_fails_the_task_for_good_not_retried(dag):
    """The form refuses it; a run whose conf bypassed the form (older Airflow, edited XCom) still gets a
    clear failure, not retries of a pod that cannot be built."""
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="node_selector must be a JSON object of strings"):
        render(dag, "train", node_selector={"pool": 1})


def test_cpu_only_training_and_other_steps_request_no_gpu(dag, rendered):
    pod, _ = render(dag, "train", gpus=0)
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert not pod["spec"].get("tolerations")
    assert all(e["name"] != "MLSTEPS_EXPECTED_GPUS" for e in pod["spec"]["containers"][0]["env"])
    for task_id, other in rendered.items():  # the form's gpus (default 1) is for train and the trial workers
        if task_id not in ("train", "tune"):
            container = other["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in container["resources"]["limits"], task_id
            assert "nvidia.com/gpu" not in container["resources"].get("requests", {}), task_id
            assert not other["spec"].get("tolerations"), task_id


def _finished_pod(code: int):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerStateTerminated(exit_code=code)
    status = k8s.V1ContainerStatus(name="base", image="x", image_id="", ready=False, restart_count=0,
                                   state=k8s.V1ContainerState(terminated=terminated))
    return k8s.V1Pod(status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]))


@pytest.mark.parametrize(("code", "fails_at_once"), [(2, True), (1, False), (137, False)],
                         ids=["rejected-input", "crash", "oom-killed"])
def test_pod_whose_step_rejected_its_input_fails_without_retry(dag, monkeypatch, code, fails_at_once):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowFailException

    def provider_cleanup(self, pod, remote_pod, xcom_result=None, context=None):
        raise RuntimeError("Pod returned a failure")  # what the provider raises for any failed pod

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", provider_cleanup)
    task = dag.get_task("validate")
    pod = _finished_pod(code)
    with pytest.raises(AirflowFailException if fails_at_once else RuntimeError) as raised:
        task.cleanup(pod, pod)
    assert isinstance(raised.value, AirflowFailException) is fails_at_once


def _pod(phase: str, base: str | None, code: int = 0):
    """A pod in ``phase`` whose step container is ``base``: None (not started), running or terminated."""
    from kubernetes.client import models as k8s

    statuses = []
    if base is not None:
        state = (k8s.V1ContainerState(running=k8s.V1ContainerStateRunning()) if base == "running" else
                 k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code)))
        statuses = [k8s.V1ContainerStatus(name="base", image="x", image_id="", ready=False, restart_count=0,
                                           state=state)]
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="train-abc", namespace="mlops"),
                     status=k8s.V1PodStatus(phase=phase, container_statuses=statuses))


@pytest.mark.parametrize(("phase", "base", "code", "deleted"), [
    ("Pending", None, 0, True),  # startup timeout: no GPU node came
    ("Running", "running", 0, True),  # execution_timeout while the step still ran
    ("Running", "terminated", 1, False),  # step failed, the XCom sidecar not yet gone: kept for kubectl logs
    ("Failed", "terminated", 1, False),
    ("Succeeded", "terminated", 0, True),
], ids=["pending-at-startup-timeout", "running-at-timeout", "failed-sidecar-running", "failed", "succeeded"])
def test_a_pod_the_task_gave_up_on_is_deleted_and_a_failed_one_kept(dag, phase, base, code, deleted):
    class PodManager:
        deleted: list[str] = []

        def delete_pod(self, pod):
            self.deleted.append(pod.metadata.name)

    task = copy.deepcopy(dag.get_task("train"))
    task.pod_manager = manager = PodManager()
    task.process_pod_deletion(_pod(phase, base, code), reraise=False)
    assert manager.deleted == (["train-abc"] if deleted else [])


def test_step_pods_wait_for_a_node_and_an_image_longer_than_the_providers_two_minutes(dag, monkeypatch):
    from datetime import timedelta

    from mlops_airflow import settings, steps

    task = dag.get_task("train")
    assert task.schedule_timeout_seconds == task.startup_timeout_seconds == 1800
    monkeypatch.setenv("MLOPS_POD_START_TIMEOUT", "600")
    op = steps.step("validate", args={}, timeout=timedelta(hours=1))
    assert op.schedule_timeout_seconds == op.startup_timeout_seconds == 600
    monkeypatch.setenv("MLOPS_POD_START_TIMEOUT", "ten minutes")
    with pytest.raises(ValueError, match="MLOPS_POD_START_TIMEOUT='ten minutes'"):
        settings.load()


def test_each_trial_worker_pod_gets_its_worker_index_and_the_search_settings(dag):
    pods = [render(dag, "tune", mapped=["--worker", str(i)], search_trials=40, search_pruner="median",
                   search_space={"width": [32, 48]}, search_epochs=8)[0] for i in range(2)]
    for index, pod in enumerate(pods):
        args = pod["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--worker", str(index)]
        flags = dict(zip(args[::2], args[1::2]))
        assert (flags["--trials"], flags["--pruner"], flags["--max-epochs"]) == ("40", "median", "8")
        assert flags["--search-space"] == '{"width": [32, 48]}'
        assert flags["--run-key"] == f"mnist_training/{RUN_ID}"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["TF_NUM_INTRAOP_THREADS"] == pod["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert pods[0]["metadata"]["name"] != pods[1]["metadata"]["name"]


def test_trial_workers_prune_with_successive_halving_unless_the_form_says_otherwise(dag):
    # Successive halving keeps every trial in one bracket, so TPE learns from all of them (Hyperband's
    # brackets each start with their own random trials); docs/benchmarks.md has the measurement.
    args = render(dag, "tune", mapped=["--worker", "0"])[0]["spec"]["containers"][0]["args"]
    assert dict(zip(args[::2], args[1::2]))["--pruner"] == "successive_halving"
    args = render(dag, "tune", mapped=["--worker", "0"], search_pruner="hyperband")[0]["spec"]["containers"][0]["args"]
    assert dict(zip(args[::2], args[1::2]))["--pruner"] == "hyperband"


@pytest.mark.parametrize(("pruner", "factor", "passed"), [
    ("successive_halving", 3, "3"), ("successive_halving", 2, "2"), ("hyperband", 4, "4"), ("median", 2, "0"),
    ("none", 2, "0"),
], ids=["halving-default", "halving-2", "hyperband-4", "median-ignores-it", "none-ignores-it"])
def test_the_reduction_factor_reaches_the_study_setup_and_the_workers_of_halving_pruners_only(dag, pruner, factor,
                                                                                              passed):
    """The tune step refuses a reduction factor with a pruner that has none: the form's value stays behind."""
    for task_id, mapped in (("create_study", None), ("tune", ["--worker", "0"])):
        args = render(dag, task_id, mapped=mapped, search_pruner=pruner,
                      search_reduction_factor=factor)[0]["spec"]["containers"][0]["args"]
        assert dict(zip(args[::2], args[1::2]))["--reduction-factor"] == passed, task_id


def test_trial_workers_take_gpus_from_the_form_and_share_a_bounded_pool(dag):
    pod, task = render(dag, "tune", gpus=4, search_gpus=1)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert task.pool == "hyperparameter_search"
    assert task.execution_timeout is not None
    setup, _ = render(dag, "create_study", gpus=3)
    args = setup["spec"]["containers"][0]["args"]
    assert dict(zip(args[::2], args[1::2]))["--setup-only"] == "true"
    # train's GPUs: the setup refuses a space whose batch sizes would not split over them, before any trial
    assert dict(zip(args[::2], args[1::2]))["--train-gpus"] == "3"
    assert "nvidia.com/gpu" not in setup["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(("start_from", "given", "champion"), [
    ("champion", True, True), ("form", True, False), ("none", False, False)])
def test_the_study_is_set_up_to_start_from_the_champion_or_the_forms_hyperparameters(dag, start_from, given,
                                                                                      champion):
    form = {"learning_rate": 0.001, "batch_size": 64, "width": 48, "dropout": 0.1}
    setup, _ = render(dag, "create_study", search_start_from=start_from, model_name="fashion", **form)
    args = setup["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert json.loads(flags["--start-from"] or "null") == (form if given else None)
    assert flags["--start-from-champion"] == ("fashion" if champion else "")
    # the start point is queued once, by the setup: workers get no such flags
    worker = render(dag, "tune", mapped=["--worker", "0"], search_start_from=start_from)[0]
    assert not {"--start-from", "--start-from-champion"} & set(worker["spec"]["containers"][0]["args"])


def test_select_renders_when_no_task_before_the_search_left_a_result(dag):
    # select runs once the workers are done, even if prep failed (none_skipped): it must still render, so
    # that it can say the search never started, instead of failing on a missing XCom in its arguments.
    pod, _ = render(dag, "select", results={})
    args = pod["spec"]["containers"][0]["args"]
    assert dict(zip(args[::2], args[1::2])) == {"--data-root": "/data", "--run-key": f"mnist_training/{RUN_ID}"}


def test_a_single_trial_worker_gets_a_fifth_try_to_report_trials_that_kill_it(dag):
    # Each try whose trial kills the worker (out of memory) leaves one failed trial, counted once its retry died
    # too; the try that finds 3 stops cleanly so that select names the cause. With one worker that is the 5th.
    _, task = render(dag, "tune")
    assert task.retries == 4
    assert all(t.retries == 2 for t in dag.tasks if t.task_id not in ("tune", "approve")), \
        {t.task_id: t.retries for t in dag.tasks}
