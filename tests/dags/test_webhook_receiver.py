"""The MLflow webhook receiver (FastAPI app of the plugin): what it accepts, refuses and emits.

Signatures are made the way MLflow makes them (mlflow.webhooks.delivery: HMAC-SHA256 over
"<delivery id>.<timestamp>.<body>", "v1,<base64>"); emitting the asset event is replaced by a list, except
in the redelivery test, which emits into a real migrated metadata database. The real API server, MLflow
sending and the resulting DAG run are covered in tests/integration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import dagsupport  # noqa: F401 - Airflow configured before the plugin is imported
import pytest

SECRET = "webhook-secret-of-the-tests"
NOW = 1_800_000_000


def _mlflow_signature(secret: str, delivery: str, stamp: str, payload: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@pytest.fixture
def receiver():
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import create_app

    emitted: list[dict] = []
    seen: set[str] = set()

    def emit(extra: dict) -> int | None:
        if extra["delivery_id"] in seen:
            return None
        seen.add(extra["delivery_id"])
        emitted.append(extra)
        return len(emitted)

    client = TestClient(create_app(secret=lambda: SECRET, emit=emit, clock=lambda: NOW))
    return client, emitted


def _event(alias: str = "champion", entity: str = "model_version_alias", action: str = "created",
           name: str = "mnist_classifier") -> str:
    return json.dumps({"entity": entity, "action": action, "timestamp": "2027-01-15T08:00:00+00:00",
                       "data": {"name": name, "alias": alias, "version": "7"}})


def _post(client, payload: str, *, secret: str = SECRET, delivery: str = "d-1", stamp: int = NOW,
          signature: str | None = None):
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": str(stamp),
               "X-MLflow-Signature": signature or _mlflow_signature(secret, delivery, str(stamp), payload)}
    return client.post("/webhooks/mlflow", content=payload, headers=headers)


def test_a_signed_champion_alias_event_is_emitted_and_one_emit_finds_seen_is_answered_as_a_duplicate(receiver):
    """The receiver's side; that the real emit finds a redelivery seen: the database test below."""
    client, emitted = receiver
    first = _post(client, _event())
    assert first.status_code == 200 and first.json()["asset"] == "mlflow_champion_alias"
    again = _post(client, _event())  # MLflow retries a delivery it thinks failed: same delivery id
    assert again.status_code == 200 and again.json() == {"duplicate": "d-1"}
    assert emitted == [{"kind": "model_version_alias.created", "model_name": "mnist_classifier", "version": "7",
                        "delivery_id": "d-1"}]


def test_a_redelivery_adds_no_second_event_to_the_airflow_database(dags_in_db):
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import ASSET_NAME, create_app

    client = TestClient(create_app(secret=lambda: SECRET, clock=lambda: NOW))  # the real emit_asset_event
    first = _post(client, _event(), delivery="d-redelivered")
    other = _post(client, _event(), delivery="d-next")  # another delivery of the same change is a new event
    again = _post(client, _event(), delivery="d-redelivered")  # redelivered after another one was recorded
    assert first.status_code == 200 and "asset_event_id" in first.json(), first.json()
    assert again.status_code == 200 and again.json() == {"duplicate": "d-redelivered"}
    assert other.status_code == 200 and "asset_event_id" in other.json(), other.json()

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        stored = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                                 .where(AssetModel.name == ASSET_NAME)).all()
        deliveries = sorted((event.extra or {}).get("delivery_id") for event in stored)
    assert deliveries == ["d-next", "d-redelivered"]


def test_a_redelivery_arriving_while_the_first_is_being_recorded_adds_no_second_event(dags_in_db, monkeypatch):
    """MLflow redelivers after its read timeout: the first delivery may still be in the database."""
    import threading
    import time

    from airflow.assets.manager import asset_manager
    from mlops_airflow import webhooks

    real = asset_manager.register_asset_change
    recording = threading.Event()

    def slow_register(*args, **kwargs):  # the first delivery is still being recorded when the second comes
        recording.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(asset_manager, "register_asset_change", slow_register)
    extra = {"kind": "model_version_alias.created", "model_name": "mnist_classifier", "version": "7",
             "delivery_id": "d-concurrent"}
    results = []
    first = threading.Thread(target=lambda: results.append(webhooks.emit_asset_event(extra)))
    first.start()
    assert recording.wait(timeout=30)
    results.append(webhooks.emit_asset_event(extra))  # the redelivery, meanwhile
    first.join(timeout=60)
    assert results.count(None) == 1 and len(results) == 2, results

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        stored = [e for e in session.scalars(select(AssetEvent)).all()
                  if (e.extra or {}).get("delivery_id") == "d-concurrent"]
    assert len(stored) == 1


@pytest.mark.parametrize(("change", "words"), [
    ({"secret": "another-secret-entirely"}, "signature does not match"),
    ({"signature": "v1,AAAA"}, "signature does not match"),
    ({"stamp": NOW - 3600}, "replayed"),
    ({"stamp": NOW + 3600}, "replayed"),
], ids=["wrong-secret", "forged-signature", "old-timestamp", "future-timestamp"])
def test_a_bad_signature_or_a_replayed_delivery_is_refused(receiver, change, words):
    client, emitted = receiver
    response = _post(client, _event(), **change)
    assert response.status_code == 401 and words in response.json()["error"]
    assert emitted == []


def test_a_body_changed_after_signing_is_refused(receiver):
    client, emitted = receiver
    signed = _mlflow_signature(SECRET, "d-1", str(NOW), _event())
    response = _post(client, _event().replace('"7"', '"8"'), signature=signed)
    assert response.status_code == 401 and emitted == []


def test_unsigned_requests_are_refused(receiver):
    client, emitted = receiver
    response = client.post("/webhooks/mlflow", content=_event(), headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and "x-mlflow-signature" in response.json()["error"]
    assert emitted == []


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1024 * 1024])
def test_a_body_over_64_kib_is_refused_even_when_validly_signed(receiver, size):
    """The endpoint is open to whoever reaches the API server: an MLflow event is a few hundred bytes."""
    client, emitted = receiver
    event = _event()
    padded = event[:-1] + ', "padding": "' + "x" * (size - len(event) - 15) + '"}'
    assert len(padded.encode()) == size
    assert _post(client, padded).status_code == 413 and emitted == []


def test_an_unsigned_request_is_refused_before_its_body_is_read(receiver):
    client, emitted = receiver
    response = client.post("/webhooks/mlflow", content=b"x" * (1024 * 1024), headers={"Content-Type": "text/plain"})
    assert response.status_code == 401 and "x-mlflow-signature" in response.json()["error"]  # not 413: unread
    assert emitted == []


def test_an_alias_event_without_the_version_is_refused_naming_what_it_lacks(receiver):
    client, emitted = receiver
    event = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2027-01-15T08:00:00+00:00",
                        "data": {"name": "mnist_classifier", "alias": "champion"}})
    response = _post(client, event)
    assert response.status_code == 422 and "without name, alias and version" in response.json()["error"]
    assert emitted == []


def test_an_event_airflow_has_no_asset_for_is_answered_503_naming_the_promotion_dag():
    """MLflow retries a 5xx: once model_promotion is deployed, the retried delivery is recorded."""
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import create_app

    def emit(extra):
        raise LookupError("asset mlflow_champion_alias is unknown to Airflow: is the model_promotion DAG deployed?")

    response = _post(TestClient(create_app(secret=lambda: SECRET, emit=emit, clock=lambda: NOW)), _event())
    assert response.status_code == 503 and "model_promotion DAG" in response.json()["error"]


def test_an_oversized_body_is_refused_before_it_is_read_whole(receiver):
    from mlops_airflow.webhooks import MAX_BODY_BYTES

    client, emitted = receiver
    padded = _event()[:-1] + ', "padding": "' + "x" * MAX_BODY_BYTES + '"}'  # validly signed, too large
    announced = _post(client, padded)
    assert announced.status_code == 413 and f"exceeds {MAX_BODY_BYTES}" in announced.json()["error"]
    delivery, stamp = "d-chunked", str(NOW)
    streamed = client.post("/webhooks/mlflow", content=iter([padded.encode()[i:i + 8192]
                                                             for i in range(0, len(padded), 8192)]),
                           headers={"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
                                    "X-MLflow-Signature": _mlflow_signature(SECRET, delivery, stamp, padded)})
    assert streamed.status_code == 413 and "content-length" not in streamed.request.headers
    assert emitted == []


@pytest.mark.parametrize(("entity", "action"), [("model_version", "created"), ("model_version_tag", "set"),
                                                ("model_version_alias", "deleted")])
def test_an_event_it_does_not_handle_is_refused(receiver, entity, action):
    client, emitted = receiver
    response = _post(client, _event(entity=entity, action=action))
    assert response.status_code == 422 and f"{entity}.{action}" in response.json()["error"]
    assert emitted == []


def test_a_move_of_another_alias_is_acknowledged_and_ignored(receiver):
    client, emitted = receiver
    response = _post(client, _event(alias="challenger"))
    assert response.status_code == 200 and "ignored" in response.json()
    assert emitted == []


def test_without_a_configured_secret_nothing_is_accepted():
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import create_app

    emitted: list = []
    client = TestClient(create_app(secret=lambda: "", emit=emitted.append, clock=lambda: NOW))
    response = _post(client, _event())
    assert response.status_code == 503 and "MLOPS_WEBHOOK_SECRET" in response.json()["error"]
    assert emitted == []


def test_the_plugin_mounts_the_receiver_on_the_api_server():
    import mlops_webhooks

    (app,) = mlops_webhooks.MlopsWebhooksPlugin.fastapi_apps
    assert app["url_prefix"] == "/mlops"
    assert "/webhooks/mlflow" in {route.path for route in app["app"].routes}


def test_another_models_champion_is_acknowledged_and_starts_no_promotion(receiver):
    """MLflow sends every model's alias events: each became a model_promotion run (that then did nothing,
    holding the DAG's one run slot while a real promotion waited)."""
    client, emitted = receiver
    response = _post(client, _event(name="fraud_detector"))
    assert response.status_code == 200 and response.json() == {"ignored": "model fraud_detector is not mnist_classifier"}
    assert emitted == []


def test_while_a_secret_is_rotated_deliveries_signed_with_the_old_or_the_new_are_accepted():
    """MLflow keeps delivering with the webhook's old secret for a while (its cache); refused, those alias
    moves were lost (MLflow does not retry a 401)."""
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import create_app

    old, new = SECRET, "the-new-webhook-secret-2027"
    emitted: list[dict] = []
    client = TestClient(create_app(secret=lambda: f"{new}, {old}", emit=lambda e: emitted.append(e) or len(emitted),
                                   clock=lambda: NOW))
    assert _post(client, _event(), secret=old, delivery="d-old").status_code == 200
    assert _post(client, _event(), secret=new, delivery="d-new").status_code == 200
    assert _post(client, _event(), secret="neither-of-the-two-secrets", delivery="d-x").status_code == 401
    assert [e["delivery_id"] for e in emitted] == ["d-old", "d-new"]


def test_a_secret_too_short_to_be_safe_accepts_nothing():
    from fastapi.testclient import TestClient
    from mlops_airflow.webhooks import create_app

    emitted: list[dict] = []
    client = TestClient(create_app(secret=lambda: "short", emit=emitted.append, clock=lambda: NOW))
    response = _post(client, _event(), secret="short")
    assert response.status_code == 503 and "at least 16 characters" in response.json()["error"]
    assert emitted == []


def test_the_receiver_publishes_no_api_description(receiver):
    client, _ = receiver
    assert [client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]
