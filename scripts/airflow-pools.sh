#!/usr/bin/env bash
# Create (or resize) the Airflow pools the DAGs use. The scheduler never queues a task whose pool is missing.
# MLOPS_SEARCH_POOL (default hyperparameter_search) caps trial workers over all DAG runs; size it with
# MLOPS_SEARCH_POOL_SLOTS (default 4) to the GPUs or nodes the search may occupy at once.
set -euo pipefail
# --include-deferred: pod tasks defer while their pod runs; without it a deferred worker frees its slot.
airflow pools set "${MLOPS_SEARCH_POOL:-hyperparameter_search}" "${MLOPS_SEARCH_POOL_SLOTS:-4}" \
  "Hyperparameter-search trial workers (one slot per worker pod)" --include-deferred >/dev/null
