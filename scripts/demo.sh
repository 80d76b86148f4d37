#!/usr/bin/env bash
# make demo: start MLflow, run mnist_training end to end on the local runtime, print where the result is.
# Options (environment): DATASET (mnist | fashion_mnist | custom), EPOCHS, BATCH_SIZE, SOURCE_DIR,
# SEARCH (true | false), SEARCH_TRIALS, SEARCH_WORKERS, SEARCH_EPOCHS, SEARCH_EXAMPLES (examples per trial),
# COMPRESS_EPOCHS (fine-tuning epochs while pruning), REVIEW (auto | none; approval needs the scheduler: make airflow-ui).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
mkdir -p var
log=var/demo.log

# Options are checked before anything starts: a wrong one is named with what it accepts.
conf=$(DATASET=${DATASET:-mnist} EPOCHS=${EPOCHS:-5} BATCH_SIZE=${BATCH_SIZE:-128} SOURCE_DIR=${SOURCE_DIR:-} \
  SEARCH=${SEARCH:-true} SEARCH_TRIALS=${SEARCH_TRIALS:-6} SEARCH_WORKERS=${SEARCH_WORKERS:-1} \
  SEARCH_EPOCHS=${SEARCH_EPOCHS:-2} SEARCH_EXAMPLES=${SEARCH_EXAMPLES:-10000} COMPRESS_EPOCHS=${COMPRESS_EPOCHS:-2} \
  REVIEW=${REVIEW:-auto} .venvs/airflow/bin/python - <<'PY'
import json, os, sys

e = os.environ
def fail(message):
    sys.exit(f"make demo: {message}")
def number(name):
    try:
        return int(e[name])
    except ValueError:
        fail(f"{name}={e[name]!r} is not a whole number")
choices = {"DATASET": ("mnist", "fashion_mnist", "custom"), "REVIEW": ("auto", "none")}
for name, allowed in choices.items():
    if e[name] not in allowed:
        hint = (" (approval waits for a reviewer in Airflow's Required Actions, which needs the scheduler: "
                "run make airflow-ui and trigger mnist_training from the UI)") if e[name] == "approval" else ""
        fail(f"{name}={e[name]!r}: choose one of {', '.join(allowed)}{hint}")
if e["DATASET"] == "custom" and not e["SOURCE_DIR"]:
    fail("DATASET=custom needs SOURCE_DIR=<folder with the four IDX files>")
if e["SOURCE_DIR"] and not os.path.isdir(e["SOURCE_DIR"]):
    fail(f"SOURCE_DIR={e['SOURCE_DIR']!r} is not a folder")
if e["SEARCH"].lower() not in ("1", "true", "yes", "0", "false", "no"):
    fail(f"SEARCH={e['SEARCH']!r}: choose true or false")
options = {"epochs": "EPOCHS", "batch_size": "BATCH_SIZE", "search_trials": "SEARCH_TRIALS",
           "search_workers": "SEARCH_WORKERS", "search_epochs": "SEARCH_EPOCHS",
           "search_train_examples": "SEARCH_EXAMPLES", "compress_finetune_epochs": "COMPRESS_EPOCHS"}
conf = {"dataset": e["DATASET"], "source_dir": e["SOURCE_DIR"], "gpus": 0,
        "search": e["SEARCH"].lower() in ("1", "true", "yes"), "review": e["REVIEW"]}
conf |= {param: number(name) for param, name in options.items()}
# The ranges are the trigger form's own (the DAG's params), checked here rather than after the servers started.
import copy, importlib.util
sys.path[:0] = ["plugins"]
spec = importlib.util.spec_from_file_location("mnist_training_options", "dags/mnist_training.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from airflow.sdk import DAG
dag = next(v for v in vars(module).values() if isinstance(v, DAG))
params = copy.deepcopy(dag.params)
for param, value in conf.items():
    try:
        params[param] = value  # validated as it is set
    except Exception as exc:  # ParamValidationError: its first line names the param, the value and the bound
        fail(f"{options.get(param, param.upper())}={value}: {str(exc).splitlines()[0]}")
print(json.dumps(conf))
PY
)

MLFLOW_TRACKING_URI=$(mlflow/server.sh start)
export MLFLOW_TRACKING_URI
echo "MLflow: $MLFLOW_TRACKING_URI"
# The registered model: the one training registers (its form's default) and the server serves.
model=${MLOPS_MODEL_NAME:-mnist_classifier}
# The supervised local model server: live now, serving once model_promotion deploys the champion.
serving_url=$(MODEL_NAME=$model scripts/serving.sh start)
echo "model server: $serving_url (scripts/serving.sh; log var/serving/server.log)"
{ airflow db migrate && scripts/airflow-pools.sh; } >var/airflow-migrate.log 2>&1 \
  || { tail -n 30 var/airflow-migrate.log; exit 1; }

echo "airflow dags test mnist_training -c '$conf'   (full log: $log)"
# Show what the steps print (minus TensorFlow's C++ chatter); Airflow's own lines go to the log only.
set +e
airflow dags test mnist_training -c "$conf" 2>&1 | tee "$log" \
  | sed -unE 's/^[^ ]+ \[info +\] (.*) \[airflow\.task\.operators\.mlops_airflow\.local\.LocalStepOperator\].*/\1/p' \
  | grep --line-buffered -vE '^[IWE][0-9]{4} |Warning|warnings\.warn|^ *$|^running: |^WARNING: All log messages|self\.data_adapter|color_warning\(|set_ylim|Downloading artifacts|━'
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]] || ! grep -q "Marking run .* successful" "$log"; then
  echo
  # A trigger-form value out of range never reaches a step: Airflow's message names the param and its schema.
  invalid=$(grep -m1 -oE "ParamValidationError: Invalid input for param .*" "$log" | sed 's/^[A-Za-z]*: //' || true)
  # The first step error, with its continuation lines (the step's message ends its output).
  first=$(awk '/\[airflow\.task\.operators\.mlops_airflow\.local\.LocalStepOperator\]/ {
      msg = $0; sub(/^[^ ]+ \[[a-z]+ *\] /, "", msg); sub(/ \[airflow\.task\.operators\.mlops_airflow\.local\.LocalStepOperator\].*/, "", msg)
      if (!found && msg ~ /^error: /) found = 1
      if (found) { print "  " msg; next }
    }
    found { exit }' "$log")
  if [[ -n $invalid ]]; then
    echo "mnist_training refused its parameters: $invalid" >&2
  elif [[ -n $first ]]; then
    echo "mnist_training failed; the first error (later ones follow from it):" >&2
    echo "$first" >&2
  fi
  echo "full log: $log" >&2
  exit 1
fi
echo
.venvs/steps/bin/python scripts/show_model.py --model-name "$model" --alias challenger
echo
# Serve: model_promotion reconciles the model server to the alias champion (infra-validation in a
# throwaway server, switch in place, smoke test; a no-op if it already serves it).
echo "airflow dags test model_promotion   (full log: var/promotion.log)"
MLOPS_SERVING_URL=$serving_url airflow dags test model_promotion -c "{\"model_name\": \"$model\"}" \
  >var/promotion.log 2>&1 || true
promotion_failed=""
if grep -q "Marking run .* successful" var/promotion.log; then
  grep -oE "(promoting|serving already runs|has no version with alias) [^[]*" var/promotion.log | head -n 1 | sed "s/ *$//" || true
else
  promotion_failed=1
  # The run's reason: plan's error (nothing changed), or rollback's summary (serving and alias put back).
  reason=$(grep -oE "AirflowFailException: .*" var/promotion.log | tail -n 1 | sed "s/^AirflowFailException: //" || true)
  echo "model_promotion failed: ${reason:-no reason in the log}; full log: var/promotion.log" >&2
fi
echo
# (TensorFlow, imported to read the test image, prints C++ start-up lines on stderr: hidden here)
.venvs/steps/bin/python scripts/predict_champion.py --model-name "$model" --url "$serving_url" \
  --data-root "${MLOPS_DATA_ROOT:-$root/var/data}" 2> >(grep -vE '^[IWE][0-9]{4} |^WARNING: All log' >&2)
# The demo failed if its promotion did (what is served, if anything, is the previous champion).
[[ -z $promotion_failed ]] || exit 1
