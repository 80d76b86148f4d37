"""serve: the real server process, a real MLflow registry, real HTTP on both protocols.

The served version is what compress registers: a pyfunc whose artifact is a .tflite (here the
pipeline's CNN with fresh weights, converted to int8: what it predicts does not matter, that the server
answers exactly what LiteRT answers does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stepsupport import free_port, step_env

from mlsteps.core import NodeError, StepError

MODEL = "serve_test_model"
LITERT_MODEL = Path(__file__).resolve().parents[2] / "mlsteps" / "litert_model.py"


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 .tflite of the pipeline's CNN, built in a subprocess (tf-keras switches tf.keras for good)."""
    return _convert(tmp_path_factory.mktemp("tflite") / "model.tflite", width=8, converted=(
        "rep = np.random.default_rng(0).uniform(0, 255, (50, 28, 28)).astype(np.float32)\n"
        "content = compress.convert(net, 'int8', rep)\n"))


def _convert(path: Path, *, width: int, converted: str) -> Path:
    """Build the pipeline's CNN (fresh weights) and write the .tflite that ``converted`` makes of ``net``, in a
    subprocess (tf-keras switches tf.keras for good)."""
    script = ("import sys, numpy as np, tf_keras\n"
              "from mlsteps import compress, model\n"
              f"net = model.build(image_shape=(28, 28), num_classes=10, width={width}, keras_module=tf_keras)\n"
              f"{converted}open(sys.argv[1], 'wb').write(content)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=step_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def versions(tflite: Path, mlflow_server: str) -> list[int]:
    """Two registered versions of the same .tflite (the second is what the tests serve by alias)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    numbers = []
    for _ in range(2):
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="compressed_model", python_model=str(LITERT_MODEL),
                                           pip_requirements=["mlflow"],
                                           artifacts={"tflite": str(tflite)},
                                           input_example=np.zeros((1, 28, 28), np.float32))
        numbers.append(int(mlflow.register_model(info.model_uri, MODEL).version))
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", str(numbers[-1]))
    return numbers


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, headers, payload = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, headers, payload = exc.code, dict(exc.headers), exc.read()
        try:
            return status, {k.lower(): v for k, v in headers.items()}, json.loads(payload)
        except json.JSONDecodeError:
            return status, headers, payload.decode()


def _start(tmp_path: Path, tracking_uri: str, *args: str, wait_ready: bool = True, **env: str) -> Server:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL, "--port", str(port),
                                    "--host", "127.0.0.1", "--max-batch", "64", "--max-body-bytes", "2000000", *args],
                                   env=step_env(MLFLOW_TRACKING_URI=tracking_uri, **env), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 90
    while True:
        try:
            status = server.call("GET", "/v2/health/ready" if wait_ready else "/v2/health/live")[0]
            if status == 200:
                return server
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            pytest.fail(f"server did not become {'ready' if wait_ready else 'live'}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(versions, mlflow_server, tmp_path_factory) -> Server:
    running = _start(tmp_path_factory.mktemp("serve"), mlflow_server)
    yield running
    _stop(running)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 28, 28)).astype(np.float32)


def _litert(tflite: Path, images: np.ndarray) -> np.ndarray:
    """What LiteRT computes, as probabilities (an int8 softmax's rows rescaled to sum to 1)."""
    raw = _litert_raw(tflite, images)
    return raw / raw.sum(axis=1, keepdims=True)


def _litert_raw(tflite: Path, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_tf_serving_predict_answers_what_litert_answers_and_names_model_and_version(server, versions, tflite):
    images = _images(5)
    status, headers, body = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": images.tolist()})
    assert status == 200, body
    np.testing.assert_allclose(np.asarray(body["predictions"]), _litert(tflite, images), atol=1e-6)
    # Probabilities, though the int8 softmax comes out in steps of 1/256 (its rows do not sum to 1).
    np.testing.assert_allclose(np.asarray(body["predictions"]).sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(_litert_raw(tflite, images).sum(axis=1) - 1).max() > 1e-3
    champion = str(versions[-1])
    assert (body["model_name"], body["model_version"]) == (MODEL, champion)
    assert (headers["x-model-name"], headers["x-model-version"]) == (MODEL, champion)
    # Columnar "inputs", rows of 784 pixels, named instances, and the version in the path answer the same.
    for path, payload in ((f"/v1/models/{MODEL}:predict", {"inputs": images.reshape(5, -1).tolist()}),
                          (f"/v1/models/{MODEL}/versions/{champion}:predict",
                           {"instances": [{"image": im.tolist()} for im in images]})):
        status, _, other = server.call("POST", path, payload)
        assert status == 200, other
        np.testing.assert_allclose(np.asarray(other.get("predictions", other.get("outputs"))),
                                   body["predictions"], atol=1e-6)


def test_open_inference_v2_infer_metadata_and_health(server, versions, tflite):
    images = _images(3, seed=1)
    request = {"id": "req-7", "inputs": [{"name": "image", "shape": [3, 28, 28], "datatype": "FP32",
                                          "data": images.reshape(-1).tolist()}]}
    status, headers, body = server.call("POST", f"/v2/models/{MODEL}/infer", request)
    assert status == 200, body
    assert body["id"] == "req-7" and body["model_version"] == str(versions[-1])
    output = body["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [3, 10])
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, 10), _litert(tflite, images), atol=1e-6)
    pixels = np.round(images)  # bytes, declared as such
    request = {"inputs": [{"name": "image", "shape": [3, 784], "datatype": "UINT8",
                           "data": pixels.astype(int).reshape(-1).tolist()}]}
    for datatype in ("UINT8", "UINT32", "UINT64"):  # every unsigned integer type of the protocol
        request["inputs"][0]["datatype"] = datatype
        status, _, body = server.call("POST", f"/v2/models/{MODEL}/infer", request)
        assert status == 200, body
        np.testing.assert_allclose(np.asarray(body["outputs"][0]["data"]).reshape(3, 10), _litert(tflite, pixels),
                                   atol=1e-6)
    status, _, meta = server.call("GET", f"/v2/models/{MODEL}")
    assert status == 200 and meta["versions"] == [str(versions[-1])]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}]
    assert server.call("GET", "/v2/health/live")[0] == 200
    assert server.call("GET", "/v2/health/ready")[0] == 200
    assert server.call("GET", f"/v2/models/{MODEL}/ready")[0] == 200
    status, _, tf_status = server.call("GET", f"/v1/models/{MODEL}")
    assert tf_status["model_version_status"][0]["state"] == "AVAILABLE"


BAD = [
    ("not-json", f"/v1/models/{MODEL}:predict", None, b"{instances: oops", 400, "not valid JSON"),
    ("no-instances", f"/v1/models/{MODEL}:predict", {"images": []}, None, 400, '"instances" or "inputs"'),
    ("words", f"/v1/models/{MODEL}:predict", {"instances": [["a"] * 784]}, None, 400, "numbers"),
    ("ragged", f"/v1/models/{MODEL}:predict", {"instances": [[1, 2], [3]]}, None, 400, "ragged"),
    ("wrong-shape", f"/v1/models/{MODEL}:predict", {"instances": [[0] * 100]}, None, 422, "expected images of shape"),
    ("out-of-range", f"/v1/models/{MODEL}:predict", {"instances": [[-5] * 784]}, None, 422, "0..255"),
    ("empty-batch", f"/v1/models/{MODEL}:predict", {"instances": []}, None, 422, "expected images"),
    ("batch-too-large", f"/v1/models/{MODEL}:predict", {"instances": [[0] * 784] * 65}, None, 413, "limit of 64"),
    # Announced as 3 MB: refused from the header, before the body is read (a client still sending a real 3 MB
    # body would see the connection close under it, as with any server that refuses early).
    ("body-too-large", f"/v1/models/{MODEL}:predict", None, b"{}", 413, "exceeds the limit of 2000000"),
    ("v2-bytes", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "BYTES", "data": ["x"]}]}, None, 400, "not numeric"),
    ("pixel-strings", f"/v1/models/{MODEL}:predict", {"instances": [["7"] * 784]}, None, 400, "got strings"),
    ("pixel-booleans", f"/v1/models/{MODEL}:predict", {"instances": [[True] * 784]}, None, 400, "got true/false"),
    ("pixel-nulls", f"/v1/models/{MODEL}:predict", {"instances": [[None] * 784]}, None, 400, "got null"),
    ("pixel-boolean-among-numbers", f"/v1/models/{MODEL}:predict", {"instances": [[[0] * 27 + [True]] * 28]}, None,
     400, "got true/false"),
    ("named-instance-boolean", f"/v1/models/{MODEL}:predict", {"instances": [{"image": [1.5] * 783 + [False]}]},
     None, 400, "got true/false"),
    ("v2-empty-batch", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [0, 784], "datatype": "FP32", "data": []}]}, None, 422, "batch is empty"),
    ("v2-string-data", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", "data": ["5"] * 784}]}, None, 400,
     "got strings"),
    ("v2-datatype-list", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": ["FP32"], "data": [0] * 784}]}, None, 400,
     "not numeric"),
    ("v2-uint8-fractions", f"/v2/models/{MODEL}/infer",  # pixels scaled to 0..1 but labelled as bytes
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 783 + [0.5]}]}, None, 400,
     '"data"[783] is 0.5, not a valid UINT8 value (whole numbers 0..255)'),
    ("v2-int8-past-its-range", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "INT8", "data": [200] * 784}]}, None, 400,
     '"data"[0] is 200, not a valid INT8 value (whole numbers -128..127)'),
    ("v2-shape-boolean", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [True, 784], "datatype": "FP32", "data": [0] * 784}]}, None, 400,
     "non-negative integers"),
    ("v2-shape-overflowing", f"/v2/models/{MODEL}/infer",  # np.prod of it wraps around to 784
     {"inputs": [{"name": "image", "shape": [2**63 - 1, 2**63 - 1, 1, 784], "datatype": "FP32", "data": [0] * 784}]},
     None, 400, "non-negative integers"),
    ("v2-shape-too-many-dimensions", f"/v2/models/{MODEL}/infer",  # numpy reshapes to 64 dimensions at most
     {"inputs": [{"name": "image", "shape": [1] * 70, "datatype": "FP32", "data": [0]}]}, None, 422,
     "expected images of shape (N, 28, 28) or (N, 784), got (1, 1, 1"),
    ("v2-shape-mismatch", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "image", "shape": [2, 784], "datatype": "FP32", "data": [0] * 784}]}, None, 422,
     "needs 1568"),
    ("unknown-model", "/v1/models/other:predict", {"instances": [[0] * 784]}, None, 404, "not found"),
    ("unknown-version", f"/v2/models/{MODEL}/versions/999/infer",
     {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}]}, None, 404,
     "version 999 not served"),
]


@pytest.mark.parametrize(("path", "payload", "raw", "status", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_a_clear_4xx_and_the_next_valid_request_succeeds(server, path, payload, raw, status, words):
    headers = {"Content-Length": "3000000"} if "exceeds the limit" in words else None
    got, _, body = server.call("POST", path, payload, raw=raw, headers=headers)
    assert got == status, body
    assert words in body["error"] and "Traceback" not in json.dumps(body)
    ok, _, answer = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": _images(1).tolist()})
    assert ok == 200 and len(answer["predictions"]) == 1
    assert server.process.poll() is None


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    """No Content-Length to refuse early: the server counts what arrives (2,000,000 bytes allowed here)."""
    def refused_413() -> float:
        metrics = server.call("GET", "/metrics")[2]
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("model_server_requests_total{") and 'code="413"' in line)

    before = refused_413()
    chunk = b" " * 100_000
    body = iter([b'{"instances": [', *[chunk] * 21, b"]}"])  # 2.1 MB of whitespace: valid JSON, too large
    request = urllib.request.Request(server.url + f"/v1/models/{MODEL}:predict", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert "content-length" not in {name.lower() for name, _ in request.header_items()}
    if isinstance(refused.value, urllib.error.HTTPError):  # the answer came back before the server hung up
        assert refused.value.code == 413
        assert "exceeds the limit of 2000000 bytes" in json.loads(refused.value.read())["error"]
    else:  # the server hung up while urllib was still sending the rest: its answer is in its metrics
        assert isinstance(refused.value.reason, (BrokenPipeError, ConnectionResetError)), refused.value
    assert refused_413() == before + 1


def test_metrics_count_requests_by_protocol_and_status_and_name_the_version(server, versions):
    server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": _images(1).tolist()})
    server.call("POST", f"/v2/models/{MODEL}/infer", {"inputs": []})
    status, _, text = server.call("GET", "/metrics")
    assert status == 200
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['model_server_requests_total{code="200",protocol="v1"}'] >= 1
    assert lines['model_server_requests_total{code="400",protocol="v2"}'] >= 1
    assert lines[f'model_server_model_info{{model="{MODEL}",version="{versions[-1]}"}}'] == 1
    assert lines["model_server_ready"] == 1
    assert lines['model_server_request_seconds_count{code="200",protocol="v1"}'] >= 1
    assert lines['model_server_request_seconds_count{code="400",protocol="v2"}'] >= 1


def test_wrong_methods_and_unknown_paths_get_json_errors_naming_the_fix(server):
    status, headers, body = server.call("GET", f"/v1/models/{MODEL}:predict")  # the status route matches the path
    assert (status, headers["allow"]) == (405, "POST") and "use POST" in body["error"], body
    status, headers, body = server.call("GET", f"/v2/models/{MODEL}/infer")
    assert (status, headers["allow"]) == (405, "POST") and "use POST" in body["error"], body
    status, headers, body = server.call("GET", f"/v1/models/{MODEL}/metadata")
    assert status == 404 and f"no endpoint GET /v1/models/{MODEL}/metadata" in body["error"], body
    assert headers["x-model-name"] == MODEL


def test_the_oip_v2_server_metadata_and_versioned_model_endpoints_answer(server):
    """tritonclient's get_server_metadata() and is_model_ready(..., model_version=) got 404."""
    status, _, body = server.call("GET", "/v2")
    assert status == 200 and body["name"] == "mlsteps-serve" and body["extensions"] == []
    served = server.call("GET", f"/v2/models/{MODEL}")[2]["versions"][0]
    status, _, body = server.call("GET", f"/v2/models/{MODEL}/versions/{served}")
    assert status == 200 and body["versions"] == [served] and body["inputs"][0]["shape"] == [-1, 28, 28]
    assert server.call("GET", f"/v2/models/{MODEL}/versions/{served}/ready")[:3:2] == (200, {"name": MODEL,
                                                                                            "ready": True})
    status, _, body = server.call("GET", f"/v2/models/{MODEL}/versions/999/ready")
    assert status == 404 and "version 999 not served" in body["error"]
    assert server.call("GET", f"/v2/models/{MODEL}/versions/999")[0] == 404


def test_interpreters_for_the_batch_sizes_seen_stay_within_their_image_capacity(tflite):
    """A client sweeping batch sizes must not grow the server's memory (an interpreter's grows with its batch):
    the least recently used are dropped, and every answer is still LiteRT's."""
    from mlsteps.serve import LiteRTRunner

    runner = LiteRTRunner(tflite, threads=1, capacity=64)
    for batch in [*range(1, 41), 7, 33]:
        images = _images(batch, seed=batch)
        np.testing.assert_allclose(runner.predict(images), _litert(tflite, images), atol=1e-6)
        assert sum(runner.batch_sizes) <= 64 and len(runner.batch_sizes) <= LiteRTRunner.MAX_INTERPRETERS
    assert runner.batch_sizes[-2:] == [7, 33]  # the most recently used are the ones kept


def test_health_probes_answer_while_a_large_batch_is_being_inferred():
    """Kubernetes' probes time out after seconds: they must not queue behind big batches (which run on a worker
    thread), nor behind a small request waiting for the model a big batch holds (it waits on a thread too), or a
    loaded pod is taken out of service and restarted."""
    import threading

    import uvicorn

    from mlsteps import serve

    class Blocking(serve.Serialised):
        """The real one-call-at-a-time runner, whose calls hold the model until released."""

        image_shape, classes = (28, 28), 10

        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release, self.calls = threading.Event(), threading.Event(), []
            self.found_busy = threading.Event()  # a request on the event loop found the model taken

        def predict(self, images: np.ndarray, wait: bool = True) -> np.ndarray:
            try:
                return super().predict(images, wait)
            except serve.RunnerBusy:
                self.found_busy.set()
                raise

        def _predict(self, images: np.ndarray) -> np.ndarray:
            self.calls.append(len(images))
            self.entered.set()
            self.release.wait(60)
            return np.full((len(images), self.classes), 0.1, np.float32)

    config = serve.ServeConfig(model_name=MODEL, max_batch=64, warmup_requests=0)
    holder = serve.ModelHolder(config)
    runner = Blocking()
    holder.served, holder.state = serve.Served(runner, "1", "tflite"), "AVAILABLE"
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(serve.create_app(config, holder), host="127.0.0.1", port=port,
                                                   log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    client = Server(f"http://127.0.0.1:{port}", None, None)
    answers: dict[str, Any] = {}

    def send(label: str, images: int) -> threading.Thread:
        sender = threading.Thread(target=lambda: answers.__setitem__(label, client.call(
            "POST", f"/v1/models/{MODEL}:predict", {"instances": _images(images).tolist()})))
        sender.start()
        return sender

    try:
        deadline = time.monotonic() + 30
        while not uvicorn_server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert len(json.dumps({"instances": _images(32).tolist()})) > serve.INLINE_BODY_BYTES
        senders = [send("big", 32)]
        assert runner.entered.wait(30)
        senders.append(send("small", 1))  # the model is busy: this one must not wait on the event loop
        assert runner.found_busy.wait(30)
        try:
            with urllib.request.urlopen(f"{client.url}/v2/health/live", timeout=10) as response:
                live = response.status
        finally:
            runner.release.set()
        for sender in senders:
            sender.join(30)
        assert live == 200
        assert answers["big"][0] == 200 and len(answers["big"][2]["predictions"]) == 32
        assert answers["small"][0] == 200 and len(answers["small"][2]["predictions"]) == 1
        assert sorted(runner.calls) == [1, 32]
    finally:
        runner.release.set()
        uvicorn_server.should_exit = True
        thread.join(30)


def _constant_app(**options: Any) -> Any:
    """The server's app around a model answering 0.1 for every class: the HTTP layer alone."""
    from mlsteps import serve

    class Constant(serve.Serialised):
        image_shape, classes = (28, 28), 10

        def _predict(self, images: np.ndarray) -> np.ndarray:
            return np.full((len(images), self.classes), 0.1, np.float32)

    config = serve.ServeConfig(model_name=MODEL, warmup_requests=0, **options)
    holder = serve.ModelHolder(config)
    holder.served, holder.state = serve.Served(Constant(), "1", "tflite"), "AVAILABLE"
    return serve.create_app(config, holder)


async def _asgi(app: Any, method: str, path: str, receive: Any, length: int | None = None,
                headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, bytes]:
    answer: dict[str, Any] = {"body": b""}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    headers = [(b"content-type", b"application/json"), *headers]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": b"", "query_string": b"", "root_path": "",
             "scheme": "http", "http_version": "1.1", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8501)}
    await app(scope, receive, send)
    return answer["status"], answer["body"]


def test_stalled_uploads_get_408_and_free_their_slots_and_an_oversized_body_is_refused_at_once():
    """A client that sends its headers and then nothing (crashed, a dropped NAT entry) held its slot for large
    bodies for ever: four of them blocked every large request, and the 413 a too-large one should get at once."""
    import anyio

    from mlsteps import serve

    app = _constant_app(body_timeout_seconds=0.5, max_body_bytes=1_000_000)
    image = json.dumps({"instances": [[[0] * 28] * 28]}).encode()
    big = image + b" " * (serve.INLINE_BODY_BYTES + 1000)
    answers: dict[str, tuple[float, int]] = {}
    started = time.monotonic()

    async def stalled() -> dict:
        await anyio.sleep_forever()

    def sends(body: bytes) -> Any:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    async def post(label: str, receive: Any, length: int) -> None:
        status, _ = await _asgi(app, "POST", f"/v1/models/{MODEL}:predict", receive, length)
        answers[label] = (time.monotonic() - started, status)

    async def main() -> None:
        with anyio.fail_after(20):  # without the body timeout: a failure, not a hang
            await requests()

    async def requests() -> None:
        async with anyio.create_task_group() as group:
            for i in range(serve.LARGE_BODIES_AT_ONCE):
                group.start_soon(post, f"stalled{i}", stalled, len(big))
            await anyio.sleep(0.1)
            group.start_soon(post, "oversized", stalled, 2_000_000)
            group.start_soon(post, "big", sends(big), len(big))

    anyio.run(main)
    assert all(answers[f"stalled{i}"][1] == 408 for i in range(serve.LARGE_BODIES_AT_ONCE)), answers
    assert answers["oversized"][1] == 413 and answers["oversized"][0] < 0.4  # not queued behind the stalled
    assert answers["big"][1] == 200  # served once a stalled upload's slot was freed


def test_a_client_that_disconnects_mid_body_is_not_counted_as_a_server_error(caplog):
    """Counted and logged as a 500 with a traceback, it fired 5xx alerts for what clients did."""
    import anyio

    app = _constant_app()

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    async def nothing() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> tuple[int, bytes]:
        await _asgi(app, "POST", f"/v1/models/{MODEL}:predict", gone, 200_000)
        return await _asgi(app, "GET", "/metrics", nothing)

    status, metrics = anyio.run(main)
    assert status == 200
    assert 'model_server_requests_total{code="499",protocol="v1"} 1.0' in metrics.decode()
    assert 'code="500"' not in metrics.decode() and "inference failed" not in caplog.text


def test_only_a_few_large_bodies_are_read_at_a_time_and_small_requests_pass_them(monkeypatch):
    """Many clients sending big batches at once: the server reads LARGE_BODIES_AT_ONCE of them and leaves the
    others unread until one is answered (each buffered body and its parse cost memory); small requests and
    bodies of any size still get answered, none refused."""
    import anyio

    from mlsteps import serve

    app = _constant_app()
    image = json.dumps({"instances": [[[0] * 28] * 28]}).encode()
    big = image + b" " * (serve.INLINE_BODY_BYTES + 1000)  # valid JSON, padded past the inline size
    reading, answers = [], {}

    async def post(label: str, body: bytes, gate: anyio.Event) -> None:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if sent:
                await anyio.sleep_forever()
            reading.append(label)
            await gate.wait()  # the client is slow to send its body
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        answers[label], _ = await _asgi(app, "POST", f"/v1/models/{MODEL}:predict", receive, len(body))

    async def main() -> None:
        slow, fast = anyio.Event(), anyio.Event()
        fast.set()
        async with anyio.create_task_group() as group:
            for i in range(serve.LARGE_BODIES_AT_ONCE + 3):
                group.start_soon(post, f"big{i}", big, slow)
            await anyio.sleep(0.3)
            assert len(reading) == serve.LARGE_BODIES_AT_ONCE  # the others wait unread
            group.start_soon(post, "small", image, fast)
            with anyio.fail_after(10):
                while "small" not in answers:
                    await anyio.sleep(0.01)
            assert len([label for label in reading if label.startswith("big")]) == serve.LARGE_BODIES_AT_ONCE
            slow.set()
        assert answers == {**{f"big{i}": 200 for i in range(serve.LARGE_BODIES_AT_ONCE + 3)}, "small": 200}

    anyio.run(main)


def test_only_a_registry_that_does_not_answer_is_waited_for_without_end(monkeypatch):
    """No answer at all (refused, timed out) is an outage to wait out; a 5xx or a failed download is worth a
    few tries; an artifact store refusing the download (403/404) is not an outage at all."""
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from mlsteps import serve

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as refused:  # what MLflow raises for a registry that is down
        mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}").get_model_version_by_alias(MODEL, "champion")
    assert serve.unreachable(refused.value) and serve.transient(refused.value)

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status}", response=response)

    assert serve.transient(http_error(503)) and not serve.unreachable(http_error(503))
    assert not serve.transient(http_error(403)) and not serve.transient(http_error(404))
    download_failed = MlflowException("The following failures occurred while downloading one or more artifacts",
                                      error_code=INTERNAL_ERROR)
    assert serve.transient(download_failed) and not serve.unreachable(download_failed)
    assert not serve.transient(MlflowException("no such version", error_code=RESOURCE_DOES_NOT_EXIST))
    # The model's own files, downloaded but missing or unreadable: no try fixes them (were tried as outages).
    assert not serve.transient(FileNotFoundError(2, "No such file", "/tmp/model/data/model.weights.h5"))
    assert not serve.transient(OSError("Unable to synchronously open file (file signature not found)"))
    assert serve.transient(requests.ConnectionError("Connection reset by peer"))
    assert serve.transient(requests.Timeout("read timed out")) and serve.transient(ConnectionResetError(104, "reset"))


def test_a_download_that_keeps_failing_ends_the_initial_load_after_a_few_tries(monkeypatch, versions,
                                                                              mlflow_server):
    """The registry answers but the version's files cannot be had: not an outage to wait out forever; the
    status says why (state END)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from mlsteps import serve

    calls = []

    def failing(**kwargs: Any) -> str:
        calls.append(kwargs)
        if len(calls) > 50:  # a load that would retry forever ends here instead of hanging the test
            raise MlflowException("tried too often", error_code=RESOURCE_DOES_NOT_EXIST)
        raise MlflowException("The following failures occurred while downloading one or more artifacts: "
                              "model/model.tflite: disk full", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", failing)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    holder = serve.ModelHolder(serve.ServeConfig(model_name=MODEL, tracking_uri=mlflow_server, warmup_requests=1))
    holder.load()
    assert len(calls) == serve.BOUNDED_TRIES
    assert holder.state == "END" and "disk full" in holder.error and not holder.ready


def test_the_initial_load_waits_out_an_outage_of_any_length_and_says_why_it_is_not_ready(
        monkeypatch, versions, mlflow_server):
    """A pod rescheduled during a long MLflow outage must come up once MLflow is back (nothing restarts a live,
    unready server); meanwhile its status says what it waits for."""
    import mlflow.artifacts

    from mlsteps import serve

    real, calls, seen = mlflow.artifacts.download_artifacts, [], []

    def down_then_up(**kwargs: Any) -> str:
        calls.append(kwargs)
        if len(calls) <= 20:
            raise ConnectionError("connection refused")
        return real(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", down_then_up)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # tenacity's pauses (up to a minute each)
    holder = serve.ModelHolder(serve.ServeConfig(model_name=MODEL, tracking_uri=mlflow_server, warmup_requests=1))
    waiting = holder._waiting
    monkeypatch.setattr(holder, "_waiting", lambda message: (waiting(message), seen.append((holder.state,
                                                                                          holder.error))))
    holder.load()
    assert (holder.state, holder.version, holder.error) == ("AVAILABLE", str(versions[-1]), "")
    assert len(seen) == 20 and {state for state, _ in seen} == {"LOADING"}
    assert "waiting for the registry" in seen[-1][1] and "connection refused" in seen[-1][1]


def test_the_status_of_a_server_waiting_for_the_registry_does_not_show_the_tracking_uris_password(monkeypatch):
    """MLflow's error quotes the URL whole: the status endpoint (and every 503) showed the password to anyone."""
    from mlsteps import serve

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    seen = []
    holder = serve.ModelHolder(serve.ServeConfig(
        model_name=MODEL, tracking_uri=f"http://reader:s3cret-pass@127.0.0.1:{free_port()}", warmup_requests=1))
    waiting = holder._waiting

    def once(message: str) -> None:
        waiting(message)
        seen.append(holder.error)
        raise serve.Superseded  # seen once: enough

    monkeypatch.setattr(holder, "_waiting", once)
    holder.load()
    assert seen and "waiting for the registry" in seen[0] and "reader:***@127.0.0.1" in seen[0], seen
    assert "s3cret" not in seen[0]


def test_a_failed_load_or_deployment_does_not_show_the_tracking_uris_password(monkeypatch, tmp_path):
    """The failed initial load's status and /admin/deploy's 422 quote the loader's error, URL and all."""
    import anyio

    from mlsteps import serve

    uri = "http://reader:s3cret-pass@mlflow.example:5000"

    def fails(config: Any, model_uri: str, **kwargs: Any) -> Any:
        raise RuntimeError(f"API request to {uri}/api/2.0/mlflow/registered-models/alias failed")

    monkeypatch.setattr(serve, "load_version", fails)
    holder = serve.ModelHolder(serve.ServeConfig(model_name=MODEL, tracking_uri=uri, warmup_requests=0))
    holder.load()
    assert holder.state == "END" and "reader:***@mlflow.example" in holder.error and "s3cret" not in holder.error

    token = tmp_path / "token"
    token.write_text("admin-token-0123456789\n")
    app = _constant_app(tracking_uri=uri, admin_token_file=str(token))
    body = json.dumps({"version": "2"}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def deploy() -> tuple[int, bytes]:
        return await _asgi(app, "POST", "/admin/deploy", receive, len(body),
                           headers=[(b"authorization", b"Bearer admin-token-0123456789")])

    status, reply = anyio.run(deploy)
    assert status == 422 and b"reader:***@mlflow.example" in reply and b"s3cret" not in reply, reply


def test_a_version_deployed_while_the_initial_load_waits_ends_the_wait(monkeypatch, versions, mlflow_server):
    """The deployment decided what is served: the initial load stops retrying instead of waiting forever for a
    version it would not serve anyway."""
    import threading

    import mlflow.artifacts

    from mlsteps import serve

    first, champion = versions
    real, real_sleep = mlflow.artifacts.download_artifacts, time.sleep

    def champion_unreachable(**kwargs: Any) -> str:
        if kwargs["artifact_uri"].endswith(f"/{champion}"):
            raise ConnectionError("connection refused")
        return real(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", champion_unreachable)
    monkeypatch.setattr(time, "sleep", lambda seconds: real_sleep(0.01))
    holder = serve.ModelHolder(serve.ServeConfig(model_name=MODEL, tracking_uri=mlflow_server, warmup_requests=1))
    loader = threading.Thread(target=holder.load, daemon=True)
    loader.start()
    deadline = time.monotonic() + 30
    while "waiting for the registry" not in holder.error:
        assert time.monotonic() < deadline and loader.is_alive()
        real_sleep(0.05)
    holder.deploy(str(first))
    loader.join(30)
    assert not loader.is_alive()
    assert (holder.state, holder.version, holder.error) == ("AVAILABLE", str(first), "")


def test_deploying_the_served_version_keeps_it_and_a_deployment_queued_behind_another_runs_after_it(
        monkeypatch, versions, mlflow_server):
    """A rollback's restore (LocalTarget) posts the previous version even when it is served: it queues behind a
    deployment still loading in the server (whose caller timed out) and wins, and costs nothing otherwise."""
    import threading

    from mlsteps import serve

    first, second = versions
    holder = serve.ModelHolder(serve.ServeConfig(model_name=MODEL, tracking_uri=mlflow_server, warmup_requests=1))
    served, _ = holder.deploy(str(first))
    assert holder.deploy(str(first)) == (served, str(first)) and holder.served is served  # not loaded again

    real, loading, release = serve.load_version, threading.Event(), threading.Event()

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        loading.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "load_version", slow_load)
    timed_out = threading.Thread(target=holder.deploy, args=(str(second),), daemon=True)  # its caller gave up
    timed_out.start()
    assert loading.wait(30)
    restore = threading.Thread(target=holder.deploy, args=(str(first),), daemon=True)
    restore.start()
    release.set()
    timed_out.join(30)
    restore.join(30)
    assert holder.version == str(first)


def test_loading_a_version_leaves_no_copy_of_it_on_disk(monkeypatch, tmp_path, versions, mlflow_server):
    """A long-running local server deploys version after version: each download is deleted once in memory."""
    import tempfile

    from mlsteps import serve

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = serve.ServeConfig(model_name=MODEL, tracking_uri=mlflow_server, warmup_requests=1)
    for version in versions:
        served = serve.load_version(config, f"models:/{MODEL}/{version}")
        assert served.runner.predict(_images(2)).shape == (2, 10)
    assert list(tmp_path.iterdir()) == []


def test_liveness_does_not_need_mlflow_and_readiness_waits_for_the_model(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the model cannot load
    server = _start(tmp_path, dead, wait_ready=False)
    try:
        assert server.call("GET", "/v2/health/live")[0] == 200
        assert server.call("GET", "/v2/health/ready")[0] == 503
        status, _, body = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": [[0] * 784]})
        assert status == 503 and "not ready" in body["error"]
        # A version in the path: not ready either (a 404 "not served" would tell clients to give up on it).
        status, _, body = server.call("POST", f"/v1/models/{MODEL}/versions/3:predict", {"instances": [[0] * 784]})
        assert status == 503 and "not ready" in body["error"]
        state = server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]["state"]
        assert state in ("LOADING", "END")
    finally:
        _stop(server)


class Forwarder:
    """A TCP port that forwards to ``target`` once started: a registry that comes up late."""

    def __init__(self, port: int, target: str) -> None:
        import socket
        import threading
        from urllib.parse import urlsplit

        self.port, self.target = port, urlsplit(target)
        self._open: list = []  # every forwarded connection's two sockets, closed with the forwarder
        self._socket = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._socket.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((self.target.hostname, self.target.port))
            self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        import socket

        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """The registry goes away: no new connections, and the kept-alive ones are cut."""
        import socket

        self._socket.close()
        for end in self._open:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_a_registry_that_comes_up_after_the_server_is_waited_for_and_its_version_served(tmp_path, versions,
                                                                                         mlflow_server):
    """MLflow reports a refused connection as an MlflowException (after its own retries: none here): the
    server retries it (tenacity) instead of ending up not ready until a restart."""
    port = free_port()
    server = _start(tmp_path, f"http://127.0.0.1:{port}", wait_ready=False, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    forwarder = None
    try:
        deadline = time.monotonic() + 60
        while "the registry did not answer" not in server.log.read_text():
            assert time.monotonic() < deadline and server.process.poll() is None, server.log.read_text()[-3000:]
            time.sleep(0.2)
        assert server.call("GET", "/v2/health/ready")[0] == 503
        forwarder = Forwarder(port, mlflow_server)  # the registry is back
        while server.call("GET", "/v2/health/ready")[0] != 200:
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.3)
        status = server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]
        assert (status["state"], status["version"]) == ("AVAILABLE", str(versions[-1]))
    finally:
        _stop(server)
        if forwarder:
            forwarder.close()


def test_a_version_that_fails_to_load_is_reported_not_served(tmp_path, versions, mlflow_server):
    server = _start(tmp_path, mlflow_server, "--model-uri", f"models:/{MODEL}/999", wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while (state := server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0])["state"] != "END":
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert state["status"]["error_message"]
        assert server.call("GET", "/v2/health/ready")[0] == 503
        assert server.call("GET", "/v2/health/live")[0] == 200
    finally:
        _stop(server)


@pytest.mark.parametrize("uri", ["$(MODEL_URI)", "models:/other_model@champion", f"models:/{MODEL}/latest", "champion"])
def test_a_model_uri_that_is_not_a_version_or_alias_of_the_served_model_is_refused_at_start(uri):
    # "$(MODEL_URI)": what a runtime that does not expand Kubernetes' $(VAR) in args passes on
    out = subprocess.run([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL, "--model-uri", uri],
                         env=step_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--model-uri {uri!r} is not models:/{MODEL}/<version> or models:/{MODEL}@<alias>" in out.stdout


@pytest.mark.parametrize(("flags", "words"), [
    (["--port", "131073"], "--port must be a TCP port, 1 to 65535, got 131073"),  # uvicorn: port 1
    (["--port", "0"], "--port must be a TCP port, 1 to 65535, got 0"),
    (["--threads", "0"], "--threads, --max-batch and --max-body-bytes must be >= 1"),
    (["--warmup-requests", "-1"], "--warmup-requests must be >= 0, got -1"),
    (["--deployment-file", "{tmp}/a-file/deployment.json"], "{tmp}/a-file is a file, not a folder"),
    (["--body-timeout-seconds", "-5"], "--body-timeout-seconds must be a number of seconds > 0, got -5"),
    (["--body-timeout-seconds", "0"], "--body-timeout-seconds must be a number of seconds > 0, got 0"),
], ids=["port-past-65535", "port-zero", "no-threads", "negative-warmup", "deployment-file-under-a-file",
        "negative-body-timeout", "no-body-timeout"])
def test_server_flags_it_cannot_serve_with_are_refused_at_start(flags, words, tmp_path):
    (tmp_path / "a-file").write_text("")
    flags, words = [f.format(tmp=tmp_path) for f in flags], words.format(tmp=tmp_path)
    out = subprocess.run([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL, *flags],
                         env=step_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and words in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("token", [None, "short"], ids=["missing-file", "too-short"])
def test_an_admin_token_file_that_cannot_serve_is_refused_at_start_naming_the_flag(tmp_path, token):
    path = tmp_path / "admin-token"
    if token is not None:
        path.write_text(token)
    out = subprocess.run([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL, "--model-uri",
                          f"models:/{MODEL}@champion", "--admin-token-file", str(path)],
                         env=step_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert str(path) in out.stdout and "at least 16 characters" in out.stdout


@pytest.fixture(scope="module")
def broken_version(tmp_path_factory, mlflow_server) -> int:
    """A registered version whose .tflite is not a model: it downloads fine and fails to load."""
    import mlflow

    garbage = tmp_path_factory.mktemp("broken") / "model.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 64)
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="compressed_model", python_model=str(LITERT_MODEL),
                                       pip_requirements=["mlflow"],
                                       artifacts={"tflite": str(garbage)})
    return int(mlflow.register_model(info.model_uri, MODEL).version)


def _admin_server(tmp_path: Path, mlflow_server: str, version: int,
                  **env: str) -> tuple[Server, dict[str, str], Path]:
    token_file, record = tmp_path / "admin-token", tmp_path / "deployed.json"
    token_file.write_text("s3cret-token-of-the-test\n")
    record.write_text(json.dumps({"model_name": MODEL, "version": str(version)}))
    server = _start(tmp_path, mlflow_server, "--admin-token-file", str(token_file), "--deployment-file", str(record),
                    **env)
    return server, {"Authorization": "Bearer s3cret-token-of-the-test"}, record


def _version_after_restart(tmp_path, mlflow_server, record) -> str:
    """The version a server started on this deployment record serves."""
    restarted = _start(tmp_path, mlflow_server, "--deployment-file", str(record))
    try:
        return restarted.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]["version"]
    finally:
        _stop(restarted)


def test_deploying_in_place_switches_versions_without_a_failed_request(tmp_path, versions, mlflow_server):
    import threading

    first, second = versions
    server, auth, record = _admin_server(tmp_path, mlflow_server, first)  # the record wins over the alias
    try:
        assert server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]["version"] == str(first)
        answers: list[tuple[int, str]] = []
        stop = threading.Event()
        body = {"instances": _images(1).tolist()}

        def load() -> None:
            while not stop.is_set():
                status, headers, _ = server.call("POST", f"/v1/models/{MODEL}:predict", body)
                answers.append((status, headers.get("x-model-version", "")))

        clients = [threading.Thread(target=load) for _ in range(3)]
        for client in clients:
            client.start()
        time.sleep(0.5)
        status, headers, reply = server.call("POST", "/admin/deploy", {"version": str(second)}, headers=auth)
        time.sleep(0.5)
        stop.set()
        for client in clients:
            client.join()
        assert status == 200, reply
        assert (reply["model_version"], reply["previous_version"]) == (str(second), str(first))
        assert {code for code, _ in answers} == {200}
        seen = [version for _, version in answers]
        assert str(first) in seen and seen[-1] == str(second)
        assert json.loads(record.read_text())["version"] == str(second)
        assert 'model_server_deployments_total{outcome="succeeded"} 1.0' in server.call("GET", "/metrics")[2]
        # A rollback's restore of the version served: kept, counted apart from switches.
        assert server.call("POST", "/admin/deploy", {"version": str(second)}, headers=auth)[0] == 200
        metrics = server.call("GET", "/metrics")[2]
        assert 'outcome="succeeded"} 1.0' in metrics and 'outcome="kept"} 1.0' in metrics
    finally:
        _stop(server)
    # A restarted server comes back with what was deployed, not with what the alias names.
    assert _version_after_restart(tmp_path, mlflow_server, record) == str(second)


def test_a_version_that_fails_to_load_is_refused_and_the_served_one_keeps_answering(tmp_path, versions,
                                                                                   broken_version, mlflow_server):
    first = versions[0]
    server, auth, record = _admin_server(tmp_path, mlflow_server, first)
    try:
        status, _, reply = server.call("POST", "/admin/deploy", {"version": str(broken_version)}, headers=auth)
        assert status == 422 and f"version {broken_version} could not be loaded" in reply["error"]
        assert f"still serving version {first}" in reply["error"]
        status, headers, _ = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": _images(1).tolist()})
        assert (status, headers["x-model-version"]) == (200, str(first))
        assert json.loads(record.read_text())["version"] == str(first)
        assert server.call("POST", "/admin/deploy", {"version": str(first)},
                           headers={"Authorization": "Bearer wrong"})[0] == 401
        token = auth["Authorization"].split()[1]
        assert server.call("POST", "/admin/deploy", {"version": str(first)},  # a token without its scheme
                           headers={"Authorization": token})[0] == 401
        assert server.call("POST", "/admin/deploy", {"version": str(first)},  # the scheme in any case
                           headers={"Authorization": f"bearer {token}"})[0] == 200
        assert server.call("POST", "/admin/deploy", {"version": "latest"}, headers=auth)[0] == 400
    finally:
        _stop(server)


def test_a_deployment_during_a_registry_outage_is_refused_without_waiting_it_out(tmp_path, versions, mlflow_server):
    """The initial load waits for the registry (tested above); a deployment answers the promotion instead,
    which rolls back, rather than holding the switch past the promotion's request timeout."""
    first, second = versions
    registry = Forwarder(free_port(), mlflow_server)
    server, auth, _ = _admin_server(tmp_path, f"http://127.0.0.1:{registry.port}", first,
                                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        registry.close()
        status, _, reply = server.call("POST", "/admin/deploy", {"version": str(second)}, headers=auth)
        assert status == 422 and f"still serving version {first}" in reply["error"], reply
        assert "the registry did not answer" not in server.log.read_text()
        status, headers, _ = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": _images(1).tolist()})
        assert (status, headers["x-model-version"]) == (200, str(first))
    finally:
        _stop(server)


def test_unloading_serves_nothing_until_a_deployment_and_a_restart_does_not_bring_the_version_back(
        tmp_path, versions, mlflow_server):
    """What rolling back a first promotion asks of the local server: {"version": null}."""
    first, champion = versions
    server, auth, record = _admin_server(tmp_path, mlflow_server, first)
    try:
        status, _, reply = server.call("POST", "/admin/deploy", {"version": None}, headers=auth)
        assert (status, reply["model_version"], reply["previous_version"]) == (200, None, str(first))
        status, _, reply = server.call("POST", f"/v1/models/{MODEL}:predict", {"instances": _images(1).tolist()})
        assert status == 503 and "no model deployed" in reply["error"]
        state = server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]
        assert (state["version"], state["state"]) == ("", "END")
        assert server.call("GET", "/v2/health/ready")[0] == 503
        assert not record.exists()
        assert 'model_server_deployments_total{outcome="unloaded"} 1.0' in server.call("GET", "/metrics")[2]
    finally:
        _stop(server)
    # The record is gone: a restarted server serves the champion alias, not the version unloaded.
    assert _version_after_restart(tmp_path, mlflow_server, record) == str(champion)


def test_without_a_token_file_there_is_no_admin_endpoint(server, versions):
    status, _, reply = server.call("POST", "/admin/deploy", {"version": str(versions[0])},
                                   headers={"Authorization": "Bearer anything-at-all-here"})
    assert status == 404 and "--admin-token-file" in reply["error"]


@pytest.mark.parametrize(("flags", "words"), [
    ({"load_timeout_seconds": 0.0}, "--load-timeout-seconds must be a number of seconds > 0, got 0"),
    ({"load_timeout_seconds": -5.0}, "--load-timeout-seconds must be a number of seconds > 0, got -5"),
    ({"load_timeout_seconds": float("inf")}, "--load-timeout-seconds must be a number of seconds > 0, got inf"),
    ({"requests": 1}, "--requests must be at least 2"),
    ({"version": 0}, "--version must be a registered version number"),
], ids=["timeout-zero", "timeout-negative", "timeout-infinite", "one-request", "version-zero"])
def test_infra_validation_refuses_flags_no_server_could_pass_before_the_registry_hears_of_it(flags, words):
    """A "failed" verdict tag would blame the version for the flags (the MLflow address here answers nothing:
    a check made after contacting it would fail on that instead)."""
    from mlsteps import infra_validate

    config = infra_validate.InfraValidateConfig(**({"model_name": MODEL, "version": 1,
                                                   "tracking_uri": "http://127.0.0.1:9"} | flags))
    with pytest.raises(StepError, match=re.escape(words)):
        infra_validate.run(config)


@pytest.mark.parametrize(("error_message", "raised", "words"), [
    ("waiting for the registry: HTTP 503 from the artifact store", "NodeError", "is failing, not the version"),
    ("", "Failed", "not ready after 0.2 s (state LOADING)"),
], ids=["registry-failing", "slow-load"])
def test_a_server_still_waiting_for_the_registry_at_the_load_timeout_is_retried_not_blamed_on_the_version(
        monkeypatch, tmp_path, error_message, raised, words):
    """An MLflow or artifact-store outage keeps the server LOADING with its reason in the status: a verdict
    "failed" (exit 2, no retry, rollback) would revert an approval for a fault of the infrastructure."""
    from types import SimpleNamespace

    from mlsteps import infra_validate

    status = {"model_version_status": [{"version": "", "state": "LOADING",
                                        "status": {"error_code": "UNKNOWN", "error_message": error_message}}]}
    monkeypatch.setattr(infra_validate, "_call", lambda url, *args, **kwargs: (200, {}, status))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises((infra_validate.Failed, NodeError)) as stopped:
        infra_validate._wait_ready("http://127.0.0.1:9", MODEL, SimpleNamespace(poll=lambda: None),
                                   tmp_path / "server.log", 0.2)
    assert type(stopped.value).__name__ == raised and words in str(stopped.value)
    assert error_message in str(stopped.value)


def test_a_registry_answering_503_at_infra_validation_is_retried_not_blamed_on_the_version(monkeypatch):
    """With MLflow's default HTTP retries (about 4 minutes of backoff) the server's first load attempt outlasted
    the load timeout before its status could say why: "not ready", a verdict failed, and a rollback."""
    import http.server
    import threading

    from mlsteps import infra_validate

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(503)

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    registry = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    try:
        with pytest.raises(NodeError, match="is failing, not the version") as stopped:
            infra_validate.validate(infra_validate.InfraValidateConfig(
                model_name=MODEL, version=1, load_timeout_seconds=25,
                tracking_uri=f"http://127.0.0.1:{registry.server_address[1]}"))
    finally:
        registry.shutdown()
        registry.server_close()
    assert "503" in str(stopped.value)


@pytest.mark.parametrize("requests", [2, 3, 12])
def test_the_malformed_probe_is_always_followed_by_a_valid_request_and_both_protocols_get_both_batch_sizes(
        monkeypatch, requests):
    """The server must still answer after refusing it; with --requests 2 (the form's least) it came last.
    Batches of 8 went to v1 only: a batching bug of the v2 path passed infra-validation."""
    from mlsteps import infra_validate

    sent: list[str] = []
    kinds: set[tuple[str, int]] = set()

    def fake_call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict, Any]:
        if raw is not None:
            sent.append("malformed")
            return 400, {}, {"error": "request body is not valid JSON"}
        if body is None:
            return 200, {}, {"inputs": [{"shape": [-1, 28, 28]}]}
        sent.append("valid")
        rows = [[0.1] * 10] * (len(body["instances"]) if "instances" in body else body["inputs"][0]["shape"][0])
        kinds.add(("v1" if "instances" in body else "v2", len(rows)))
        answer = ({"predictions": rows} if "instances" in body else
                  {"outputs": [{"shape": [len(rows), 10], "data": [p for row in rows for p in row]}]})
        return 200, {"x-model-version": "3"}, answer

    monkeypatch.setattr(infra_validate, "_call", fake_call)
    infra_validate._probe("http://127.0.0.1:9", MODEL, "3", requests)
    assert sent.count("malformed") == 1 and sent.count("valid") == requests
    assert sent.index("malformed") < len(sent) - 1
    if requests >= 4:
        assert kinds == {("v1", 1), ("v1", 8), ("v2", 1), ("v2", 8)}
    assert ("v1", 1) in kinds  # the latencies reported are of batches of 1


def _infra_validate(tmp_path: Path, mlflow_server: str, version: int) -> tuple[subprocess.CompletedProcess, dict]:
    result = tmp_path / f"infra-{version}.json"
    out = subprocess.run([sys.executable, "-m", "mlsteps.infra_validate", "--model-name", MODEL, "--version",
                          str(version), "--requests", "12", "--load-timeout-seconds", "90",
                          "--result-path", str(result)], capture_output=True, text=True, timeout=300,
                         env=step_env(MLFLOW_TRACKING_URI=mlflow_server))
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    tags = mlflow.MlflowClient().get_model_version(MODEL, str(version)).tags
    return out, {"result": json.loads(result.read_text()) if result.exists() else None, "tags": tags}


def test_infra_validation_passes_a_version_the_real_server_loads_and_answers(tmp_path, versions, mlflow_server):
    out, seen = _infra_validate(tmp_path, mlflow_server, versions[0])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert seen["result"]["passed"] and seen["result"]["version"] == versions[0]
    assert seen["result"]["p50_ms"] > 0
    assert seen["tags"]["promotion.infra_validation"].startswith("passed: 12 requests")


def test_infra_validation_fails_a_version_the_server_cannot_load_and_says_why(tmp_path, broken_version,
                                                                              mlflow_server):
    out, seen = _infra_validate(tmp_path, mlflow_server, broken_version)
    assert out.returncode == 2, out.stdout[-3000:]
    assert f"infra-validation of {MODEL} version {broken_version} failed" in out.stderr
    assert "could not load it" in out.stderr and "Traceback" not in out.stderr
    assert seen["result"] is None
    assert seen["tags"]["promotion.infra_validation"].startswith("failed: the model server could not load it")


@pytest.fixture(scope="module")
def nan_version(tmp_path_factory, mlflow_server) -> int:
    """A registered version whose .tflite loads and answers, but NaN: its classifier's weights are NaN."""
    import mlflow

    path = _convert(tmp_path_factory.mktemp("nan") / "model.tflite", width=4, converted=(
        "kernel, bias = net.layers[-1].get_weights()\n"
        "net.layers[-1].set_weights([np.full_like(kernel, np.nan), bias])\n"
        "content = compress.convert(net, 'float')\n"))
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="compressed_model", python_model=str(LITERT_MODEL),
                                       pip_requirements=["mlflow"],
                                       artifacts={"tflite": str(path)})
    return int(mlflow.register_model(info.model_uri, MODEL).version)


def test_a_version_answering_non_finite_probabilities_fails_infra_validation_and_is_never_served(
        tmp_path, nan_version, mlflow_server):
    out, seen = _infra_validate(tmp_path, mlflow_server, nan_version)
    assert out.returncode == 2, out.stdout[-3000:]
    assert "non-finite probabilities" in out.stderr and "Traceback" not in out.stderr
    assert seen["tags"]["promotion.infra_validation"].startswith("failed: the model server could not load it")


CRASHING_MODEL = """
import os

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class CrashesOnBatches(mlflow.pyfunc.PythonModel):
    \"\"\"Answers one image at a time (warm-up passes); a batch kills the whole server process.\"\"\"

    def predict(self, context, model_input, params=None):
        images = np.asarray(model_input)
        if len(images) > 1:
            os._exit(3)
        return np.full((len(images), 10), 0.1, dtype=np.float32)


set_model(CrashesOnBatches())
"""


@pytest.fixture(scope="module")
def crashing_version(tmp_path_factory, mlflow_server) -> int:
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    code = tmp_path_factory.mktemp("crashing") / "crashing_model.py"
    code.write_text(CRASHING_MODEL)
    mlflow.set_tracking_uri(mlflow_server)
    signature = infer_signature(np.zeros((1, 28, 28), np.float32), np.full((1, 10), 0.1, np.float32))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=signature,
                                       pip_requirements=["mlflow"])
    return int(mlflow.register_model(info.model_uri, MODEL).version)


def test_a_version_that_kills_the_server_mid_probe_fails_infra_validation_with_the_servers_end(
        tmp_path, crashing_version, mlflow_server):
    out, seen = _infra_validate(tmp_path, mlflow_server, crashing_version)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    verdict = seen["tags"]["promotion.infra_validation"]
    assert verdict.startswith("failed: the model server stopped answering"), verdict
    assert "exited with code 3" in verdict


def test_server_and_infra_validation_import_nothing_the_serving_image_lacks(versions, mlflow_server):
    """images/serving has no TensorFlow, Keras, pandas or Optuna: neither module may need them, nor may loading
    a version from the registry and answering a request (the imports happen inside functions). Full MLflow (this
    environment) imports pandas while loading when it is installed; mlflow-skinny (the image) does not: that
    part runs for real in tests/images/test_serving_image.py."""
    lacking = "{'tensorflow', 'keras', 'tf_keras', 'pandas', 'optuna', 'matplotlib', 'sklearn'}"
    probe = ("import sys, numpy as np, mlsteps.serve as serve, mlsteps.infra_validate\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {lacking}))\n"
             f"config = serve.ServeConfig(model_name={MODEL!r}, warmup_requests=1)\n"
             "serve.create_app(config)\n"
             f"served = serve.load_version(config, 'models:/{MODEL}/{versions[0]}')\n"
             "served.runner.predict(np.zeros((2, 28, 28), np.float32))\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & ({lacking} - {{'pandas'}})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env=step_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]"], out.stdout


def test_a_server_with_nothing_loaded_becomes_ready_when_a_version_is_deployed(tmp_path, versions, mlflow_server):
    token = tmp_path / "admin-token"
    token.write_text("another-token-for-this-test")
    server = _start(tmp_path, mlflow_server, "--model-uri", f"models:/{MODEL}/999", "--admin-token-file", str(token),
                    "--deployment-file", str(tmp_path / "deployed.json"), wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while server.call("GET", f"/v1/models/{MODEL}")[2]["model_version_status"][0]["state"] != "END":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        status, _, reply = server.call("POST", "/admin/deploy", {"version": str(versions[0])},
                                       headers={"Authorization": "Bearer another-token-for-this-test"})
        assert (status, reply["model_version"], reply["previous_version"]) == (200, str(versions[0]), "")
        assert server.call("GET", "/v2/health/ready")[0] == 200
    finally:
        _stop(server)
