"""Session fixtures for end-to-end tests: a real MLflow server and a migrated Airflow home."""

from __future__ import annotations

import pytest
from services import MlflowServer, free_port, migrated_airflow_home


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_var"), free_port())
    assert server.script("start") == server.url
    yield server
    server.script("stop")


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer):
    """An Airflow home shared by the end-to-end modules. Modules may unpause DAGs in it (test_scheduler_api
    unpauses mnist_training): a module that runs the scheduler with job scheduling on needs its own home."""
    return migrated_airflow_home(tmp_path_factory.mktemp("airflow_home"), mlflow_server)
