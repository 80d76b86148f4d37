"""The Kubernetes runtime: one KubernetesPodOperator per step, hardened and wired to the shared volume.

Imported by ``steps.step`` only when the runtime is ``kubernetes``; the DAG files import the provider's pod
module at top level all the same (whatever the runtime), so that the DAG processor pre-imports its ~0.7 s
once before forking its parsers instead of paying it per parse.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.common.compat.sdk import AirflowSkipException
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import models as k8s

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_airflow.settings import Settings
    from mlops_airflow.steps import Resources

GPU_RESOURCE = "nvidia.com/gpu"
EXPECTED_GPUS_ENV = "MLSTEPS_EXPECTED_GPUS"  # mlsteps.core.require_gpus reads it
RUN_AS_USER = 10001  # the non-root user of images/steps/Dockerfile
SIDECAR_LIMITS = {"cpu": "50m", "memory": "32Mi"}  # a shell sleeping until the result is read
USER_ERROR = 2  # exit code of mlsteps.core.cli for a StepError (bad input, failed validation)
# TensorFlow reads these for its thread pools; unset, it sizes them by the node's cores, not the pod's limit.
TF_THREAD_ENVS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def cpu_threads(quantity: str) -> int:
    """Whole CPUs a Kubernetes CPU quantity allows, at least 1: "500m" -> 1, "4" -> 4, "1.5" -> 1."""
    from kubernetes.utils import parse_quantity

    return max(1, math.floor(parse_quantity(quantity)))


def exit_code(pod: k8s.V1Pod | None, container: str) -> int | None:
    """Exit code of a finished container of a pod, if the pod status has it."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return terminated.exit_code if terminated is not None else None


class StepPodOperator(KubernetesPodOperator):
    """KubernetesPodOperator whose GPU count and node selector come from (templated) trigger-form params."""

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "gpus", "node_selector_json")

    def __init__(self, *, gpus: str | int = 0, node_selector_json: str = "", extra_arguments: list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gpus = gpus
        self.node_selector_json = node_selector_json
        # Appended to the rendered arguments; what a mapped task expands over (e.g. ["--worker", "1"]).
        self.extra_arguments = [str(a) for a in extra_arguments or []]

    def process_pod_deletion(self, pod: k8s.V1Pod, *, reraise: bool = True) -> bool:
        """As the provider's (succeeded pods go, failed ones stay for ``kubectl logs``), but a pod whose step
        has not finished is deleted too.

        That is a pod the task gave up on: still Pending at the startup timeout (no GPU node came), or still
        running at ``execution_timeout``. Left there, it would run on beside the retry's pod (a retry never
        reattaches to a pod its predecessor checked), holding a GPU and writing the same run folder.
        """
        if pod is not None and pod.status is not None and pod.status.phase in ("Pending", "Running") \
                and exit_code(pod, self.base_container_name) is None:
            self.log.info("Deleting pod %s: its step never finished (phase %s)", pod.metadata.name, pod.status.phase)
            try:
                self.pod_manager.delete_pod(pod)
            except Exception:  # as the provider's: with reraise=False nothing may hide the task's own failure
                if reraise:
                    raise
                self.log.exception("Could not delete pod %s; delete it by hand", pod.metadata.name)
                return False
            return True
        return super().process_pod_deletion(pod, reraise=reraise)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> Any:
        """As the provider's, but a step that rejected its input fails the task without retries."""
        try:
            return super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowSkipException:
            raise
        except Exception as exc:
            if exit_code(remote_pod, self.base_container_name) == USER_ERROR:
                raise AirflowFailException(f"{self.task_id}: the step rejected its input "
                                           f"(exit code {USER_ERROR}), retrying cannot help:\n{exc}") from exc
            raise

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        container = pod.spec.containers[0]
        if self.extra_arguments:
            container.args = [*(container.args or []), *self.extra_arguments]
        text = str(self.gpus or 0).strip()
        try:
            number = float(text)  # "1.0" too: a JSON client's 1.0 passes the form's integer schema
        except ValueError:
            number = -1.0
        if not (number >= 0 and number.is_integer()):
            raise AirflowFailException(f"{self.task_id}: gpus must be a whole number >= 0, got {text!r}")
        gpus = int(number)
        selector_given = bool(self.node_selector_json.strip()) and self.node_selector_json.strip() != "{}"
        if gpus or selector_given:
            # GPU node pools are tainted nvidia.com/gpu (GKE, the NVIDIA operator): a pod the node_selector pins
            # there must tolerate it even without GPUs (a CPU search on the training pool), or it never schedules.
            # A toleration only permits: on other nodes it changes nothing.
            pod.spec.tolerations = [*(pod.spec.tolerations or []),
                                    k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
        if gpus:
            resources = container.resources or k8s.V1ResourceRequirements()
            resources.limits = {**(resources.limits or {}), GPU_RESOURCE: str(gpus)}
            resources.requests = {**(resources.requests or {}), GPU_RESOURCE: str(gpus)}
            container.resources = resources
            # The step refuses to run on the CPU when TensorFlow does not see what the pod was given.
            container.env = [*(container.env or []), k8s.V1EnvVar(name=EXPECTED_GPUS_ENV, value=str(gpus))]
        if self.node_selector_json.strip():
            selector = json.loads(self.node_selector_json)
            if not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
                raise AirflowFailException(f"{self.task_id}: node_selector must be a JSON object of strings, "
                                           f"got {self.node_selector_json!r}")  # a retry would not change it
            pod.spec.node_selector = {**(pod.spec.node_selector or {}), **selector}
        for sidecar in pod.spec.containers[1:]:
            # The provider's XCom sidecar requests resources but sets no limits: a namespace whose
            # ResourceQuota or LimitRange demands them would refuse the whole pod.
            resources = sidecar.resources or k8s.V1ResourceRequirements()
            if isinstance(resources, dict):  # as the connection's xcom_sidecar_container_resources extra gives it
                resources = k8s.V1ResourceRequirements(**resources)
            if not resources.limits:
                resources.limits = dict(SIDECAR_LIMITS)
            sidecar.resources = resources
        return pod


def operator_kwargs(*, task_id: str, module: str, arguments: list[str], resources: Resources, gpus: str | int,
                    node_selector_json: str, deadline_seconds: int, settings: Settings,
                    optional_secrets: tuple[str, ...] = (), image: str | None = None, data_volume: bool = True,
                    read_only_root: bool = False, **kwargs: Any) -> dict[str, Any]:
    """One step as a pod: image, command, resources, shared volume, MLflow secret, hardening.

    Returns StepPodOperator's keyword arguments, for a plain task or for ``StepPodOperator.partial(...)``.
    ``optional_secrets`` are mounted as environment variables when they exist (e.g. the Optuna storage URL).
    ``read_only_root``: the step container's root filesystem read-only, with HOME and /tmp an emptyDir, as
    the model server's Deployment runs (k8s/serving): infra-validation runs the candidate like that.
    """
    hardened = k8s.V1SecurityContext(allow_privilege_escalation=False, privileged=False, run_as_non_root=True,
                                     capabilities=k8s.V1Capabilities(drop=["ALL"]))
    step_context = copy.deepcopy(hardened)
    volumes = [k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=settings.data_pvc))] if data_volume else []
    mounts = [k8s.V1VolumeMount(name="data", mount_path=settings.data_root)] if data_volume else []
    cpu_limit = resources.cpu_limit or resources.cpu
    # A step on a 64-core node with a 4-CPU limit would otherwise run 64 TensorFlow threads in a 4-CPU quota.
    env = [k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
           *(k8s.V1EnvVar(name=name, value=str(cpu_threads(cpu_limit))) for name in TF_THREAD_ENVS)]
    if read_only_root:
        step_context.read_only_root_filesystem = True
        volumes.append(k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi")))
        mounts.append(k8s.V1VolumeMount(name="tmp", mount_path="/tmp"))
        env.append(k8s.V1EnvVar(name="HOME", value="/tmp"))
    env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.mlflow_secret))]
    env_from += [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name, optional=True))
                 for name in optional_secrets]
    return dict(
        task_id=task_id,
        name=task_id.replace("_", "-"),
        namespace=settings.namespace,
        image=image or settings.steps_image,
        image_pull_policy=settings.image_pull_policy,
        cmds=["python", "-m", module],
        arguments=arguments,
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": resources.cpu, "memory": resources.memory},
            limits={"cpu": cpu_limit, "memory": resources.memory}),
        gpus=gpus,
        node_selector_json=node_selector_json,
        volumes=volumes,
        volume_mounts=mounts,
        env_vars=env,
        env_from=env_from,
        service_account_name=settings.service_account,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, fs_group=RUN_AS_USER,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=step_context,
        # The "restricted" Pod Security level checks every container, the XCom sidecar too.
        xcom_sidecar_container_security_context=hardened,
        active_deadline_seconds=deadline_seconds,
        # The provider's 120 s would fail a step waiting for a GPU node to be added or pulling the CUDA image.
        schedule_timeout_seconds=settings.pod_start_timeout,
        startup_timeout_seconds=settings.pod_start_timeout,
        do_xcom_push=True,
        deferrable=True,
        logging_interval=30,
        get_logs=True,
        # Failed pods stay for `kubectl logs/describe`; successful ones are cleaned up.
        on_finish_action="delete_succeeded_pod",
        labels={"app.kubernetes.io/part-of": "mlops-mnist", "mlops/step": module.rsplit(".", 1)[-1]},
        **kwargs,
    )
