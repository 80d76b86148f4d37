"""Shared by the benchmarks: a plain-text table and a results file that records how it was produced."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


SERVER_SH = Path(__file__).resolve().parents[1] / "mlflow" / "server.sh"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow(work: Path, **extra_env: str) -> tuple[dict[str, str], str]:
    """This benchmark's own MLflow server (state under ``work``, a free port); returns (env for steps, URL)."""
    env = {**os.environ, "MLOPS_VAR": str(work), "MLFLOW_PORT": str(free_port()), **extra_env}
    url = subprocess.run([str(SERVER_SH), "start"], env=env, check=True, capture_output=True, text=True).stdout.strip()
    return {**env, "MLFLOW_TRACKING_URI": url}, url


def stop_mlflow(env: dict[str, str]) -> None:
    subprocess.run([str(SERVER_SH), "stop"], env=env, capture_output=True, check=False)
