"""The Kubernetes deploy target against a fake API server: the exact patches sent, the rollout wait, the undo.

No cluster here: FakeApps stands in for AppsV1Api. It holds the Deployment of k8s/serving, applies each
strategic merge patch the way the API server would for these fields (containers and env merged by name),
answers with real kubernetes-client objects, and plays a rollout. Every Deployment that results from a
patch is validated against the Kubernetes schema.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))

from mlops_airflow.deploy import DeployFailed, KubernetesTarget, Serving, TargetUnavailable  # noqa: E402

MANIFEST = yaml.safe_load((ROOT / "k8s" / "serving" / "deployment.yaml").read_text())
MERGE_PATCH = "application/strategic-merge-patch+json"


def _merge(target: dict, patch: dict) -> dict:
    """Strategic merge of the fields promotion patches: maps recursively, containers/env lists by name."""
    for key, value in patch.items():
        if value is None:  # a null removes the key
            target.pop(key, None)
        elif isinstance(value, dict):
            target[key] = _merge(target.get(key) or {}, value)
        elif isinstance(value, list) and key in ("containers", "env"):
            by_name = {item["name"]: item for item in target.get(key, [])}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    target.setdefault(key, []).append(item)
        else:
            target[key] = value
    return target


class FakeApps:
    """AppsV1Api for one Deployment; a version in ``never_ready`` never gets a ready pod. The first
    ``stale_reads`` status reads after a patch answer the status from before it (the controller has not
    observed the new generation yet), as a real API server may."""

    def __init__(self, never_ready: set[str] = frozenset(), polls_to_roll_out: int = 2, stale_reads: int = 0) -> None:
        self.deployment = copy.deepcopy(MANIFEST)
        self.deployment["metadata"]["generation"] = 1
        self.deployment["status"] = self._done(1)
        self.never_ready, self.polls_to_roll_out, self.stale_reads = never_ready, polls_to_roll_out, stale_reads
        self.patches: list[tuple[dict, str]] = []
        self.status_reads = 0
        self._rolling = 0
        self._stale_left = 0
        self._frozen = False

    def _done(self, generation: int) -> dict:
        replicas = self.deployment["spec"]["replicas"] if hasattr(self, "deployment") else MANIFEST["spec"]["replicas"]
        return {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
                "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}

    def _object(self) -> object:
        from kubernetes import client

        class Response:
            data = json.dumps(self.deployment)

        return client.ApiClient().deserialize(Response(), "V1Deployment")

    def read_namespaced_deployment(self, name: str, namespace: str) -> object:
        assert (name, namespace) == ("model-server", "mlops")
        return self._object()

    def patch_namespaced_deployment(self, name: str, namespace: str, body: dict, _content_type: str) -> object:
        assert (name, namespace) == ("model-server", "mlops")
        self.patches.append((copy.deepcopy(body), _content_type))
        spec = copy.deepcopy(self.deployment["spec"])
        _merge(self.deployment, body)
        if self.deployment["spec"] == spec:  # the API server: no new generation, no new rollout
            self._frozen = True
            return self._object()
        self._frozen = False
        self.deployment["metadata"]["generation"] += 1
        self._rolling = 0
        self._stale_left = self.stale_reads
        return self._object()

    def read_namespaced_deployment_status(self, name: str, namespace: str) -> object:
        self.status_reads += 1
        if self._frozen:  # nothing changed since the last rollout: its status stays as it ended
            return self._object()
        if self._stale_left:
            self._stale_left -= 1
            return self._object()  # the status of the previous generation, as last written
        self._rolling += 1
        generation = self.deployment["metadata"]["generation"]
        replicas = self.deployment["spec"]["replicas"]
        version = self.deployment["spec"]["template"]["metadata"]["labels"]["mlops/model-version"]
        if version in self.never_ready:  # the surge pod never becomes ready; the old pods keep serving
            status = {"observedGeneration": generation, "replicas": replicas + 1, "updatedReplicas": 1,
                      "readyReplicas": replicas, "availableReplicas": replicas, "unavailableReplicas": 1,
                      "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}
            if self._rolling > 2:
                status["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                         "message": 'ReplicaSet "model-server-7d9" has timed out progressing.'}]
        elif self._rolling < self.polls_to_roll_out:
            status = {"observedGeneration": generation, "replicas": replicas + 1, "updatedReplicas": 1,
                      "readyReplicas": replicas, "availableReplicas": replicas, "unavailableReplicas": 1}
        else:
            status = self._done(generation)
        self.deployment["status"] = status
        return self._object()


def _target(apps: FakeApps, **kwargs) -> KubernetesTarget:
    return KubernetesTarget(apps, namespace="mlops", deployment="model-server", model_name="mnist_classifier",
                            poll_seconds=0, sleep=lambda s: None, **kwargs)


def _validate(deployment: dict) -> None:
    import kubernetes_validate

    manifest = {k: v for k, v in deployment.items() if k != "status"}
    kubernetes_validate.validate(manifest, desired_version="1.33", strict=True)


def _env(apps: FakeApps) -> dict[str, str]:
    container = apps.deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_manifest_as_applied_serves_the_champion_alias_and_no_known_version():
    assert _target(FakeApps()).current() == Serving(None, "models:/mnist_classifier@champion")


def test_a_missing_or_forbidden_deployment_is_named_with_the_fix_and_an_api_outage_stays_retryable():
    """plan turns TargetUnavailable into a failure without retries (it got a raw ApiException, retried twice);
    a 503 must stay an ApiException, which a retry may get past."""
    from kubernetes.client.exceptions import ApiException

    class Answering(FakeApps):
        status = 0

        def read_namespaced_deployment(self, name: str, namespace: str) -> object:
            raise ApiException(status=self.status, reason={404: "Not Found", 403: "Forbidden",
                                                           503: "Service Unavailable"}[self.status])

    apps = Answering()
    for apps.status, words in ((404, "Deployment mlops/model-server does not exist: apply k8s/serving"),
                               (403, "reading Deployment mlops/model-server is forbidden (Forbidden): bind the "
                                     "Role of k8s/serving/promotion-rbac.yaml")):
        with pytest.raises(TargetUnavailable, match=re.escape(words)):
            _target(apps).current()
    apps.status = 503
    with pytest.raises(ApiException):
        _target(apps).current()


def test_a_deployment_serving_another_model_is_refused_before_anything_is_patched():
    """The server answers under its MODEL_NAME: another model's versions rolled out there would 404 the smoke
    test, or its version label be taken for this model's."""
    apps = FakeApps()
    target = KubernetesTarget(apps, namespace="mlops", deployment="model-server", model_name="fashion_classifier",
                              poll_seconds=0, sleep=lambda s: None)
    with pytest.raises(TargetUnavailable, match="serves mnist_classifier, not fashion_classifier"):
        target.current()
    assert apps.patches == []


def test_promotion_sends_exactly_one_patch_of_model_uri_and_version_label_and_waits_for_the_rollout():
    apps = FakeApps(polls_to_roll_out=3)
    _target(apps).deploy("7")
    assert apps.patches == [({
        "metadata": {"annotations": {"kubernetes.io/change-cause":
                                     "model promotion: mnist_classifier version 7 (models:/mnist_classifier/7)"}},
        "spec": {"template": {
            "metadata": {"labels": {"mlops/model-version": "7"}},
            "spec": {"containers": [{"name": "server",
                                     "env": [{"name": "MODEL_URI", "value": "models:/mnist_classifier/7"}]}]}}},
    }, MERGE_PATCH)]
    assert apps.status_reads == 3  # returned only once every replica was updated and available
    _validate(apps.deployment)
    assert _env(apps) == {"MODEL_NAME": "mnist_classifier", "MODEL_URI": "models:/mnist_classifier/7", "HOME": "/tmp"}
    assert _target(apps).current() == Serving("7", "models:/mnist_classifier/7")
    # the rest of the template (probes, strategy, security) is untouched
    rest = copy.deepcopy(apps.deployment)
    rest["spec"]["template"]["metadata"]["labels"]["mlops/model-version"] = "none"
    rest["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"] = "models:/mnist_classifier@champion"
    assert rest["spec"] == MANIFEST["spec"]


class SlowToBecomeAvailable(FakeApps):
    """Every replica runs the new template at once, but the new pods take two more polls to pass readiness
    (the model still loading): what kubectl rollout status waits for."""

    def read_namespaced_deployment_status(self, name: str, namespace: str) -> object:
        self.status_reads += 1
        self._rolling += 1
        generation, replicas = self.deployment["metadata"]["generation"], self.deployment["spec"]["replicas"]
        if self._rolling < 3:
            self.deployment["status"] = {"observedGeneration": generation, "replicas": replicas,
                                         "updatedReplicas": replicas, "readyReplicas": replicas - 1,
                                         "availableReplicas": replicas - 1, "unavailableReplicas": 1}
        else:
            self.deployment["status"] = self._done(generation)
        return self._object()


def test_a_rollout_whose_new_pods_are_not_yet_available_is_waited_for():
    apps = SlowToBecomeAvailable()
    _target(apps).deploy("7")
    assert apps.status_reads == 3  # not done at "2/2 updated" while one of them is still unavailable


def test_a_rollout_that_makes_no_progress_fails_and_restore_patches_the_previous_version_back():
    apps = FakeApps(never_ready={"8"})
    target = _target(apps)
    target.deploy("7")
    before = target.current()
    with pytest.raises(DeployFailed, match="made no progress.*timed out progressing"):
        target.deploy("8")
    target.restore(before)
    assert [body["spec"]["template"]["metadata"]["labels"]["mlops/model-version"] for body, _ in apps.patches] == [
        "7", "8", "7"]
    assert apps.patches[-1] == apps.patches[0]  # the undo is the very patch that deployed version 7
    assert target.current() == Serving("7", "models:/mnist_classifier/7")
    _validate(apps.deployment)


def test_a_retried_restore_waits_for_the_rollout_back_and_a_stuck_one_is_not_taken_for_serving():
    """The rollback's first try patched version 7 back, but 7's new pods never became ready: the pods of the
    failed version 8 still serve (maxUnavailable 0) under a template that names 7. The retry must not pass
    without a patch to send, and plan must not take the Deployment for one serving 7."""
    apps = FakeApps(never_ready={"8"})
    target = _target(apps)
    target.deploy("7")
    before = target.current()
    with pytest.raises(DeployFailed):
        target.deploy("8")
    apps.never_ready = {"7", "8"}  # e.g. version 7's artifacts unreachable while its pods start
    with pytest.raises(DeployFailed, match="made no progress"):
        target.restore(before)
    with pytest.raises(DeployFailed, match="made no progress"):  # the retry: nothing to patch, still not done
        target.restore(before)
    assert len(apps.patches) == 3
    stuck = target.current()
    assert (stuck.version, stuck.model_uri) == ("7", "models:/mnist_classifier/7")
    assert "its rollout made no progress" in stuck.problem and "timed out progressing" in stuck.problem

    apps.never_ready = {"8"}  # version 7 can start again: the next try completes the rollout back
    target.restore(before)
    assert len(apps.patches) == 3 and target.current() == Serving("7", "models:/mnist_classifier/7")


def test_deploying_again_the_version_whose_rollout_made_no_progress_starts_a_new_rollout():
    """plan deploys the champion again when its rollout made no progress (a node without its image, a broken
    image set by hand): the same patch would change nothing, start no rollout, and fail at once on the old
    rollout's ProgressDeadlineExceeded; the redeploy annotation makes it a new one."""
    apps = FakeApps(never_ready={"7"})
    target = _target(apps, now=lambda: "2026-12-07T19:00:00.000+00:00")
    with pytest.raises(DeployFailed, match="made no progress"):
        target.deploy("7")
    assert "its rollout made no progress" in target.current().problem
    apps.never_ready = set()  # fixed meanwhile: this rollout can complete
    target.deploy("7")
    assert target.current() == Serving("7", "models:/mnist_classifier/7")
    template = apps.patches[-1][0]["spec"]["template"]
    assert template["metadata"]["annotations"] == {"mlops/redeployed-at": "2026-12-07T19:00:00.000+00:00"}
    assert "annotations" not in apps.patches[0][0]["spec"]["template"]["metadata"]  # a new version needs none
    _validate(apps.deployment)
    target.deploy("7")  # a retried deploy of a rollout that went on: waits, starts no second rollout
    assert "annotations" not in apps.patches[-1][0]["spec"]["template"]["metadata"]


def test_restore_right_after_a_timed_out_rollout_waits_for_the_controller_to_observe_the_undo():
    apps = FakeApps(never_ready={"8"}, stale_reads=2)
    target = _target(apps)
    target.deploy("7")
    before = target.current()
    with pytest.raises(DeployFailed, match="made no progress"):
        target.deploy("8")
    reads = apps.status_reads
    # The first reads after the undo patch still carry version 8's generation and ProgressDeadlineExceeded.
    target.restore(before)
    assert apps.status_reads - reads > apps.stale_reads  # it waited past the stale status
    assert target.current() == Serving("7", "models:/mnist_classifier/7")
    assert apps.deployment["status"]["observedGeneration"] == apps.deployment["metadata"]["generation"]


@pytest.mark.parametrize(("stuck", "words"), [
    ({"polls_to_roll_out": 10**6}, "1/2 updated"),
    ({"stale_reads": 10**6}, "the controller has not observed generation 2"),
], ids=["replicas-never-updated", "generation-never-observed"])
def test_a_rollout_unfinished_at_the_timeout_fails_and_says_where_it_stands(stuck, words):
    now = iter(range(0, 10**6, 60))
    target = _target(FakeApps(**stuck), rollout_timeout=300, clock=lambda: next(now))
    with pytest.raises(DeployFailed, match=f"not done after 300 s: {words}"):
        target.deploy("9")


@pytest.mark.parametrize(("never_ready", "deployed"), [(set(), False), ({"3"}, True), (set(), True)],
                         ids=["infra-validation-failed", "rollout-failed", "smoke-test-failed"])
def test_restoring_a_failed_first_promotion_serves_nothing_and_the_next_promotion_scales_back(never_ready, deployed):
    apps = FakeApps(never_ready=never_ready)
    target = _target(apps)
    before = target.current()
    if deployed:  # else infra_validate failed: the Deployment is as applied, its pods at @champion
        try:
            target.deploy("3")
        except DeployFailed:
            assert never_ready
    target.restore(before)
    body, _ = apps.patches[-1]
    assert body["spec"]["template"]["metadata"]["labels"] == {"mlops/model-version": "none"}
    assert _env(apps)["MODEL_URI"] == "models:/mnist_classifier@champion"
    # No pod left to load the failed version (through the alias, which rollback moves only afterwards).
    assert apps.deployment["spec"]["replicas"] == 0
    assert apps.deployment["metadata"]["annotations"]["mlops/replicas-before-rollback"] == "2"
    assert target.current() == before
    _validate(apps.deployment)

    target.deploy("4")
    assert apps.deployment["spec"]["replicas"] == 2
    assert "mlops/replicas-before-rollback" not in apps.deployment["metadata"]["annotations"]
    assert target.current() == Serving("4", "models:/mnist_classifier/4")
    _validate(apps.deployment)


class Pods:
    """The Service in front of the Deployment's pods: an HTTP server answering /v1/models/<name> with the
    versions in ``answers``, one per connection, in turn (as kube-proxy spreads connections over pods), each
    in ``state``."""

    def __init__(self, answers: list[str], state: str = "AVAILABLE") -> None:
        import http.server
        import itertools
        import threading

        versions = itertools.cycle(answers)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the base class's name
                body = json.dumps({"model_version_status": [{"version": next(versions), "state": state}]})
                self.send_response(200 if self.path == "/v1/models/mnist_classifier" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pods(request):
    started = Pods(request.param)
    yield started
    started.close()


@pytest.mark.parametrize("pods", [["1"]], indirect=True)
@pytest.mark.parametrize(("never_ready", "deployed"), [(set(), False), ({"3"}, True), (set(), True)],
                         ids=["infra-validation-failed", "rollout-failed", "smoke-test-failed"])
def test_pods_of_the_applied_manifest_serving_a_version_through_the_alias_are_pinned_to_it_on_restore(
        pods, never_ready, deployed):
    apps = FakeApps(never_ready=never_ready)
    target = _target(apps, serving_url=pods.url)
    before = target.current()
    assert before == Serving("1", "models:/mnist_classifier/1", pinned=False)
    if deployed:
        try:
            target.deploy("3")
        except DeployFailed:
            assert never_ready
    # What rollback restores: plan's XCom holds the version and URI (pinned, the dataclass's default).
    target.restore(Serving(before.version, before.model_uri))
    assert apps.deployment["spec"]["replicas"] == 2, "the version that served keeps serving"
    assert "mlops/replicas-before-rollback" not in (apps.deployment["metadata"].get("annotations") or {})
    assert _env(apps)["MODEL_URI"] == "models:/mnist_classifier/1"
    assert target.current() == Serving("1", "models:/mnist_classifier/1")
    _validate(apps.deployment)


@pytest.mark.parametrize("pods", [["1", "2"]], indirect=True)
def test_pods_answering_different_versions_leave_what_serves_unknown(pods):
    apps = FakeApps()
    assert _target(apps, serving_url=pods.url).current() == Serving(None, "models:/mnist_classifier@champion")


@pytest.mark.parametrize("state", ["LOADING", "END"])
def test_pods_still_loading_or_failed_do_not_count_as_serving_the_version_they_name(state):
    """A pod LOADING version 2 (or one whose load of it ended in failure) does not serve it: taken for the
    version served, a failed promotion would be "rolled back" to a version that never answered."""
    pods = Pods(["2"], state=state)
    try:
        assert _target(FakeApps(), serving_url=pods.url).current() == Serving(None, "models:/mnist_classifier@champion")
    finally:
        pods.close()


def test_pods_that_do_not_answer_leave_what_serves_unknown():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes
    for url in (closed, "http://127.0.0.1:85o1"):  # refused; a URL httpx cannot even parse
        assert _target(FakeApps(), serving_url=url).current() == Serving(None, "models:/mnist_classifier@champion")


def test_restore_sends_nothing_when_the_deployment_already_serves_the_previous_version():
    apps = FakeApps()
    target = _target(apps)
    target.deploy("4")
    target.restore(target.current())
    assert len(apps.patches) == 1


def test_the_target_uses_the_client_of_the_providers_hook(monkeypatch):
    from kubernetes import client
    from mlops_airflow import deploy, settings

    made = {}

    class Hook:
        def __init__(self, conn_id: str) -> None:
            made["conn_id"] = conn_id
            self.api_client = client.ApiClient()

    monkeypatch.setattr("airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook", Hook)
    monkeypatch.setenv("MLOPS_DEPLOY_TARGET", "kubernetes")
    monkeypatch.setenv("MLOPS_KUBERNETES_CONN_ID", "serving_cluster")
    target = deploy.for_settings(settings.load(), "mnist_classifier")
    assert isinstance(target, KubernetesTarget) and isinstance(target.apps, client.AppsV1Api)
    # The pods of a Deployment still at @champion are asked through the Service (MLOPS_SERVING_URL).
    assert target.serving_url == "http://model-server.mlops.svc:8501"
    assert (made["conn_id"], target.namespace, target.deployment) == ("serving_cluster", "mlops", "model-server")
