"""Real services for end-to-end tests: an MLflow server process and Airflow commands on SQLite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path


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

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def versions(self, model_name: str) -> list[dict]:
        found = self.get("model-versions/search", filter=f"name='{model_name}'")
        return found.get("model_versions", [])


def airflow(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AIRFLOW), *args], env=env, capture_output=True, text=True, timeout=timeout)
