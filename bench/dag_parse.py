"""DAG parse cost: seconds each DAG file adds over a bare `from airflow.sdk import dag` import.

Each measurement is a fresh interpreter (as a DAG processor child without pre-imports would be): time the
bare SDK import, then the DAG file's execution. `warm` first imports what the DAG processor pre-imports for
that file (the airflow.* modules it names, [dag_processor] parsing_pre_import_modules, on by default),
using Airflow's own iter_airflow_imports.
Run in the Airflow environment:  .venvs/airflow/bin/python bench/dag_parse.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBE = r"""
import sys, time, runpy, json
t0 = time.perf_counter()
from airflow.sdk import dag
t1 = time.perf_counter()
if sys.argv[2] == "warm":  # exactly what the DAG processor pre-imports for this file
    import importlib
    from airflow.utils.file import iter_airflow_imports
    for module in iter_airflow_imports(sys.argv[1]):
        importlib.import_module(module)
t2 = time.perf_counter()
runpy.run_path(sys.argv[1])
t3 = time.perf_counter()
print("RESULT" + json.dumps({"sdk": t1 - t0, "dag": t3 - t2}))
"""


def measure(dag_file: Path, runtime: str, mode: str, home: str) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": home, "MLOPS_RUNTIME": runtime, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", PROBE, str(dag_file), mode], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[6:])


def main(repeats: int = 7) -> None:
    rows, results = [], []
    with tempfile.TemporaryDirectory() as home:
        for dag_file in sorted((ROOT / "dags").glob("*.py")):
            for runtime in ("kubernetes", "local"):
                for mode in ("cold", "warm"):
                    samples = [measure(dag_file, runtime, mode, home) for _ in range(repeats)]
                    sdk = statistics.median(s["sdk"] for s in samples)
                    cost = statistics.median(s["dag"] for s in samples)
                    rows.append([dag_file.name, runtime, mode, round(sdk, 3), round(cost, 3),
                                 "yes" if cost <= 0.1 else "no"])
                    results.append({"dag": dag_file.name, "runtime": runtime, "mode": mode,
                                    "sdk_import_s": sdk, "dag_parse_s": cost, "repeats": repeats})
    print(table(["DAG file", "runtime", "imports", "bare SDK import s", "DAG file s (over SDK)", "<= 0.1 s"], rows))
    print("written:", write("dag_parse", {"results": results}))


if __name__ == "__main__":
    main()
