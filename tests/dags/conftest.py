"""Importing dagsupport first gives every DAG test an isolated AIRFLOW_HOME (see there)."""

import dagsupport  # noqa: F401
