# What mlflow/server.sh and scripts/serving.sh share (sourced): a background process group with a pid file,
# awaited and stopped the same way. The recorded pid leads its own process group (started with setsid).

# daemon_running <pidfile>: a process of the recorded group is alive and is ours: its full command line holds
# $daemon_marker (set by the sourcing script), or its environment has MLOPS_DAEMON=$daemon_marker (what
# daemon_env gives the processes a start launches), so a pid file left by a reboot never names someone else's
# process. The whole group counts: a server whose supervisor (the group's leader) was killed is still ours,
# even when what is left is a worker whose command line names no state folder (MLflow's uvicorn).
daemon_running() {
  local pid group member code
  [[ -f $1 ]] && pid=$(cat "$1") && [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
  # Never this script's own group (a pid reused after a reboot): stopping it would signal the caller.
  [[ $pid -ne $(ps -o pgid= -p $$ | tr -d ' ') ]] || return 1
  # pgrep exits 1 for "no such process"; anything else means it could not look, which must not read as
  # "not running" (stop would drop the pid file and report success, the server still up).
  group=$(pgrep -a -g "$pid" 2>/dev/null) || {
    code=$?
    ((code == 1)) && return 1
    echo "error: pgrep failed (exit $code) looking for the process group in $1; is procps installed" \
      "(apt-get install procps)? Nothing was stopped or started" >&2
    exit 1
  }
  [[ $group == *"${daemon_marker:?daemon_marker not set}"* ]] && return 0
  for member in $(pgrep -g "$pid"); do
    # Readable for our own processes only: another user's process never counts as ours.
    # (the redirection inside the braces: an unreadable or vanished environ file says nothing on the terminal)
    { tr '\0' '\n' <"/proc/$member/environ"; } 2>/dev/null | grep -qxF "MLOPS_DAEMON=$daemon_marker" && return 0
  done
  return 1
}

# daemon_env: the environment entry that marks a started server and every process it starts as ours
# (start it with: env "$(daemon_env)" setsid ...).
daemon_env() { echo "MLOPS_DAEMON=${daemon_marker:?daemon_marker not set}"; }

# daemon_require_curl: the health checks use curl; without it a start would wait its whole timeout.
daemon_require_curl() {
  command -v curl >/dev/null || { echo "error: curl not found (the health checks use it): apt-get install curl" >&2; exit 1; }
}

# daemon_other_url <state> <url> <check command...>: fails (1) when the running server was started on another
# URL than <url>, saying so; a start must neither wait for nor stop it. A server started before URLs were
# recorded (no <state>/url) counts as on <url> only if the check passes there.
daemon_other_url() {
  local state=$1 url=$2 recorded
  shift 2
  recorded=$(cat "$state/url" 2>/dev/null || true)
  [[ $recorded == "$url" ]] && return 0
  [[ -z $recorded ]] && "$@" && return 0
  echo "error: already running on ${recorded:-another address (started before this script recorded it)}" \
    "(state folder $state); stop it first, or give another MLOPS_VAR" >&2
  return 1
}

# daemon_lock <state folder>: hold the folder's start lock (fd 9) until this script ends, so that two starts
# at once (make demo beside make airflow-ui) do not both launch a server between the one's check and its pid
# file. The server must not inherit it: start it with 9>&-.
daemon_lock() {
  mkdir -p "$1"
  exec 9>"$1/.start.lock"
  flock -w 300 9 || { echo "error: another start of the server in $1 holds its lock for 300 s" >&2; return 1; }
}

# daemon_await <pidfile> <log> <what> <check command...>: wait up to $DAEMON_START_SECONDS (60) s for the
# check to pass while the process lives; otherwise say so with the end of its log and return 1. Interrupted
# meanwhile (Ctrl-C, TERM), it stops the process group: it runs in its own session (setsid), so nothing else
# would, and a server that cannot come up would be restarted by its supervisor forever.
daemon_await() {
  local pidfile=$1 log=$2 what=$3
  shift 3
  trap "echo ' interrupted: stopping $what' >&2; daemon_stop $(printf %q "$pidfile"); exit 130" INT TERM
  # A deadline, not a count of tries: a check against a port that accepts and then hangs takes its own
  # timeout (curl -m 2) each time.
  local deadline=$((SECONDS + ${DAEMON_START_SECONDS:-60}))
  while ((SECONDS < deadline)); do
    "$@" && { trap - INT TERM; return 0; }
    daemon_running "$pidfile" || break
    sleep 0.5
  done
  trap - INT TERM
  echo "error: $what did not come up; log: $log" >&2
  tail -n 20 "$log" >&2 || true
  return 1
}

# daemon_stop <pidfile> [what]: TERM the whole process group, KILL what is left after 15 s; with <what>, say
# what happened (make mlflow-stop / serving-stop would otherwise end silently either way).
daemon_stop() {
  local pidfile=$1 what=${2:-} pid
  if daemon_running "$pidfile"; then
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do pgrep -g "$pid" >/dev/null || break; sleep 0.25; done
    local outcome=stopped
    pgrep -g "$pid" >/dev/null && outcome="did not stop within 15 s; killed"
    kill -KILL -- "-$pid" 2>/dev/null || true
    [[ -z $what ]] || echo "$what (pid $pid) $outcome"
  else
    [[ -z $what ]] || echo "$what was not running"
  fi
  rm -f "$pidfile" "$(dirname "$pidfile")/url"
}
