#!/usr/bin/env bash
# make bench: six of the nine benchmarks, each printing its table and writing bench/results/<name>.json
# (docs/benchmarks.md gives the commands of the other three and of the wide-space searches).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The serving benchmark (the last) drives load with wrk: say so now, not after the hour the others take.
command -v wrk >/dev/null || { echo "error: make bench needs wrk for its serving benchmark: apt-get install wrk" >&2; exit 1; }
.venvs/airflow/bin/python bench/dag_parse.py
.venvs/steps/bin/python bench/input_pipeline.py
# The default-space table (3 seeds), then the 1 -> 2 worker speed-up merged into the same file.
.venvs/steps/bin/python bench/search.py --seeds 42 43 44 --skip-speedup
.venvs/steps/bin/python bench/search.py --seeds --merge
.venvs/steps/bin/python bench/train_fashion.py
.venvs/steps/bin/python bench/compress.py
.venvs/steps/bin/python bench/serving.py
