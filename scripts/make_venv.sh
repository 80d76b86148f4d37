#!/usr/bin/env bash
# Build a virtual environment from scratch, keeping the one it replaces until the new one is whole.
#   scripts/make_venv.sh <venv> -- <pip install arguments> [-- <more pip install arguments> ...]
# Each group after a -- is one `pip install` in the new environment, in order. From scratch: a package dropped
# from the requirements does not linger (nor end up in the next lock). If anything fails (offline, a pin
# that does not resolve, Ctrl-C), the previous environment is put back as it was and the script exits non-zero;
# its stamp (.installed) is older than the requirements, so the next `make envs` tries again. Both exist
# side by side meanwhile: twice the disk space at the peak. A <venv> that is a symbolic link is built where
# it points. Two builds of one environment at once (make demo beside make airflow-ui) take turns, and the
# second, finding that the first stamped the environment while it waited, leaves it alone.
# Settings (environment): PYTHON (python3), the interpreter that creates the environment.
set -euo pipefail
usage="usage: $0 <venv> -- <pip install arguments> [-- ...]"
[[ -n ${1:-} && ${2:-} == -- ]] || { echo "$usage" >&2; exit 64; }
venv=${1%/}
shift 2
[[ -L $venv ]] && venv=$(readlink -f "$venv")  # the environment, not the link to it
python=${PYTHON:-python3}
kept=$venv.previous
discarded=$venv.discarded

mkdir -p "$(dirname "$venv")"
waiting_since=$(date +%s.%N)
exec 8>"$venv.lock"
flock 8

# Stamped by another build while this one waited for the lock (make demo beside make airflow-ui, both finding
# it stale): built again, the environment the other make is already running would be moved away under it.
# (Not a comparison with the requirements: make -B asks for a build whatever the times say.)
stamped=$(stat -c %.9Y "$venv/.installed" 2>/dev/null || echo 0)
if [[ ! -d $kept ]] && awk -v stamped="$stamped" -v since="$waiting_since" 'BEGIN { exit !(stamped > since) }'; then
  echo "$venv: built by another make while this one waited; left as it is"
  exit 0
fi

rm -rf "$discarded"  # what a killed run was deleting: the environment before the last whole one
# Left by a run killed outright (SIGKILL, power loss): a kept environment is the last whole one, unless the
# new one was finished (stamped) before the kill.
if [[ -d $kept ]]; then
  if [[ -f $venv/.installed ]]; then
    mv "$kept" "$discarded"
    rm -rf "$discarded"
  else
    rm -rf "$venv"
    mv "$kept" "$venv"
  fi
fi

restore() {
  local code=$?
  trap - EXIT INT TERM
  rm -rf "$venv"  # this run's, half-built
  if [[ -d $kept ]]; then
    mv "$kept" "$venv"
    echo "error: building $venv failed (exit $code); the previous environment is back in place" >&2
  else
    echo "error: building $venv failed (exit $code)" >&2
  fi
  exit "$code"
}

[[ -e $venv ]] && mv "$venv" "$kept"
trap restore EXIT
trap 'exit 130' INT TERM
"$python" -m venv "$venv"
args=()
for arg in "$@" --; do
  if [[ $arg == -- ]]; then
    ((${#args[@]})) && "$venv/bin/python" -m pip install -q "${args[@]}"
    args=()
  else
    args+=("$arg")
  fi
done
touch "$venv/.installed"  # whole: from here on, a kept environment is no longer the last whole one
trap - EXIT INT TERM
[[ -d $kept ]] && mv "$kept" "$discarded"
rm -rf "$discarded"
