"""A throwaway PostgreSQL server from Debian's postgresql package, set up by mlflow/init-db.sql as
docker-compose's postgres service is (databases and users mlflow and optuna)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running() -> Iterator[int]:
    """Start the server on a free port of 127.0.0.1 and yield the port; skip where PostgreSQL is missing.

    Password authentication over TCP, as in production; the superuser only through the server's own socket.
    """
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = initdb[-1].parent
    # initdb and postgres refuse to run as root; pytest's own temporary folders are private to this user.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="mlops-postgresql-"))
    if as_owner:
        shutil.chown(home, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*command: str | Path, stdin: str | None = None) -> None:
        # in a folder of its own: the checkout may be private to root (a root CI's /root/...)
        out = subprocess.run([*as_owner, *map(str, command)], input=stdin, capture_output=True, text=True,
                             timeout=120, cwd=home)
        assert out.returncode == 0, f"{command[0]} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"

    try:
        run(bin_dir / "initdb", "-D", home / "data", "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8")
        run(bin_dir / "pg_ctl", "-D", home / "data", "-l", home / "server.log", "-w", "-o",
            f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
        run(bin_dir / "psql", "-h", home, "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q",
            "-f", "-", stdin=(ROOT / "mlflow" / "init-db.sql").read_text())
        yield port
    finally:
        subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(home / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120, cwd=home)
        shutil.rmtree(home, ignore_errors=True)
