#!/usr/bin/env bash
# Build a virtual environment from scratch, keeping the one it replaces until the new one is whole.
#   scripts/make_venv.sh <venv> -- <pip install arguments> [-- <more pip install arguments> ...]
# Each group after a -- is one `pip install` in the new environment, in order. From scratch: a package dropped
# from the requirements does not linger (nor end up in the next lock). If anything fails (offline, a pin
# that does not resolve, Ctrl-C), the previous environment is put back as it was and the script exits non-zero;
# its stamp (.installed) is older than the requirements, so the next `make envs` tries again. Both exist
# side by side meanwhile: twice the disk space at the peak. A <venv> that is a symbolic link is built where
# it points. Two builds of one environment at once (make demo beside make airflow-ui) take turns, and the
# second finds the environment the first built up to date (given its inputs) and leaves it alone.
# Settings (environment): PYTHON (python3), the interpreter that creates the environment; MAKE_VENV_INPUTS,
# the files the environment is built from (make's prerequisites): once the lock is ours, a stamp newer than
# each of them means another build just made it, and this one does nothing.
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
exec 8>"$venv.lock"
flock 8

# Built while this run waited for the lock (make demo beside make airflow-ui, both finding it stale): rebuilt
# again, the environment the other make is already running would be moved away under it.
if [[ -n ${MAKE_VENV_INPUTS:-} && -f $venv/.installed && ! -d $kept ]]; then
  fresh=1
  for input in $MAKE_VENV_INPUTS; do
    [[ $venv/.installed -nt $input ]] || fresh=0
  done
  if ((fresh)); then
    echo "$venv: up to date (built meanwhile)"
    exit 0
  fi
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
