"""Real services for end-to-end tests: an MLflow server process and Airflow commands on SQLite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
STEPS_PYTHON = ROOT / ".venvs" / "steps" / "bin" / "python"
AIRFLOW = Path(sys.executable).parent / "airflow"
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` started by the project's own script; queried over its REST API."""

    def __init__(self, var: Path, port: int) -> None:
        self.env = {**os.environ, "MLOPS_VAR": str(var), "MLFLOW_PORT": str(port)}
        self.url = f"http://127.0.0.1:{port}"

    def script(self, action: str) -> str:
        out = subprocess.run([str(ROOT / "mlflow" / "server.sh"), action], env=self.env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def get(self, endpoint: str, **query: str) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def versions(self, model_name: str) -> list[dict]:
        found = self.get("model-versions/search", filter=f"name='{model_name}'")
        return found.get("model_versions", [])


def airflow(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AIRFLOW), *args], env=env, capture_output=True, text=True, timeout=timeout)


def request(method: str, url: str, body: dict | None = None, token: str | None = None,
            headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    """One HTTP call; (status, JSON body) for success and error answers alike."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    call = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:  # a plain-text error page: "Internal Server Error"
            return exc.code, {"text": body.decode(errors="replace")}


@contextlib.contextmanager
def standalone(airflow_home: dict[str, str], log_dir: Path, wait_for_dag: str, **env: str) -> Iterator[tuple[str, str]]:
    """`airflow standalone` (API server, scheduler, DAG processor, triggerer) as `make airflow-ui` runs it;
    yields (base URL, bearer token of user admin) once ``wait_for_dag`` is served by the API."""
    port = free_port()
    env = {**airflow_home, "AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__PARALLELISM": "2",
           # workers report to the API server's execution API, which now listens on this port
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
           # the log is read while it runs (test_scheduler_api waits for the scheduler's lines)
           "PYTHONUNBUFFERED": "1", **env}
    log = (log_dir / "standalone.log").open("w")
    process = subprocess.Popen([str(AIRFLOW), "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    passwords = os.path.join(env["AIRFLOW_HOME"], "simple_auth_manager_passwords.json.generated")
    token = None
    deadline = time.monotonic() + 180
    try:
        while token is None:
            assert process.poll() is None, "airflow standalone exited; see " + log.name
            assert time.monotonic() < deadline, "API server did not come up; see " + log.name
            time.sleep(2)
            if not os.path.exists(passwords):
                continue
            password = json.load(open(passwords))["admin"]
            try:
                status, body = request("POST", f"{base}/auth/token", {"username": "admin", "password": password})
            except (urllib.error.URLError, ConnectionError):
                continue
            if status in (200, 201):
                token = body["access_token"]
        while request("GET", f"{base}/api/v2/dags/{wait_for_dag}", token=token)[0] != 200:
            assert time.monotonic() < deadline, f"{wait_for_dag} never appeared in the API; see " + log.name
            time.sleep(2)
        yield base, token
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        # Its components (scheduler, API server, ...) are in its process group and can outlive it: a scheduler
        # still shutting down its executor was left running after the tests.
        _end_group(process.pid, grace=30)
        process.wait()
        log.close()


def _end_group(pgid: int, *, grace: float) -> None:
    """Wait up to ``grace`` seconds for every process of the group to exit, then kill what is left."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def migrated_airflow_home(home: Path, mlflow_server: MlflowServer) -> dict[str, str]:
    """The environment of an Airflow home in ``home`` with a freshly migrated SQLite database, running steps on
    the local runtime and logging to ``mlflow_server``. Every DAG in it starts paused."""
    # Nothing Airflow- or deployment-specific leaks in from the test process (e.g. unit-test mode set by
    # the DAG tests of the same session, which gives every Airflow process its own JWT secret).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLOPS_", "MLFLOW_"))}
    env = {
        **inherited,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLOPS_RUNTIME": "local",
        "MLOPS_DATA_ROOT": str(home / "data"),
        "MLOPS_STEPS_PYTHON": str(STEPS_PYTHON),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        # airflow standalone starts its components as `airflow ...` subprocesses.
        "PATH": f"{AIRFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The scheduler queues no task of a pool that does not exist: create the search's pool like the scripts do.
    out = subprocess.run([str(ROOT / "scripts" / "airflow-pools.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # The cap holds only if deferred pod tasks keep their slot (a trial worker defers while its pod runs).
    out = subprocess.run([str(AIRFLOW), "pools", "get", "hyperparameter_search", "-o", "json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (pool,) = json.loads(out.stdout[out.stdout.index("["):])
    assert (str(pool["slots"]), str(pool["include_deferred"]).lower()) == ("4", "true"), pool
    return env
