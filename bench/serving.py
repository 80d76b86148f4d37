"""Serving: our server (mlsteps.serve) vs `mlflow models serve` on the same registered version, with wrk.

Goals (issue #5): >= 1,000 requests/s at batch 1 and >= 20x `mlflow models serve` on the same version,
p99 <= 10 ms at 100 requests/s. The version is what compress registers: a pyfunc whose artifact is the
int8 .tflite of the pipeline's CNN (width 32, 87,594 parameters; fresh weights: latency does not depend on
their values). Load: wrk (Debian package `wrk`) with one thread on loopback, sharing the 2 cores with the
server; a request is one 28x28 image as JSON, TF Serving's format for ours, MLflow's {"inputs": ...} for
MLflow. Also measured: `mlflow models serve` on the float Keras version (as train logs it), the
setup the issue's 30 requests/s baseline came from. Max throughput: wrk with N connections, closed loop. Fixed rate: 2 connections, each waiting 20 ms
between requests (wrk's Lua delay()), about 100 requests/s.
Run in the steps environment:  .venvs/steps/bin/python bench/serving.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, start_mlflow, stop_mlflow, table, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench_serving"


def wait(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {seconds} s")


def lua(work: Path, path: str, body: dict, delay_ms: int) -> Path:
    script = work / f"wrk_{abs(hash((path, delay_ms)))}.lua"
    payload = json.dumps(body).replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.body = "{payload}"\n'
        + (f"function delay() return {delay_ms} end\n" if delay_ms else "")
        + "function response(status, headers, body) if status ~= 200 then failed = (failed or 0) + 1 end end\n")
    return script


def parse_wrk(text: str) -> dict:
    """requests/s, p50 and p99 in ms, errors (non-2xx + socket errors) from `wrk --latency` output."""

    def ms(token: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", token).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    pct = dict(re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+(\S+)", text, re.M))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50_ms": ms(pct["50"]), "p99_ms": ms(pct["99"]), "errors": errors,
            "requests": int(re.search(r"(\d+) requests in", text).group(1))}


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True)
    return parse_wrk(out.stdout)


def register_int8_cnn(env: dict[str, str], url: str, work: Path, name: str) -> str:
    """Register the pipeline's CNN (width 32, fresh weights) as compress does: a pyfunc around an int8 .tflite."""
    import mlflow
    import numpy as np

    tflite = work / "model.tflite"
    script = ("import sys, numpy as np, tf_keras\nfrom mlsteps import compress, model\n"
              "net = model.build(image_shape=(28, 28), num_classes=10, width=32, keras_module=tf_keras)\n"
              "rep = np.random.default_rng(0).uniform(0, 255, (200, 28, 28)).astype(np.float32)\n"
              "open(sys.argv[1], 'wb').write(compress.convert(net, 'int8', rep))\n")
    subprocess.run([sys.executable, "-c", script, str(tflite)], env=env, check=True, capture_output=True)
    mlflow.set_tracking_uri(url)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="compressed_model", artifacts={"tflite": str(tflite)},
                                       python_model=str(ROOT / "mlsteps" / "litert_model.py"),
                                       input_example=np.zeros((1, 28, 28), np.float32))
    return str(mlflow.register_model(info.model_uri, name).version)


def measure(name: str, base: str, path: str, body: dict, work: Path, connections: list[int], seconds: int) -> dict:
    """One server: a 2 s warm-up, closed-loop maximum at each connection count, then ~100 requests/s."""
    subprocess.run(["wrk", "-t1", "-c2", "-d2s", "-s", str(lua(work, path, body, 0)), base],
                   capture_output=True, check=True)
    row: dict = {}
    for count in connections:
        row[f"max_c{count}"] = run_wrk(base, lua(work, path, body, 0), count, seconds)
        print(name, count, "connections:", row[f"max_c{count}"], flush=True)
    row["rate_100"] = run_wrk(base, lua(work, path, body, 20), 2, seconds)
    print(name, "~100 req/s:", row["rate_100"], flush=True)
    return row


def load_table(results: dict[str, dict]) -> str:
    rows = []
    for name, row in results.items():
        for key, r in row.items():
            label = "~100 req/s (2 conn., 20 ms pause)" if key == "rate_100" else f"max, {key[5:]} connections"
            rows.append([name, label, round(r["rps"]), round(r["p50_ms"], 2), round(r["p99_ms"], 2), r["errors"]])
    return table(["server", "load", "requests/s", "p50 ms", "p99 ms", "errors"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, nargs="*", default=[1, 4, 16])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    # PATH: `mlflow models serve` execs uvicorn from it, as in an activated environment
    env, url = start_mlflow(work, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    servers: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        version = register_int8_cnn(env, url, work, MODEL)
        # The float Keras model as train logs it (what `mlflow models serve` served before compression).
        keras_script = ("import sys, mlflow, mlflow.tensorflow, numpy as np\nfrom mlsteps import model\n"
                        "mlflow.set_tracking_uri(sys.argv[1])\n"
                        "net = model.build(image_shape=(28, 28), num_classes=10, width=32)\n"
                        "x = np.zeros((1, 28, 28), np.float32)\n"
                        "with mlflow.start_run():\n"
                        "    info = mlflow.tensorflow.log_model(net, name='model', input_example=x)\n"
                        "print(mlflow.register_model(info.model_uri, sys.argv[2]).version)\n")
        keras_version = subprocess.run([sys.executable, "-c", keras_script, url, MODEL], env=env, check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1]
        image = np.random.default_rng(1).uniform(0, 255, (1, 28, 28)).round().tolist()

        targets = {}
        ours = free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "mlsteps.serve", "--model-name", MODEL,
                                         "--model-uri", f"models:/{MODEL}/{version}", "--host", "127.0.0.1",
                                         "--port", str(ours)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
        wait(f"http://127.0.0.1:{ours}/v2/health/ready")
        targets["mlsteps.serve (LiteRT, Starlette/uvicorn)"] = (f"http://127.0.0.1:{ours}",
                                                               f"/v1/models/{MODEL}:predict", {"instances": image})
        theirs = free_port()
        servers.append(subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{MODEL}/{version}",
                                         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(theirs)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
        wait(f"http://127.0.0.1:{theirs}/ping")
        targets["mlflow models serve (same version)"] = (f"http://127.0.0.1:{theirs}", "/invocations",
                                                        {"inputs": image})
        keras_port = free_port()
        servers.append(subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{MODEL}/{keras_version}",
                                         "--env-manager", "local", "--host", "127.0.0.1", "--port",
                                         str(keras_port)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
        wait(f"http://127.0.0.1:{keras_port}/ping", seconds=180)
        targets["mlflow models serve (float Keras version)"] = (f"http://127.0.0.1:{keras_port}", "/invocations",
                                                               {"inputs": image})
        # The HTTP stack's own ceiling here: our server answering a body-less GET (no JSON, no model).
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{args.seconds}s", "--latency",
                              f"http://127.0.0.1:{ours}/v2/health/live"], capture_output=True, text=True, check=True)
        ceiling = parse_wrk(out.stdout)
        print("GET /v2/health/live, 16 connections:", ceiling, flush=True)
        for name, (base, path, body) in targets.items():
            results[name] = measure(name, base, path, body, work, args.connections, args.seconds)
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
        stop_mlflow(env)

    print(load_table(results))
    names = list(results)
    best = {n: max(v["rps"] for k, v in results[n].items() if k.startswith("max")) for n in names}
    ratio = best[names[0]] / best[names[1]]
    ours_rate = results[names[0]]["rate_100"]
    goals = {"1000_rps": best[names[0]] >= 1000, "20x_mlflow": ratio >= 20, "p99_10ms_at_100": ours_rate["p99_ms"] <= 10}
    keras_ratio = best[names[0]] / best[names[2]]
    print(f"max throughput: ours {best[names[0]]:.0f} req/s, mlflow models serve {best[names[1]]:.0f} req/s on "
          f"the same version ({ratio:.1f}x), {best[names[2]]:.0f} req/s on the float Keras version "
          f"({keras_ratio:.1f}x); p99 at ~100 req/s {ours_rate['p99_ms']:.2f} ms; goals: {goals}")
    print(f"HTTP ceiling (GET /v2/health/live, 16 connections): {ceiling['rps']:.0f} req/s; 20x mlflow models serve "
          f"would need {20 * best[names[1]]:.0f} req/s")
    print("written:", write("serving", {"settings": vars(args), "results": results, "max_rps": best,
                                        "http_ceiling": ceiling,
                                        "ratio_vs_mlflow": ratio, "ratio_vs_mlflow_keras": keras_ratio,
                                        "goals": goals}))


if __name__ == "__main__":
    main()
