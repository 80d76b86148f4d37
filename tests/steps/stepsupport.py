"""Helpers shared by the step tests (imported by conftest and test modules; this folder is on sys.path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def step_env(**extra: str) -> dict[str, str]:
    """Environment for a step subprocess: unbuffered, INFO logs, no tracking server inherited from the shell."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", MLSTEPS_LOG_LEVEL="INFO", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def datasets_entries(data_root: Path) -> list[Path]:
    """Everything under <data_root>/datasets (prepared datasets, scratch folders, markers)."""
    folder = data_root / "datasets"
    return sorted(folder.rglob("*")) if folder.exists() else []


def partial_leftovers(data_root: Path) -> list[Path]:
    """Scratch folders and half-downloaded files anywhere under the data root."""
    return sorted([*data_root.rglob("*.partial"), *data_root.rglob("*.download")])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, what os.fsync flushed (by path) and what os.replace / os.rename published."""
    events: list[tuple[str, str]] = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording(name, real):
        def move(src, dst, *args, **kwargs):
            events.append((name, str(dst)))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording("replace", replace))
    monkeypatch.setattr(os, "rename", recording("rename", rename))
    return events
