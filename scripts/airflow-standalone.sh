#!/usr/bin/env bash
# make airflow-ui: MLflow, the local model server and Airflow (scheduler, API server and UI on :8080) on this
# machine, local runtime. Trigger mnist_training from the UI's trigger form; approve in Required Actions or move
# the alias champion in the MLflow UI: MLflow's webhook starts model_promotion, which deploys it to the model
# server. Ctrl-C stops Airflow (MLflow and the model server keep running: make mlflow-stop serving-stop).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
mkdir -p var
MLFLOW_TRACKING_URI=$(mlflow/server.sh start)
export MLFLOW_TRACKING_URI
echo "MLflow: $MLFLOW_TRACKING_URI"
{ airflow db migrate && scripts/airflow-pools.sh; } >var/airflow-migrate.log 2>&1 \
  || { tail -n 30 var/airflow-migrate.log; exit 1; }
# The model both DAGs default to (MLOPS_MODEL_NAME): the server answers under its name only.
serving_url=$(MODEL_NAME=${MLOPS_MODEL_NAME:-mnist_classifier} scripts/serving.sh start)
echo "model server: $serving_url"
# The webhook secret Airflow's receiver checks and MLflow signs with (kept across restarts).
if [[ -z ${MLOPS_WEBHOOK_SECRET:-} ]]; then
  [[ -s var/webhook-secret ]] || (umask 077; .venvs/steps/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' >var/webhook-secret)
  MLOPS_WEBHOOK_SECRET=$(cat var/webhook-secret)
fi
export MLOPS_WEBHOOK_SECRET MLOPS_SERVING_URL=$serving_url
.venvs/steps/bin/python scripts/mlflow_webhook.py --airflow-url http://127.0.0.1:${AIRFLOW__API__PORT:-8080}
echo "Airflow: http://localhost:${AIRFLOW__API__PORT:-8080} (user admin; password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
# Own process group, so that Ctrl-C (or a TERM to this script) ends every Airflow child too.
setsid airflow standalone &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null; wait $pid' INT TERM EXIT
wait $pid
