#!/usr/bin/env bash
# The local model server (the local deploy target): started, supervised and stopped here.
#   scripts/serving.sh start|stop|status|url
# A supervisor loop restarts the server whenever it exits ('stop' ends both); the server comes back with the version it served
# (var/serving/deployed.json), not with whatever the alias says now. model_promotion switches versions
# through its /admin/deploy endpoint, authenticated by the token in var/serving/admin-token.
# Settings (environment): SERVING_PORT (8501), SERVING_HOST (127.0.0.1), MODEL_NAME (mnist_classifier),
# MLFLOW_TRACKING_URI (default: mlflow/server.sh url), MLOPS_VAR (<repo>/var), STEPS_PYTHON.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
# Physical (links resolved): the state folder marks our processes, and must read the same however it is named
# (make clean gives $(CURDIR)/var, a shell in a linked checkout the path through the link).
var=$(realpath -m -- "${MLOPS_VAR:-$root/var}")
state=$var/serving
port=${SERVING_PORT:-8501}
host=${SERVING_HOST:-127.0.0.1}
model=${MODEL_NAME:-mnist_classifier}
python=${STEPS_PYTHON:-$root/.venvs/steps/bin/python}
pidfile=$state/supervisor.pid
url="http://$host:$port"

source "$root/scripts/lib/daemon.sh"
daemon_marker=$state  # in the supervisor's command line (its state folder argument)
live() { curl -fsS -m 2 "$url/v2/health/live" >/dev/null 2>&1; }
running() { daemon_running "$pidfile"; }
requested=$url
# A running server answers where it was started (recorded in its state folder), whatever the environment says now.
if running && [[ -s $state/url ]]; then url=$(cat "$state/url"); fi

case "${1:-}" in
  start)
    daemon_require_curl
    daemon_lock "$state" || exit 1
    if running; then
      daemon_other_url "$state" "$requested" live || exit 1
      # Ours, alive: still starting (or failing). Wait for it rather than start a second supervisor.
      daemon_await "$pidfile" "$state/server.log" "the model server on $url" live \
        || { daemon_stop "$pidfile"; exit 1; }
      echo "$url"; exit 0
    fi
    if live; then echo "error: something else already answers on $url; set SERVING_PORT to another port" >&2; exit 1; fi
    [[ -x $python ]] || { echo "error: $python not found; run 'make envs' first" >&2; exit 1; }
    tracking=${MLFLOW_TRACKING_URI:-$(MLOPS_VAR=$var "$root/mlflow/server.sh" url)}
    mkdir -p "$state"
    if [[ ! -s $state/admin-token ]]; then
      (umask 077; "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$state/admin-token")
    fi
    echo "$url" >"$state/url"  # before the pid file: a concurrent start that finds the server finds its URL
    # setsid: supervisor and server form one process group that 'stop' ends together.
    MLFLOW_TRACKING_URI=$tracking env "$(daemon_env)" setsid bash -c '
      while true; do
        "$0" -m mlsteps.serve --model-name "$1" --host "$2" --port "$3" \
          --deployment-file "$4/deployed.json" --admin-token-file "$4/admin-token"
        code=$?
        echo "$(date -u +%FT%TZ) supervisor: model server exited with code $code; restarting in 2 s"
        sleep 2
      done' "$python" "$model" "$host" "$port" "$state" >>"$state/server.log" 2>&1 </dev/null 9>&- &
    echo $! >"$pidfile"
    # A server that never comes up is not left restarting in the background.
    daemon_await "$pidfile" "$state/server.log" "the model server on $url" live \
      || { daemon_stop "$pidfile"; exit 1; }
    echo "$url"
    ;;
  stop) daemon_stop "$pidfile" "the model server on $url" ;;
  status)
    daemon_require_curl
    if running && live; then
      echo "running: $url (supervisor pid $(cat "$pidfile"))"
      curl -fsS -m 2 "$url/v1/models/$model" || true; echo
    elif running; then
      echo "running (supervisor pid $(cat "$pidfile")) but not answering on $url; log: $state/server.log"; exit 1
    else
      echo "stopped"; exit 3
    fi
    ;;
  url) echo "$url" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 64 ;;
esac
