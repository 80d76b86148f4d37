#!/usr/bin/env bash
# make test: the steps suite in the steps environment, the Airflow suites in the Airflow environment.
# Arguments are passed to both pytest runs (make test PYTEST_ARGS="-k resume").
# The two suites run at the same time: each spends much of its time waiting on servers and subprocesses,
# so the whole run takes about 15 minutes on 2 cores. The steps suite streams here; the Airflow
# suites write var/test-logs/airflow.log, printed when they end. TEST_SERIAL=1 runs one after the other.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
steps=(.venvs/steps/bin/python -m pytest tests/steps "$@")
airflow=(.venvs/airflow/bin/python -m pytest tests/dags tests/k8s tests/integration tests/images "$@")
steps_title="== steps (TensorFlow, MLflow): tests/steps"
airflow_title="== Airflow (DAGs, pods, manifests, end to end, images): tests/dags tests/k8s tests/integration tests/images"

if [[ ${TEST_SERIAL:-0} == 1 ]]; then
  status=0
  echo "$steps_title"; "${steps[@]}" || status=1
  echo "$airflow_title"; "${airflow[@]}" || status=1
  exit $status
fi

logs=var/test-logs
mkdir -p "$logs"
# Both suites run as background jobs, and this script waits on them: bash runs a trap only once the
# foreground command ends, but interrupts `wait` for it. A background job of a script starts with SIGINT
# ignored: give it back, so that Ctrl-C reaches it.
( trap - INT; exec "${airflow[@]}" ) >"$logs/airflow.log" 2>&1 &
airflow_pid=$!
# Ctrl-C or a TERM (a CI timeout) must not leave either suite running. Ctrl-C reaches both suites from the
# terminal already (a second SIGINT would cut short their fixtures' cleanup): wait for them. A TERM reaches
# only this script: pass it on as the Ctrl-C pytest understands.
steps_pid=""
stop_suites() {
  [[ $1 == 130 ]] || kill -INT $airflow_pid $steps_pid 2>/dev/null
  wait $airflow_pid $steps_pid 2>/dev/null
  exit "$1"
}
trap 'stop_suites 130' INT
trap 'stop_suites 143' TERM
echo "$airflow_title: running alongside, output in $logs/airflow.log (printed when it ends)"
echo "$steps_title"
# The terminal as its stdin (a background job's would be /dev/null): PYTEST_ARGS=--pdb still works.
exec 3<&0
( trap - INT; exec "${steps[@]}" <&3 3<&- ) &
steps_pid=$!
exec 3<&-
wait $steps_pid
steps_status=$?
wait $airflow_pid
airflow_status=$?
trap - INT TERM
echo "$airflow_title"
cat "$logs/airflow.log"
echo "== steps suite: $([[ $steps_status -eq 0 ]] && echo passed || echo "FAILED (exit $steps_status)");" \
  "Airflow suites: $([[ $airflow_status -eq 0 ]] && echo passed || echo "FAILED (exit $airflow_status)")"
[[ $steps_status -eq 0 && $airflow_status -eq 0 ]]
