"""Each step renders to the pod that would be sent to Kubernetes, and that pod passes the API schema.

No cluster exists here: ``build_pod_request_obj(dry_run=True)`` builds the V1Pod the operator would
create, after the same template rendering a real run does, and kubernetes-validate checks it against
the Kubernetes OpenAPI schema (strict: unknown fields are errors).
"""

from __future__ import annotations

import copy

import pytest
from dagsupport import DAGS, FakeTaskInstance

K8S_VERSION = "1.33"
RUN_ID = "manual__2026-11-26T02:00:00+00:00"
RESULTS = {  # what earlier steps would have pushed to XCom
    "prep": {"manifest": "/data/datasets/mnist/0123456789abcdef/manifest.json", "dataset": "mnist",
             "digest": "0123456789abcdef" * 4},
    "train": {"model_path": "/data/runs/x/model/model.keras", "model_uri": "models:/m-abc"},
    "evaluate": {"metrics": {"test_accuracy": 0.99}},
}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["mnist_training"]


def render(dag, task_id: str, **params):
    """Render one task's templates with the trigger-form params and return its (dry-run) pod as a dict."""
    from kubernetes.client import ApiClient

    task = copy.deepcopy(dag.get_task(task_id))  # rendering replaces templates in place
    resolved = {**dag.params.validate(), **params}
    context = {"params": resolved, "dag": dag, "run_id": RUN_ID, "ti": FakeTaskInstance(task_id, RESULTS), "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod), task


@pytest.fixture(scope="module")
def rendered(dag):
    return {task.task_id: render(dag, task.task_id)[0] for task in dag.tasks}


@pytest.mark.parametrize("task_id", ["prep", "validate", "train", "evaluate", "register"])
def test_pod_validates_against_kubernetes_schema(rendered, task_id):
    import kubernetes_validate

    kubernetes_validate.validate(rendered[task_id], desired_version=K8S_VERSION, strict=True)


@pytest.mark.parametrize("task_id", ["prep", "validate", "train", "evaluate", "register"])
def test_pod_runs_the_step_cli_hardened_with_shared_volume_and_mlflow_secret(rendered, task_id):
    pod = rendered[task_id]
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["image"] == "ghcr.io/mlops-mnist/steps:0.1.0"
    assert container["command"] == ["python", "-m", f"mlsteps.{task_id}"]
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "mlops-data"}} in spec["volumes"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["serviceAccountName"] == "mlops-steps"
    assert pod["metadata"]["namespace"] == "mlops"
    # The XCom sidecar reads the step's result file.
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in container["volumeMounts"]


def test_step_arguments_carry_params_and_earlier_results(rendered):
    args = rendered["train"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--manifest"] == RESULTS["prep"]["manifest"]
    assert flags["--run-key"] == f"mnist_training/{RUN_ID}"
    assert flags["--data-root"] == "/data"
    assert (flags["--epochs"], flags["--batch-size"], flags["--width"]) == ("5", "128", "32")
    register = rendered["register"]["spec"]["containers"][0]["args"]
    flags = dict(zip(register[::2], register[1::2]))
    assert flags["--model-uri"] == "models:/m-abc"
    assert flags["--metrics"] == '{"test_accuracy": 0.99}'
    assert flags["--dataset-digest"] == RESULTS["prep"]["digest"]


def test_training_pod_requests_the_gpus_and_node_pool_from_the_trigger_form(dag):
    pod, task = render(dag, "train", gpus=2, node_selector={"cloud.google.com/gke-nodepool": "a100"})
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "a100"}
    assert pod["spec"]["activeDeadlineSeconds"] == int(task.execution_timeout.total_seconds())
    assert task.deferrable and task.logging_interval and task.do_xcom_push
    assert task.on_finish_action.value == "delete_succeeded_pod"


def test_cpu_only_training_and_other_steps_request_no_gpu(dag, rendered):
    pod, _ = render(dag, "train", gpus=0)
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert not pod["spec"].get("tolerations")
    assert "nvidia.com/gpu" not in rendered["prep"]["spec"]["containers"][0]["resources"]["limits"]


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
