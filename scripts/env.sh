# Environment for running this project's Airflow on one machine (sourced by the scripts beside it).
# bash only (it finds the checkout through BASH_SOURCE): `source scripts/env.sh` from bash.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$root/var/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$root/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$root/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# airflow standalone would start 32 workers otherwise; this machine has 2 cores.
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export MLOPS_RUNTIME=${MLOPS_RUNTIME:-local}
export PATH=$root/.venvs/airflow/bin:$PATH
