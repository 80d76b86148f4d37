"""Shared by the DAG tests: an isolated AIRFLOW_HOME, the repository's DAG and plugin folders, a stand-in TI."""

from __future__ import annotations

import atexit
import contextlib
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
PLUGINS = ROOT / "plugins"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))


def airflow_env(home: Path, runtime: str) -> dict[str, str]:
    """Environment for an Airflow process that sees only this project's DAGs and plugins."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "MLOPS_RUNTIME": runtime,
    }


# Airflow reads its configuration when first imported, which happens while test modules are collected:
# set the environment now, before any of them import airflow. Removed when the test process ends.
_HOME = Path(tempfile.mkdtemp(prefix="airflow_home_"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(airflow_env(_HOME, "kubernetes"))
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


class FakeTaskInstance:
    """Stands in for the running task instance when rendering templates without a DAG run."""

    dag_id = "mnist_training"
    map_index = -1
    try_number = 1

    def __init__(self, task_id: str, results: dict | None = None) -> None:
        self.task_id = task_id
        self.results = results or {}

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        """``results[task_id]`` for the return value, ``results[(task_id, key)]`` for another key; None, as
        Airflow returns for a task that pushed nothing."""
        return self.results.get(task_ids if key == "return_value" else (task_ids, key))


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """Handler of a stand-in HTTP server (MLflow, the model server): JSON answers, no access log."""

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free local port from a thread; yield its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
