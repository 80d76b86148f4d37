"""Podman for the image tests: builds on the local Python base image (docs/operations.md, "Containers without
Docker")."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = os.environ.get("MLOPS_TEST_BASE_IMAGE", "localhost/debian-python:3.11")
PYTHON_BASE = "localhost/mlops-test-base:test"  # BASE with a PATH: base of the images, stand-in for alpine


def podman(*args: str, timeout: int = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def build(dockerfile: str, tag: str) -> str:
    """Build ``dockerfile`` from the repository root on the local base, as docs/operations.md shows."""
    command = ["podman", "build", "--build-arg", f"BASE_IMAGE={PYTHON_BASE}",
               "--build-arg", "PIP_BREAK_SYSTEM_PACKAGES=1", "-t", tag, "-f", dockerfile]
    if Path("/etc/ssl/certs").is_dir():
        command[2:2] = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    out = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tag


def create_secret(name: str, values: dict[str, str], folder: Path) -> None:
    """A Kubernetes Secret for ``envFrom``, in podman's form: a JSON map of base64 values."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()}))
    podman("secret", "rm", name, check=False)
    podman("secret", "create", name, str(path))


def play_step_pod(pod: dict, manifest: Path, timeout: float = 300) -> dict:
    """`podman kube play` a step's rendered Pod (written to ``manifest``), wait for its step container to exit 0
    and return what the XCom sidecar holds, as KubernetesPodOperator reads it. The caller runs `podman kube
    down` on ``manifest``."""
    manifest.write_text(json.dumps(pod))
    podman("kube", "play", str(manifest), timeout=int(timeout))
    main = f"{pod['metadata']['name']}-{pod['spec']['containers'][0]['name']}"
    deadline = time.monotonic() + timeout
    while podman("inspect", main, "--format", "{{.State.Status}}").stdout.strip() != "exited":
        assert time.monotonic() < deadline, podman("logs", main, check=False).stdout[-3000:]
        time.sleep(2)
    logs = podman("logs", main, check=False)
    code = podman("inspect", main, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert code == "0", logs.stdout[-3000:] + logs.stderr[-3000:]
    return json.loads(podman("exec", f"{pod['metadata']['name']}-airflow-xcom-sidecar", "cat",
                             "/airflow/xcom/return.json").stdout)
