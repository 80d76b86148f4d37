#!/usr/bin/env bash
# The local model server (the local deploy target): started, supervised and stopped here.
#   scripts/serving.sh start|stop|status|url
# A supervisor loop restarts the server whenever it exits ('stop' ends both); the server comes back with the version it served
# (var/serving/deployed.json), not with whatever the alias says now. model_promotion switches versions
# through its /admin/deploy endpoint, authenticated by the token in var/serving/admin-token.
# Settings (environment): SERVING_PORT (8501), SERVING_HOST (127.0.0.1), MODEL_NAME (mnist_classifier),
# MLFLOW_TRACKING_URI (default: mlflow/server.sh url), MLOPS_VAR (<repo>/var), STEPS_PYTHON.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
var=${MLOPS_VAR:-$root/var}
state=$var/serving
port=${SERVING_PORT:-8501}
host=${SERVING_HOST:-127.0.0.1}
model=${MODEL_NAME:-mnist_classifier}
python=${STEPS_PYTHON:-$root/.venvs/steps/bin/python}
pidfile=$state/supervisor.pid
url="http://$host:$port"

live() { curl -fsS -m 2 "$url/v2/health/live" >/dev/null 2>&1; }
running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running && live; then echo "$url"; exit 0; fi
    if live; then echo "error: something else already answers on $url; set SERVING_PORT to another port" >&2; exit 1; fi
    [[ -x $python ]] || { echo "error: $python not found; run 'make envs' first" >&2; exit 1; }
    tracking=${MLFLOW_TRACKING_URI:-$(MLOPS_VAR=$var "$root/mlflow/server.sh" url)}
    mkdir -p "$state"
    if [[ ! -s $state/admin-token ]]; then
      (umask 077; "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$state/admin-token")
    fi
    # setsid: supervisor and server form one process group that 'stop' ends together.
    MLFLOW_TRACKING_URI=$tracking setsid bash -c '
      while true; do
        "$0" -m mlsteps.serve --model-name "$1" --host "$2" --port "$3" \
          --deployment-file "$4/deployed.json" --admin-token-file "$4/admin-token"
        code=$?
        echo "$(date -u +%FT%TZ) supervisor: model server exited with code $code; restarting in 2 s"
        sleep 2
      done' "$python" "$model" "$host" "$port" "$state" >>"$state/server.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 60); do
      if live; then echo "$url"; exit 0; fi
      running || break
      sleep 0.5
    done
    echo "error: the model server did not come up on $url; log: $state/server.log" >&2
    tail -n 20 "$state/server.log" >&2 || true
    exit 1
    ;;
  stop)
    if running; then
      pid=$(cat "$pidfile")
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    ;;
  status)
    if running && live; then
      echo "running: $url (supervisor pid $(cat "$pidfile"))"
      curl -fsS -m 2 "$url/v1/models/$model" || true; echo
    else
      echo "stopped"; exit 3
    fi
    ;;
  url) echo "$url" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 64 ;;
esac
