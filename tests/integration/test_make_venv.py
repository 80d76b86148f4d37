"""scripts/make_venv.sh (make envs): a new environment from scratch, the previous one kept until it is whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services import ROOT

SCRIPT = ROOT / "scripts" / "make_venv.sh"


def _build(venv: Path, *pip_args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    # Offline as a laptop on a train: pip may use no index (nor the find-links of a pip.conf).
    env = {**os.environ, "PYTHON": python, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run([str(SCRIPT), str(venv), "--", *pip_args], env=env, capture_output=True, text=True,
                          timeout=300)


def _old_environment(venv: Path) -> None:
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "tool").write_text("the previous environment's\n")
    (venv / ".installed").touch()


def test_a_build_that_fails_offline_puts_the_previous_environment_back(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv)
    failed = _build(venv, "tensorflow==2.99.0")
    assert failed.returncode != 0
    assert "the previous environment is back in place" in failed.stderr
    assert (venv / "bin" / "tool").read_text() == "the previous environment's\n"
    assert not (tmp_path / "steps.previous").exists()


def test_a_build_that_succeeds_replaces_the_previous_environment_and_stamps_it(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv)
    (venv / ".installed").unlink()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install offline\n")
    built = _build(venv, "-r", str(requirements))
    assert built.returncode == 0, built.stderr
    assert not (venv / "bin" / "tool").exists()  # from scratch: nothing of the previous one lingers
    assert (venv / "bin" / "python").exists() and (venv / ".installed").exists()
    assert not (tmp_path / "steps.previous").exists()


def test_an_environment_kept_by_a_killed_build_is_put_back_before_the_next_one(tmp_path):
    venv = tmp_path / "steps"
    _old_environment(venv.with_name("steps.previous"))  # killed outright after moving it aside
    (venv / "bin").mkdir(parents=True)  # and half-way through the new one
    failed = _build(venv, "tensorflow==2.99.0", python="false")  # this build fails at once
    assert failed.returncode != 0
    assert (venv / "bin" / "tool").read_text() == "the previous environment's\n"
    assert sorted(path.name for path in venv.iterdir()) == [".installed", "bin"]  # not the half-built one in it
    assert not venv.with_name("steps.previous").exists()
