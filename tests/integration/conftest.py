"""Real services for end-to-end tests: an MLflow server process and an Airflow home on SQLite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS_PYTHON = ROOT / ".venvs" / "steps" / "bin" / "python"
AIRFLOW = Path(sys.executable).parent / "airflow"
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` started by the project's own script; queried over its REST API."""

    def __init__(self, var: Path, port: int) -> None:
        self.env = {**os.environ, "MLOPS_VAR": str(var), "MLFLOW_PORT": str(port)}
        self.url = f"http://127.0.0.1:{port}"

    def script(self, action: str) -> str:
        out = subprocess.run([str(ROOT / "mlflow" / "server.sh"), action], env=self.env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def get(self, endpoint: str, **query: str) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def versions(self, model_name: str) -> list[dict]:
        found = self.get("model-versions/search", filter=f"name='{model_name}'")
        return found.get("model_versions", [])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_var"), free_port())
    assert server.script("start") == server.url
    yield server
    server.script("stop")


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer):
    """An Airflow home with a migrated SQLite database, running steps on the local runtime."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLOPS_RUNTIME": "local",
        "MLOPS_DATA_ROOT": str(home / "data"),
        "MLOPS_STEPS_PYTHON": str(STEPS_PYTHON),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    out = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return env


def airflow(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AIRFLOW), *args], env=env, capture_output=True, text=True, timeout=timeout)
