"""The serving manifests in k8s/serving fit together and say what promotion relies on.

Their validation against the Kubernetes schema: test_manifests.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FOLDER = Path(__file__).resolve().parents[2] / "k8s" / "serving"


def _objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            objects[doc["kind"]] = doc
    return objects


OBJECTS = _objects()


def test_rollout_never_drops_ready_capacity_and_readiness_means_model_loaded():
    deployment = OBJECTS["Deployment"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Neither restarts a server that is up but unready (waiting out MLflow, or holding a failed load).
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"  # never waits for MLflow
    # Leaving pods answer until endpoints forget them, well within the grace period.
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert int(container["lifecycle"]["preStop"]["exec"]["command"][1]) < \
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] / 2
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODEL_URI"].startswith("models:/") and "$(MODEL_URI)" in container["args"]


def test_service_and_disruption_budget_select_the_server_pods():
    labels = OBJECTS["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, pdb = OBJECTS["Service"], OBJECTS["PodDisruptionBudget"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # unready pods never block a drain
    port = OBJECTS["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_server_pod_is_hardened_and_uses_its_own_service_account():
    spec = OBJECTS["Deployment"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["serviceAccountName"] == OBJECTS["ServiceAccount"]["metadata"]["name"]
    assert container["image"].startswith("ghcr.io/mlops-mnist/serving:")


def test_promotion_may_read_and_patch_only_the_model_server():
    import sys

    sys.path.insert(0, str(FOLDER.parents[1] / "plugins"))
    from mlops_airflow.settings import load

    role, binding = OBJECTS["Role"], OBJECTS["RoleBinding"]
    (rule,) = role["rules"]
    assert rule["resourceNames"] == [OBJECTS["Deployment"]["metadata"]["name"]] == [load().serving_deployment]
    assert set(rule["verbs"]) == {"get", "patch"} and set(rule["resources"]) == {"deployments", "deployments/status"}
    assert rule["apiGroups"] == ["apps"]  # deployments are in apps: "" (core) would grant nothing
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_the_kustomization_image_override_names_the_deployments_image():
    import sys

    sys.path.insert(0, str(FOLDER.parents[1] / "plugins"))
    from mlops_airflow.settings import load

    (override,) = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())["images"]
    image = OBJECTS["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.rsplit(":", 1)[0] == override["name"]  # else kustomize would leave the image alone
    assert f"{override['newName']}:{override['newTag']}" == load().serving_image  # infra-validation runs the same
