"""The steps image, built from images/steps/Dockerfile, runs the pod that the DAG renders.

Podman stands in for the cluster's container runtime: `podman kube play` runs the very Pod manifest
that KubernetesPodOperator would submit for the prep task (security context, shared PVC, XCom
sidecar), and the result is read back the way the operator reads it, from the sidecar's
/airflow/xcom/return.json. Marked slow (the image build downloads TensorFlow); needs podman and a local
base image (docs/operations.md, "Containers without Docker"); skipped where either is missing.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "dags"))

import idxdata  # noqa: E402
from podmanlib import PYTHON_BASE, build, create_secret, play_step_pod, podman  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE = "localhost/mlops-steps:test"
VOLUME = "mlops-data-test"


@pytest.fixture(scope="module")
def steps_image(python_base: str) -> str:
    return build("images/steps/Dockerfile", IMAGE)


def test_image_runs_steps_as_non_root_user(steps_image):
    out = podman("run", "--rm", steps_image, "sh", "-c", "id -u && python -m mlsteps.train --help")
    uid, _, usage = out.stdout.partition("\n")
    assert uid.strip() == "10001"
    assert "--run-key" in usage and "--learning-rate" in usage


def _render_prep_pod(source_dir: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The prep task's pod exactly as the operator would build it, for this image."""
    for name, value in {"MLOPS_STEPS_IMAGE": IMAGE, "MLOPS_IMAGE_PULL_POLICY": "Never",
                        "MLOPS_RUNTIME": "kubernetes", "MLOPS_DATA_PVC": VOLUME}.items():
        monkeypatch.setenv(name, value)
    import dagsupport  # noqa: F401  (isolated AIRFLOW_HOME, plugins on sys.path)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient
    from dagsupport import FakeTaskInstance

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["mnist_training"]
    task = copy.deepcopy(dag.get_task("prep"))
    params = {**dag.params.validate(), "dataset": "custom", "source_dir": source_dir}
    context = {"params": params, "dag": dag, "run_id": "manual__test", "ti": FakeTaskInstance("prep"), "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    monkeypatch.setattr(KubernetesHook, "get_xcom_sidecar_container_image", lambda self: PYTHON_BASE)
    pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
    pod["metadata"]["name"] = "mlops-prep-test"
    return pod


def test_rendered_prep_pod_runs_in_podman_and_returns_xcom(steps_image, tmp_path, monkeypatch):
    podman("volume", "rm", "-f", VOLUME, check=False)
    podman("volume", "create", VOLUME)
    mountpoint = Path(podman("volume", "inspect", VOLUME, "--format", "{{.Mountpoint}}").stdout.strip())
    idxdata.write_dataset(mountpoint / "source", train=200, test=50)
    os.chown(mountpoint, 10001, 10001)  # the PVC is writable by the pod's fsGroup in a cluster
    pod = _render_prep_pod("/data/source", monkeypatch)
    secret_name = pod["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"]
    create_secret(secret_name, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, tmp_path)  # prep needs no MLflow
    manifest = tmp_path / "pod.json"
    try:
        result = play_step_pod(pod, manifest)
        assert result["dataset"] == "custom"
        assert result["counts"] == {"train": 180, "val": 20, "test": 50}
        prepared = mountpoint / Path(result["manifest"]).relative_to("/data")
        assert (prepared.parent / "_COMPLETE").is_file()
        assert prepared.parent.stat().st_uid == 10001  # written by the pod's non-root user
    finally:
        podman("kube", "down", str(manifest), check=False)
        podman("volume", "rm", "-f", VOLUME, check=False)
        podman("secret", "rm", secret_name, check=False)
