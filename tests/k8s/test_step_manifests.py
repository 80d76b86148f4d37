"""k8s/steps (the step pods' service account, data volume and the RBAC Airflow runs them with) grants what
the KubernetesPodOperator really calls (schema validation: test_manifests.py).

No cluster here: the calls are read from the installed provider's source, so an upgrade that starts
calling something new fails this test instead of every step on a real cluster.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "k8s" / "steps"
# Kubernetes client method -> RBAC verb; exec and attach stream over a websocket that needs both verbs.
VERBS = {"create": ["create"], "read": ["get"], "list": ["list"], "patch": ["patch"], "delete": ["delete"],
         "replace": ["update"], "connect_get": ["create", "get"], "connect_post": ["create"]}
RESOURCES = {"pod": "pods", "pod_log": "pods/log", "pod_exec": "pods/exec", "pod_attach": "pods/attach",
             "event": "events"}


def _objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects |= {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}
    return objects


OBJECTS = _objects()


def _provider_calls() -> set[tuple[str, str]]:
    """(resource, verb) of every pod-related API call in the provider's pod operator, manager, trigger, hook."""
    import airflow.providers.cncf.kubernetes as provider

    base = Path(provider.__file__).parent
    pattern = re.compile(r"\b(connect_get|connect_post|create|read|list|patch|delete|replace)_namespaced_"
                         r"(pod_log|pod_exec|pod_attach|pod|event)\b")
    watched = re.compile(r"stream\(\s*[\w.]*list_namespaced_(pod|event)\b")  # a watch of that list
    calls = set()
    for name in ("operators/pod.py", "utils/pod_manager.py", "triggers/pod.py", "hooks/kubernetes.py"):
        source = (base / name).read_text()
        for method, resource in pattern.findall(source):
            calls |= {(RESOURCES[resource], verb) for verb in VERBS[method]}
        calls |= {(RESOURCES[resource], "watch") for resource in watched.findall(source)}
    return calls


def test_the_role_grants_every_pod_call_the_operator_makes():
    calls = _provider_calls()
    assert {("pods", "create"), ("pods/exec", "create"), ("events", "watch")} <= calls  # the scan found them
    # Only rules of the core API group ("") grant pods, pods/log, pods/exec and events.
    granted = {(resource, verb) for rule in OBJECTS["Role"]["rules"] if rule["apiGroups"] == [""]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert calls - granted == set()


def test_the_role_is_bound_to_the_workers_and_the_triggerer():
    binding = OBJECTS["RoleBinding"]
    assert binding["roleRef"]["name"] == OBJECTS["Role"]["metadata"]["name"]
    names = {subject["name"] for subject in binding["subjects"]}
    assert any("worker" in n for n in names) and any("triggerer" in n for n in names)  # deferred pods too


def test_names_match_the_settings_defaults_the_pods_are_rendered_with():
    sys.path.insert(0, str(ROOT / "plugins"))
    from mlops_airflow.settings import load

    settings = load()
    assert OBJECTS["ServiceAccount"]["metadata"]["name"] == settings.service_account
    assert OBJECTS["PersistentVolumeClaim"]["metadata"]["name"] == settings.data_pvc
    assert OBJECTS["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    namespaces = {obj["metadata"]["namespace"] for obj in OBJECTS.values()}
    assert namespaces == {settings.namespace}
