"""Serving frameworks side by side: the same LiteRT model behind Starlette (ours), FastAPI and KServe.

Why mlsteps.serve is a Starlette app: this measures the choice. One int8 `.tflite` of the pipeline's CNN
(width 32), three servers on the same request (TF Serving `:predict`, one 28×28 image as JSON), each
validating shape and pixel range and running the same LiteRT interpreter call:
  mlsteps.serve      the real server (Starlette on uvicorn + uvloop/httptools, orjson), model from MLflow
  FastAPI            the idiomatic FastAPI app: a pydantic body model, ORJSONResponse, same uvicorn stack
  KServe ModelServer kserve.Model subclass (KServe's Python model server: its own FastAPI app, v1 protocol)
Load: wrk, one thread, on the same 2 cores; max throughput at 4 and 16 connections, then ~100 req/s.

The FastAPI and KServe servers run in .venvs/bench-frameworks (bench/requirements-frameworks.txt, created
here on first use); mlsteps.serve in the steps environment.
Run: .venvs/steps/bin/python bench/serving_frameworks.py   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, start_mlflow, stop_mlflow, write
from serving import load_table, measure, register_int8_cnn, wait

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venvs" / "bench-frameworks"
MODEL = "bench_frameworks"

COMMON = r'''
import threading

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class Runner:
    """One interpreter per batch size, as mlsteps.serve does (and, like it, one call at a time)."""

    def __init__(self, path):
        self.content = open(path, "rb").read()
        self.by_batch = {}
        self.lock = threading.Lock()

    def predict(self, images):
        with self.lock:
            return self._predict(images)

    def _predict(self, images):
        batch = len(images)
        if batch not in self.by_batch:
            interpreter = Interpreter(model_content=self.content, num_threads=1)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [batch, 28, 28])
            interpreter.allocate_tensors()
            self.by_batch[batch] = (interpreter, index, interpreter.get_output_details()[0]["index"])
        interpreter, index, out = self.by_batch[batch]
        interpreter.set_tensor(index, images)
        interpreter.invoke()
        return interpreter.get_tensor(out).copy()


def check(images):
    if images.ndim != 3 or images.shape[1:] != (28, 28) or not 1 <= len(images) <= 256:
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    if images.min() < 0 or images.max() > 255:
        raise ValueError("pixel values must be in 0..255")
    return images
'''

FASTAPI_APP = COMMON + r'''
import sys
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel

runner = Runner(sys.argv[1])
app = FastAPI()


class Predict(BaseModel):
    instances: list[list[list[float]]]


@app.post("/v1/models/{name}:predict", response_class=ORJSONResponse)
async def predict(name: str, body: Predict):  # inline on the event loop, as mlsteps.serve runs inference
    try:
        images = check(np.asarray(body.instances, dtype=np.float32))
    except ValueError as exc:
        raise HTTPException(422, str(exc))
    return ORJSONResponse({"predictions": runner.predict(images).tolist(), "model_name": name})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
'''

KSERVE_APP = COMMON + r'''
import sys
import kserve


class LiteRTModel(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self):
        self.runner = Runner(self.path)
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        images = check(np.asarray(payload["instances"], dtype=np.float32))
        return {"predictions": self.runner.predict(images).tolist()}


if __name__ == "__main__":
    path, name = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[:1] + sys.argv[3:]  # the rest are ModelServer's own flags
    kserve.ModelServer().start([LiteRTModel(name, path)])
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, nargs="*", default=[4, 16])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    python = VENV / "bin" / "python"
    installed = VENV / ".installed"  # written last: an install that failed half-way is redone, not used
    if not installed.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r",
                        str(ROOT / "bench" / "requirements-frameworks.txt")], check=True)
        installed.touch()
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="bench_frameworks_"))
    env, url = start_mlflow(work, TF_CPP_MIN_LOG_LEVEL="3")
    servers: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    versions = {}
    try:
        version = register_int8_cnn(env, url, work, MODEL)
        tflite = work / "model.tflite"  # the file the other two servers load directly
        (work / "fastapi_app.py").write_text(FASTAPI_APP)
        (work / "kserve_app.py").write_text(KSERVE_APP)
        for name in ("kserve", "fastapi", "starlette", "uvicorn", "pydantic"):
            out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{name}'))"],
                                 capture_output=True, text=True)
            versions[name] = out.stdout.strip()

        ports = {name: free_port() for name in ("ours", "fastapi", "kserve")}
        launches = {
            "mlsteps.serve (Starlette)": ([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL, "--model-uri",
                                           f"models:/{MODEL}/{version}", "--host", "127.0.0.1", "--port",
                                           str(ports["ours"])], ports["ours"], "/v2/health/ready"),
            f"FastAPI {versions['fastapi']} (pydantic body)": (
                [str(python), str(work / "fastapi_app.py"), str(tflite), str(ports["fastapi"])], ports["fastapi"],
                "/docs"),
            f"KServe {versions['kserve']} ModelServer": (
                [str(python), str(work / "kserve_app.py"), str(tflite), MODEL, "--http_port", str(ports["kserve"]),
                 "--grpc_port", str(free_port()), "--workers", "1", "--enable_grpc", "false",
                 "--enable_latency_logging", "false"], ports["kserve"], f"/v1/models/{MODEL}"),
        }
        image = np.random.default_rng(1).uniform(0, 255, (1, 28, 28)).round().tolist()
        path = f"/v1/models/{MODEL}:predict"
        for name, (command, port, ready) in launches.items():
            log = (work / f"{port}.log").open("wb")
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            servers.append(server)
            base = f"http://127.0.0.1:{port}"
            wait(base + ready, seconds=120)
            results[name] = measure(name, base, path, {"instances": image}, work, args.connections, args.seconds)
            os.killpg(server.pid, signal.SIGTERM)  # one server at a time: each gets the same 2 cores
            server.wait(timeout=30)
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        stop_mlflow(env)
    print(load_table(results))
    print("written:", write("serving_frameworks", {"settings": vars(args), "versions": versions, "results": results}))


if __name__ == "__main__":
    main()
