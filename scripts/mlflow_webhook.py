"""Point MLflow's registry webhook at Airflow's receiver (idempotent: updates the webhook if it exists).

    MLFLOW_TRACKING_URI=http://<mlflow>:5000 MLOPS_WEBHOOK_SECRET=<16+ characters> \
        .venvs/steps/bin/python scripts/mlflow_webhook.py --airflow-url http://<airflow>:8080

MLflow then POSTs every alias change (``model_version_alias.created``), signed with the secret, to
``<airflow-url>/mlops/webhooks/mlflow``; the receiver turns a move of ``champion`` into a model_promotion run.
Needs MLflow 3.3+ with a SQL backend (the file store has no webhooks).
"""

from __future__ import annotations

import argparse
import os
import sys

NAME = "airflow-model-promotion"
EVENTS = ["model_version_alias.created"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--airflow-url", required=True, help="Airflow API server as MLflow reaches it")
    parser.add_argument("--check", action="store_true",
                        help="then have MLflow send a test delivery and say how the receiver answered (MLflow does "
                             "not log a refused delivery); needs the Airflow API server running")
    args = parser.parse_args()
    secret = os.environ.get("MLOPS_WEBHOOK_SECRET", "")
    if len(secret) < 16:
        print("error: set MLOPS_WEBHOOK_SECRET (at least 16 characters), the same value as on the Airflow API "
              "server", file=sys.stderr)
        return 2
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri.startswith(("http://", "https://")):
        # Unset, MLflow would quietly create a new local mlflow.db and register the webhook there.
        print(f"error: set MLFLOW_TRACKING_URI to the MLflow server's http(s) URL (got {tracking_uri or 'nothing'}): "
              "the webhook lives in the server that sends it", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that is down: said in seconds
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    url = args.airflow_url.rstrip("/") + "/mlops/webhooks/mlflow"
    try:
        existing = _find_all(client, NAME)
        if not existing:
            hook = client.create_webhook(name=NAME, url=url, events=EVENTS, secret=secret,
                                         description="alias changes -> Airflow model_promotion")
        else:
            hook = client.update_webhook(existing[0].webhook_id, url=url, events=EVENTS, secret=secret,
                                         status="ACTIVE")
            # Each copy (two registrations at once, an older version of this script) delivers every event
            # with a delivery id of its own, which the receiver cannot tell for a redelivery.
            for extra in existing[1:]:
                client.delete_webhook(extra.webhook_id)
                print(f"deleted a second webhook named {NAME} ({extra.webhook_id})")
    except mlflow.exceptions.MlflowException as exc:
        reason = (str(exc).splitlines() or [repr(exc)])[0][:300]
        print(f"error: MLflow at {tracking_uri} could not register the webhook: {reason} "
              "(is the server running, version 3.3+ with a SQL backend?)", file=sys.stderr)
        return 2
    print(f"MLflow webhook {hook.name} ({hook.webhook_id}) on {tracking_uri} -> {url}")
    return _check(client, hook.webhook_id, url) if args.check else 0


# What a refusal of MLflow's test delivery means (its example event moves an alias that is not champion: a
# receiver that accepts the signature answers 200 "ignored" and starts nothing).
_ANSWERS = {401: "the receiver refused the signature: MLOPS_WEBHOOK_SECRET differs between here and the Airflow "
                 "API server (which reads it when it starts)",
            404: "nothing answers at that path: is this Airflow's API server, with this project's plugins?",
            503: "the receiver is not configured: set MLOPS_WEBHOOK_SECRET (16+ characters) on the Airflow API "
                 "server and restart it"}


def _check(client, webhook_id: str, url: str) -> int:
    import mlflow

    try:
        result = client.test_webhook(webhook_id)
    except mlflow.exceptions.MlflowException as exc:
        print(f"error: MLflow could not send a test delivery: {(str(exc).splitlines() or [repr(exc)])[0][:300]}",
              file=sys.stderr)
        return 1
    if result.success:
        print(f"test delivery: {url} answered {result.response_status} {(result.response_body or '')[:200]}")
        return 0
    why = _ANSWERS.get(result.response_status or 0) or result.error_message or result.response_body or "no answer"
    print(f"error: test delivery to {url}: {result.response_status or 'no HTTP answer'}: {why}", file=sys.stderr)
    return 1


def _find_all(client, name: str) -> list:
    """The webhooks named ``name``, on every page of the server's list (a page holds 100)."""
    found, token = [], None
    while True:
        page = client.list_webhooks(page_token=token)
        found += [w for w in page if w.name == name]
        token = page.token
        if not token:
            return found


if __name__ == "__main__":
    raise SystemExit(main())
