#!/usr/bin/env bash
# Start, stop or query the local MLflow tracking server: SQLite backend, artifacts proxied to a folder.
#   mlflow/server.sh start|stop|status|url
# Settings (environment): MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1), MLOPS_VAR (<repo>/var),
# MLFLOW_BIN (the steps environment's mlflow), MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false: GenAI jobs off).
# Webhooks (registry events to Airflow's receiver, scripts/mlflow_webhook.py) work on this SQLite backend;
# for this local server they may target http:// and loopback addresses, and webhook secrets are encrypted
# with a key kept in var/mlflow/webhook-key (MLflow would otherwise make a new one at every start).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
# Physical (links resolved): the state folder marks our processes, and must read the same however it is named
# (make clean gives $(CURDIR)/var, a shell in a linked checkout the path through the link).
var=$(realpath -m -- "${MLOPS_VAR:-$root/var}")
state=$var/mlflow
port=${MLFLOW_PORT:-5000}
host=${MLFLOW_HOST:-127.0.0.1}
mlflow_bin=${MLFLOW_BIN:-$root/.venvs/steps/bin/mlflow}
pidfile=$state/server.pid
url="http://$host:$port"

source "$root/scripts/lib/daemon.sh"
daemon_marker=$state  # in the server's command line (its SQLite path)
healthy() { curl -fsS -m 2 "$url/health" >/dev/null 2>&1; }
running() { daemon_running "$pidfile"; }
requested=$url
# A running server answers where it was started (recorded in its state folder), whatever the environment says now.
if running && [[ -s $state/url ]]; then url=$(cat "$state/url"); fi

case "${1:-}" in
  start)
    daemon_require_curl
    daemon_lock "$state" || exit 1
    if running; then
      daemon_other_url "$state" "$requested" healthy || exit 1
      # Ours, alive: still starting (or hung). Wait for it rather than start a second one over its pid file.
      daemon_await "$pidfile" "$state/server.log" "the MLflow server on $url" healthy \
        || { daemon_stop "$pidfile"; exit 1; }
      echo "$url"; exit 0
    fi
    if healthy; then
      echo "error: something else already answers on $url; set MLFLOW_PORT to another port" >&2; exit 1
    fi
    [[ -x $mlflow_bin ]] || { echo "error: $mlflow_bin not found; run 'make envs' first" >&2; exit 1; }
    mkdir -p "$state/artifacts"
    # One key for the life of the database: the webhook secrets stored in it are encrypted with it, and under
    # another key MLflow can read no webhook (deliveries stop, scripts/mlflow_webhook.py cannot update it).
    # A key given in the environment is kept in the file for the starts without it, and must match it.
    given_key=${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY:-}
    if [[ -s $state/webhook-key && -n $given_key && $given_key != "$(cat "$state/webhook-key")" ]]; then
      echo "error: MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY differs from the key in $state/webhook-key, with which" \
        "this server's webhook secrets are stored: unset it (or set it to that key)" >&2
      exit 1
    fi
    if [[ ! -s $state/webhook-key ]]; then
      if [[ -n $given_key ]]; then
        (umask 077; printf '%s\n' "$given_key" >"$state/webhook-key")
      else
        (umask 077; "$(dirname "$mlflow_bin")/python" -c \
          'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())' >"$state/webhook-key")
      fi
    fi
    export MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$(cat "$state/webhook-key")
    export MLFLOW_WEBHOOK_ALLOWED_SCHEMES=${MLFLOW_WEBHOOK_ALLOWED_SCHEMES:-http,https}
    export MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=${MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS:-true}
    export MLFLOW_WEBHOOK_CACHE_TTL=${MLFLOW_WEBHOOK_CACHE_TTL:-5}
    # MLflow 3's job runner serves only GenAI features (judges, prompt optimisation, trace rollups): off, it
    # saves seven idle worker processes (~25 CPU-seconds at every start, then ~10 % of a core). Webhooks
    # do not use it.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
    echo "$url" >"$state/url"  # before the pid file: a concurrent start that finds the server finds its URL
    # setsid: the server and its workers form one process group that 'stop' can end together;
    # MLOPS_DAEMON (daemon_env) marks as ours its uvicorn worker, whose command line names no state folder.
    env "$(daemon_env)" setsid "$mlflow_bin" server \
        --backend-store-uri "sqlite:///$state/mlflow.db" \
        --artifacts-destination "$state/artifacts" \
        --host "$host" --port "$port" --workers 1 \
        >"$state/server.log" 2>&1 < /dev/null 9>&- &
    echo $! >"$pidfile"
    daemon_await "$pidfile" "$state/server.log" "the MLflow server on $url" healthy \
      || { daemon_stop "$pidfile"; exit 1; }
    echo "$url"
    ;;
  stop) daemon_stop "$pidfile" "the MLflow server on $url" ;;
  status)
    daemon_require_curl
    if running && healthy; then echo "running: $url (pid $(cat "$pidfile"))"
    elif running; then echo "running (pid $(cat "$pidfile")) but not answering on $url; log: $state/server.log"; exit 1
    else echo "stopped"; exit 3; fi
    ;;
  url) echo "$url" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 64 ;;
esac
