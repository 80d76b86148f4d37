"""Deploy targets: where promotion puts a model version, behind one interface.

    target = for_settings(settings, "mnist_classifier")
    before = target.current()     # what serves now (version, model URI)
    target.deploy("7")            # returns once version 7 answers every request, or raises DeployFailed
    target.restore(before)        # roll back to what served before

``KubernetesTarget`` patches the model server's Deployment (``MODEL_URI`` env and the
``mlops/model-version`` pod label) and waits for the rollout like ``kubectl rollout status``: every
replica updated and available (readiness = model loaded and warmed; ``maxUnavailable: 0`` keeps the old
pods serving meanwhile). Restoring patches the previous values back, which is what ``kubectl rollout
undo`` does, but to a known version rather than to "the revision before". The Deployment as applied
(``@champion`` URI, label "none") serves what the alias named when each pod started: its pods are asked
which version (through the Service, ``MLOPS_SERVING_URL``); if they all answer one, restoring pins that
version. Restoring a first promotion (nothing served before, or not known) scales the Deployment to 0,
keeping its replica count in an annotation for the next promotion: pods of the manifest's ``@champion``
URI would load whatever the alias names at that moment, the failed version included.

``LocalTarget`` drives the model server that ``scripts/serving.sh`` starts and supervises: ``POST
/admin/deploy`` loads the version beside the served one and switches when it is warm; no request fails
or waits, and a version that does not load leaves the served one in place. Restoring a first promotion
(nothing served before) unloads the version (``{"version": null}``): the server serves nothing, as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

VERSION_LABEL = "mlops/model-version"
MODEL_URI_ENV = "MODEL_URI"
MODEL_NAME_ENV = "MODEL_NAME"  # the registered model the Deployment's server serves (k8s/serving)
STATUS_TIMEOUT_S = 10.0  # the local model server answers its status at once, even while loading
CONTAINER = "server"
REPLICAS_ANNOTATION = "mlops/replicas-before-rollback"  # kept while a failed first promotion is scaled to 0
# On the pod template when a deploy names what the template names already and its rollout made no progress:
# a patch that changes nothing starts no rollout, so the time of the deploy makes it new (kubectl rollout
# restart's way).
REDEPLOYED_ANNOTATION = "mlops/redeployed-at"


class DeployFailed(Exception):
    """The new version did not come up; the target says why."""


class TargetUnavailable(Exception):
    """The target cannot be reached or is not set up; nothing was changed."""


@dataclass(frozen=True)
class Serving:
    version: str | None  # registered version being served (None: nothing, or not known)
    model_uri: str  # what the server was told to load
    # False: the server was told an alias (k8s/serving as applied: @champion) and ``version`` is what its pods
    # answered they serve; promotion pins it (a rollout to models:/<name>/<version>) even if it is the one wanted.
    pinned: bool = True
    # Why what serves may not be ``version`` after all (a Kubernetes rollout to it that made no progress: pods of
    # the version before keep serving): promotion deploys it again even if it is the one wanted. "": none.
    problem: str = ""


class Target(Protocol):
    def current(self) -> Serving: ...

    def deploy(self, version: str) -> None: ...

    def restore(self, before: Serving) -> None: ...


class LocalTarget:
    """The supervised local model server (scripts/serving.sh), switched in place over its admin endpoint."""

    def __init__(self, url: str, model_name: str, token_file: str, timeout: float = 600.0,
                 settle_timeout: float = 180.0, poll_seconds: float = 2.0) -> None:
        import httpx

        self.url, self.model_name, self.token_file = url.rstrip("/"), model_name, token_file
        self.settle_timeout, self.poll_seconds = settle_timeout, poll_seconds
        self._http = httpx.Client(timeout=timeout)

    def _unavailable(self, why: str) -> TargetUnavailable:
        return TargetUnavailable(f"the local model server at {self.url} {why}; start it with "
                                 "`scripts/serving.sh start` (or set MLOPS_SERVING_URL to where it listens)")

    def current(self) -> Serving:
        """What serves now. A server still LOADING (just restarted, or waiting for MLflow) is waited for: taken
        for "nothing served", a rollback would unload the version it is loading and drop the alias.
        ``settle_timeout`` (180 s) stays within plan's 5-minute task timeout, so its message is what the log shows.
        """
        import httpx

        deadline = time.monotonic() + self.settle_timeout
        while True:
            try:  # a status read is quick: a port that takes connections and never answers must not hold plan
                response = self._http.get(f"{self.url}/v1/models/{self.model_name}", timeout=STATUS_TIMEOUT_S)
            except httpx.TransportError as exc:  # timeouts included
                raise self._unavailable(f"does not answer ({type(exc).__name__})") from None
            if response.status_code == 404:
                raise self._unavailable(f"serves another model, not {self.model_name}")
            try:
                status = response.json()["model_version_status"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise self._unavailable(f"answers its status with HTTP {response.status_code} and no model "
                                        f"status ({response.text[:200]!r}): is it the model server?") from None
            if status["state"] != "LOADING":
                break
            if time.monotonic() > deadline:
                raise TargetUnavailable(f"the local model server at {self.url} is still loading a model after "
                                        f"{self.settle_timeout:g} s; its log says why ($MLOPS_VAR/serving/server.log)")
            time.sleep(self.poll_seconds)
        version = status["version"] if status["state"] == "AVAILABLE" else None
        return Serving(version, f"models:/{self.model_name}/{version}" if version else "")

    def deploy(self, version: str) -> None:
        self._admin_deploy(str(version))

    def _admin_deploy(self, version: str | None) -> None:
        """``POST /admin/deploy``: switch to ``version``, or with None unload the served one."""
        import httpx

        token_path = Path(self.token_file)
        if not token_path.is_file():
            raise self._unavailable(f"has no admin token at {token_path} (MLOPS_SERVING_ADMIN_TOKEN_FILE)")
        try:
            response = self._http.post(f"{self.url}/admin/deploy", json={"version": version},
                                       headers={"Authorization": f"Bearer {token_path.read_text().strip()}"})
        except httpx.TransportError as exc:
            raise self._unavailable(f"does not answer ({type(exc).__name__})") from None
        if response.status_code in (401, 404):
            raise self._unavailable(f"refused the deployment: {response.json().get('error')}")
        if response.status_code != 200:
            raise DeployFailed(response.json().get("error", response.text[:500]))

    def restore(self, before: Serving) -> None:
        """Serve ``before.version`` again; None (a first promotion) unloads whatever serves now.

        Sent even when the server reports ``before.version`` already: a deployment that timed out here may still
        be loading in the server, and would switch to the failed version after this restore. The server runs one
        deployment at a time, so this one comes after it (a version already served is kept, not reloaded).
        """
        self._admin_deploy(before.version)


class KubernetesTarget:
    """The model server's Deployment, patched through the cncf.kubernetes provider's client."""

    def __init__(self, apps: Any, *, namespace: str, deployment: str, model_name: str, serving_url: str = "",
                 rollout_timeout: float = 900.0, poll_seconds: float = 5.0, sleep: Any = time.sleep,
                 clock: Any = time.monotonic, now: Any = None) -> None:
        self.apps, self.namespace, self.deployment, self.model_name = apps, namespace, deployment, model_name
        self.serving_url = serving_url.rstrip("/")
        self.rollout_timeout, self.poll_seconds, self._sleep, self._clock = rollout_timeout, poll_seconds, sleep, clock
        self._now = now or (lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    @classmethod
    def from_connection(cls, conn_id: str, **kwargs: Any) -> KubernetesTarget:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes import client

        return cls(client.AppsV1Api(KubernetesHook(conn_id=conn_id).api_client), **kwargs)

    def _read(self) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.apps.read_namespaced_deployment(self.deployment, self.namespace)
        except ApiException as exc:
            # Not there, or not ours to read: a retry cannot fix either (other statuses may pass on a retry).
            if exc.status == 404:
                raise TargetUnavailable(f"Deployment {self.namespace}/{self.deployment} does not exist: apply "
                                        "k8s/serving (kubectl apply -k k8s/serving), or set MLOPS_NAMESPACE / "
                                        "MLOPS_SERVING_DEPLOYMENT to where the model server runs") from None
            if exc.status == 403:
                raise TargetUnavailable(f"reading Deployment {self.namespace}/{self.deployment} is forbidden "
                                        f"({exc.reason}): bind the Role of k8s/serving/promotion-rbac.yaml to the "
                                        "service account of Airflow's workers") from None
            raise

    def current(self) -> Serving:
        """What serves now. A Deployment still at an alias URI (k8s/serving as applied: label "none") whose pods
        are available serves whatever the alias named when each pod started: they are asked which version
        (``serving_url``, the Service). One version answered: that one, unpinned; none, or several: not known.
        """
        deployment = self._read()
        serving = self._serving(deployment)
        # A pinned template whose rollout made no progress: its version may not be what serves (an alias URI's
        # pods are asked below, whatever the rollout did).
        if serving.version is not None and (stalled := self._stalled(deployment)):
            log.warning("%s/%s: the rollout to %s made no progress (%s): pods of an earlier template may still "
                        "serve", self.namespace, self.deployment, serving.model_uri or "(no model URI)", stalled)
            return replace(serving, problem=f"its rollout made no progress: {stalled}")
        available = (deployment.status.available_replicas or 0) if deployment.status else 0
        if serving.version is not None or "@" not in serving.model_uri or not available or not self.serving_url:
            return serving
        seen, problems = self._ask_pods(tries=min(12, max(6, 3 * available)))
        if len(seen) == 1:
            version = seen.pop()
            log.info("%s/%s serves %s through %s (its pods say so): version %s", self.namespace, self.deployment,
                     self.model_name, serving.model_uri, version)
            return Serving(version, f"models:/{self.model_name}/{version}", pinned=False)
        log.warning("%s/%s serves %s through %s, and its pods answered %s%s: the version served is not known, so "
                    "a failed promotion scales it to 0", self.namespace, self.deployment, self.model_name,
                    serving.model_uri, f"versions {', '.join(sorted(seen))}" if seen else "no version",
                    f" ({'; '.join(problems[:3])})" if problems else "")
        return serving

    def _ask_pods(self, tries: int, budget: float = 60.0) -> tuple[set[str], list[str]]:
        """Versions the Deployment's pods report AVAILABLE; a new connection per try, so the Service spreads
        the tries over its pods (with 2 pods serving different versions, 6 tries all reach one of them 1 time
        in 32). At most ``budget`` seconds in all: plan has 5 minutes."""
        import httpx

        seen: set[str] = set()
        problems: list[str] = []
        deadline = self._clock() + budget
        for _ in range(tries):
            if self._clock() > deadline:
                problems.append(f"stopped asking after {budget:g} s")
                break
            try:
                status = httpx.get(f"{self.serving_url}/v1/models/{self.model_name}",
                                   timeout=10).json()["model_version_status"][0]
            except Exception as exc:  # noqa: BLE001 - whatever the answer (or its absence), the version is unknown
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(status, dict) and status.get("state") == "AVAILABLE" and status.get("version"):
                seen.add(str(status["version"]))
        return seen, problems

    @staticmethod
    def _stalled(deployment: Any) -> str:
        """The message of a ProgressDeadlineExceeded condition of the current generation's rollout, else ""."""
        status = deployment.status
        if not status or (status.observed_generation or 0) < (deployment.metadata.generation or 0):
            return ""
        return next((condition.message or condition.reason for condition in status.conditions or []
                     if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded"), "")

    def _serving(self, deployment: Any) -> Serving:
        template = deployment.spec.template
        container = next((c for c in template.spec.containers if c.name == CONTAINER), None)
        if container is None:
            raise TargetUnavailable(f"Deployment {self.namespace}/{self.deployment} has no container "
                                    f"{CONTAINER!r}; apply k8s/serving")
        env = {e.name: e.value for e in container.env or []}
        served_name = env.get(MODEL_NAME_ENV)
        if served_name and served_name != self.model_name:  # promotion patches MODEL_URI, never the name
            raise TargetUnavailable(f"Deployment {self.namespace}/{self.deployment} serves {served_name}, not "
                                    f"{self.model_name}; set MLOPS_SERVING_DEPLOYMENT to {self.model_name}'s "
                                    "model server, or promote the model it serves")
        uri = env.get(MODEL_URI_ENV) or ""
        label = (template.metadata.labels or {}).get(VERSION_LABEL, "none")
        return Serving(None if label == "none" else label, uri)

    def patch(self, version: str | None, model_uri: str) -> dict[str, Any]:
        """The strategic merge patch that makes the Deployment serve ``model_uri`` (a rollout)."""
        label = version or "none"
        return {
            "metadata": {"annotations": {"kubernetes.io/change-cause":
                                         f"model promotion: {self.model_name} version {label} ({model_uri})"}},
            "spec": {"template": {
                "metadata": {"labels": {VERSION_LABEL: label}},
                "spec": {"containers": [{"name": CONTAINER, "env": [{"name": MODEL_URI_ENV, "value": model_uri}]}]},
            }},
        }

    def _apply(self, patch: dict[str, Any]) -> None:
        self.apps.patch_namespaced_deployment(self.deployment, self.namespace, patch,
                                              _content_type="application/strategic-merge-patch+json")
        self.wait_for_rollout()

    def deploy(self, version: str) -> None:
        patch = self.patch(str(version), f"models:/{self.model_name}/{version}")
        deployment = self._read()
        if self._serving(deployment) == Serving(str(version), f"models:/{self.model_name}/{version}") \
                and self._stalled(deployment):
            # The template names this version already and its rollout made no progress (plan deploys it again):
            # without a change to the template the API server starts no rollout, and the wait would at once see
            # the old one's ProgressDeadlineExceeded. (A retried deploy whose rollout goes on just waits.)
            patch["spec"]["template"]["metadata"]["annotations"] = {REDEPLOYED_ANNOTATION: self._now()}
        kept = (deployment.metadata.annotations or {}).get(REPLICAS_ANNOTATION)
        if kept and not deployment.spec.replicas:  # scaled to 0 by the rollback of a first promotion
            patch["spec"]["replicas"] = int(kept)
            patch["metadata"]["annotations"][REPLICAS_ANNOTATION] = None  # strategic merge: removed
        self._apply(patch)

    def restore(self, before: Serving) -> None:
        deployment = self._read()
        first = before.version is None
        # A first promotion that failed before deploy (infra_validate) left the Deployment as applied: its pods,
        # at the manifest's @champion URI, may already load the alias's version, never validated. Scaled to 0.
        if self._serving(deployment) == before and not (first and deployment.spec.replicas):
            # Patched back already (a retried rollback, or a step that failed before deploy): that rollout must
            # still be done, or the failed version's pods keep serving (maxUnavailable 0) under this template.
            self.wait_for_rollout()
            return
        patch = self.patch(before.version, before.model_uri)
        if first:
            # Nothing served before: serve nothing again. Pods at the manifest's @champion URI would load
            # whatever the alias names when they start (a reviewer may approve the failed version again), so
            # no pods at all.
            replicas = deployment.spec.replicas
            patch["spec"]["replicas"] = 0
            if replicas:
                patch["metadata"]["annotations"][REPLICAS_ANNOTATION] = str(replicas)
        self._apply(patch)

    def wait_for_rollout(self) -> None:
        """Return when every replica runs the new template and is available (``kubectl rollout status``).

        Like kubectl, conditions and replica counts are trusted only once the controller has observed the
        patched generation: until then they describe the previous rollout (right after a timed-out rollout,
        its ProgressDeadlineExceeded), so the wait goes on.
        """
        deadline = self._clock() + self.rollout_timeout
        while True:
            deployment = self.apps.read_namespaced_deployment_status(self.deployment, self.namespace)
            wanted, status = deployment.spec.replicas or 0, deployment.status
            generation, observed = deployment.metadata.generation or 0, status.observed_generation or 0
            if stalled := self._stalled(deployment):
                raise DeployFailed(f"rollout of {self.namespace}/{self.deployment} made no progress: {stalled}")
            if observed >= generation and ((status.updated_replicas or 0) == wanted and (status.replicas or 0) == wanted
                                           and (status.available_replicas or 0) == wanted
                                           and not status.unavailable_replicas):
                return
            if self._clock() > deadline:
                progress = (f"{status.updated_replicas or 0}/{wanted} updated, {status.available_replicas or 0}/"
                            f"{wanted} available" if observed >= generation else
                            f"the controller has not observed generation {generation} yet (at {observed})")
                raise DeployFailed(f"rollout of {self.namespace}/{self.deployment} not done after "
                                   f"{self.rollout_timeout:g} s: {progress}")
            self._sleep(self.poll_seconds)


def for_settings(settings: Any, model_name: str) -> Target:
    """The target ``MLOPS_DEPLOY_TARGET`` names, for ``model_name``."""
    if settings.deploy_target == "kubernetes":
        return KubernetesTarget.from_connection(settings.kubernetes_conn_id, namespace=settings.namespace,
                                                deployment=settings.serving_deployment, model_name=model_name,
                                                serving_url=settings.serving_url)
    return LocalTarget(settings.serving_url, model_name, settings.serving_admin_token_file)
