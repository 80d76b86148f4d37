#!/usr/bin/env bash
# make airflow-ui: MLflow plus Airflow (scheduler, API server and UI on :8080) on this machine, local runtime.
# Trigger mnist_training from the UI's trigger form; Ctrl-C stops Airflow (MLflow keeps running:
# 'make mlflow-stop').
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
mkdir -p var
MLFLOW_TRACKING_URI=$(mlflow/server.sh start)
export MLFLOW_TRACKING_URI
echo "MLflow: $MLFLOW_TRACKING_URI"
{ airflow db migrate && scripts/airflow-pools.sh; } >var/airflow-migrate.log 2>&1 \
  || { tail -n 30 var/airflow-migrate.log; exit 1; }
echo "Airflow: http://localhost:8080 (user admin; password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
# Own process group, so that Ctrl-C (or a TERM to this script) ends every Airflow child too.
setsid airflow standalone &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null; wait $pid' INT TERM EXIT
wait $pid
