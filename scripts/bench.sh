#!/usr/bin/env bash
# make bench: every benchmark, each printing its table and writing bench/results/<name>.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
.venvs/airflow/bin/python bench/dag_parse.py
.venvs/steps/bin/python bench/input_pipeline.py
.venvs/steps/bin/python bench/search.py
.venvs/steps/bin/python bench/train_fashion.py
.venvs/steps/bin/python bench/compress.py
# needs wrk (apt-get install wrk)
.venvs/steps/bin/python bench/serving.py
