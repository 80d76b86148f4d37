#!/usr/bin/env bash
# Build a virtual environment from scratch, keeping the one it replaces until the new one is whole.
#   scripts/make_venv.sh <venv> -- <pip install arguments> [-- <more pip install arguments> ...]
# Each group after a -- is one `pip install` in the new environment, in order. From scratch: a package dropped
# from the requirements does not linger (nor end up in the next lock). If anything fails (offline, a pin
# that does not resolve, Ctrl-C), the previous environment is put back as it was and the script exits non-zero;
# its stamp (.installed) is older than the requirements, so the next `make envs` tries again.
# Settings (environment): PYTHON (python3), the interpreter that creates the environment.
set -euo pipefail
venv=${1:?usage: $0 <venv> -- <pip install arguments> [-- ...]}
[[ ${2:-} == -- ]] || { echo "usage: $0 <venv> -- <pip install arguments> [-- ...]" >&2; exit 64; }
shift 2
python=${PYTHON:-python3}
kept=$venv.previous

# A kept environment left by a run that was killed outright (SIGKILL, power loss) is the last whole one.
if [[ -d $kept ]]; then
  rm -rf "$venv"
  mv "$kept" "$venv"
fi

restore() {
  local code=$?
  trap - EXIT INT TERM
  if [[ -d $kept ]]; then
    rm -rf "$venv"
    mv "$kept" "$venv"
    echo "error: building $venv failed (exit $code); the previous environment is back in place" >&2
  else
    rm -rf "$venv"
    echo "error: building $venv failed (exit $code)" >&2
  fi
  exit "$code"
}
trap restore EXIT
trap 'exit 130' INT TERM

[[ -d $venv ]] && mv "$venv" "$kept"
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
trap - EXIT INT TERM
rm -rf "$kept"
touch "$venv/.installed"
