"""scripts/make_venv.sh (make envs): a new environment from scratch, the previous one kept until it is whole.

Stand-in interpreters (PYTHON) make environments whose pip passes or fails at once (the real venv module
and pip take 8 s a build here); CI's own `make envs` builds the real ones from scratch.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from services import ROOT

SCRIPT = ROOT / "scripts" / "make_venv.sh"


def _stand_in(tmp_path: Path, *, pip_exit: int = 0, delay: float = 0) -> str:
    """An interpreter whose `-m venv <dir>` makes <dir>/bin/python, whose pip exits ``pip_exit``."""
    python = tmp_path / f"python-{pip_exit}-{delay}"
    python.write_text(f'#!/usr/bin/env bash\nsleep {delay}\nmkdir -p "$3/bin"\n'
                      f'printf "#!/bin/sh\\nexit {pip_exit}\\n" >"$3/bin/python"\nchmod +x "$3/bin/python"\n')
    python.chmod(0o755)
    return str(python)


def _build(venv: Path | str, *pip_args: str, python: str, wait: bool = True):
    env = {**os.environ, "PYTHON": python}
    command = [str(SCRIPT), str(venv), "--", *pip_args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _old_environment(venv: Path) -> None:
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "tool").write_text("the previous environment's\n")
    (venv / ".installed").touch()
    os.utime(venv / ".installed", (time.time() - 3600,) * 2)  # built an hour ago


def _is_the_old_one(venv: Path) -> bool:
    return (venv / "bin" / "tool").read_text() == "the previous environment's\n" \
        and sorted(path.name for path in venv.iterdir()) == [".installed", "bin"]


def test_a_build_that_fails_offline_puts_the_previous_environment_back(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv)
    failed = _build(venv, "tensorflow==2.99.0", python=_stand_in(tmp_path, pip_exit=1))  # pip: no index reached
    assert failed.returncode != 0
    assert "the previous environment is back in place" in failed.stderr
    assert _is_the_old_one(venv) and not (tmp_path / "steps.previous").exists()


def test_a_build_that_succeeds_replaces_the_previous_environment_and_stamps_it(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv)
    built = _build(venv, "-r", "requirements.txt", "--", "-e", ".", python=_stand_in(tmp_path))
    assert built.returncode == 0, built.stderr
    assert not (venv / "bin" / "tool").exists()  # from scratch: nothing of the previous one lingers
    assert (venv / "bin" / "python").exists() and (venv / ".installed").stat().st_mtime > time.time() - 60
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("steps")) == ["steps", "steps.lock"]


def test_an_environment_kept_by_a_killed_build_is_put_back_before_the_next_one(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv.with_name("steps.previous"))  # killed outright after moving it aside
    (venv / "bin").mkdir(parents=True)  # and half-way through the new one
    failed = _build(venv, "anything", python=_stand_in(tmp_path, pip_exit=1))
    assert failed.returncode != 0
    assert _is_the_old_one(venv) and not venv.with_name("steps.previous").exists()


def test_two_builds_at_once_take_turns_and_keep_the_previous_environment(tmp_path):
    """make demo beside make airflow-ui: the second took the first's kept environment for a killed run's."""
    venv = tmp_path / "steps"
    _old_environment(venv)
    slow_failure = _stand_in(tmp_path, pip_exit=1, delay=2)
    first = _build(venv, "anything", python=slow_failure, wait=False)
    time.sleep(0.5)
    second = _build(venv, "anything", python=slow_failure, wait=False)
    assert first.wait(timeout=60) != 0 and second.wait(timeout=60) != 0
    assert _is_the_old_one(venv)


def test_a_linked_environment_is_rebuilt_where_the_link_points(tmp_path):
    elsewhere = tmp_path / "disk" / "steps"
    _old_environment(elsewhere)
    venv = tmp_path / "steps"
    venv.symlink_to(elsewhere)
    assert _build(f"{venv}/", "anything", python=_stand_in(tmp_path)).returncode == 0  # a trailing slash too
    assert venv.is_symlink() and (elsewhere / ".installed").exists() and not (elsewhere / "bin" / "tool").exists()
    failed = _build(venv, "anything", python=_stand_in(tmp_path, pip_exit=1))
    assert failed.returncode != 0 and venv.is_symlink() and (elsewhere / "bin" / "python").exists()


def test_a_build_killed_after_finishing_keeps_the_new_environment_not_the_one_before(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv.with_name("steps.previous"))  # killed between the stamp and discarding it
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "tool").write_text("the new environment's\n")
    (venv / ".installed").touch()
    failed = _build(venv, "anything", python=_stand_in(tmp_path, pip_exit=1))
    assert failed.returncode != 0 and (venv / "bin" / "tool").read_text() == "the new environment's\n"
    assert not venv.with_name("steps.previous").exists()


def test_a_build_that_waited_for_another_leaves_the_environment_that_one_built_alone(tmp_path):
    """make demo beside make airflow-ui, both finding the environment stale: the second, once the first had
    built it, moved that fresh environment (in use by the first make) aside and built another."""
    venv = tmp_path / "steps"
    _old_environment(venv)
    first = _build(venv, "anything", python=_stand_in(tmp_path, delay=2), wait=False)
    deadline = time.monotonic() + 30
    while not venv.with_name("steps.previous").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the first holds the lock (it has moved the old environment aside)
    second = _build(venv, "anything", python=_stand_in(tmp_path, pip_exit=1), wait=False)
    assert first.wait(timeout=60) == 0
    (venv / "bin" / "marker").write_text("in use")  # what the first make now runs
    output = second.communicate(timeout=60)
    assert second.returncode == 0, output
    assert "built by another make while this one waited" in output[0]
    assert (venv / "bin" / "marker").exists()

    rebuilt = _build(venv, "anything", python=_stand_in(tmp_path))  # make -B, or requirements changed: built
    assert rebuilt.returncode == 0 and not (venv / "bin" / "marker").exists()
