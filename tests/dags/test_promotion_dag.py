"""model_promotion as the scheduler and Kubernetes see it, and its plan: when it deploys and when it does nothing.

The run itself (local target, real server, real MLflow) is in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from dagsupport import DAGS, FakeTaskInstance, JsonHandler, http_server


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["model_promotion"]


def test_promotion_runs_on_alias_events_and_a_safety_net_schedule_one_at_a_time(dag):
    from airflow.sdk import AssetOrTimeSchedule

    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "*/10 * * * *"
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["mlflow_champion_alias"]
    assert dag.max_active_runs == 1 and dag.catchup is False


def test_every_step_after_plan_rolls_back_on_failure_and_record_needs_all_of_them(dag):
    order = [t.task_id for t in dag.topological_sort()]
    assert order.index("plan") < order.index("infra_validate") < order.index("deploy") < order.index("smoke_test")
    rollback = dag.get_task("rollback")
    assert rollback.trigger_rule == "one_failed"
    assert rollback.upstream_task_ids == {"infra_validate", "deploy", "smoke_test"}
    assert dag.get_task("record").upstream_task_ids == {"smoke_test"}


def test_infra_validation_pod_runs_the_candidate_in_the_serving_image(dag):
    import kubernetes_validate
    from kubernetes.client import ApiClient

    task = copy.deepcopy(dag.get_task("infra_validate"))
    results = {"plan": {"model_name": "mnist_classifier", "version": "7"}}
    context = {"params": {**dag.params.validate(), "validation_requests": 80}, "dag": dag, "run_id": "manual__x",
               "ti": FakeTaskInstance("infra_validate", results), "task": task}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
    kubernetes_validate.validate(pod, desired_version="1.33", strict=True)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/mlops-mnist/serving:0.1.0"
    assert container["command"] == ["python", "-m", "mlsteps.infra_validate"]
    flags = dict(zip(container["args"][::2], container["args"][1::2]))
    assert (flags["--model-name"], flags["--version"], flags["--requests"]) == ("mnist_classifier", "7", "80")
    # It reads the model from MLflow only: no claim on the data volume (which, ReadWriteOnce, would pin the node).
    assert all("persistentVolumeClaim" not in v for v in pod["spec"]["volumes"])
    # The candidate runs as the Deployment will run it (k8s/serving): a version that writes outside /tmp, or
    # needs more than its limits, fails here and not in the rollout.
    import yaml
    from dagsupport import ROOT

    served = yaml.safe_load((ROOT / "k8s" / "serving" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    server = served["containers"][0]
    assert container["resources"]["limits"] == server["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is server["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "HOME", "value": "/tmp"} in container["env"] and {"name": "HOME", "value": "/tmp"} in server["env"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert next(v for v in pod["spec"]["volumes"] if v["name"] == tmp["name"])["emptyDir"]


class FakeRegistry:
    def __init__(self, champion: str | None, versions: tuple[str, ...] = ("1", "2", "3")) -> None:
        self.champion, self.versions = champion, versions

    def exists(self, name: str) -> bool:
        return name != "mnist_clasifier"  # a misspelt name

    def alias(self, name: str, alias: str) -> str | None:
        return self.champion if self.exists(name) else None

    def version(self, name: str, version: str) -> dict | None:
        return {"version": version} if self.exists(name) and version in self.versions else None


@pytest.fixture
def plan_with(monkeypatch):
    """Run plan's function against a registry and a target that serves ``served``."""
    from mlops_airflow import promotion
    from mlops_airflow.deploy import Serving

    def run(champion: str | None, served: str | None, version: int = 0, events: dict | None = None,
            model_name: str = "mnist_classifier", pinned: bool = True, problem: str = "", by_hand: bool = False):
        seen = {}

        def target(settings, name):
            seen["model"] = name
            return SimpleNamespace(current=lambda: Serving(served, f"models:/{name}/{served}" if served else "",
                                                           pinned=pinned, problem=problem))

        registry = run.registry = RecordingRegistry(champion)
        settings = SimpleNamespace(tracking_uri="http://mlflow:5000")
        monkeypatch.setattr(promotion, "_context", lambda: (settings, registry))
        monkeypatch.setattr(promotion, "_target", target)
        params = {"model_name": model_name, "version": version}
        from airflow.sdk.api.datamodels._generated import DagRunType  # what the Task SDK's DagRun holds

        run_type = (DagRunType.ASSET_TRIGGERED if events else DagRunType.MANUAL if by_hand or version
                    else DagRunType.SCHEDULED)
        dag_run = SimpleNamespace(run_type=run_type)
        return promotion.plan.function(params=params, triggering_asset_events=events, run_id="r1",
                                       dag_run=dag_run), seen

    return run


def test_plan_does_nothing_when_serving_runs_the_champion_or_there_is_none(plan_with):
    assert plan_with(champion="2", served="2")[0] == {}
    assert plan_with(champion=None, served="2")[0] == {}


def test_plan_promotes_the_champion_and_remembers_what_served_before(plan_with):
    planned, _ = plan_with(champion="3", served="2")
    assert planned == {"model_name": "mnist_classifier", "version": "3", "previous_version": "2",
                       "previous_model_uri": "models:/mnist_classifier/2", "trigger": "schedule", "run_id": "r1",
                       "champion_at_plan": "3"}


def test_plan_pins_the_champion_that_pods_serve_only_through_the_alias(plan_with):
    # k8s/serving as applied: its pods loaded @champion (version 2); promotion validates it and pins it.
    planned, _ = plan_with(champion="2", served="2", pinned=False)
    assert (planned["version"], planned["previous_version"]) == ("2", "2")
    assert planned["previous_model_uri"] == "models:/mnist_classifier/2"


def test_plan_deploys_the_champion_again_when_the_rollout_to_it_is_stuck(plan_with):
    # A rollback whose rollout back never finished: the template names version 2, old pods may still serve.
    planned, _ = plan_with(champion="2", served="2", problem="its rollout made no progress: timed out")
    assert (planned["version"], planned["previous_version"]) == ("2", "2")


def test_plan_deploys_a_version_given_by_hand_even_if_the_alias_names_another(plan_with):
    planned, _ = plan_with(champion="2", served="2", version=1)
    assert (planned["version"], planned["trigger"]) == ("1", "manual")


def test_a_version_sent_as_a_json_float_is_that_version(plan_with):
    planned, _ = plan_with(champion="2", served="2", version=3.0)
    assert (planned["version"], planned["trigger"]) == ("3", "manual")


def test_a_version_given_by_hand_that_already_serves_gets_the_alias_without_a_deployment(plan_with):
    planned, _ = plan_with(champion="3", served="1", version=1)  # champion 3 is bad; 1 pinned by hand
    assert planned == {} and plan_with.registry.champion == "1"


def test_plan_refuses_a_version_that_is_not_registered(plan_with):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="version 9 is not registered"):
        plan_with(champion="2", served="2", version=9)


def test_a_model_name_mlflow_does_not_know_fails_a_run_by_hand_and_is_a_warning_on_schedule(plan_with, caplog):
    """Taken for "no champion", a misspelt model_name passed every run as "nothing to serve"."""
    from airflow.sdk.exceptions import AirflowFailException

    for given in ({"version": 3}, {"by_hand": True}):
        with pytest.raises(AirflowFailException, match="mnist_clasifier is not a registered model in MLflow at "
                                                       "http://mlflow:5000: check the model_name param"):
            plan_with(champion="3", served="2", model_name="mnist_clasifier", **given)
    # Scheduled: also what runs before the first training registers the model; said, not failed.
    assert plan_with(champion="3", served="2", model_name="mnist_clasifier")[0] == {}
    assert "mnist_clasifier is not a registered model" in caplog.text


def test_plan_acts_on_an_alias_event_of_the_served_model_and_ignores_other_models(plan_with):
    ours = SimpleNamespace(extra={"model_name": "mnist_classifier", "version": "3"})
    planned, seen = plan_with(champion="3", served="1", events={"mlflow_champion_alias": [ours]})
    assert (planned["version"], planned["trigger"], seen["model"]) == ("3", "mlflow webhook", "mnist_classifier")
    other = SimpleNamespace(extra={"model_name": "fashion_classifier", "version": "5"})
    planned, seen = plan_with(champion="5", served="1", events={"mlflow_champion_alias": [other]})
    assert planned == {} and "model" not in seen  # the server was not even asked


class RecordingRegistry(FakeRegistry):
    def __init__(self, champion: str | None) -> None:
        super().__init__(champion)
        self.tags: dict[str, dict[str, str]] = {}
        self.moves: list[tuple[str, str | None]] = []

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.champion = version
        self.moves.append(("set", version))

    def delete_alias(self, name: str, alias: str) -> None:
        self.champion = None
        self.moves.append(("delete", None))

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(version, {}).update(tags)

    def versions_tagged(self, name: str, key: str, value: str) -> list[str]:
        return sorted((v for v, tags in self.tags.items() if tags.get(key) == value), key=int)


class FakeTarget:
    def __init__(self) -> None:
        self.restored = []

    def restore(self, before) -> None:
        self.restored.append(before)


@pytest.fixture
def after_plan(monkeypatch):
    """Run a task function after plan chose ``planned``, against a recording registry and target."""
    from mlops_airflow import promotion

    def run(task, champion: str | None, tags: dict[str, dict[str, str]] | None = None, **planned):
        registry, target = RecordingRegistry(champion), FakeTarget()
        registry.tags.update(copy.deepcopy(tags or {}))
        monkeypatch.setattr(promotion, "_context", lambda: (None, registry))
        monkeypatch.setattr(promotion, "_target", lambda settings, name: target)
        plan = {"model_name": "m", "version": "3", "previous_version": "2", "previous_model_uri": "models:/m/2",
                "trigger": "mlflow webhook", "run_id": "r1", **planned}
        ti = SimpleNamespace(xcom_pull=lambda task_ids: plan if task_ids == "plan" else None)
        error = None
        try:
            task.function(ti=ti)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            error = exc
        return registry, target, error

    return run


def test_rollback_restores_serving_and_the_alias_tags_the_version_and_fails_the_run(after_plan):
    from airflow.sdk.exceptions import AirflowFailException
    from mlops_airflow import promotion
    from mlops_airflow.deploy import Serving

    registry, target, error = after_plan(promotion.rollback, champion="3")
    assert target.restored == [Serving("2", "models:/m/2")]
    assert registry.moves == [("set", "2")]
    assert registry.tags["3"]["promotion.status"] == "failed" and registry.tags["3"]["promotion.rolled_back_to"] == "2"
    assert isinstance(error, AirflowFailException) and "back at version 2" in str(error)


def test_a_rollback_that_cannot_restore_serving_still_puts_the_alias_back_and_tags_the_version(after_plan,
                                                                                              monkeypatch):
    """Restoring fails on every try (the previous version's pods cannot start): the alias must not keep naming
    the failed version, or the next run would take serving it for the reconciled champion."""
    from mlops_airflow import promotion
    from mlops_airflow.deploy import DeployFailed

    def cannot_restore(self, before):
        raise DeployFailed("rollout of mlops/model-server made no progress")

    monkeypatch.setattr(FakeTarget, "restore", cannot_restore)
    registry, _, error = after_plan(promotion.rollback, champion="3")
    assert registry.moves == [("set", "2")] and registry.tags["3"]["promotion.status"] == "failed"
    assert isinstance(error, DeployFailed)  # retried, unlike the run's verdict
    assert "alias champion of m is back at version 2" in str(error) and "made no progress" in str(error)


def test_rollback_leaves_an_alias_someone_moved_on_meanwhile(after_plan):
    from mlops_airflow import promotion

    registry, target, _ = after_plan(promotion.rollback, champion="4")  # a reviewer approved version 4 meanwhile
    assert registry.moves == [] and registry.champion == "4"
    assert len(target.restored) == 1


def test_a_failed_redeploy_of_the_served_version_leaves_its_alias_and_status_alone(after_plan):
    """plan deploys the champion again when its rollout made no progress: failing again, it must not be tagged
    failed (it serves), nor its alias set where it is (MLflow's alias event would queue the same run again)."""
    from mlops_airflow import promotion
    from mlops_airflow.deploy import Serving

    registry, target, error = after_plan(promotion.rollback, champion="2", version="2")
    assert registry.moves == [] and registry.champion == "2"
    assert "promotion.status" not in registry.tags.get("2", {})
    assert registry.tags["2"]["promotion.redeploy"].startswith("failed at ")
    assert target.restored == [Serving("2", "models:/m/2")]
    assert "alias champion unchanged" in str(error)


def test_rollback_of_a_first_promotion_removes_the_alias(after_plan):
    from mlops_airflow import promotion

    registry, _, error = after_plan(promotion.rollback, champion="3", previous_version=None, previous_model_uri="")
    assert registry.moves == [("delete", None)] and "(none)" in str(error)


def test_a_run_whose_plan_fails_skips_rollback_and_fails_with_plans_own_error(dag, airflow_db, monkeypatch, capfd):
    """Airflow fires rollback's one_failed on upstream_failed too: with no plan there is nothing to undo."""
    from mlops_airflow import promotion

    monkeypatch.setattr(promotion, "_context", lambda: (None, FakeRegistry(champion="2")))
    run = dag.test(run_conf={"model_name": "mnist_classifier", "version": 9})  # not registered: plan fails
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed"
    assert (states["plan"], states["rollback"]) == ("failed", "skipped")
    assert {states[t] for t in ("infra_validate", "deploy", "smoke_test", "record")} == {"upstream_failed"}
    log = capfd.readouterr().out
    assert "mnist_classifier version 9 is not registered" in log
    assert "nothing to roll back" in log and "TypeError" not in log


def test_record_moves_the_alias_only_for_a_version_given_by_hand(after_plan):
    from mlops_airflow import promotion

    registry, _, error = after_plan(promotion.record, champion="4")  # webhook run for 3; 4 approved since
    assert error is None and registry.moves == [] and registry.tags["3"]["promotion.status"] == "serving"
    # The version served before says so no longer: a registry search for promotion.status "serving" finds one.
    assert registry.tags["2"]["promotion.status"] == "replaced" and registry.tags["2"]["promotion.replaced_by"] == "3"
    registry, _, _ = after_plan(promotion.record, champion="2", trigger="manual", champion_at_plan="2")
    assert registry.moves == [("set", "3")] and registry.tags["3"]["promotion.trigger"] == "manual"


def test_record_leaves_one_version_serving_when_what_served_before_was_unknown(after_plan):
    """plan saw nothing served (a server that had given up loading, pods answering several versions): version 2,
    still tagged serving, kept saying so beside 3."""
    from mlops_airflow import promotion

    registry, _, error = after_plan(promotion.record, champion="3", previous_version=None,
                                    tags={"1": {"promotion.status": "replaced"}, "2": {"promotion.status": "serving"}})
    assert error is None
    assert {v: t["promotion.status"] for v, t in registry.tags.items()} == {"1": "replaced", "2": "replaced",
                                                                           "3": "serving"}
    assert registry.tags["2"]["promotion.replaced_by"] == "3" and "promotion.replaced_by" not in registry.tags["1"]


def test_a_promotion_by_hand_leaves_an_alias_a_reviewer_moved_during_it(after_plan):
    """Version 7 approved while version 3 was deployed by hand: 7 stays champion (its queued run deploys it)."""
    from mlops_airflow import promotion

    registry, _, error = after_plan(promotion.record, champion="7", trigger="manual", champion_at_plan="2")
    assert error is None and registry.moves == [] and registry.champion == "7"
    assert registry.tags["3"]["promotion.status"] == "serving"


@pytest.fixture
def local_server(tmp_path):
    """A stand-in for the local model server's status and /admin/deploy (the real one: tests/steps/test_serve.py)."""
    import json

    state = {"version": "3", "posted": []}  # version 3 was deployed by the promotion that failed

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802 - http.server's name; TF Serving model status
            served = state["version"]
            if state.get("loading_reads"):
                state["loading_reads"] -= 1
                self.send_json(200, {"model_version_status": [{"version": "", "state": "LOADING"}]})
                return
            self.send_json(200, {"model_version_status": [{"version": served or "",
                                                           "state": "AVAILABLE" if served else "END"}]})

        def do_POST(self):  # noqa: N802
            assert self.path == "/admin/deploy"
            if self.headers["Authorization"] != "Bearer admin-token-0123456789":
                self.send_json(401, {"error": "missing or wrong admin token"})
                return
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["posted"].append(request)
            previous, state["version"] = state["version"], request["version"]
            self.send_json(200, {"model_version": request["version"], "previous_version": previous or ""})

    token = tmp_path / "admin-token"
    token.write_text("admin-token-0123456789\n")
    with http_server(Handler) as url:
        yield url, str(token), state


def test_the_local_target_waits_for_a_loading_server_instead_of_taking_it_for_an_empty_one(local_server):
    from mlops_airflow.deploy import LocalTarget, TargetUnavailable

    url, token, state = local_server
    state["loading_reads"] = 3  # restarted by its supervisor: LOADING version 3 for three more status reads
    assert LocalTarget(url, "m", token, poll_seconds=0).current().version == "3"
    assert state["loading_reads"] == 0
    state["loading_reads"] = 10**6
    with pytest.raises(TargetUnavailable, match="still loading a model after 0.2 s"):
        LocalTarget(url, "m", token, settle_timeout=0.2, poll_seconds=0.05).current()


def test_a_port_that_takes_connections_and_never_answers_is_an_unavailable_target_at_once(monkeypatch, tmp_path):
    """Its status read waited the 600 s meant for deployments, past plan's 5-minute timeout, retried twice."""
    import socket

    from mlops_airflow import deploy

    monkeypatch.setattr(deploy, "STATUS_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nothing reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(deploy.TargetUnavailable, match=r"does not answer \(ReadTimeout\)"):
            deploy.LocalTarget(url, "m", str(tmp_path / "token"), settle_timeout=60).current()


def test_something_else_answering_on_the_serving_port_is_an_unavailable_target_not_an_error():
    """A 200 without a model status (another service on the port) raised KeyError or JSONDecodeError."""
    from mlops_airflow.deploy import LocalTarget, TargetUnavailable

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802
            self.send_json(200, {"status": "ok"})

    with http_server(Handler) as url, pytest.raises(TargetUnavailable, match="no model status .*is it the model "
                                                                             "server?"):
        LocalTarget(url, "m", "unused-token-file").current()


def test_a_wrong_admin_token_is_a_target_problem_not_a_failed_version(local_server, tmp_path):
    """deploy tags a version "failed" and rolls back only for DeployFailed: a token that does not match the
    server's says nothing about the version."""
    from mlops_airflow.deploy import LocalTarget, TargetUnavailable

    url, _, state = local_server
    wrong = tmp_path / "stale-token"
    wrong.write_text("an-old-token\n")
    with pytest.raises(TargetUnavailable, match="refused the deployment: missing or wrong admin token"):
        LocalTarget(url, "m", str(wrong)).deploy("4")
    assert state["version"] == "3" and state["posted"] == []


def test_the_local_target_gives_up_on_a_loading_server_while_plan_can_still_say_why(dag, local_server):
    from mlops_airflow.deploy import LocalTarget

    url, token, _ = local_server
    assert LocalTarget(url, "m", token).settle_timeout < dag.get_task("plan").execution_timeout.total_seconds() - 60


@pytest.mark.parametrize(("before", "posted", "served"), [
    (None, [{"version": None}], None),
    ("2", [{"version": "2"}], "2"),
], ids=["first-promotion-unloads", "previous-version-redeployed"])
def test_restoring_the_local_server_leaves_it_serving_what_served_before(local_server, before, posted, served):
    from mlops_airflow.deploy import LocalTarget, Serving

    url, token, state = local_server
    target = LocalTarget(url, "m", token)
    target.restore(Serving(before, f"models:/m/{before}" if before else ""))
    assert state["posted"] == posted
    assert target.current().version == served
    # Already there: sent again all the same (a deployment still loading in the server would otherwise switch
    # to the failed version after this restore; the server keeps a version it serves already).
    target.restore(Serving(before, ""))
    assert state["posted"] == posted * 2


@pytest.fixture
def fake_server():
    """A model server stand-in on a free port answering predictions as version ``answer["version"]``."""
    import json

    # old_after: answer "2" after N posts; old_first: answer "2" to the first N posts; ports: the clients' ports
    answer = {"version": "3", "row": [0.1] * 10, "posts": 0, "old_after": None, "old_first": 0, "ports": []}

    class Handler(JsonHandler):
        protocol_version = "HTTP/1.1"  # keeps a connection open for a client that keeps it

        def _answer(self, payload: dict) -> None:
            self._answer_as(answer["version"], payload)

        def _answer_as(self, version: str, payload: dict) -> None:
            self.send_json(200, payload, {"X-Model-Version": version})

        def do_GET(self):  # noqa: N802 - http.server's name; OIP v2 model metadata
            self._answer({"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}]})

        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert [len(request["instances"][0]), len(request["instances"][0][0])] == [28, 28]
            answer["posts"] += 1
            answer["ports"].append(self.client_address[1])
            if answer["posts"] <= answer["old_first"] or (answer["old_after"] is not None
                                                         and answer["posts"] > answer["old_after"]):
                self._answer_as("2", {"predictions": [answer["row"]]})
                return
            self._answer({"predictions": [answer["row"]]})

    with http_server(Handler) as url:
        yield url, answer


def test_smoke_test_sends_every_request_it_promises_and_fails_on_the_first_wrong_answer(fake_server):
    """Pods of a rollout may answer with either version: a wrong answer after a few right ones fails it."""
    from mlops_airflow.promotion import smoke

    url, answer = fake_server
    assert smoke(url, "m", "3", requests=5).startswith("passed: 5 requests")
    assert answer["posts"] == 5
    # Each on a connection of its own, so that the Service spreads them over its pods.
    assert len(set(answer["ports"])) == 5
    answer["posts"], answer["old_after"] = 0, 3  # the 4th request reaches a pod still on version 2
    with pytest.raises(AssertionError, match="request 4 was answered by version 2, not 3"):
        smoke(url, "m", "3", requests=5, settle=0)


def test_smoke_test_asks_again_while_the_old_pods_leave_the_service_then_fails(fake_server):
    """After a rollout the old pods serve on for their preStop (5 s) until kube-proxy forgets them: a good
    version was rolled back when the first request reached one."""
    from mlops_airflow.promotion import smoke

    url, answer = fake_server
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    answer["old_first"] = 3
    verdict = smoke(url, "m", "3", requests=5, settle=20, clock=lambda: now[0], sleep=sleep)
    assert verdict.endswith("all answered by version 3 (after 3 answers of an older version while the rollout "
                            "settled)")
    assert answer["posts"] == 8 and slept == [1, 1, 1]
    answer["posts"], now[0], answer["old_first"] = 0, 0.0, 100  # still the old version once settled: fails
    with pytest.raises(AssertionError, match=r"request 1 was answered by version 2, not 3 \(20 earlier answers "
                                             r"of other versions, over 20 s\)"):
        smoke(url, "m", "3", requests=5, settle=20, clock=lambda: now[0], sleep=sleep)


@pytest.mark.parametrize("row", [[1.0], [0.2] * 6, [0.08] * 10], ids=["one-class", "sums-to-1.2", "sums-to-0.8"])
def test_smoke_test_refuses_answers_that_are_not_probabilities_over_the_classes(fake_server, row):
    from mlops_airflow.promotion import smoke

    url, answer = fake_server
    answer["row"] = row
    with pytest.raises(AssertionError, match="not a probability row"):
        smoke(url, "m", "3", requests=2)


@pytest.mark.parametrize("answer", [{"foo": 1}, {"predictions": "oops"}, [1, 2]])
def test_smoke_test_fails_an_answer_that_is_not_a_prediction_instead_of_erroring(answer):
    """A 200 from something else at MLOPS_SERVING_URL (a proxy, another service) raised KeyError or TypeError:
    the task was retried and no promotion.smoke_test tag said why."""
    from mlops_airflow.promotion import smoke

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802
            self.send_json(200, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}]})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_json(200, answer, {"X-Model-Version": "3"})

    with http_server(Handler) as url, pytest.raises(AssertionError, match="request 1: the answer is not a "
                                                                          "prediction"):
        smoke(url, "m", "3", requests=2)


def test_smoke_test_passes_only_when_every_answer_comes_from_the_new_version(fake_server):
    from mlops_airflow.promotion import smoke

    url, answer = fake_server
    assert smoke(url, "m", "3", requests=5).startswith("passed: 5 requests")
    answer["version"] = "2"
    with pytest.raises(AssertionError, match="answered by version 2, not 3"):
        smoke(url, "m", "3", requests=5, settle=0)
    answer["version"], answer["row"] = "3", [0.5] * 10
    with pytest.raises(AssertionError, match="not a probability row"):
        smoke(url, "m", "3", requests=5)


def test_a_failed_smoke_test_or_deploy_is_recorded_on_the_version_and_fails_the_run(monkeypatch, fake_server):
    """rollback then runs (one_failed); the reason stays on the version in the registry for reviewers."""
    from airflow.sdk.exceptions import AirflowFailException
    from mlops_airflow import promotion
    from mlops_airflow.deploy import DeployFailed

    url, answer = fake_server
    answer["version"] = "2"  # the new version never answers
    registry = RecordingRegistry("3")

    class BrokenTarget:
        def deploy(self, version):
            raise DeployFailed("rollout of mlops/model-server made no progress")

    monkeypatch.setattr(promotion, "_context", lambda: (SimpleNamespace(serving_url=url, deploy_target="local"),
                                                        registry))
    monkeypatch.setattr(promotion, "_target", lambda settings, name: BrokenTarget())
    monkeypatch.setattr(promotion, "SMOKE_SETTLE_SECONDS", 0)
    planned = {"model_name": "m", "version": "3"}
    ti = SimpleNamespace(xcom_pull=lambda task_ids: planned)
    with pytest.raises(AirflowFailException, match="smoke test of m version 3 failed"):
        promotion.smoke_test.function(params={"smoke_requests": 3}, ti=ti)
    assert registry.tags["3"]["promotion.smoke_test"] == "failed: request 1 was answered by version 2, not 3"
    with pytest.raises(AirflowFailException, match="m version 3 did not come up: rollout .* made no progress"):
        promotion.deploy.function(ti=ti)
    assert registry.tags["3"]["promotion.deploy"] == "failed: rollout of mlops/model-server made no progress"


def test_plan_fails_without_retrying_when_the_deploy_target_is_not_there(plan_with, monkeypatch):
    """Retrying cannot start the local server or create the Deployment: the message says what to do."""
    from airflow.sdk.exceptions import AirflowFailException
    from mlops_airflow import promotion
    from mlops_airflow.deploy import TargetUnavailable

    def missing():
        raise TargetUnavailable("the local model server at http://127.0.0.1:8501 does not answer; start it")

    plan_with(champion="3", served="2")  # sets up the registry
    monkeypatch.setattr(promotion, "_target", lambda settings, name: SimpleNamespace(current=missing))
    with pytest.raises(AirflowFailException, match="does not answer; start it"):
        promotion.plan.function(params={"model_name": "m", "version": 0}, triggering_asset_events=None,
                                run_id="r1", dag_run=None)


@pytest.mark.parametrize(("run_type", "trigger"), [("SCHEDULED", "schedule"), ("MANUAL", "by hand")])
def test_plan_records_whether_the_schedule_or_a_person_started_the_run(monkeypatch, run_type, trigger):
    from airflow.sdk.api.datamodels._generated import DagRunType
    from mlops_airflow import promotion
    from mlops_airflow.deploy import Serving

    monkeypatch.setattr(promotion, "_context", lambda: (None, RecordingRegistry("3")))
    monkeypatch.setattr(promotion, "_target", lambda settings, name: SimpleNamespace(
        current=lambda: Serving("2", f"models:/{name}/2")))
    planned = promotion.plan.function(params={"model_name": "m", "version": 0}, triggering_asset_events=None,
                                      run_id="r1", dag_run=SimpleNamespace(run_type=getattr(DagRunType, run_type)))
    assert planned["trigger"] == trigger
