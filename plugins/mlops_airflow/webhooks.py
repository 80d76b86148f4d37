"""The MLflow webhook receiver: an alias change in the registry becomes an Airflow asset event.

MLflow (3.3+, SQL backend) POSTs registry events to ``<airflow>/mlops/webhooks/mlflow`` with
``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">``,
``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (Unix seconds). The receiver:

- refuses a missing or wrong signature (401) and a timestamp more than ``MAX_SKEW_SECONDS`` away from
  now (401: a replayed old delivery); unsigned requests before their body is read, bodies over
  ``MAX_BODY_BYTES`` (413) before more is read;
- refuses events it does not handle (422; MLflow does not log a refusal: the API server's log says it); an
  alias event for another alias than ``champion``, or for another model than this deployment's
  (``MLOPS_MODEL_NAME``), is acknowledged and ignored (200);
- turns ``model_version_alias.created`` for ``champion`` into one event of the asset
  ``mlflow_champion_alias`` (extra: model name, version, delivery id), which triggers model_promotion;
  a redelivery of the same delivery id adds nothing.

The shared secret is ``MLOPS_WEBHOOK_SECRET`` on the API server (the ``secret`` given to MLflow's
``create_webhook``, at least 16 characters); without it every request gets 503. While a secret is rotated it
may list the new and the old one, comma-separated: a delivery signed with either is accepted.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations (Request, imported
# in create_app) at definition time.
import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ASSET_NAME = "mlflow_champion_alias"
ASSET_URI = "mlflow://registry/aliases/champion"
ALIAS = "champion"
MAX_SKEW_SECONDS = 300
MAX_BODY_BYTES = 64 * 1024
HANDLED = {"model_version_alias.created"}
SIGNATURE_HEADER, DELIVERY_HEADER, TIMESTAMP_HEADER = "x-mlflow-signature", "x-mlflow-delivery-id", "x-mlflow-timestamp"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature of one delivery (mlflow.webhooks.delivery)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def require_signed(headers: dict[str, str]) -> None:
    """Refused (401) unless the signature headers are all there: checked before the body is read."""
    missing = [h for h in (SIGNATURE_HEADER, DELIVERY_HEADER, TIMESTAMP_HEADER) if not headers.get(h)]
    if missing:
        raise Refused(401, f"missing {', '.join(missing)}")


MIN_SECRET_LENGTH = 16  # as scripts/mlflow_webhook.py requires


def secrets_of(setting: str) -> list[str]:
    """The secrets ``MLOPS_WEBHOOK_SECRET`` holds: one, or during a rotation the new and the old, comma-separated."""
    return [part.strip() for part in setting.split(",") if part.strip()]


def check(secret: str, headers: dict[str, str], body: bytes, now: float) -> dict[str, Any]:
    """The verified event, or Refused: the status code and why."""
    require_signed(headers)
    delivery, stamp, given = (headers[h] for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    matches = [hmac.compare_digest(given.encode(), signature(key, delivery, stamp, body).encode())
               for key in secrets_of(secret)]  # each compared: the time taken says nothing of which matched
    if not any(matches):
        raise Refused(401, "signature does not match: is MLOPS_WEBHOOK_SECRET the webhook's secret?")
    if not stamp.isdigit() or abs(now - int(stamp)) > MAX_SKEW_SECONDS:
        raise Refused(401, f"timestamp {stamp!r} is more than {MAX_SKEW_SECONDS} s from now (replayed?)")
    try:
        event = json.loads(body)
        kind = f"{event['entity']}.{event['action']}"
        data = event["data"]
    except (ValueError, KeyError, TypeError):
        raise Refused(422, "body is not an MLflow webhook event (entity, action, data)") from None
    if kind not in HANDLED:
        raise Refused(422, f"event {kind!r} is not handled here; subscribe this webhook to "
                           f"{', '.join(sorted(HANDLED))} only")
    if not isinstance(data, dict) or not {"name", "alias", "version"} <= data.keys():
        raise Refused(422, f"{kind} event without name, alias and version")
    return {"kind": kind, "model_name": str(data["name"]), "alias": str(data["alias"]),
            "version": str(data["version"]), "delivery_id": delivery}


_EMIT_LOCK = threading.Lock()


def emit_asset_event(extra: dict[str, Any]) -> int | None:
    """Record one event of the champion asset (queues model_promotion); None for a delivery seen before.

    The check for an earlier delivery and the insert happen under one lock: MLflow redelivers after its read
    timeout, possibly while the first delivery is still being recorded. In this process a lock serializes
    them; across API server processes (PostgreSQL) the asset's row is locked (SELECT ... FOR UPDATE).
    """
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with _EMIT_LOCK, create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == ASSET_NAME, AssetModel.uri == ASSET_URI)
                               .with_for_update())
        if asset is None:
            raise LookupError(f"asset {ASSET_NAME} is unknown to Airflow: is the model_promotion DAG deployed?")
        recent = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id)
                                 .order_by(AssetEvent.id.desc()).limit(500))
        if any((event.extra or {}).get("delivery_id") == extra["delivery_id"] for event in recent):
            return None
        event = asset_manager.register_asset_change(asset=asset, extra=extra, session=session, source_is_api=True)
        return event.id if event else None


async def bounded_body(request: Any) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES before it is all read: the endpoint is open to whoever
    reaches the API server, and the signature can only be checked over the whole body."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Refused(413, f"body of {length} bytes exceeds {MAX_BODY_BYTES} (an MLflow event is a few hundred)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, f"body exceeds {MAX_BODY_BYTES} bytes (an MLflow event is a few hundred)")
    return body


def _model_name() -> str:
    from mlops_airflow.settings import load

    return load().model_name


def create_app(secret: Callable[[], str] = lambda: os.environ.get("MLOPS_WEBHOOK_SECRET", ""),
               emit: Callable[[dict[str, Any]], int | None] = emit_asset_event,
               clock: Callable[[], float] = time.time, model_name: Callable[[], str] = _model_name) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    # No /docs, /redoc or /openapi.json: the endpoint is open to whoever reaches the API server.
    app = FastAPI(title="MLflow webhook receiver", description=__doc__, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.post("/webhooks/mlflow")
    async def mlflow_event(request: Request) -> JSONResponse:
        key = secret()
        if not secrets_of(key):
            return JSONResponse({"error": "receiver not configured: set MLOPS_WEBHOOK_SECRET on the API server"},
                                status_code=503)
        if any(len(part) < MIN_SECRET_LENGTH for part in secrets_of(key)):
            log.error("MLOPS_WEBHOOK_SECRET holds a secret of fewer than %d characters: every delivery refused",
                      MIN_SECRET_LENGTH)
            return JSONResponse({"error": f"receiver misconfigured: MLOPS_WEBHOOK_SECRET needs at least "
                                          f"{MIN_SECRET_LENGTH} characters"}, status_code=503)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            require_signed(headers)
            event = check(key, headers, await bounded_body(request), clock())
        except Refused as exc:
            log.warning("webhook refused (%s): %s", exc.status, exc)
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        if event["alias"] != ALIAS:
            return JSONResponse({"ignored": f"alias {event['alias']} is not {ALIAS}"})
        served = model_name()
        if event["model_name"] != served:  # MLflow sends every model's events: not this deployment's to promote
            return JSONResponse({"ignored": f"model {event['model_name']} is not {served}"})
        try:
            # a database write: off the API server's event loop
            event_id = await run_in_threadpool(emit, {k: v for k, v in event.items() if k != "alias"})
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        if event_id is None:
            return JSONResponse({"duplicate": event["delivery_id"]})
        log.info("%s version %s is %s: asset event %s (delivery %s)", event["model_name"], event["version"], ALIAS,
                 event_id, event["delivery_id"])
        return JSONResponse({"asset_event_id": event_id, "asset": ASSET_NAME})

    return app
