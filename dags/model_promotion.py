"""
### model_promotion

Keeps serving in line with the MLflow registry: **the alias `champion` names the version that must be
served.** plan → infra_validate → deploy → smoke_test → record, and rollback when a step before record fails.

Triggered three ways, one run at a time:
- by an MLflow webhook when an alias moves (the receiver on the Airflow API server, `/mlops/webhooks/mlflow`,
  checks the HMAC signature and emits an event of the asset `mlflow_champion_alias`);
- every 10 minutes as a safety net (a lost webhook delivery, an alias moved while Airflow was down);
- by hand, with `version` set to deploy a given version (the alias then follows it, unless a reviewer moved
  it during the run: the approval wins and is deployed next).

**plan** does nothing when serving already runs that version (a version given by hand that already serves
only gets the alias). **infra_validate** loads the candidate in
the real model server (the serving image, in its own pod) and sends it real requests on both protocols.
**deploy** rolls it out: the Kubernetes Deployment (`MLOPS_DEPLOY_TARGET=kubernetes`: patched, rollout
awaited, readiness = model loaded) or the supervised local server (`local`: switched in place, no request
dropped). **smoke_test** asks the live endpoint and checks every answer names the new version. **record**
tags the version `promotion.status=serving`.

When infra_validate, deploy or smoke_test fails, **rollback** restores the previous version on the serving
side (after a first promotion: nothing served, as before), moves `champion` back to it (unless a reviewer
moved it on meanwhile), tags the failed version `promotion.status=failed` (the failing step's reason is in its `promotion.*` tag) and
fails the run; a failed redeploy of the version served before (its rollout had made no progress) leaves the
alias and its status alone. When **plan** itself fails, nothing was changed: rollback is skipped and plan's error is
the run's reason. When **record** fails (MLflow unreachable), the run fails without a rollback; the next run
reconciles serving to the alias.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# Pre-imported once by the DAG processor (see mnist_training.py): the infra_validate pod's operator.
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param
from mlops_airflow.promotion import deploy, plan, record, rollback, smoke_test
from mlops_airflow.settings import MODEL_NAME_PATTERN, load
from mlops_airflow.steps import Resources, xcom
from mlops_airflow.steps import step as render_step
from mlops_airflow.webhooks import ASSET_NAME, ASSET_URI

# Emitted by the webhook receiver (plugins/mlops_webhooks.py) when MLflow reports an alias change.
CHAMPION_ALIAS = Asset(name=ASSET_NAME, uri=ASSET_URI)

settings = load()

with DAG(
    dag_id="model_promotion",
    description="Reconcile the model server to the MLflow alias champion: validate, deploy, smoke-test, roll back",
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("*/10 * * * *", timezone="UTC"),
                                 assets=[CHAMPION_ALIAS]),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one promotion at a time; the next waits
    tags=["ml", "serving", "promotion"],
    # A verdict (the candidate failed to load, to come up, or to answer) fails at once and rolls back;
    # retries are for what may pass on a second try (MLflow or the Kubernetes API briefly unreachable).
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=20),
                  "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=5)},
    params={
        "model_name": Param(settings.model_name, type="string", minLength=1, maxLength=200,
                            pattern=MODEL_NAME_PATTERN,
                            description="The registered model this deployment serves (alias events of other "
                                        "models are ignored); letters, digits, _ . -."),
        "version": Param(0, type="integer", minimum=0,
                         description="Deploy this version (the alias champion follows it, unless moved during "
                                     "the run); 0: the champion."),
        "validation_requests": Param(50, type="integer", minimum=2, maximum=10000,
                                     description="Requests the candidate must answer in infra-validation."),
        "smoke_requests": Param(20, type="integer", minimum=1, maximum=10000,
                                description="Requests to the live endpoint after deployment."),
    },
) as dag:
    planned = plan()
    validate = render_step(
        "infra_validate", settings=settings, image=settings.serving_image, timeout=timedelta(minutes=15),
        # As k8s/serving's Deployment runs the server: its CPU and memory limits, read-only root, HOME=/tmp.
        resources=Resources(cpu="1", cpu_limit="2", memory="1Gi"), read_only_root=True,
        data_volume=False,  # reads the model from MLflow only
        args={"model_name": xcom("plan", "model_name"), "version": xcom("plan", "version"),
              "requests": "{{ params.validation_requests }}"})
    deployed, smoked, recorded = deploy(), smoke_test(), record()
    restore = rollback()

    planned >> validate >> deployed >> smoked >> recorded
    [validate, deployed, smoked] >> restore
