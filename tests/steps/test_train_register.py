"""train and register against a real MLflow server: resume after a kill, return cached models, register once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import idxdata
import pytest
from stepsupport import step_env

from mlsteps import register, tracking, train

pytestmark = pytest.mark.integration

EPOCH_LINE = re.compile(r"mlsteps\.train: epoch (\d+)/(\d+) ")
STEP_TIMEOUT = 300  # seconds one train process may take before the test gives up on it


def _train_command(manifest: str, data_root: Path, url: str, result_path: Path) -> list[str]:
    return [sys.executable, "-m", "mlsteps.train", "--manifest", manifest, "--data-root", str(data_root),
            "--run-key", "k1", "--tracking-uri", url, "--epochs", "4", "--batch-size", "32",
            "--result-path", str(result_path)]


def _run_streaming(command: list[str], *, kill_on: str | None = None) -> tuple[int, list[str], float]:
    """Run a step, reading its output line by line; SIGKILL it as soon as a line contains ``kill_on``."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, env=step_env())
    watchdog = threading.Timer(STEP_TIMEOUT, process.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if kill_on is not None and kill_on in line:
                process.kill()
                break
        code = process.wait(timeout=30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if time.monotonic() - started >= STEP_TIMEOUT:
        pytest.fail(f"{command[2]} ran past {STEP_TIMEOUT} s:\n" + "\n".join(lines[-40:]))
    return code, lines, time.monotonic() - started


def _epochs(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := EPOCH_LINE.search(line))]


def test_killed_training_resumes_after_last_finished_epoch(tmp_path, data_root, prepare, mlflow_server) -> None:
    from mlflow import MlflowClient

    source = idxdata.write_dataset(tmp_path / "source", train=3000, test=200)
    manifest = prepare(source)["manifest"]
    result_path = tmp_path / "train.json"
    command = _train_command(manifest, data_root, mlflow_server, result_path)

    code, lines, _ = _run_streaming(command, kill_on="epoch 1/4")
    assert code == -9, "\n".join(lines[-40:])
    assert _epochs(lines) == [1]
    assert not result_path.exists()

    code, lines, _ = _run_streaming(command)
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "resuming from checkpoint: epoch 2/4" in output
    assert _epochs(lines) == [2, 3, 4]
    assert "epoch 1/4" not in output
    result = json.loads(result_path.read_text())
    assert result["resumed_from_epoch"] == 1
    assert result["epochs"] == 4
    assert Path(result["model_path"]).is_file()
    history = MlflowClient(mlflow_server).get_metric_history(result["mlflow_run_id"], "accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert result["metrics"]["accuracy"] > 0.5, "the synthetic classes are easy to tell apart"

    result_path.unlink()
    code, lines, seconds = _run_streaming(command)
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "already trained with these settings" in output
    assert not re.search(r"\bepoch \d+/\d+", output)
    cached = json.loads(result_path.read_text())
    assert cached["model_uri"] == result["model_uri"]
    assert cached["mlflow_run_id"] == result["mlflow_run_id"]
    assert seconds < 60


def test_register_twice_for_one_run_key_creates_one_version(tmp_path, data_root, prepare, mlflow_server) -> None:
    from mlflow import MlflowClient

    prepared = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))
    trained = train.run(train.TrainConfig(manifest=prepared["manifest"], data_root=str(data_root),
                                          run_key="register/k2", tracking_uri=mlflow_server,
                                          experiment="register_tests", epochs=1, batch_size=64, width=4))
    config = register.RegisterConfig(model_uri=trained["model_uri"], run_key="register/k2", dataset="custom",
                                     dataset_digest=prepared["digest"], metrics=json.dumps({"test_accuracy": 0.5}),
                                     model_name="register_tests_model", dag_id="mnist_training",
                                     dag_run_id="manual__1", tracking_uri=mlflow_server)

    first = register.run(config)
    second = register.run(config)

    assert first["created"] is True
    assert second["created"] is False
    assert second["version"] == first["version"]
    assert first["run_id"] == trained["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions("name = 'register_tests_model'")
    assert [int(v.version) for v in versions] == [first["version"]]
    by_alias = client.get_model_version_by_alias("register_tests_model", register.CHALLENGER)
    assert int(by_alias.version) == first["version"]
    tags = by_alias.tags
    assert tags["dataset"] == "custom"
    assert tags["dataset_digest"] == prepared["digest"]
    assert tags["code_version"] == register.code_version()
    assert tags[tracking.RUN_KEY_TAG] == "register/k2"
    assert tags["metric.test_accuracy"] == "0.500000"


def test_register_rejects_metrics_that_are_not_json(mlflow_server) -> None:
    config = register.RegisterConfig(model_uri="models:/unused", run_key="register/bad", dataset="custom",
                                     dataset_digest="0" * 64, metrics="accuracy=0.9", tracking_uri=mlflow_server)
    with pytest.raises(register.StepError, match="--metrics must be a JSON object"):
        register.run(config)
