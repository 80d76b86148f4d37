"""model_promotion as the scheduler and Kubernetes see it, and its plan: when it deploys and when it does nothing.

The run itself (local target, real server, real MLflow) is in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from dagsupport import DAGS, FakeTaskInstance


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


class FakeRegistry:
    def __init__(self, champion: str | None, versions: tuple[str, ...] = ("1", "2", "3")) -> None:
        self.champion, self.versions = champion, versions

    def alias(self, name: str, alias: str) -> str | None:
        return self.champion

    def version(self, name: str, version: str) -> dict | None:
        return {"version": version} if version in self.versions else None


@pytest.fixture
def plan_with(monkeypatch):
    """Run plan's function against a registry and a target that serves ``served``."""
    from mlops_airflow import promotion
    from mlops_airflow.deploy import Serving

    def run(champion: str | None, served: str | None, version: int = 0, events: dict | None = None,
            model_name: str = "mnist_classifier"):
        seen = {}

        def target(settings, name):
            seen["model"] = name
            return SimpleNamespace(current=lambda: Serving(served, f"models:/{name}/{served}" if served else ""))

        monkeypatch.setattr(promotion, "_context", lambda: (None, FakeRegistry(champion)))
        monkeypatch.setattr(promotion, "_target", target)
        params = {"model_name": model_name, "version": version}
        dag_run = SimpleNamespace(run_type="asset_triggered" if events else "scheduled")
        return promotion.plan.function(params=params, triggering_asset_events=events, run_id="r1",
                                       dag_run=dag_run), seen

    return run


def test_plan_does_nothing_when_serving_runs_the_champion_or_there_is_none(plan_with):
    assert plan_with(champion="2", served="2")[0] == {}
    assert plan_with(champion=None, served="2")[0] == {}


def test_plan_promotes_the_champion_and_remembers_what_served_before(plan_with):
    planned, _ = plan_with(champion="3", served="2")
    assert planned == {"model_name": "mnist_classifier", "version": "3", "previous_version": "2",
                       "previous_model_uri": "models:/mnist_classifier/2", "trigger": "schedule", "run_id": "r1"}


def test_plan_deploys_a_version_given_by_hand_even_if_the_alias_names_another(plan_with):
    planned, _ = plan_with(champion="2", served="2", version=1)
    assert (planned["version"], planned["trigger"]) == ("1", "manual")


def test_plan_refuses_a_version_that_is_not_registered(plan_with):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="version 9 is not registered"):
        plan_with(champion="2", served="2", version=9)


def test_plan_follows_the_model_named_by_the_webhook_event(plan_with):
    event = SimpleNamespace(extra={"model_name": "fashion_classifier", "version": "3"})
    planned, seen = plan_with(champion="3", served="1", events={"mlflow_champion_alias": [event]})
    assert seen["model"] == "fashion_classifier"
    assert (planned["model_name"], planned["trigger"]) == ("fashion_classifier", "mlflow webhook")
