#!/usr/bin/env bash
# make test: the steps suite in the steps environment, the Airflow suites in the Airflow environment.
# Arguments are passed to both pytest runs (make test PYTEST_ARGS="-k resume").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
status=0
echo "== steps (TensorFlow, MLflow): tests/steps"
.venvs/steps/bin/python -m pytest tests/steps "$@" || status=1
echo "== Airflow (DAGs, pods, manifests, end to end, images): tests/dags tests/k8s tests/integration tests/images"
.venvs/airflow/bin/python -m pytest tests/dags tests/k8s tests/integration tests/images "$@" || status=1
exit $status
