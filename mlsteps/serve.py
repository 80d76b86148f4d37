"""serve: the model server. Loads a registered version and answers TF Serving REST and Open Inference v2.

What it loads: the ``.tflite`` that compress chose (run by the LiteRT interpreter), found in the
version's pyfunc artifact; a version without one (registered before compression existed) is served
through ``mlflow.pyfunc`` instead. Which version: ``--model-uri`` (``models:/<name>/<version>`` or
``models:/<name>@<alias>``; default: the version in ``--deployment-file`` if there is one, else
``models:/<model-name>@champion``), resolved once at start.

Deployment in place (the local deploy target): with ``--admin-token-file``, ``POST /admin/deploy
{"version": "7"}`` (bearer token) loads and warms version 7 beside the served one and then switches to
it; requests never wait and never fail during the switch, and a version that fails to load leaves the
served one untouched (HTTP 422 names why). ``{"version": null}`` unloads the served version (rolling back a
first promotion): requests then get 503 until a version is deployed. ``--deployment-file`` records what is
served, so a restarted server comes back with the same version (not whatever the alias says now); unloading
removes the record, so a restarted server then serves the alias ``champion``, if there is one.

Endpoints (every answer of a model endpoint names the model and version, in the body and in ``X-Model-Name`` /
``X-Model-Version`` headers):
  GET  /v1/models/<name>                TF Serving status (LOADING, AVAILABLE, or END with the load error)
  POST /v1/models/<name>[/versions/<v>]:predict   {"instances": [...]} or {"inputs": [...]}
  GET  /v2/health/live | /v2/health/ready         liveness (always, no MLflow needed) | readiness (model loaded)
  GET  /v2/models/<name>[/ready]                  model metadata | readiness
  POST /v2/models/<name>[/versions/<v>]/infer     {"inputs": [{"name", "shape", "datatype", "data"}]}
  GET  /metrics                                   Prometheus: inference requests and latency by protocol and status
                                                  code, the version served, readiness, deployments by outcome
  POST /admin/deploy                              switch to another version, or unload (only with --admin-token-file)
Bad requests get 400 (not JSON; not numbers: strings, true/false and null are refused), 404 (no such model,
version or path), 405 (wrong method), 413 (body or batch too large) or 422 (wrong shape, values out of 0..255)
with {"error": "<what is wrong and what is expected>"}; the server stays up. Large requests (over 64 KiB of
JSON: more than a few images) are parsed and run on a worker thread, two at a time, and a small one that finds the
model busy with them waits there too, so the health probes never wait behind a big batch; at most four large
bodies are read at a time (others wait unread), so many clients sending big batches cannot exhaust memory.
Run: ``python -m mlsteps.serve --model-name mnist_classifier --port 8501`` (MLFLOW_TRACKING_URI set).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core import StepError, field, hide_passwords, parse_config, setup_logging, write_json_atomic, write_problem
from .tracking import transient, unreachable

log = logging.getLogger("mlsteps.serve")

CHAMPION = "champion"
OUTAGE_PAUSE_MAX_SECONDS = 60  # the longest pause between tries while the registry is down (initial load)
BOUNDED_TRIES = 8  # tries of the initial load for a failure other than no answer at all (5xx, artifact download)
INLINE_BODY_BYTES = 64 * 1024  # larger request bodies are parsed and run on a worker thread
LARGE_BODIES_AT_ONCE = 4  # larger ones read at the same time (the rest wait, unread): memory stays bounded
SERVER_VERSION = "1"  # of this server's API, in the OIP v2 server metadata
CLIENT_CLOSED = 499  # the code of a request whose client disconnected first in the metrics (nginx's)
V2_DATATYPES = {"FP32", "FP64", "FP16", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = field("mnist_classifier", help="registered model name (and the name in request paths)")
    model_uri: str = field("", help="models:/<name>/<version> or models:/<name>@<alias>; "
                                    "empty: models:/<model-name>@champion")
    host: str = field("0.0.0.0", help="address to listen on")
    port: int = field(8501, help="HTTP port (8501 is TF Serving's REST port)")
    threads: int = field(1, help="LiteRT interpreter threads per request")
    max_batch: int = field(256, help="most images in one request (more: HTTP 413)")
    max_body_bytes: int = field(8 * 1024 * 1024, help="largest request body in bytes (more: HTTP 413)")
    body_timeout_seconds: float = field(30.0, help="longest a client may take to send a request body (more: "
                                                   "HTTP 408; a stalled upload would hold a slot for large "
                                                   "bodies for ever)")
    warmup_requests: int = field(20, help="inferences run before the server reports ready")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    deployment_file: str = field("", help="JSON file recording the deployed version: read at start (when no "
                                          "--model-uri), rewritten by each deployment (local deploy target)")
    admin_token_file: str = field("", help="file holding the bearer token of POST /admin/deploy (switch to "
                                           "another version in place); empty: no admin endpoint")


def without_secrets(text: str, config: ServeConfig) -> str:
    """``text`` without the tracking URI's password: MLflow's errors quote the URL whole, and the server shows
    them on endpoints anyone may call (the model status, every inference's 503 while it is not ready)."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return hide_passwords(text, uri) if uri else text


class Superseded(Exception):
    """The initial load stops waiting for the registry: a version was deployed (or unloaded) meanwhile."""


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RunnerBusy(Exception):
    """The model is answering another request and the caller asked not to wait (the event loop must not)."""


class Serialised:
    """One inference at a time (an interpreter, a Keras model's predict: neither is thread-safe), from the event
    loop and the worker threads alike. ``wait=False`` raises RunnerBusy instead of blocking: the event loop then
    hands the request to a worker thread rather than stall every other request, probes included, behind a
    big batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def predict(self, images: np.ndarray, wait: bool = True) -> np.ndarray:
        if not self._lock.acquire(blocking=wait):
            raise RunnerBusy
        try:
            return self._predict(images)
        finally:
            self._lock.release()

    def _predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LiteRTRunner(Serialised):
    """One interpreter per batch size seen (resizing costs more than a small model's inference).

    Bounded, least recently used dropped first: at most 16 interpreters, for at most ``capacity`` images in all.
    An interpreter's memory grows with its batch (a float model's most): a client sweeping batch sizes must not
    push the server past its memory limit.
    """

    MAX_INTERPRETERS = 16

    def __init__(self, path: Path, threads: int, capacity: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        super().__init__()
        self._content = path.read_bytes()
        self._threads = threads
        self._capacity = capacity
        self._by_batch: dict[int, tuple[Any, int, int]] = {}  # in order of use, least recent first
        probe = Interpreter(model_content=self._content)
        detail = probe.get_input_details()[0]
        self.image_shape = tuple(int(d) for d in detail["shape"][1:])
        self.classes = int(probe.get_output_details()[0]["shape"][-1])

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes that have an interpreter now, least recently used first."""
        return list(self._by_batch)

    def _for(self, batch: int) -> tuple[Any, int, int]:
        entry = self._by_batch.pop(batch, None)
        if entry is None:
            from ai_edge_litert.interpreter import Interpreter

            # Make room first: the dropped interpreters' memory is freed before the new one allocates its own.
            while self._by_batch and (len(self._by_batch) >= self.MAX_INTERPRETERS
                                      or sum(self._by_batch) + batch > self._capacity):
                self._by_batch.pop(next(iter(self._by_batch)))
            interpreter = Interpreter(model_content=self._content, num_threads=self._threads)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [batch, *self.image_shape])
            interpreter.allocate_tensors()
            entry = (interpreter, index, interpreter.get_output_details()[0]["index"])
        self._by_batch[batch] = entry  # the most recently used last
        return entry

    def _predict(self, images: np.ndarray) -> np.ndarray:
        interpreter, inp, out = self._for(len(images))
        interpreter.set_tensor(inp, images)
        interpreter.invoke()
        probabilities = interpreter.get_tensor(out).astype(np.float32)
        # An int8 model's softmax comes out in steps of 1/256: rows summed to 0.99, not 1. Rescaled, they do.
        sums = probabilities.sum(axis=1, keepdims=True)
        return np.divide(probabilities, sums, out=probabilities, where=sums > 0)


class PyfuncRunner(Serialised):
    """A version without a .tflite (a Keras model registered before compression): through mlflow.pyfunc."""

    def __init__(self, local_dir: Path) -> None:
        import mlflow

        super().__init__()
        self._model = mlflow.pyfunc.load_model(str(local_dir))
        shape = self._model.metadata.get_input_schema().inputs[0].shape
        self.image_shape = tuple(int(d) for d in shape[1:])
        self.classes = int(self._model.metadata.get_output_schema().inputs[0].shape[-1])

    def _predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._model.predict(images), dtype=np.float32)


@dataclass(frozen=True)
class Served:
    """One loaded version; swapped as a whole, so a request never mixes two versions."""

    runner: Any
    version: str
    variant: str


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> (name, version, alias), one of the last two
    empty; a ValueError for any other form (a ``latest`` or stage, a logged model's id, an unexpanded $(VAR))."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/([0-9]+)|@([\w-]+))", uri)
    if not match:
        raise ValueError(f"{uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    name, version, alias = match.groups()
    return name, version or "", alias or ""


def load_version(config: ServeConfig, uri: str, *, retry_outage: bool = True,
                 waiting: Any = None) -> Served:
    """Resolve ``uri`` in the registry, download the version, build its runner and warm it up.

    ``retry_outage``: wait out a registry that does not answer at all, however long (each try after MLflow's
    own HTTP retries, then a pause growing to a minute; ``waiting(message)`` hears of each), and other
    transient failures (5xx, a failed artifact download) for ``BOUNDED_TRIES`` tries: the server's initial load
    does, since nothing else can make it ready, and a pod rescheduled during an outage must come up once MLflow
    is back.
    An in-place deployment does not: after MLflow's own retries it answers that the version could not be
    loaded (the caller, a promotion, rolls back), instead of holding the switch past the caller's timeout.
    The download goes to a temporary folder, deleted once the model is in memory: a long-running server
    deploying version after version keeps no copies on disk.
    """
    import shutil
    import tempfile

    import mlflow
    import yaml
    from tenacity import retry, retry_if_exception, wait_exponential

    from . import tracking

    tracking.connect(config.tracking_uri, probe=False)  # an outage is waited out below
    client = mlflow.MlflowClient()

    def before_sleep(state: Any) -> None:
        exc = state.outcome.exception()
        message = without_secrets(f"{'the registry did not answer' if unreachable(exc) else 'the registry failed'} "
                                  f"({exc}); try {state.attempt_number + 1} in {state.next_action.sleep:.0f} s",
                                  config)
        log.warning("loading %s: %s", uri, message)
        if waiting:
            waiting(message)

    def stop(state: Any) -> bool:
        return not retry_outage or (state.attempt_number >= BOUNDED_TRIES
                                    and not unreachable(state.outcome.exception()))

    @retry(stop=stop, reraise=True, wait=wait_exponential(multiplier=0.5, max=OUTAGE_PAUSE_MAX_SECONDS),
           retry=retry_if_exception(transient), before_sleep=before_sleep)
    def resolve(folder: str) -> tuple[str, Path]:
        name, version, alias = parse_model_uri(uri)
        if alias:
            version = client.get_model_version_by_alias(name, alias).version
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=folder)
        return str(version), Path(local)

    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="mlsteps-serve-")
    try:
        version, local = resolve(folder)
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("python_function", {})
        tflite = flavor.get("artifacts", {}).get("tflite", {}).get("path")
        runner: Any = (LiteRTRunner(local / tflite, config.threads, capacity=2 * config.max_batch) if tflite
                       else PyfuncRunner(local))
        sample = np.zeros((1, *runner.image_shape), np.float32)
        for _ in range(config.warmup_requests):
            probabilities = runner.predict(sample)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if config.warmup_requests and not np.all(np.isfinite(probabilities)):
        raise ValueError(f"version {version} answers non-finite probabilities")
    log.info("loaded %s version %s (%s, input %s) in %.1f s", config.model_name, version,
             "tflite" if tflite else "pyfunc", runner.image_shape, time.monotonic() - started)
    return Served(runner, version, "tflite" if tflite else "pyfunc")


def read_deployment(path: str, model_name: str) -> str:
    """The version of ``model_name`` a deployment file records ("" if none: no file, or another model's)."""
    import json

    if not path or not Path(path).exists():
        return ""
    try:
        record = json.loads(Path(path).read_text())
        return str(record["version"]) if record.get("model_name", model_name) == model_name else ""
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StepError(f"{path} is not a deployment record ({exc}); delete it to serve the champion") from None


def write_deployment(path: str, model_name: str, served: Served, previous: str) -> None:
    """Record what is served, atomically: a restarted server comes back with the same version."""
    from datetime import datetime, timezone

    write_json_atomic(Path(path), {"model_name": model_name, "version": served.version, "previous_version": previous,
                                   "deployed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


class ModelHolder:
    """The served model: loaded in the background, so liveness never waits for MLflow; swappable in place."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.name = config.model_name
        self.served: Served | None = None
        self.state = "LOADING"
        self.error = ""
        self.on_loaded: Any = None  # called once a model answers (the app updates its metrics)
        self._swap = threading.Lock()
        self._administered = False  # a version was deployed or unloaded: the initial load must not override it

    @property
    def ready(self) -> bool:
        return self.served is not None

    @property
    def version(self) -> str:
        return self.served.version if self.served else ""

    def initial_uri(self) -> str:
        if self.config.model_uri:
            return self.config.model_uri
        deployed = read_deployment(self.config.deployment_file, self.name)
        return f"models:/{self.name}/{deployed}" if deployed else f"models:/{self.name}@{CHAMPION}"

    def _waiting(self, message: str) -> None:
        """The initial load waits for the registry: the status says so (state LOADING, with the reason).
        Once a version has been deployed (or unloaded) in place, there is nothing left to wait for."""
        with self._swap:
            if self._administered:
                raise Superseded
            self.error = f"waiting for the registry: {message}"

    def load(self) -> None:
        uri = ""
        try:
            uri = self.initial_uri()
            served = load_version(self.config, uri, waiting=self._waiting)
        except Superseded:
            log.info("stopped waiting for %s: a deployment in place decided what is served", uri)
            return
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, report it and stay alive (not ready)
            why = without_secrets(f"{type(exc).__name__}: {exc}", self.config)
            with self._swap:
                if not self._administered:  # a version deployed (or an unload) meanwhile wins
                    self.state, self.error = "END", why
            log.error("could not load %s: %s", uri or self.name, why)
            return
        with self._swap:
            if self._administered:  # a version deployed (or an unload) meanwhile wins
                return
            self.served, self.state, self.error = served, "AVAILABLE", ""
            if self.config.deployment_file and not read_deployment(self.config.deployment_file, self.name):
                write_deployment(self.config.deployment_file, self.name, served, "")  # a restart keeps it
            self._changed()
        log.info("serving %s version %s", self.name, served.version)

    def _changed(self) -> None:
        """Tell the app (its metrics) what is served now; called holding the lock, so that the metrics
        cannot name a version a concurrent switch has just replaced."""
        if self.on_loaded:
            self.on_loaded()

    def deploy(self, version: str) -> tuple[Served, str]:
        """Load ``version`` beside the served one, then switch to it; the old one answers until then.

        Raises whatever loading raised; the served version is then unchanged. The version served already is
        kept as it is (a rollback's restore, sent after a deployment that may still be loading).
        """
        with self._swap:  # one deployment at a time
            if self.served is not None and self.served.version == version:
                self._administered = True  # the initial load, if still running, must not replace it
                log.info("%s version %s is served already: kept", self.name, version)
                return self.served, version
            served = load_version(self.config, f"models:/{self.name}/{version}", retry_outage=False)
            previous = self.version
            if self.config.deployment_file:
                write_deployment(self.config.deployment_file, self.name, served, previous)
            self.served, self.state, self.error = served, "AVAILABLE", ""
            self._administered = True
            self._changed()
        log.info("switched %s from version %s to %s", self.name, previous or "(none)", served.version)
        return served, previous

    def unload(self) -> str:
        """Serve nothing (predictions get 503) and forget the deployment record; returns the version unloaded."""
        with self._swap:
            previous = self.version
            if self.config.deployment_file:
                Path(self.config.deployment_file).unlink(missing_ok=True)
            self.served, self.state = None, "END"
            self.error = "no model deployed (unloaded through /admin/deploy; deploy a version to serve again)"
            self._administered = True
            self._changed()
        log.info("unloaded %s version %s: serving nothing", self.name, previous or "(none)")
        return previous


def images_from(value: Any, image_shape: tuple[int, ...], max_batch: int, where: str,
                booleans: bool = True) -> np.ndarray:
    """A float32 batch (N, H, W) from nested lists of pixels, N rows of H*W pixels, or [{"image": ...}]."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        try:
            value = [row["image"] for row in value]
        except (KeyError, TypeError):
            raise RequestError(400, f"{where}: named instances must each have an \"image\" field") from None
    return checked(numbers(value, f"{where} must be a list of images of numbers (shape N x "
                                  f"{' x '.join(map(str, image_shape))})", booleans), image_shape, max_batch, where)


def numbers(value: Any, what: str, booleans: bool = True) -> np.ndarray:
    """``value`` (nested JSON lists) as float32, refused (400) unless every element is a JSON number.

    A plain float32 cast would take "7" and true as pixels; null, strings, booleans and ragged lists are
    named instead. ``booleans``: whether the request body holds a true or false anywhere (False skips looking
    for them among numbers: a pass over every value, as long as parsing them).
    """
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(400, f"{what}; got ragged lists") from None
    if array.dtype.kind not in "iuf":
        found = {"b": "true/false", "U": "strings"}.get(array.dtype.kind,
                                                        "null, objects, ragged lists or integers past 64 bits")
        raise RequestError(400, f"{what}; got {found}")
    flat = value
    for _ in range(array.ndim - 1):  # true among numbers becomes 1 in a numeric array: look at the JSON values
        flat = itertools.chain.from_iterable(flat)
    if booleans and array.ndim and bool in map(type, flat):
        raise RequestError(400, f"{what}; got true/false")
    return array.astype(np.float32)


def check_datatype(datatype: str, flat: np.ndarray) -> None:
    """Refuse (400) V2 data that its declared integer datatype cannot hold: a client that says UINT8 and sends
    0.5 has scaled its pixels and mislabelled them, or sent the wrong array; the model would answer either way."""
    if datatype[0] not in "IU":
        return
    limits = np.iinfo(datatype.lower())
    wrong = (flat != np.floor(flat)) | (flat < limits.min) | (flat > limits.max)
    if wrong.any():
        first = int(np.argmax(wrong))
        raise RequestError(400, f'"data"[{first}] is {float(flat[first]):g}, not a valid {datatype} value '
                                f'(whole numbers {limits.min}..{limits.max}); declare "datatype": "FP32" to send '
                                'other numbers')


def expected_shape(image_shape: tuple[int, ...]) -> str:
    return f"(N, {', '.join(map(str, image_shape))}) or (N, {int(np.prod(image_shape))})"


def checked(images: np.ndarray, image_shape: tuple[int, ...], max_batch: int, where: str) -> np.ndarray:
    pixels = int(np.prod(image_shape))
    if images.ndim == 2 and images.shape[1] == pixels:
        images = images.reshape((len(images), *image_shape))
    if images.ndim != len(image_shape) + 1 or images.shape[1:] != image_shape:
        raise RequestError(422, f"{where}: expected images of shape {expected_shape(image_shape)}, got "
                                f"{tuple(images.shape)}")
    if not len(images):
        raise RequestError(422, f"{where}: the batch is empty")
    if len(images) > max_batch:
        raise RequestError(413, f"{where}: batch of {len(images)} images exceeds the limit of {max_batch}; "
                                "split it into smaller requests")
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
        raise RequestError(422, f"{where}: pixel values must be finite numbers in 0..255 "
                                f"(got {float(np.nanmin(images)):g}..{float(np.nanmax(images)):g})")
    return images


def create_app(config: ServeConfig, holder: ModelHolder | None = None) -> Any:
    """The ASGI app (Starlette: routing without per-request validation layers; see docs/architecture.md)."""
    import anyio
    import orjson
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    holder = holder or ModelHolder(config)
    registry = CollectorRegistry()
    requests = Counter("model_server_requests", "Inference requests, by protocol and HTTP status code",
                       ["protocol", "code"], registry=registry)
    latency = Histogram("model_server_request_seconds",
                        "Time to answer an inference request, by protocol and HTTP status code", ["protocol", "code"],
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=registry)
    info = Gauge("model_server_model_info", "1 for the model version being served", ["model", "version"],
                 registry=registry)
    ready_gauge = Gauge("model_server_ready", "1 once the model is loaded and warmed up", registry=registry)
    ready_gauge.set_function(lambda: 1.0 if holder.ready else 0.0)
    deployments = Counter("model_server_deployments",
                          "Deployments through /admin/deploy, by outcome (kept: that version served already)",
                          ["outcome"], registry=registry)

    def reply(payload: dict[str, Any], status: int = 200, version: str | None = None) -> Response:
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                        media_type="application/json",
                        headers={"X-Model-Name": holder.name,
                                 "X-Model-Version": holder.version if version is None else version})

    def error(status: int, message: str) -> Response:
        return reply({"error": message, "model_name": holder.name, "model_version": holder.version}, status)

    def known(request: Request) -> Served:
        """The version that answers this request (taken once: a deployment may switch versions meanwhile)."""
        served = holder.served
        name = request.path_params["name"]
        if name != holder.name:
            raise RequestError(404, f"model {name!r} not found; this server serves {holder.name!r}")
        if served is None:  # whichever version the path names: not "not found" but "not now"
            raise RequestError(503, f"{holder.name} is not ready ({holder.state.lower()}"
                                    f"{': ' + holder.error if holder.error else ''})")
        version = request.path_params.get("version")
        if version is not None and version != served.version:
            raise RequestError(404, f"{holder.name} version {version} not served; this server serves version "
                                    f"{served.version}")
        return served

    def check_length(request: Request) -> None:
        """413 from the Content-Length alone: before waiting for a slot, and before reading anything."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_body_bytes:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}")

    async def read(request: Request) -> bytes:
        """The request body, refused (413) past ``--max-body-bytes`` from its Content-Length or while it streams,
        and (408) when it takes longer than ``--body-timeout-seconds`` to arrive: a client that stalls (crashed,
        a dropped NAT entry: uvicorn has no timeout for a body) would keep its slot for large bodies for ever."""
        check_length(request)
        chunks, size = [], 0
        try:
            with anyio.fail_after(config.body_timeout_seconds):
                async for chunk in request.stream():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > config.max_body_bytes:
                        raise RequestError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes")
        except TimeoutError:
            raise RequestError(408, f"request body not received within {config.body_timeout_seconds:g} s "
                                    f"({size} bytes arrived)") from None
        return b"".join(chunks)

    # At most LARGE_BODIES_AT_ONCE requests over INLINE_BODY_BYTES (or of unknown length) are read and answered
    # at a time; the others wait before reading their body. Without it, a hundred clients sending 8 MiB each
    # would have the pod buffer them all and be killed for memory; the probes and small requests never wait here.
    large_bodies = anyio.Semaphore(LARGE_BODIES_AT_ONCE)

    def large(request: Request) -> bool:
        length = request.headers.get("content-length", "")
        return not (length.isdigit() and int(length) <= INLINE_BODY_BYTES)

    def parse(raw: bytes) -> tuple[Any, bool]:
        """The parsed JSON body, and whether its text holds a true or false (see ``numbers``)."""
        try:
            return orjson.loads(raw), b"true" in raw or b"false" in raw
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from None

    # Big requests leave the event loop (a big batch of a float model holds it long enough that probes queued
    # behind a few would time out, and Kubernetes would take the pod out of service, then restart it). Two at a
    # time: parsing holds Python objects for every pixel, and the interpreter runs one call at a time anyway.
    # A small request finding the model busy with one of them waits on a worker thread too (RunnerBusy).
    heavy = anyio.CapacityLimiter(2)

    def inference(protocol: str, handler: Any) -> Any:
        def work(raw: bytes, served: Served, wait: bool = True) -> dict[str, Any]:
            return handler(*parse(raw), served, wait)

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                served = known(request)
                check_length(request)
                async with large_bodies if large(request) else contextlib.nullcontext():
                    raw = await read(request)
                    if len(raw) <= INLINE_BODY_BYTES:  # one image is 2-4 KiB: a thread hand-off would cost more
                        try:
                            answer = work(raw, served, False)
                        except RunnerBusy:
                            answer = await anyio.to_thread.run_sync(work, raw, served)
                    else:
                        answer = await anyio.to_thread.run_sync(work, raw, served, limiter=heavy)
                response = reply(answer, version=served.version)
            except RequestError as exc:
                response = error(exc.status, str(exc))
            except ClientDisconnect:  # the caller went away before its body arrived: not the server's failure
                log.debug("client disconnected before sending its whole request body")
                response = error(CLIENT_CLOSED, "client disconnected")  # nobody reads it; counted as such
            except Exception as exc:  # noqa: BLE001 - never a stack trace to the caller; the log has it
                log.exception("inference failed")
                response = error(500, f"inference failed: {type(exc).__name__}")
            requests.labels(protocol, str(response.status_code)).inc()
            latency.labels(protocol, str(response.status_code)).observe(time.perf_counter() - started)
            return response

        return endpoint

    def v1_predict(payload: Any, booleans: bool, served: Served, wait: bool) -> dict[str, Any]:
        if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
            raise RequestError(400, 'body must be a JSON object with either "instances" or "inputs"')
        key = "instances" if "instances" in payload else "inputs"
        images = images_from(payload[key], served.runner.image_shape, config.max_batch, f'"{key}"', booleans)
        probabilities = served.runner.predict(images, wait)
        field_name = "predictions" if key == "instances" else "outputs"
        return {field_name: probabilities, "model_name": holder.name, "model_version": served.version}

    def v2_infer(payload: Any, booleans: bool, served: Served, wait: bool) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
            raise RequestError(400, 'body must be a JSON object with "inputs": a list of exactly one tensor')
        tensor = payload["inputs"][0]
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= tensor.keys():
            raise RequestError(400, 'the input tensor needs "name", "shape", "datatype" and "data"')
        if not isinstance(tensor["datatype"], str) or tensor["datatype"] not in V2_DATATYPES:
            raise RequestError(400, f"datatype {tensor['datatype']!r} is not numeric; use one of "
                                    f"{', '.join(sorted(V2_DATATYPES))}")
        shape = tensor["shape"]
        # type(d) is int: JSON true would pass isinstance(d, int); counted with Python ints (np.prod overflows)
        if not (isinstance(shape, list) and shape and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise RequestError(400, f'"shape" must be a list of non-negative integers, got {shape!r}')
        if len(shape) not in (2, len(served.runner.image_shape) + 1):  # numpy reshapes to at most 64 dimensions
            raise RequestError(422, f"input: expected images of shape {expected_shape(served.runner.image_shape)}, "
                                    f"got {tuple(shape)}")
        flat = numbers(tensor["data"], '"data" must be numbers (flat or nested)', booleans).reshape(-1)
        if flat.size != math.prod(shape):
            raise RequestError(422, f'"data" has {flat.size} values but "shape" {shape} needs {math.prod(shape)}')
        check_datatype(tensor["datatype"], flat)
        images = checked(flat.reshape(shape), served.runner.image_shape, config.max_batch, "input")
        probabilities = served.runner.predict(images, wait)
        out = {"model_name": holder.name, "model_version": served.version,
               "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
                            "data": probabilities.reshape(-1)}]}
        if "id" in payload:
            out["id"] = payload["id"]
        return out

    async def v1_status(request: Request) -> Response:
        if request.path_params["name"].endswith(":predict"):  # the status route matches GET .../<name>:predict
            response = error(405, "use POST for :predict")
            response.headers["Allow"] = "POST"
            return response
        if request.path_params["name"] != holder.name:
            return error(404, f"model {request.path_params['name']!r} not found; this server serves {holder.name!r}")
        return reply({"model_version_status": [{
            "version": holder.version, "state": holder.state,
            "status": {"error_code": "OK" if not holder.error else "UNKNOWN", "error_message": holder.error}}]})

    async def live(request: Request) -> Response:
        return reply({"live": True})

    async def ready(request: Request) -> Response:
        return reply({"ready": holder.ready}, 200 if holder.ready else 503)

    async def v2_server(request: Request) -> Response:
        """OIP v2 server metadata (what tritonclient's get_server_metadata asks)."""
        return reply({"name": "mlsteps-serve", "version": SERVER_VERSION, "extensions": []})

    def other_version(request: Request) -> Response | None:
        """404 for a path naming a version this server does not serve (a version path while nothing is served:
        the caller's version is not known to be wrong, and the endpoint says not ready)."""
        version, served = request.path_params.get("version"), holder.served
        if version is not None and served is not None and version != served.version:
            return error(404, f"{holder.name} version {version} not served; this server serves version "
                              f"{served.version}")
        return None

    async def v2_metadata(request: Request) -> Response:
        if request.path_params["name"] != holder.name:
            return error(404, f"model {request.path_params['name']!r} not found; this server serves {holder.name!r}")
        if (refused := other_version(request)) is not None:
            return refused
        served = holder.served
        if served is None:
            return error(503, f"{holder.name} is not ready ({holder.state.lower()})")
        shape = [-1, *served.runner.image_shape]
        return reply({"name": holder.name, "versions": [served.version], "platform": served.variant,
                      "inputs": [{"name": "image", "datatype": "FP32", "shape": shape}],
                      "outputs": [{"name": "probabilities", "datatype": "FP32",
                                   "shape": [-1, served.runner.classes]}]}, version=served.version)

    async def model_ready(request: Request) -> Response:
        if request.path_params["name"] != holder.name:
            return error(404, f"model {request.path_params['name']!r} not found")
        if (refused := other_version(request)) is not None:
            return refused
        return reply({"name": holder.name, "ready": holder.ready}, 200 if holder.ready else 503)

    try:
        token = Path(config.admin_token_file).read_text().strip() if config.admin_token_file else ""
    except OSError as exc:
        raise StepError(f"--admin-token-file {config.admin_token_file}: cannot read it ({exc.strerror}); "
                        "write a token of at least 16 characters there, or leave the flag out (no admin "
                        "endpoint)") from None
    if config.admin_token_file and len(token) < 16:
        raise StepError(f"{config.admin_token_file}: the admin token must have at least 16 characters")

    async def admin_deploy(request: Request) -> Response:
        """Switch to another version in place: loaded and warmed beside the served one, then swapped."""
        import hmac

        from starlette.concurrency import run_in_threadpool

        if not token:
            return error(404, "no admin endpoint: start the server with --admin-token-file")
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return error(401, "missing or wrong bearer token for /admin/deploy")
        try:
            payload, _ = parse(await read(request))
        except RequestError as exc:
            return error(exc.status, str(exc))
        if isinstance(payload, dict) and "version" in payload and payload["version"] is None:
            previous = await run_in_threadpool(holder.unload)
            deployments.labels("unloaded").inc()
            return reply({"model_name": holder.name, "model_version": None, "previous_version": previous})
        version = str(payload.get("version", "")) if isinstance(payload, dict) else ""
        if not version.isdigit():
            return error(400, 'body must be {"version": "<registered version number>"}, or {"version": null} '
                              "to unload")
        try:
            served, previous = await run_in_threadpool(holder.deploy, version)
        except Exception as exc:  # noqa: BLE001 - the old version keeps serving; the caller learns why
            deployments.labels("failed").inc()
            why = without_secrets(f"{type(exc).__name__}: {exc}", config)
            log.error("deployment of %s version %s failed, still serving %s: %s", holder.name, version,
                      holder.version or "(none)", why)
            return error(422, f"{holder.name} version {version} could not be loaded ({why}); still serving "
                              f"version {holder.version or '(none)'}")
        # A rollback's restore posts the version served already: kept, not a switch.
        deployments.labels("kept" if previous == served.version else "succeeded").inc()
        return reply({"model_name": holder.name, "model_version": served.version, "previous_version": previous},
                     version=served.version)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def track_version() -> None:
        info.clear()
        if holder.version:
            info.labels(holder.name, holder.version).set(1)

    holder.on_loaded = track_version

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        if holder.state == "LOADING":
            threading.Thread(target=holder.load, name="model-loader", daemon=True).start()
        yield

    routes = [
        Route("/v1/models/{name}:predict", inference("v1", v1_predict), methods=["POST"]),
        Route("/v1/models/{name}/versions/{version}:predict", inference("v1", v1_predict), methods=["POST"]),
        Route("/v1/models/{name}", v1_status, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", inference("v2", v2_infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", inference("v2", v2_infer), methods=["POST"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}", v2_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", v2_metadata, methods=["GET"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/deploy", admin_deploy, methods=["POST"]),
    ]

    async def no_route(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such path, wrong method) in the same JSON as every other error."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = (f"use {exc.headers['Allow']} for {request.url.path}" if status == 405 and exc.headers
                   else f"no endpoint {request.method} {request.url.path}; see GET /v2/models/{holder.name}"
                   if status == 404 else str(getattr(exc, "detail", exc)))
        response = error(status, message)
        if status == 405 and exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: no_route})
    app.state.holder = holder
    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m mlsteps.serve``: load the version in the background and serve it with uvicorn."""
    setup_logging()
    config, _ = parse_config(ServeConfig, argv, __doc__.splitlines()[0])
    if config.threads < 1 or config.max_batch < 1 or config.max_body_bytes < 1:
        raise SystemExit("error: --threads, --max-batch and --max-body-bytes must be >= 1")
    if config.warmup_requests < 0:
        raise SystemExit(f"error: --warmup-requests must be >= 0, got {config.warmup_requests}")
    if not (math.isfinite(config.body_timeout_seconds) and config.body_timeout_seconds > 0):
        raise SystemExit(f"error: --body-timeout-seconds must be a number of seconds > 0, got "
                         f"{config.body_timeout_seconds:g}")
    if not 1 <= config.port <= 65535:  # uvicorn would listen on the port modulo 65536
        raise SystemExit(f"error: --port must be a TCP port, 1 to 65535, got {config.port}")
    if config.deployment_file and (problem := write_problem(Path(config.deployment_file))):
        raise SystemExit(f"error: --deployment-file {config.deployment_file}: {problem}; give a file the server "
                         "can write (a restart reads the deployed version back from it)")
    if not (config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        print("error: no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI", flush=True)
        return 2
    if config.model_uri:  # e.g. "$(MODEL_URI)" from a runtime that does not expand Kubernetes' $(VAR) in args
        try:
            named = parse_model_uri(config.model_uri)[0]
        except ValueError:
            named = ""
        if named != config.model_name:
            print(f"error: --model-uri {config.model_uri!r} is not models:/{config.model_name}/<version> or "
                  f"models:/{config.model_name}@<alias> (the server serves --model-name {config.model_name!r})",
                  flush=True)
            return 2
    import uvicorn

    try:
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning",
                    access_log=False, loop="auto", http="auto")
    except StepError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
