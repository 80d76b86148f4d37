"""infra_validate: load a candidate version in the real model server and make it answer real requests.

Before promotion deploys a version, this step starts ``python -m mlsteps.serve`` on a private port (in
production: in a pod of the serving image, so the candidate meets the same binary, libraries and limits
it will be served with), waits until it reports ready, and sends ``--requests`` requests: TF Serving
``:predict`` and Open Inference v2 ``infer`` alternately, batches of 1 and 8 random images. Each answer
must be HTTP 200, name the candidate version, and hold one finite probability row per image summing to 1.
One malformed request must get a 4xx and the next valid one must still succeed.

The verdict goes into version tags (``promotion.infra_validation``: passed/failed and why). A failure
exits 2 with the reason (the server's own load error when it never became ready); nothing is deployed.
A server still waiting for the registry at the load timeout (MLflow or its artifact store failing: the
server's status says so) exits 1 without a verdict: the runner retries, and the version is not blamed.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import tracking
from .core import NodeError, StepError, cli, field

log = logging.getLogger("mlsteps.infra_validate")
# An int8 model's softmax output is quantized in steps of 1/256: ten classes may sum to 1 +- 10 * 0.5/256.
SUM_TOLERANCE = 0.05


@dataclass(frozen=True)
class InfraValidateConfig:
    model_name: str = field(help="registered model name")
    version: int = field(help="the candidate version")
    requests: int = field(50, help="valid requests the candidate must answer")
    load_timeout_seconds: float = field(180.0, help="how long the server may take to load and warm up")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


class Failed(Exception):
    """The candidate did not pass: the message says what it did."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, dict(exc.headers), exc.read()
    try:
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(payload)
    except json.JSONDecodeError:
        return status, headers, payload.decode(errors="replace")


def _wait_ready(base: str, name: str, server: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise Failed(f"the model server exited with code {server.returncode}: "
                         f"{log_path.read_text(errors='replace')[-1500:]}")
        try:
            status, _, body = _call(f"{base}/v1/models/{name}")
            state = body["model_version_status"][0] if status == 200 else {}
        except (OSError, KeyError, TypeError):
            state = {}
        if state.get("state") == "AVAILABLE":
            return
        if state.get("state") == "END":
            raise Failed(f"the model server could not load it: {state['status']['error_message']}")
        if time.monotonic() > deadline:
            waiting = (state.get("status") or {}).get("error_message", "") if state.get("state") == "LOADING" else ""
            if waiting:  # the server's own reason, e.g. "waiting for the registry: HTTP 503": not the version's
                raise NodeError(f"the model server was still loading {name} after {timeout:g} s, {waiting}; the "
                                "MLflow registry or its artifact store is failing, not the version (retried, and "
                                "the version gets no verdict)")
            raise Failed(f"not ready after {timeout:g} s (state {state.get('state', 'no answer')})")
        time.sleep(0.3)


def _probe(base: str, name: str, version: str, requests: int) -> list[float]:
    """Send the valid requests (and one malformed one); return batch-1 latencies in ms."""
    image_shape = _call(f"{base}/v2/models/{name}")[2]["inputs"][0]["shape"][1:]  # the model's own input
    rng = np.random.default_rng(0)
    latencies = []
    for i in range(requests):
        batch = 8 if i % 4 in (2, 3) else 1  # each protocol gets batches of 1 and of 8 (from 4 requests on)
        images = rng.uniform(0, 255, (batch, *image_shape)).round()
        if i % 2:
            url = f"{base}/v2/models/{name}/infer"
            body: dict[str, Any] = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                                                "data": images.reshape(-1).tolist()}]}
        else:
            url, body = f"{base}/v1/models/{name}:predict", {"instances": images.tolist()}
        started = time.perf_counter()
        status, headers, reply = _call(url, body)
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            raise Failed(f"request {i + 1} ({url.rsplit('/', 1)[-1]}) got HTTP {status}: {reply}")
        if headers.get("x-model-version") != version:
            raise Failed(f"request {i + 1} was answered by version {headers.get('x-model-version')!r}, "
                         f"not {version}")
        if i % 2:
            out = reply["outputs"][0]
            rows = np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])
        else:
            rows = np.asarray(reply["predictions"], dtype=np.float64)
        if rows.shape[0] != batch or not np.all(np.isfinite(rows)) or not np.allclose(rows.sum(axis=1), 1, atol=SUM_TOLERANCE):
            raise Failed(f"request {i + 1}: the answer is not one probability row per image "
                         f"(shape {rows.shape}, row sums {np.round(rows.sum(axis=1), 3).tolist()[:4]})")
        if batch == 1:
            latencies.append(elapsed)
        if i == min(requests // 2, requests - 2):  # refused without hurting the server: a valid one follows
            status, _, reply = _call(f"{base}/v1/models/{name}:predict", raw=b'{"instances": [[1, 2')
            if not 400 <= status < 500:
                raise Failed(f"a malformed request got HTTP {status} instead of 4xx: {reply}")
    return latencies


def _check(config: InfraValidateConfig) -> None:
    """Flags no server could pass with, refused before the registry hears of the version (a verdict tag
    "failed" would otherwise blame the model)."""
    if config.requests < 2:
        raise StepError(f"--requests must be at least 2, got {config.requests}")
    if not (math.isfinite(config.load_timeout_seconds) and config.load_timeout_seconds > 0):
        raise StepError(f"--load-timeout-seconds must be a number of seconds > 0, got {config.load_timeout_seconds:g}")
    if config.version < 1:
        raise StepError(f"--version must be a registered version number (1 or more), got {config.version}")


def validate(config: InfraValidateConfig) -> dict[str, Any]:
    """Start the server on the candidate, probe it, stop it; raise Failed with the reason (flags checked by run)."""
    version = str(config.version)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="infra-validate-") as tmp:
        log_path = Path(tmp) / "server.log"
        # MLflow's own HTTP retries (7, about 4 minutes of backoff; 120 s a request) outlast the load timeout
        # before the server's status can say the registry is failing: a version "not ready" for an outage.
        # A few seconds each, and the server's own retries say why in its status.
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")}
        if config.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = config.tracking_uri
        with log_path.open("wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlsteps.serve", "--model-name", config.model_name, "--model-uri",
                 f"models:/{config.model_name}/{version}", "--host", "127.0.0.1", "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            started = time.monotonic()
            _wait_ready(base, config.model_name, server, log_path, config.load_timeout_seconds)
            load_seconds = time.monotonic() - started
            log.info("version %s loaded in the model server in %.1f s; sending %d requests", version,
                     load_seconds, config.requests)
            try:
                latencies = _probe(base, config.model_name, version, config.requests)
            except (OSError, http.client.HTTPException) as exc:  # the server crashed or hung up mid-request
                try:
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                ended = ("still running" if server.poll() is None else f"exited with code {server.returncode}")
                raise Failed(f"the model server stopped answering ({type(exc).__name__}: {exc}); it {ended}: "
                             f"{log_path.read_text(errors='replace')[-1500:]}") from None
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise Failed(f"an answer was not in the protocol's form ({type(exc).__name__}: {exc})") from None
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))
    return {"load_seconds": round(load_seconds, 2), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}


def run(config: InfraValidateConfig) -> dict[str, Any]:
    _check(config)
    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    name, version = config.model_name, str(config.version)
    tracking.registered_version(client, name, version)
    try:
        measured = validate(config)
    except Failed as exc:
        client.set_model_version_tag(name, version, "promotion.infra_validation", f"failed: {exc}"[:5000])
        raise StepError(f"infra-validation of {name} version {version} failed: {exc}") from None
    verdict = (f"passed: {config.requests} requests on both protocols, batch-1 p50 {measured['p50_ms']:.2f} ms, "
               f"p99 {measured['p99_ms']:.2f} ms, loaded in {measured['load_seconds']:.1f} s")
    client.set_model_version_tag(name, version, "promotion.infra_validation", verdict)
    log.info("%s version %s %s", name, version, verdict)
    return {"model_name": name, "version": int(version), "passed": True, "requests": config.requests, **measured}


def main(argv: list[str] | None = None) -> int:
    """``python -m mlsteps.infra_validate``: the step's CLI."""
    return cli(run, InfraValidateConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
