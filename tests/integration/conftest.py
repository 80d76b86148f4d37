"""Session fixtures for end-to-end tests: a real MLflow server and a migrated Airflow home."""

from __future__ import annotations

import os
import subprocess

import pytest
from services import AIRFLOW, ROOT, STEPS_PYTHON, MlflowServer, free_port


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
    # Nothing Airflow- or deployment-specific leaks in from the test process (e.g. unit-test mode set by
    # the DAG tests of the same session, which gives every Airflow process its own JWT secret).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLOPS_", "MLFLOW_"))}
    env = {
        **inherited,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLOPS_RUNTIME": "local",
        "MLOPS_DATA_ROOT": str(home / "data"),
        "MLOPS_STEPS_PYTHON": str(STEPS_PYTHON),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        # airflow standalone starts its components as `airflow ...` subprocesses.
        "PATH": f"{AIRFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The scheduler queues no task of a pool that does not exist: create the search's pool like the scripts do.
    out = subprocess.run([str(ROOT / "scripts" / "airflow-pools.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return env
