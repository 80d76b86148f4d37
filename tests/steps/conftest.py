"""Fixtures for step tests: small synthetic IDX datasets, a local HTTP mirror and a real MLflow server."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import idxdata  # noqa: E402  (needs the sys.path entry above)
import pgserver  # noqa: E402

from mlsteps import prep  # noqa: E402
from stepsupport import free_port, step_env  # noqa: E402


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """The four gzipped IDX files of a 300/100 synthetic dataset with 10 classes."""
    return idxdata.write_dataset(tmp_path / "source")


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def prepare(data_root: Path) -> Callable[..., dict[str, Any]]:
    """Run prep on a folder of IDX files (dataset 'custom' unless told otherwise) into the test's data root."""

    def run(source: Path | None, **overrides: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {"data_root": str(data_root), "dataset": "custom",
                                    "source_dir": str(source) if source else None}
        return prep.run(prep.PrepConfig(**(settings | overrides)))

    return run


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        pass


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real HTTP server on 127.0.0.1 serving a folder: (base URL, folder, paths requested so far)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    requested: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder, requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts) for this test session; yields its URL."""
    state = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = state / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{state}/mlflow.db",
             "--artifacts-destination", str(state / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=state, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=step_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"MLflow server did not become healthy on {url} (exit {process.poll()}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        # The server forks workers: end the whole process group it leads, politely first.
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def mlflow_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tracking URI naming a SQLite database itself (no server), as --tracking-uri may; its experiment
    "database" keeps artifacts in a local folder. MLflow's SQL store numbers model versions as int where the
    server's REST API answers str."""
    import mlflow

    state = tmp_path_factory.mktemp("mlflow-database")
    uri = f"sqlite:///{state}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("database", artifact_location=str(state / "artifacts"))
    return uri


@pytest.fixture(scope="session")
def postgresql() -> Iterator[str]:
    """The Optuna database of a real PostgreSQL server set up by mlflow/init-db.sql (pgserver.py), as a user puts
    it in OPTUNA_STORAGE. Skipped where PostgreSQL is not installed (.ci/run installs it)."""
    with pgserver.running() as port:
        yield f"postgresql://optuna:optuna@127.0.0.1:{port}/optuna"
