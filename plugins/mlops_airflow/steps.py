"""The step -> operator factory: a step is declared once and rendered for the configured runtime.

    prep = step("prep", args={"dataset": "{{ params.dataset }}"}, timeout=timedelta(minutes=30))

renders a KubernetesPodOperator (runtime ``kubernetes``) or a local subprocess (runtime ``local``)
running ``python -m mlsteps.prep --dataset ... --result-path <xcom file>``. Either way the step's
result JSON becomes the task's XCom.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mlops_airflow import settings as settings_mod

STEPS_PACKAGE = "mlsteps"


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"  # CPU request (Kubernetes quantity)
    memory: str = "2Gi"  # memory request and limit
    cpu_limit: str | None = None  # CPU limit; defaults to the request


def xcom(task_id: str, key: str) -> str:
    """A Jinja expression for one field of an earlier step's result."""
    return f"{{{{ ti.xcom_pull(task_ids='{task_id}')['{key}'] }}}}"


RUN_KEY = "{{ dag.dag_id }}/{{ run_id }}"


def to_arguments(args: dict[str, Any]) -> list[str]:
    """{"batch_size": 64} -> ["--batch-size", "64"]; values may be Jinja templates."""
    out: list[str] = []
    for name, value in args.items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def step(name: str, *, args: dict[str, Any], timeout: timedelta, resources: Resources = Resources(),
         gpus: str | int = 0, node_selector_json: str = "", task_id: str | None = None,
         settings: settings_mod.Settings | None = None, expand_over: Any = None,
         optional_secrets: tuple[str, ...] = (), image: str | None = None, data_volume: bool = True,
         read_only_root: bool = False, **operator_kwargs: Any) -> Any:
    """Render step ``name`` (module ``mlsteps.<name>``) as an operator of the configured runtime.

    ``expand_over``: an upstream task's output, a list of argument lists; the step becomes a mapped task
    with one instance per list, each appending its list to ``args`` (e.g. ``[["--worker", "0"], ...]``).
    ``optional_secrets``: Kubernetes Secrets passed to the pod as environment variables if they exist.
    ``image``: the pod's image, if not the steps image (e.g. the model server's, for infra-validation).
    ``data_volume``: mount the shared data volume (False for a step that reads only MLflow: a ReadWriteOnce
    volume would tie its pod to one node). ``read_only_root``: the pod's root filesystem read-only, HOME and
    /tmp an emptyDir (as the model server's Deployment; Kubernetes runtime only).
    """
    settings = settings or settings_mod.load()
    module = f"{STEPS_PACKAGE}.{name}"
    task_id = task_id or name
    arguments = to_arguments(args)
    if settings.runtime == "kubernetes":
        from mlops_airflow import pods

        cls: Any = pods.StepPodOperator
        kwargs = pods.operator_kwargs(
            task_id=task_id, module=module, arguments=arguments, resources=resources, gpus=gpus,
            node_selector_json=node_selector_json, settings=settings, execution_timeout=timeout,
            optional_secrets=optional_secrets, image=image, data_volume=data_volume, read_only_root=read_only_root,
            # The pod's own limit as well (from its start): the operator deletes a pod still running when the
            # task times out, and this ends it even where that deletion could not happen.
            deadline_seconds=int(timeout.total_seconds()), **operator_kwargs)
    else:
        from mlops_airflow.local import LocalStepOperator

        cls = LocalStepOperator
        # TensorFlow takes almost all of every visible GPU's memory at start: local steps that run at once (the
        # search's workers, a compress beside a search) would leave each other none, where growing as needed
        # they share. A value set in the environment stays.
        env = {"MLFLOW_TRACKING_URI": settings.tracking_uri,
               "TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "true")}
        if settings.optuna_storage:
            env["OPTUNA_STORAGE"] = settings.optuna_storage
        kwargs = dict(task_id=task_id, module=module, arguments=arguments, python=settings.steps_python, env=env,
                      execution_timeout=timeout, **operator_kwargs)
    if expand_over is None:
        return cls(**kwargs)
    return cls.partial(**kwargs).expand(extra_arguments=expand_over)
