#!/usr/bin/env bash
# make test: the steps suite in the steps environment, the Airflow suites in the Airflow environment.
# Arguments are passed to every pytest run (make test PYTEST_ARGS="-k resume").
# Three pytest runs at the same time: the Airflow suites, the search's steps tests (tests/steps/test_tune.py
# and test_search_resilience.py: Optuna workers as processes, the longest file) and the other steps tests.
# Each spends much of its time waiting on servers and subprocesses (one of them alone keeps about one core
# busy), so on 2 cores the whole run takes about as long as the longest part. The other steps tests stream
# here; the other two write var/test-logs/{airflow,search}.log, printed when they end. TEST_SERIAL=1 runs
# them one after the other, streaming each.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
search_files=(tests/steps/test_tune.py tests/steps/test_search_resilience.py)
steps=(.venvs/steps/bin/python -m pytest tests/steps "${search_files[@]/#/--ignore=}" "$@")
search=(.venvs/steps/bin/python -m pytest "${search_files[@]}" "$@")
airflow=(.venvs/airflow/bin/python -m pytest tests/dags tests/k8s tests/integration tests/images "$@")
steps_title="== steps (TensorFlow, MLflow): tests/steps but the search's"
search_title="== steps, the search (Optuna workers): ${search_files[*]}"
airflow_title="== Airflow (DAGs, pods, manifests, end to end, images): tests/dags tests/k8s tests/integration tests/images"

# pytest's exit 5 is "no tests collected": a PYTEST_ARGS="-k ..." that selects nothing in one of the parts.
verdict() {
  case $1 in
    0) echo passed ;;
    5) echo "no test selected" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

if [[ ${TEST_SERIAL:-0} == 1 ]]; then
  # Each part a background job that this script waits on, as below (bash runs a trap only once its foreground
  # command ends, but interrupts `wait`): Ctrl-C reaches the part from the terminal, a TERM (a CI timeout) is
  # passed on to it as the Ctrl-C pytest understands, and pytest's exit 2 for an interruption, which bash
  # cannot tell from a failed run, starts no further part.
  interrupted=0
  part_pid=""
  trap 'interrupted=130' INT
  trap 'interrupted=143; [[ -z $part_pid ]] || kill -INT "$part_pid" 2>/dev/null' TERM
  run_part() {
    local title=$1
    shift
    ((interrupted)) && return 255
    echo "$title"
    exec 3<&0
    ( exec env --default-signal=INT "$@" <&3 3<&- ) &
    part_pid=$!
    exec 3<&-
    local status
    while :; do
      wait "$part_pid"
      status=$?
      # over 128 with the part still there: a trap interrupted the wait; wait on until the part has ended
      # (its fixtures' cleanup included)
      ((status > 128)) && kill -0 "$part_pid" 2>/dev/null || break
    done
    part_pid=""
    return "$status"
  }
  run_part "$steps_title" "${steps[@]}"; steps_status=$?
  run_part "$search_title" "${search[@]}"; search_status=$?
  run_part "$airflow_title" "${airflow[@]}"; airflow_status=$?
  trap - INT TERM
  if ((interrupted)); then
    echo "== interrupted: the parts after it did not run" >&2
    exit "$interrupted"
  fi
else
  logs=var/test-logs
  mkdir -p "$logs"
  # The parts are background jobs of this script, which waits on them: bash runs a trap only once the
  # foreground command ends, but interrupts `wait` for it. A background job of a script starts with SIGINT
  # ignored, and bash cannot give back a signal ignored when the script started (itself a background job of
  # a non-interactive shell: a CI runner, nohup): env resets it, so that pytest stops on Ctrl-C and on the
  # SIGINT stop_suites sends, with its fixtures' cleanup (servers, temporary databases).
  default_int=(env --default-signal=INT)
  ( exec "${default_int[@]}" "${airflow[@]}" ) >"$logs/airflow.log" 2>&1 &
  airflow_pid=$!
  ( exec "${default_int[@]}" "${search[@]}" ) >"$logs/search.log" 2>&1 &
  search_pid=$!
  # Ctrl-C or a TERM (a CI timeout) must not leave any part running. Ctrl-C reaches every part from the
  # terminal already (a second SIGINT would cut short their fixtures' cleanup): wait for them. A TERM
  # reaches only this script: pass it on as the Ctrl-C pytest understands.
  steps_pid=""
  stop_suites() {
    [[ $1 == 130 ]] || kill -INT $airflow_pid $search_pid $steps_pid 2>/dev/null
    wait $airflow_pid $search_pid $steps_pid 2>/dev/null
    exit "$1"
  }
  trap 'stop_suites 130' INT
  trap 'stop_suites 143' TERM
  echo "$airflow_title: running alongside, output in $logs/airflow.log (printed when it ends)"
  echo "$search_title: running alongside, output in $logs/search.log (printed when it ends)"
  echo "$steps_title"
  # The terminal as its stdin (a background job's would be /dev/null): PYTEST_ARGS=--pdb still works.
  exec 3<&0
  ( exec "${default_int[@]}" "${steps[@]}" <&3 3<&- ) &
  steps_pid=$!
  exec 3<&-
  wait $steps_pid
  steps_status=$?
  wait $search_pid
  search_status=$?
  wait $airflow_pid
  airflow_status=$?
  trap - INT TERM
  echo "$search_title"
  cat "$logs/search.log"
  echo "$airflow_title"
  cat "$logs/airflow.log"
fi
echo "== steps: $(verdict $steps_status); the search's steps tests: $(verdict $search_status);" \
  "Airflow suites: $(verdict $airflow_status)"
if [[ $steps_status == 5 && $search_status == 5 && $airflow_status == 5 ]]; then
  echo "no test selected in any part: check PYTEST_ARGS and TEST_MARKERS" >&2
  exit 5
fi
ok() { [[ $1 == 0 || $1 == 5 ]]; }
ok $steps_status && ok $search_status && ok $airflow_status
