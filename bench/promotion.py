"""Promotion under load: failed requests while model_promotion switches the local model server.

Setup: a benchmark-owned MLflow server with three versions of one model (two int8 CNNs of different widths,
and one whose .tflite does not load), the supervised local model server (`scripts/serving.sh`), and
Airflow's `airflow dags test model_promotion` on the local target, exactly as `make demo` runs them.
Load: `--clients` client threads, each with one keep-alive connection, sending batch-1 TF Serving
requests back to back the whole time. Scenarios, in order, each a real DAG run under that load:
  promote   alias champion moved to version 2 (what a reviewer does): validate, switch, smoke test
  rollback  champion moved to version 3, which fails infra-validation: alias and serving restored
  manual    version 1 given by hand (the alias follows)
A failed request is any answer other than HTTP 200 or a connection error. Goal: none.

Run: .venvs/steps/bin/python bench/promotion.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import free_port, start_mlflow, stop_mlflow, table, write

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench_promotion"
AIRFLOW = ROOT / ".venvs" / "airflow" / "bin" / "airflow"


class Load:
    """Client threads predicting back to back; every answer's status, version and latency."""

    def __init__(self, port: int, clients: int) -> None:
        self.port, self.answers, self.lock = port, [], threading.Lock()
        self.stop = threading.Event()
        image = np.random.default_rng(1).uniform(0, 255, (1, 28, 28)).round().tolist()
        self.body = json.dumps({"instances": image})
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                connection.request("POST", f"/v1/models/{MODEL}:predict", body=self.body,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                answer = (time.monotonic(), response.status, response.getheader("X-Model-Version"),
                          (time.perf_counter() - started) * 1000)
            except (OSError, http.client.HTTPException) as exc:
                answer = (time.monotonic(), 0, type(exc).__name__, 0.0)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                self.answers.append(answer)

    def window(self, start: float, end: float) -> list[tuple]:
        with self.lock:
            return [a for a in self.answers if start <= a[0] <= end]


def register(env: dict[str, str], url: str, work: Path) -> list[str]:
    script = ("import sys, json, mlflow, numpy as np, tf_keras\nfrom pathlib import Path\n"
              "from mlsteps import compress, model\nmlflow.set_tracking_uri(sys.argv[1])\nout = []\n"
              "for kind in ('32', '48', 'broken'):\n"
              "    path = Path(sys.argv[2]) / f'{kind}.tflite'\n"
              "    if kind == 'broken':\n        path.write_bytes(b'not a flatbuffer' * 64)\n"
              "    else:\n"
              "        net = model.build(image_shape=(28, 28), num_classes=10, width=int(kind), keras_module=tf_keras)\n"
              "        rep = np.random.default_rng(0).uniform(0, 255, (200, 28, 28)).astype(np.float32)\n"
              "        path.write_bytes(compress.convert(net, 'int8', rep))\n"
              "    with mlflow.start_run():\n"
              "        info = mlflow.pyfunc.log_model(name='compressed_model', artifacts={'tflite': str(path)},\n"
              "            python_model=sys.argv[3])\n"
              "    out.append(mlflow.register_model(info.model_uri, sys.argv[4]).version)\n"
              "print(json.dumps(out))\n")
    out = subprocess.run([sys.executable, "-c", script, url, str(work), str(ROOT / "mlsteps" / "litert_model.py"),
                          MODEL], env=env, check=True, capture_output=True, text=True)
    return [str(v) for v in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="client threads (one keep-alive connection each)")
    args = parser.parse_args()
    import mlflow

    work = Path(tempfile.mkdtemp(prefix="bench_promotion_"))
    env, url = start_mlflow(work, TF_CPP_MIN_LOG_LEVEL="3")
    port = free_port()
    serving_env = {**env, "SERVING_PORT": str(port), "MODEL_NAME": MODEL}
    airflow_env = {**{k: v for k, v in env.items() if not k.startswith("AIRFLOW")},
                   "AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                   "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                   "MLOPS_RUNTIME": "local", "MLOPS_DEPLOY_TARGET": "local",
                   "MLOPS_SERVING_URL": f"http://127.0.0.1:{port}",
                   "MLOPS_SERVING_ADMIN_TOKEN_FILE": str(work / "serving" / "admin-token"),
                   "MLOPS_STEPS_PYTHON": sys.executable, "MLOPS_DATA_ROOT": str(work / "data")}
    load: Load | None = None
    rows, results = [], {}
    try:
        versions = register(env, url, work)
        client = mlflow.MlflowClient(url)
        client.set_registered_model_alias(MODEL, "champion", versions[0])
        subprocess.run([str(ROOT / "scripts" / "serving.sh"), "start"], env=serving_env, check=True,
                       capture_output=True)
        subprocess.run([str(AIRFLOW), "db", "migrate"], env=airflow_env, check=True, capture_output=True)
        deadline = time.monotonic() + 120
        while True:  # the server loads the champion in the background
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the model server never became ready")
            time.sleep(0.5)
        load = Load(port, args.clients)
        for thread in load.threads:
            thread.start()
        time.sleep(3)
        scenarios = [("promote", {"alias": versions[1]}, {}), ("rollback", {"alias": versions[2]}, {}),
                     ("manual", {}, {"version": int(versions[0])})]
        for name, change, conf in scenarios:
            if "alias" in change:
                client.set_registered_model_alias(MODEL, "champion", change["alias"])
            start = time.monotonic()
            out = subprocess.run([str(AIRFLOW), "dags", "test", "model_promotion", "-c",
                                  json.dumps({"model_name": MODEL, **conf})], env=airflow_env, capture_output=True,
                                 text=True)
            end = time.monotonic()
            listing = subprocess.run([str(AIRFLOW), "dags", "list-runs", "model_promotion", "-o", "json"],
                                     env=airflow_env, capture_output=True, text=True).stdout
            state = json.loads(listing.strip().splitlines()[-1])[0]["state"]  # newest first
            (work / f"{name}.log").write_text(out.stdout + out.stderr)
            answers = load.window(start, end)
            failed = [a for a in answers if a[1] != 200]
            latencies = [a[3] for a in answers if a[1] == 200]
            seen = list(dict.fromkeys(a[2] for a in sorted(answers) if a[1] == 200))  # in the order they answered
            champion = client.get_model_version_by_alias(MODEL, "champion").version
            results[name] = {"run_state": state, "seconds": round(end - start, 1), "requests": len(answers),
                             "failed": len(failed), "failures": [list(map(str, a)) for a in failed[:10]],
                             "versions_answering": seen, "champion_after": champion,
                             "requests_per_s": round(len(answers) / (end - start)),
                             "p50_ms": round(float(np.percentile(latencies, 50)), 2),
                             "p99_ms": round(float(np.percentile(latencies, 99)), 2)}
            print(name, results[name], flush=True)
            rows.append([name, state, results[name]["seconds"], len(answers), len(failed), " → ".join(seen),
                         champion, results[name]["requests_per_s"], results[name]["p50_ms"], results[name]["p99_ms"]])
    finally:
        if load:
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=15)
        subprocess.run([str(ROOT / "scripts" / "serving.sh"), "stop"], env=serving_env, capture_output=True)
        stop_mlflow(env)
    print(table(["scenario", "DAG run", "seconds", "requests", "failed", "versions answering", "champion after",
                 "req/s", "p50 ms", "p99 ms"], rows))
    total_failed = sum(r["failed"] for r in results.values())
    goal = total_failed == 0 and results["promote"]["run_state"] == "success" and \
        results["rollback"]["run_state"] == "failed"
    print(f"failed requests over all promotions: {total_failed}; goal (zero failed requests): {goal}")
    print("written:", write("promotion", {"settings": vars(args), "versions": versions, "results": results,
                                          "failed_requests": total_failed, "goal_met": goal}))


if __name__ == "__main__":
    main()
