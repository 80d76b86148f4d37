"""Airflow-side glue of the hyperparameter search: whether to search, how many workers, what train gets.

Both are tiny tasks that run in the Airflow worker itself (no pod): they only read params and XCom.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

HYPERPARAMETERS = ("learning_rate", "batch_size", "width", "dropout")  # what the search may set for train
SELECT_TASK = "select"
START_FROM = ("champion", "form", "none")  # the search's first trial (the trigger form's search_start_from)
# The tune setup's --start-from (the form's hyperparameters) and --start-from-champion (the model name), as
# templates: the champion's hyperparameters come first, the form's while there is no champion.
START_FROM_ARGS = {
    "start_from": "{{ ({" + ", ".join(f"'{n}': params.{n}" for n in HYPERPARAMETERS)
                  + "} | tojson) if params.search_start_from != 'none' else '' }}",
    "start_from_champion": "{{ params.model_name if params.search_start_from == 'champion' else '' }}",
}


def batch_split_error(params: dict[str, Any], runtime: str) -> str | None:
    """Why train would refuse the form's batch size on the form's GPUs (several GPUs need a batch that splits
    evenly over them), or None. Only without a search (its study checks every batch size it may pick) and on
    Kubernetes (a local train uses the machine's GPUs, whatever the form says)."""
    gpus, batch = int(params.get("gpus") or 0), int(params["batch_size"])
    if params.get("search") or runtime != "kubernetes" or gpus <= 1 or batch % gpus == 0:
        return None
    lower, upper = batch // gpus * gpus, -(-batch // gpus) * gpus
    options = " or ".join(str(b) for b in dict.fromkeys((lower, upper)) if b >= 8)
    return (f"batch_size {batch} does not split evenly over the {gpus} GPUs of the form's gpus, so train would "
            f"refuse it after prep and validate (and after waiting for a {gpus}-GPU node); give a batch size that "
            f"is a multiple of {gpus} ({options}), or another number of GPUs")


def check_training_conf(context: Any, *, runtime: str) -> None:
    """``pre_execute`` of the training DAG's first task: the run's config (unknown keys), then what train would
    refuse only hours later."""
    from mlops_airflow.runconf import check_conf

    check_conf(context)
    error = batch_split_error(context["params"], runtime)
    if error:
        raise AirflowFailException(error)


@task.short_circuit(task_id="plan_search", ignore_downstream_trigger_rules=False,
                    execution_timeout=timedelta(minutes=2))
def plan_search(params: dict[str, Any] | None = None) -> list[list[str]]:
    """One argument list per trial worker, e.g. [["--worker", "0"], ["--worker", "1"]]; never more than trials.

    With the search turned off the list is empty, which skips the search tasks (and only them: train then
    uses the trigger form's hyperparameters).
    """
    assert params is not None
    if not params["search"]:
        return []
    # A worker takes one trial at a time: more workers than trials would only wait (holding a pod, a GPU).
    workers = min(int(params["search_workers"]), int(params["search_trials"]))
    return [["--worker", str(i)] for i in range(workers)]


@task(task_id="hyperparameters", trigger_rule="none_failed_min_one_success", execution_timeout=timedelta(minutes=2))
def hyperparameters(params: dict[str, Any] | None = None, ti: Any = None) -> dict[str, Any]:
    """The search's best hyperparameters if it ran, else the trigger form's; and where they came from."""
    assert params is not None and ti is not None
    tuned = ti.xcom_pull(task_ids=SELECT_TASK)
    if not tuned and params["search"]:
        # e.g. select skipped because a worker was skipped: never train silently on the form's values
        raise AirflowFailException("search is on but select produced no hyperparameters; see the search tasks")
    if tuned:
        chosen = {name: tuned["hyperparameters"].get(name, params[name]) for name in HYPERPARAMETERS}
        return {**chosen, "source": "search", "search_run_id": tuned["search_run_id"], "trial": tuned["trial"],
                "value": tuned["value"], "objective": tuned["objective"]}
    return {**{name: params[name] for name in HYPERPARAMETERS}, "source": "trigger form", "search_run_id": None,
            "trial": None}
