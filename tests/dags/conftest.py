"""Importing dagsupport first gives every DAG test an isolated AIRFLOW_HOME (see there)."""

import subprocess
import sys
from pathlib import Path

import dagsupport  # noqa: F401
import pytest


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The metadata database of the isolated AIRFLOW_HOME, migrated by `airflow db migrate` (SQLite, seconds)."""
    out = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="session")
def dags_in_db(airflow_db: None) -> None:
    """This project's DAGs serialized into that database, as the DAG processor stores them (assets included)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=dagsupport.DAGS, bundle_path=dagsupport.DAGS, bundle_name="dags-folder")
    assert bag.import_errors == {}
    sync_bag_to_db(bag, bundle_name="dags-folder", bundle_version=None)
