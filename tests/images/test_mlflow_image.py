"""The MLflow server image, built from mlflow/Dockerfile, runs as docker-compose.yaml configures it, on PostgreSQL.

The container gets the mlflow service's environment from docker-compose.yaml, with the database host moved
from the compose network's `postgres` to a real PostgreSQL server on this machine set up by mlflow/init-db.sql
(tests/pgserver.py). A version is then registered through it the way compress registers one (run, proxied
model artifacts, registry), and read back. Marked slow (the build installs MLflow); needs podman, a local base
image and PostgreSQL; skipped where one is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import pgserver  # noqa: E402
from podmanlib import build, podman  # noqa: E402
from services import STEPS_PYTHON  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE = "localhost/mlops-mlflow:test"
CONTAINER = "mlops-mlflow-test"
PORT = 5000  # the image's command; with the host's network (docs/operations.md) it binds it on the host
URL = f"http://127.0.0.1:{PORT}"
MODEL = "image_test_classifier"


def _compose_environment(database_port: int) -> dict[str, str]:
    """docker-compose.yaml's environment of the mlflow service, ${VAR:-default} at its default, the database on
    this machine instead of the compose network's host `postgres`."""
    service = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]["mlflow"]
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()}
    assert "@postgres/" in env["MLFLOW_BACKEND_STORE_URI"], env["MLFLOW_BACKEND_STORE_URI"]
    env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace(
        "@postgres/", f"@127.0.0.1:{database_port}/")
    return env


def _get(path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(URL + path, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.fixture(scope="module")
def mlflow_image(python_base: str) -> str:
    return build("mlflow/Dockerfile", IMAGE)


def test_the_mlflow_image_tracks_and_registers_on_postgresql_as_compose_configures_it(mlflow_image):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is taken (an MLflow server from `make mlflow-start`?): stop it and rerun")
    with pgserver.running() as database_port:
        env = _compose_environment(database_port)
        podman("rm", "-f", CONTAINER, check=False)
        podman("run", "-d", "--name", CONTAINER, "--network", "host",
               *[arg for k, v in env.items() for arg in ("-e", f"{k}={v}")], mlflow_image)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if urllib.request.urlopen(f"{URL}/health", timeout=5).status == 200:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                state = podman("inspect", CONTAINER, "--format", "{{.State.Status}}").stdout.strip()
                logs = podman("logs", CONTAINER, check=False)
                assert state == "running", f"MLflow container {state}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
                assert time.monotonic() < deadline, f"MLflow never healthy:\n{logs.stderr[-3000:]}"
                time.sleep(2)
            assert podman("exec", CONTAINER, "id", "-u").stdout.strip() == "10002"
            # A version registered the way compress registers one: run, model artifacts through the proxy, registry.
            out = subprocess.run([str(STEPS_PYTHON), str(ROOT / "tests" / "integration" / "register_versions.py"),
                                  MODEL, "good"], env={**os.environ, "MLFLOW_TRACKING_URI": URL},
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            [version] = json.loads(out.stdout.strip().splitlines()[-1])
            status, found = _get(f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={version}")
            assert status == 200 and found["model_version"]["status"] == "READY", found
            # The artifacts went to the container's artifact destination, written by its own user.
            listed = podman("exec", CONTAINER, "sh", "-c",
                            f"find {env['MLFLOW_ARTIFACTS_DESTINATION']} -name model.tflite -user 10002")
            assert listed.stdout.strip(), "no model.tflite in the artifact destination"
            # ... and the registry is in PostgreSQL's mlflow database, as init-db.sql's user mlflow sees it.
            query = ("import sys, psycopg2\n"
                     "with psycopg2.connect(sys.argv[1]) as db, db.cursor() as cursor:\n"
                     "    cursor.execute('select version from model_versions where name = %s', (sys.argv[2],))\n"
                     "    print([row[0] for row in cursor.fetchall()])\n")
            out = subprocess.run([str(STEPS_PYTHON), "-c", query, env["MLFLOW_BACKEND_STORE_URI"], MODEL],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr[-2000:]
            assert out.stdout.strip() == f"[{version}]"
        finally:
            podman("rm", "-f", CONTAINER, check=False)
