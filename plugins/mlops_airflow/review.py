"""Airflow-side glue of the review: which path a registered version takes, and the approval card.

``review`` (trigger-form param) chooses: ``approval`` waits for a reviewer in Airflow's Required Actions
(ApprovalOperator), ``auto`` promotes a version that passed the gate, ``none`` stops after the gate.
A version that failed the gate is never offered for approval or promoted.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, task

log = logging.getLogger(__name__)

REVIEW_MODES = ("approval", "auto", "none")
APPROVE_TASK, PROMOTE_TASK = "approve", "promote"


@task.branch(task_id="plan_review", execution_timeout=timedelta(minutes=2))
def plan_review(params: dict[str, Any] | None = None, ti: Any = None) -> list[str]:
    """``approve`` (wait for a reviewer), ``promote`` (auto and the gate passed), or nothing."""
    assert params is not None and ti is not None
    verdict = ti.xcom_pull(task_ids="gate") or {}
    if params["review"] == "none" or not verdict.get("passed"):
        return []
    return [APPROVE_TASK] if params["review"] == "approval" else [PROMOTE_TASK]


@task.short_circuit(task_id="plan_rejection", trigger_rule="none_failed", execution_timeout=timedelta(minutes=2))
def plan_rejection(ti: Any = None) -> bool:
    """Whether there is a rejection to record: the card was shown (plan_review chose ``approve``) and no approval
    came back (Reject, or no answer in time). Otherwise record_rejection is skipped: no pod to start for nothing
    (on Kubernetes, an unschedulable one would fail a run that promoted its model)."""
    assert ti is not None
    asked = APPROVE_TASK in (ti.xcom_pull(task_ids="plan_review") or [])
    rejected = asked and not ti.xcom_pull(task_ids=APPROVE_TASK)
    log.info("%s", "rejected (or no answer in time): recording it" if rejected else
             "approved" if asked else "no reviewer was asked: nothing to record")
    return rejected


CARD = """\
### {{ params.model_name }} version {{ ti.xcom_pull(task_ids='register')['version'] }} wants to become `champion`
{% set gate = ti.xcom_pull(task_ids='gate') %}{% set comp = ti.xcom_pull(task_ids='compress') %}
| | this version | champion |
|---|---|---|
| test accuracy (as served) | {{ '%.2f' % (100 * gate['accuracy']) }} % | \
{% if gate['champion_accuracy'] is not none %}{{ '%.2f' % (100 * gate['champion_accuracy']) }} % \
(version {{ gate['champion_version'] }}){% else %}none yet{% endif %} |

**Quality gate: {{ gate['verdict'] }}**: {{ gate['reasons'] }}

**Compression**: `{{ comp['variant'] }}`, {{ comp['size_bytes'] }} bytes, \
{{ '%+.2f' % (-comp['accuracy_drop_points']) }} pt against the float model; {{ comp['reason'] }}

[Model version in MLflow]({{ mlflow_ui }}/#/models/{{ params.model_name }}/versions/\
{{ ti.xcom_pull(task_ids='register')['version'] }}) (training run `{{ ti.xcom_pull(task_ids='train')['mlflow_run_id'] }}`:
learning curves, evaluation, compression table and plot)

Approve moves the alias `champion` to this version (promotion then deploys it); Reject tags it rejected.
"""


ANSWER_KEY = "answer"
MAX_RESPONSE_TIME = timedelta(hours=18)
# A card shown just before the next scheduled run still gets two hours (that run then starts up to two hours
# late); otherwise it closes a quarter of an hour before that run is due.
MIN_RESPONSE_TIME = timedelta(hours=2)
NIGHTLY_MARGIN = timedelta(minutes=15)


class ReviewApproval(ApprovalOperator):
    """ApprovalOperator that keeps every answer in XCom (key ``answer``), a rejection's too.

    On Reject (or no answer in time) the operator skips ``promote`` by raising out of ``execute_complete``
    before its answer is returned, so the return value is never pushed: who rejected, when and why would
    be lost to ``record_rejection``.
    """

    def timeout_for(self, now: datetime, timezone: Any = None) -> timedelta:
        """How long a card shown at ``now`` waits: 18 h, ending ``NIGHTLY_MARGIN`` before the DAG's next
        scheduled run (one run at a time: an open card would hold it back), but never under
        ``MIN_RESPONSE_TIME``. The DAG's cron is read in ``timezone``, by default the DAG's (Airflow's
        default_timezone); a DAG without a cron schedule gives 18 h."""
        schedule = getattr(self.dag, "schedule", None) if self.has_dag() else None
        if not isinstance(schedule, str):
            return MAX_RESPONSE_TIME
        from croniter import croniter

        if timezone is None:
            timezone = getattr(self.dag, "timezone", None)
        local = now.astimezone(timezone) if timezone is not None else now
        next_run = croniter(schedule, local).get_next(datetime)
        return max(MIN_RESPONSE_TIME, min(MAX_RESPONSE_TIME, next_run - local - NIGHTLY_MARGIN))

    def execute(self, context: Any) -> Any:
        # From when the card is shown (a retry shows it again: the clock restarts, still before the next run).
        self.response_timeout = self.timeout_for(datetime.now(UTC))
        self.log.info("the review card waits up to %s for an answer (no answer: Reject)", self.response_timeout)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:
            responded_at = event.get("responded_at")
            context["ti"].xcom_push(key=ANSWER_KEY, value={
                "chosen_options": list(event.get("chosen_options") or []),
                "params_input": dict(event.get("params_input") or {}),
                "responded_by_user": event.get("responded_by_user"),
                "responded_at": responded_at.isoformat() if hasattr(responded_at, "isoformat") else responded_at})
        return super().execute_complete(context=context, event=event)


def approval(*, mlflow_ui: str) -> ApprovalOperator:
    """The review card in Required Actions; on timeout the version is rejected."""
    return ReviewApproval(
        task_id=APPROVE_TASK,
        subject="Promote {{ params.model_name }} version {{ ti.xcom_pull(task_ids='register')['version'] }} "
                "to champion?",
        body=CARD.replace("{{ mlflow_ui }}", mlflow_ui.rstrip("/")),
        defaults="Reject",
        # Set when the card is shown (ReviewApproval.timeout_for): at most 18 h, and over before the next
        # scheduled run, which max_active_runs=1 would otherwise hold back until the answer.
        response_timeout=MAX_RESPONSE_TIME,
        # null: the UI sends a text field the reviewer emptied as null, which "string" alone would refuse when
        # the task resumes (the answer lost, the card shown again).
        params={"comment": Param("", type=["null", "string"], description="Why (recorded on the model version)")},
    )


# Jinja for the review step's arguments, from the approval's answer (absent when no one was asked).
_ANSWER = "{% set r = ti.xcom_pull(task_ids='approve') or {} %}"
DECISION = _ANSWER + "{{ 'approved' if r else 'auto' }}"
# On Reject (or no answer in time) ApprovalOperator skips `promote` and returns no answer: the card was
# shown (plan_review chose it) and no approval came back. Who rejected, and why: ReviewApproval's `answer`.
REJECTED = _ANSWER + ("{% set asked = 'approve' in (ti.xcom_pull(task_ids='plan_review') or []) %}"
                      "{{ 'rejected' if asked and not r else 'none' }}")
_REJECTION = "{% set a = ti.xcom_pull(task_ids='approve', key='" + ANSWER_KEY + "') or {} %}"
REJECTED_BY = _REJECTION + ("{{ (a.get('responded_by_user') or {}).get('name') or "
                            "('nobody: no answer in time' if a else 'unknown') }}")
REJECTED_COMMENT = _REJECTION + ("{% set c = (a.get('params_input') or {}).get('comment', '') %}"
                                 "{{ (c['value'] if c is mapping else c) or '' }}")
REJECTED_AT = _REJECTION + "{{ a.get('responded_at', '') }}"
REVIEWER = _ANSWER + "{{ (r.get('responded_by_user') or {}).get('name') or ('pipeline' if not r else 'unknown') }}"
COMMENT = _ANSWER + ("{% set c = (r.get('params_input') or {}).get('comment', '') %}"
                     "{{ (c['value'] if c is mapping else c) or '' }}")
DECIDED_AT = _ANSWER + "{{ r.get('responded_at', '') }}"
