"""Airflow plugin: the MLflow webhook receiver on the API server, at /mlops/webhooks/mlflow.

See mlops_airflow/webhooks.py for what it accepts; docs/operations.md for setting up the webhook in MLflow.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from mlops_airflow.webhooks import create_app


class MlopsWebhooksPlugin(AirflowPlugin):
    name = "mlops_webhooks"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/mlops", "name": "MLflow webhook receiver"}]
