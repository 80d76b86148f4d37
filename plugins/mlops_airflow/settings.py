"""Deployment settings, read once from environment variables (never from Airflow Variables at parse time).

Every name here is documented in the README's configuration table.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# A registered model name the whole pipeline can carry: MLflow refuses '/' and ':', and the model server puts
# the name in its URLs. The same rule as mlsteps.register.MODEL_NAME. (?!\n): Python's re.search, which
# jsonschema uses, lets $ match before a final newline ("name\n"); the form's JavaScript does not.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(?!\n)$"
# Kubernetes label syntax (node selectors): an optional DNS-subdomain prefix and "/", then a name of 1-63
# characters, alphanumeric at both ends; a value is empty or such a name. The API server refuses others.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = (r"^(?=[^/]{1,253}/|[^/]*$)([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     + _LABEL_NAME + r"(?!\n)$")
LABEL_VALUE_PATTERN = r"^(" + _LABEL_NAME + r")?(?!\n)$"
RUNTIMES = ("kubernetes", "local")
DATASETS = ("mnist", "fashion_mnist", "custom")  # mlsteps.datasets.DATASET_NAMES (a test holds them equal)
DEPLOY_TARGETS = ("kubernetes", "local")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    runtime: str  # "kubernetes" (production) or "local" (subprocesses on this machine)
    namespace: str  # Kubernetes namespace of the step pods
    steps_image: str  # image holding the mlsteps package and TensorFlow
    image_pull_policy: str  # IfNotPresent in production; Never for images built on the node
    data_pvc: str  # PersistentVolumeClaim shared by all step pods (datasets, checkpoints, reports)
    data_root: str  # where that volume is mounted in pods, or the folder used by the local runtime
    mlflow_secret: str  # Secret with MLFLOW_TRACKING_URI (+ _USERNAME/_PASSWORD) for the pods
    service_account: str  # service account of the step pods
    steps_python: str  # interpreter of the steps environment (local runtime)
    tracking_uri: str  # MLflow tracking URI handed to local steps
    optuna_secret: str  # optional Secret with OPTUNA_STORAGE (the search's SQL URL) for the pods
    optuna_storage: str  # OPTUNA_STORAGE handed to local steps; empty: SQLite under the data root
    search_pool: str  # Airflow pool bounding how many trial workers run at once
    mlflow_ui_url: str  # MLflow as reviewers reach it in a browser (links on the approval card)
    deploy_target: str  # where promotion deploys: "kubernetes" (a Deployment) or "local" (a supervised process)
    serving_url: str  # the model server as clients reach it (promotion's smoke test calls it)
    serving_image: str  # image of the model server (its Deployment, and the infra-validation pod)
    serving_deployment: str  # Deployment of the model server (kubernetes target)
    serving_admin_token_file: str  # bearer token of the local server's /admin/deploy (local target)
    kubernetes_conn_id: str  # Airflow connection the kubernetes target patches the Deployment through
    pod_start_timeout: int  # seconds a step pod may wait to be scheduled, then as long again to start
    default_dataset: str  # the trigger form's default dataset: what scheduled (nightly) runs train on
    default_source_dir: str  # the form's default source_dir (a custom dataset's IDX folder) for those runs
    model_name: str  # the registered model this deployment trains and serves: both DAGs' default model_name


def load() -> Settings:
    runtime = os.environ.get("MLOPS_RUNTIME", "kubernetes").strip().lower()
    if runtime not in RUNTIMES:
        raise ValueError(f"MLOPS_RUNTIME={runtime!r} is not one of {', '.join(RUNTIMES)}")
    default_python = PROJECT_ROOT / ".venvs" / "steps" / "bin" / "python"
    target = os.environ.get("MLOPS_DEPLOY_TARGET", runtime).strip().lower()
    if target not in DEPLOY_TARGETS:
        raise ValueError(f"MLOPS_DEPLOY_TARGET={target!r} is not one of {', '.join(DEPLOY_TARGETS)}")
    namespace = os.environ.get("MLOPS_NAMESPACE", "mlops")
    var = Path(os.environ.get("MLOPS_VAR") or PROJECT_ROOT / "var")  # where scripts/serving.sh keeps its state
    start_timeout = os.environ.get("MLOPS_POD_START_TIMEOUT", "1800")
    if not start_timeout.strip().isdigit() or int(start_timeout) < 1:
        raise ValueError(f"MLOPS_POD_START_TIMEOUT={start_timeout!r}: give a whole number of seconds (at least 1)")
    dataset = os.environ.get("MLOPS_DEFAULT_DATASET", "mnist").strip()
    if dataset not in DATASETS:
        raise ValueError(f"MLOPS_DEFAULT_DATASET={dataset!r} is not one of {', '.join(DATASETS)}")
    source_dir = os.environ.get("MLOPS_DEFAULT_SOURCE_DIR", "").strip()
    if dataset == "custom" and not source_dir:
        raise ValueError("MLOPS_DEFAULT_DATASET=custom needs MLOPS_DEFAULT_SOURCE_DIR, the folder of its four IDX "
                         "files (as the step pods or local steps see it)")
    model_name = os.environ.get("MLOPS_MODEL_NAME", "mnist_classifier").strip()
    if not re.search(MODEL_NAME_PATTERN, model_name) or len(model_name) > 200:
        raise ValueError(f"MLOPS_MODEL_NAME={model_name!r} is not a registered model name the model server can "
                         "serve: letters, digits, _ . - (at most 200, starting with a letter or digit)")
    return Settings(
        model_name=model_name,
        default_dataset=dataset,
        default_source_dir=source_dir,
        runtime=runtime,
        namespace=namespace,
        steps_image=os.environ.get("MLOPS_STEPS_IMAGE", "ghcr.io/mlops-mnist/steps:0.1.0"),
        image_pull_policy=os.environ.get("MLOPS_IMAGE_PULL_POLICY", "IfNotPresent"),
        data_pvc=os.environ.get("MLOPS_DATA_PVC", "mlops-data"),
        data_root=os.environ.get("MLOPS_DATA_ROOT",
                                 "/data" if runtime == "kubernetes" else str(PROJECT_ROOT / "var" / "data")),
        mlflow_secret=os.environ.get("MLOPS_MLFLOW_SECRET", "mlflow-credentials"),
        service_account=os.environ.get("MLOPS_SERVICE_ACCOUNT", "mlops-steps"),
        steps_python=os.environ.get("MLOPS_STEPS_PYTHON",
                                    str(default_python) if default_python.exists() else sys.executable),
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
        optuna_secret=os.environ.get("MLOPS_OPTUNA_SECRET", "optuna-storage"),
        optuna_storage=os.environ.get("MLOPS_OPTUNA_STORAGE", ""),
        search_pool=os.environ.get("MLOPS_SEARCH_POOL", "hyperparameter_search"),
        mlflow_ui_url=os.environ.get("MLOPS_MLFLOW_UI_URL", os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")),
        deploy_target=target,
        serving_url=os.environ.get("MLOPS_SERVING_URL", f"http://model-server.{namespace}.svc:8501"
                                   if target == "kubernetes" else "http://127.0.0.1:8501"),
        serving_image=os.environ.get("MLOPS_SERVING_IMAGE", "ghcr.io/mlops-mnist/serving:0.1.0"),
        serving_deployment=os.environ.get("MLOPS_SERVING_DEPLOYMENT", "model-server"),
        serving_admin_token_file=os.environ.get("MLOPS_SERVING_ADMIN_TOKEN_FILE",
                                                str(var / "serving" / "admin-token")),
        kubernetes_conn_id=os.environ.get("MLOPS_KUBERNETES_CONN_ID", "kubernetes_default"),
        pod_start_timeout=int(start_timeout),
    )
