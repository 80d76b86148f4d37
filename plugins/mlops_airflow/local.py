"""The local runtime: a step runs as a subprocess of the steps environment; its result JSON becomes XCom."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


USER_ERROR = 2  # exit code of mlsteps.core.cli for a StepError


class StepFailed(Exception):
    """The step process exited non-zero; the message carries the end of its output."""


class LocalStepOperator(BaseOperator):
    """Run ``python -m <module> <arguments>`` in the steps environment, streaming its log into the task log."""

    # Not "env": rendered fields are stored and shown in the UI, and env may carry credentials
    # (MLFLOW_TRACKING_URI, OPTUNA_STORAGE with a password).
    template_fields: Sequence[str] = ("arguments",)
    ui_color = "#e8f4ea"

    def __init__(self, *, module: str, arguments: list[str], python: str, env: dict[str, str] | None = None,
                 extra_arguments: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.module = module
        self.arguments = arguments
        # Appended to the rendered arguments; what a mapped task expands over (e.g. ["--worker", "1"]).
        self.extra_arguments = [str(a) for a in extra_arguments or []]
        self.python = python
        self.env = env or {}
        self._process: subprocess.Popen[str] | None = None

    def execute(self, context: Context) -> Any:
        with tempfile.TemporaryDirectory(prefix=f"{self.task_id}-") as tmp:
            result_path = Path(tmp) / "return.json"
            command = [self.python, "-m", self.module, *self.arguments, *self.extra_arguments,
                       "--result-path", str(result_path)]
            self.log.info("running: %s", " ".join(command))
            tail: collections.deque[str] = collections.deque(maxlen=30)
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                # A byte that is not UTF-8 (a native library's, a file name's) is shown as such, not taken
                # for the step's failure: a strict decode raised here and killed a step that was working.
                text=True, encoding="utf-8", errors="replace",
                # Same process group as the task, so Airflow's kill of the task reaches the step too.
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
            assert self._process.stdout is not None
            # Relayed by a thread of its own, so that what the step says while it stops (a timeout's SIGTERM:
            # its "terminated" line, its cleanup) still reaches the task log, and a full pipe never blocks it.
            relay = threading.Thread(target=self._relay, args=(self._process.stdout, tail), daemon=True)
            relay.start()
            try:
                code = self._process.wait()
            finally:  # a timeout or kill of the task must not leave the step running on its own
                self.on_kill()
                relay.join(timeout=10)  # the rest of its output (a process it left holding the pipe: not waited for)
            if code == USER_ERROR:
                # Bad input or data: retrying cannot help, so fail now instead of after the retries.
                raise AirflowFailException(f"{self.module} rejected its input:\n" + "\n".join(tail))
            if code != 0:
                raise StepFailed(f"{self.module} exited with code {code}; last lines:\n" + "\n".join(tail))
            return json.loads(result_path.read_text())

    def _relay(self, stream: Any, tail: collections.deque[str]) -> None:
        failed = False
        for line in stream:  # read to the end whatever happens: a pipe nobody reads would block the step
            line = line.rstrip()
            tail.append(line)
            if failed:
                continue
            try:
                self.log.info("%s", line)
            except Exception:  # noqa: BLE001 (the log channel itself broke: the tail still says what happened)
                failed = True

    def on_kill(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
