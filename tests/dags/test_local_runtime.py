"""The local runtime's operator (make demo, make airflow-ui): a step as a subprocess, its output in the task log."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from mlops_airflow.local import LocalStepOperator

STEP = textwrap.dedent("""\
    import json, signal, sys, time
    result = sys.argv[sys.argv.index("--result-path") + 1]

    def stop(signum, frame):
        print("terminated (SIGTERM): stopping", flush=True)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    sys.stdout.write("started\\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(b"caf\\xe9 from a native library\\n")  # not UTF-8
    sys.stdout.flush()
    time.sleep(float(sys.argv[1]))
    print("done", flush=True)
    json.dump({"ok": True}, open(result, "w"))
""")


@pytest.fixture
def step_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_step.py").write_text(STEP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fake_step"


def _operator(module: str, seconds: float) -> LocalStepOperator:
    return LocalStepOperator(task_id="fake", module=module, arguments=[str(seconds)], python=sys.executable)


def test_a_step_printing_bytes_that_are_not_utf8_runs_to_its_end(step_module, capsys) -> None:
    """A strict decode raised in the operator, whose cleanup then killed a step that was working."""
    assert _operator(step_module, 0.5).execute({}) == {"ok": True}
    logged = capsys.readouterr().out  # the task log (structlog writes it to stdout here)
    assert "caf\ufffd from a native library" in logged and "done" in logged


def test_what_a_step_says_while_a_timeout_stops_it_reaches_the_task_log(step_module, capsys) -> None:
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout

    operator = _operator(step_module, 60)
    with pytest.raises(AirflowTaskTimeout), timeout(2):
        operator.execute({})
    assert "terminated (SIGTERM): stopping" in capsys.readouterr().out
    assert operator._process is not None and operator._process.poll() is not None  # the step is gone
