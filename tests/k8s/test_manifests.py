"""Every kustomize folder under k8s/ validates against the Kubernetes schema and lists all its manifests.

No cluster here: kubernetes-validate checks each object against the Kubernetes 1.33 OpenAPI schema
(strict: unknown fields are errors). What each folder's objects must say is tested beside it
(test_serving_manifests.py, test_step_manifests.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
K8S_VERSION = "1.33"
FOLDERS = sorted(p.parent for p in K8S.glob("*/kustomization.yaml"))
MANIFESTS = [(folder, path, index, doc) for folder in FOLDERS for path in sorted(folder.glob("*.yaml"))
             if path.name != "kustomization.yaml" for index, doc in enumerate(yaml.safe_load_all(path.read_text()))]


def test_both_folders_are_found():
    assert {f.name for f in FOLDERS} >= {"serving", "steps"}


@pytest.mark.parametrize(("folder", "path", "index", "doc"), MANIFESTS,
                         ids=[f"{f.name}/{p.name}#{i}" for f, p, i, _ in MANIFESTS])
def test_manifest_validates_against_the_kubernetes_schema(folder, path, index, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, desired_version=K8S_VERSION, strict=True)


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_kustomization_lists_every_manifest(folder):
    listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
