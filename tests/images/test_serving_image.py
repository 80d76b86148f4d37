"""The serving image, built from images/serving/Dockerfile, runs the model-server Deployment of k8s/serving.

`podman kube play` runs the Deployment as written (non-root user, read-only root filesystem with an emptyDir
/tmp, MLFLOW_* from the mlflow-credentials Secret, MODEL_URI substituted into the arguments), against a real
MLflow server holding a registered int8 .tflite, as compress registers it. Then real HTTP: readiness, a
prediction, the metrics. Marked slow (the build installs LiteRT and MLflow); needs podman and a local base
image (docs/operations.md, "Containers without Docker"); skipped where either is missing.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from podmanlib import build, create_secret, play_step_pod, podman  # noqa: E402
from services import STEPS_PYTHON, MlflowServer, free_port  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE = "localhost/mlops-serving:test"
MODEL = "image_test_classifier"
PORT = 8501  # the image's entrypoint; with the host's network the server binds it on the host


@pytest.fixture(scope="module")
def serving_image(python_base: str) -> str:
    return build("images/serving/Dockerfile", IMAGE)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_var"), free_port())
    assert server.script("start") == server.url
    try:
        out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "tests" / "integration" / "register_versions.py"),
                              MODEL, "good"], env={**server.env, "MLFLOW_TRACKING_URI": server.url},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        [version] = json.loads(out.stdout.strip().splitlines()[-1])
        server.post("registered-models/alias", {"name": MODEL, "alias": "champion", "version": str(version)})
        yield server, version
    finally:
        server.script("stop")


def _get(path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _deployment() -> dict:
    """k8s/serving's Deployment for this image and model: one replica, the image built here, never pulled."""
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "serving" / "deployment.yaml").read_text()))
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    deployment["metadata"].pop("namespace", None)
    deployment["spec"]["replicas"] = 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container.update(image=IMAGE, imagePullPolicy="Never")
    # MLflow listens on the host's loopback here (a Service in the cluster): share the host's network, where
    # podman 4.3 refuses port mappings (Kubernetes ignores them there); the probes then name the port by number.
    deployment["spec"]["template"]["spec"]["hostNetwork"] = True
    ports = {p["name"]: p["containerPort"] for p in container.pop("ports")}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = ports[container[probe]["httpGet"]["port"]]
    env = {e["name"]: e for e in container["env"]}
    env["MODEL_NAME"]["value"] = MODEL
    env["MODEL_URI"]["value"] = f"models:/{MODEL}@champion"
    # The kubelet expands $(VAR) in args from the container's env; podman 4.3 passes it on as is.
    container["args"] = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]]["value"] if m[1] in env else m[0], arg)
                         for arg in container["args"]]
    return deployment


def test_the_serving_deployment_runs_the_image_and_serves_the_champion(serving_image, registry, tmp_path):
    server, version = registry
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is taken (a model server from `make serving-start`?): stop it and rerun")
    deployment = _deployment()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret_name = container["envFrom"][0]["secretRef"]["name"]
    create_secret(secret_name, {"MLFLOW_TRACKING_URI": server.url}, tmp_path)
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    try:
        podman("kube", "play", str(manifest), timeout=300)
        # podman names a Deployment's container <deployment>-pod-<replica>-<container> (4.3) or without the replica
        names = podman("ps", "--format", "{{.Names}}").stdout.split()
        [main] = [n for n in names if n.startswith(deployment["metadata"]["name"] + "-pod")
                  and n.endswith("-" + container["name"])]
        deadline = time.monotonic() + 300
        while (status := _get_or_none("/v2/health/ready")) != 200:
            state = podman("inspect", main, "--format", "{{.State.Status}}", check=False).stdout.strip()
            logs = podman("logs", main, check=False)
            assert state == "running", f"server container {state}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"never ready ({status}):\n{logs.stderr[-3000:]}"
            time.sleep(2)
        # The Deployment's user, and its read-only root filesystem: not even the user's own home is writable
        # (only the emptyDir /tmp, where MLflow downloaded the version).
        assert podman("exec", main, "id", "-u").stdout.strip() == str(
            deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
        assert podman("exec", main, "sh", "-c", "touch /home/serving/x", check=False).returncode != 0
        assert podman("exec", main, "sh", "-c", "touch /tmp/x", check=False).returncode == 0
        status, body = _get(f"/v2/models/{MODEL}")
        assert status == 200, body
        assert json.loads(body)["versions"] == [str(version)]
        image = [[float((r * 28 + c) % 256) for c in range(28)] for r in range(28)]
        request = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/models/{MODEL}:predict",
                                         data=json.dumps({"instances": [image, image]}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 2 and len(predictions[0]) == 10
        assert abs(sum(predictions[0]) - 1) < 1e-3
        status, metrics = _get("/metrics")
        assert status == 200 and b"# TYPE" in metrics
    finally:
        podman("kube", "down", str(manifest), check=False)
        podman("secret", "rm", secret_name, check=False)


def _get_or_none(path: str) -> int | None:
    try:
        return _get(path)[0]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _render_infra_validate_pod(version: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """model_promotion's infra_validate task's pod exactly as the operator would build it, for this image."""
    for name, value in {"MLOPS_SERVING_IMAGE": IMAGE, "MLOPS_IMAGE_PULL_POLICY": "Never",
                        "MLOPS_RUNTIME": "kubernetes"}.items():
        monkeypatch.setenv(name, value)
    sys.path.insert(0, str(ROOT / "tests" / "dags"))
    import dagsupport  # noqa: F401  (isolated AIRFLOW_HOME, plugins on sys.path)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from dagsupport import FakeTaskInstance
    from kubernetes.client import ApiClient
    from podmanlib import PYTHON_BASE

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["model_promotion"]
    task = copy.deepcopy(dag.get_task("infra_validate"))
    results = {"plan": {"model_name": MODEL, "version": str(version)}}
    context = {"params": {**dag.params.validate(), "model_name": MODEL, "validation_requests": 12}, "dag": dag,
               "run_id": "manual__test", "ti": FakeTaskInstance("infra_validate", results), "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    monkeypatch.setattr(KubernetesHook, "get_xcom_sidecar_container_image", lambda self: PYTHON_BASE)
    pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
    pod["metadata"]["name"] = "mlops-infra-validate-test"
    pod["spec"]["hostNetwork"] = True  # MLflow listens on the host's loopback here (a Service in the cluster)
    return pod


def test_the_rendered_infra_validation_pod_passes_the_champion_under_the_deployments_restrictions(
        serving_image, registry, tmp_path, monkeypatch):
    server, version = registry
    pod = _render_infra_validate_pod(version, monkeypatch)
    main = pod["spec"]["containers"][0]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True  # as k8s/serving runs the server
    secret_name = main["envFrom"][0]["secretRef"]["name"]
    create_secret(secret_name, {"MLFLOW_TRACKING_URI": server.url}, tmp_path)
    manifest = tmp_path / "pod.json"
    try:
        result = play_step_pod(pod, manifest)
        assert result["passed"] is True and result["version"] == version and result["requests"] == 12
        tags = server.get("model-versions/get", name=MODEL, version=str(version))["model_version"]["tags"]
        verdict = {t["key"]: t["value"] for t in tags}["promotion.infra_validation"]
        assert verdict.startswith("passed: 12 requests")
    finally:
        podman("kube", "down", str(manifest), check=False)
        podman("secret", "rm", secret_name, check=False)
