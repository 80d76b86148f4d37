"""train and register against a real MLflow server: resume after a kill, return cached models, register once."""

from __future__ import annotations

import dataclasses
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


def _killed_after_epoch(epoch: int, tmp_path: Path, data_root: Path, prepare, url: str, *,
                       train: int) -> tuple[list[str], Path, list[str]]:
    """Start training (4 epochs) on ``train`` synthetic examples, SIGKILL it once epoch ``epoch`` is logged.

    Returns the command (to run it again), its result path and the killed run's output lines.
    """
    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=train, test=50))["manifest"]
    result_path = tmp_path / "train.json"
    command = _train_command(manifest, data_root, url, result_path)
    code, lines, _ = _run_streaming(command, kill_on=f"epoch {epoch}/4")
    assert code == -9, "\n".join(lines[-40:])
    return command, result_path, lines


def test_killed_training_resumes_after_last_finished_epoch(tmp_path, data_root, prepare, mlflow_server) -> None:
    from mlflow import MlflowClient

    command, result_path, lines = _killed_after_epoch(1, tmp_path, data_root, prepare, mlflow_server, train=3000)
    assert _epochs(lines) == [1]
    assert not result_path.exists()

    code, lines, _ = _run_streaming(command)
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "resuming from checkpoint: epoch 2/4" in output
    assert "resuming after epoch 1: training data shuffled with seed 43" in output  # not epoch 1's order again
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
    # The pipeline run cleared and run again: validate reopens the MLflow run, train finds its model done.
    MlflowClient(mlflow_server).update_run(result["mlflow_run_id"], status="RUNNING")
    code, lines, _ = _run_streaming(command)
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "already trained with these settings" in output
    assert not re.search(r"\bepoch \d+/\d+", output)
    cached = json.loads(result_path.read_text())
    assert cached["model_uri"] == result["model_uri"]
    assert cached["mlflow_run_id"] == result["mlflow_run_id"]
    assert MlflowClient(mlflow_server).get_run(result["mlflow_run_id"]).info.status == "FINISHED"  # not left RUNNING


def test_a_checkpoint_damaged_by_a_kill_resumes_from_the_copy_before_it(tmp_path, data_root, prepare,
                                                                       mlflow_server) -> None:
    command, result_path, _ = _killed_after_epoch(2, tmp_path, data_root, prepare, mlflow_server, train=600)
    backup = tracking.run_dir(str(data_root), "k1") / "backup"
    latest = [p for p in backup.rglob("*.weights.h5")]
    assert len(latest) == 1, sorted(backup.rglob("*"))
    latest[0].write_bytes(latest[0].read_bytes()[:1000])  # what a kill in the middle of writing it leaves

    code, lines, _ = _run_streaming(command)
    output = "\n".join(lines)
    assert code == 0, output[-4000:]
    assert "resuming from checkpoint: epoch 2/4" in output  # epoch 1's copy, kept beside the damaged one
    assert _epochs(lines) == [2, 3, 4]
    assert json.loads(result_path.read_text())["resumed_from_epoch"] == 1


def _train_config(manifest: str, data_root: Path, url: str, run_key: str, **overrides) -> train.TrainConfig:
    settings = {"manifest": manifest, "data_root": str(data_root), "run_key": run_key, "tracking_uri": url,
                "experiment": "train_tests", "epochs": 1, "batch_size": 64, "width": 4}
    return train.TrainConfig(**(settings | overrides))


def _fail_after_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the step fail once every epoch is trained (and backed up), before the model is saved."""
    def fail(*args, **kwargs) -> None:
        raise RuntimeError("MLflow unreachable while logging the learning curves")

    monkeypatch.setattr(train, "_learning_curves", fail)


def test_a_try_that_failed_after_training_is_marked_failed_and_its_retry_reports_the_last_epoch(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    from mlflow import MlflowClient

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    config = _train_config(manifest, data_root, mlflow_server, "train/after-fit")
    with monkeypatch.context() as patch:
        _fail_after_training(patch)
        with pytest.raises(RuntimeError, match="learning curves"):
            train.run(config)
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("train_tests").experiment_id],
                             f"tags.`{tracking.RUN_KEY_TAG}` = 'train/after-fit'")[0]
    assert run.info.status == "FAILED"

    result = train.run(config)
    assert result["resumed_from_epoch"] == 1  # nothing left to train: the retry restored the last epoch
    last = {key: [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == 1]
            for key in ("loss", "accuracy", "val_loss", "val_accuracy")}
    assert result["metrics"] == {key: values[-1] for key, values in last.items()}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_an_epoch_whose_metrics_mlflow_did_not_take_is_trained_again_on_the_retry(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    from mlflow import MlflowClient

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    config = _train_config(manifest, data_root, mlflow_server, "train/lost-epoch", epochs=2)
    real = MlflowClient.log_batch

    def outage_at_epoch_2(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step == 2 for m in metrics):
            raise ConnectionError("MLflow unreachable while logging epoch 2")
        return real(self, run_id, metrics, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", outage_at_epoch_2)
        with pytest.raises(ConnectionError, match="epoch 2"):
            train.run(config)
    result = train.run(config)
    assert result["resumed_from_epoch"] == 1  # epoch 1 was backed up; epoch 2 was not, so it ran again
    client = MlflowClient(mlflow_server)
    assert sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "val_accuracy")) == [1, 2]
    assert set(result["metrics"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_a_diverged_training_fails_naming_the_learning_rate_and_saves_no_model(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    from mlflow import MlflowClient

    from mlsteps import model as model_lib

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    config = _train_config(manifest, data_root, mlflow_server, "train/diverged", epochs=2, learning_rate=0.5)
    real = model_lib.compiled
    # Adam recovers from any learning rate train accepts on this easy data: step it far past those.
    monkeypatch.setattr(model_lib, "compiled", lambda **kw: real(**(kw | {"learning_rate": 1e30})))
    with pytest.raises(train.StepError, match=r"training diverged: .*loss.* after epoch 1 .*--learning-rate 0.5\)"):
        train.run(config)
    workdir = tracking.run_dir(str(data_root), "train/diverged")
    assert not (workdir / "model").exists(), "no model is saved (a retry would have returned it)"
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("train_tests").experiment_id],
                             f"tags.`{tracking.RUN_KEY_TAG}` = 'train/diverged'")[0]
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]  # stopped after epoch 1


def test_running_out_of_memory_fails_in_one_line_naming_the_batch_size_and_width_for_a_retry(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    """TensorFlow's ResourceExhaustedError came out as a traceback naming no flag, retried unchanged."""
    import keras
    import tensorflow as tf

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]

    def out_of_memory(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,8,28,28]\nmore")

    monkeypatch.setattr(keras.Model, "fit", out_of_memory)
    with pytest.raises(train.NodeError, match=r"out of memory training batches of 64 at width 4 on the CPU \(OOM "
                                              r"when allocating tensor with shape\[64,8,28,28\]\): lower "
                                              r"--batch-size or --width"):
        train.run(_train_config(manifest, data_root, mlflow_server, "train/out-of-memory"))


@pytest.mark.parametrize(("override", "flag"), [({"dropout": 1.5}, "--dropout"), ({"learning_rate": 0.0}, "--learning-rate"),
                                                ({"batch_size": 0}, "--batch-size"), ({"width": 0}, "--width"),
                                                ({"epochs": 0}, "--epochs"), ({"seed": 2**32}, "--seed")],
                         ids=["dropout", "learning-rate", "batch-size", "width", "epochs", "seed"])
def test_impossible_hyperparameters_are_refused_before_mlflow_hears_of_the_run(override, flag, tmp_path, data_root,
                                                                             prepare, mlflow_server) -> None:
    from mlflow import MlflowClient

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=20, test=10))["manifest"]
    run_key = f"train/impossible-{flag.lstrip('-')}"  # one per case: a run one case leaves cannot fail another
    with pytest.raises(train.StepError, match=f"^{flag}"):
        train.run(_train_config(manifest, data_root, mlflow_server, run_key, **override))
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("train_tests")
    runs = MlflowClient(mlflow_server).search_runs([experiment.experiment_id],
                                                   f"tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'") \
        if experiment else []
    assert not runs


def test_a_backup_left_by_other_settings_is_discarded_and_training_starts_over(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch, caplog) -> None:
    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    with monkeypatch.context() as patch:
        _fail_after_training(patch)
        with pytest.raises(RuntimeError):
            train.run(_train_config(manifest, data_root, mlflow_server, "train/changed", width=4))

    result = train.run(_train_config(manifest, data_root, mlflow_server, "train/changed", width=8))
    assert result["resumed_from_epoch"] == 0
    assert result["settings"]["width"] == 8
    assert "discarding the epoch backup" in caplog.text
    # The run's params still say width 4 (MLflow params never change); the tag says what this model used.
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"])
    assert run.data.params["width"] == "4"
    changed = json.loads(run.data.tags["train.settings_changed"])
    assert changed["width"] == "8" and changed["parameters"] == str(result["parameters"])
    # Back to the settings the params name: the tag goes.
    train.run(_train_config(manifest, data_root, mlflow_server, "train/changed", width=4))
    assert "train.settings_changed" not in MlflowClient(mlflow_server).get_run(run.info.run_id).data.tags


def test_a_failed_training_with_other_settings_keeps_the_finished_model_until_the_new_one_is_saved(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    from mlflow import MlflowClient

    from mlsteps.core import is_complete

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    first = train.run(_train_config(manifest, data_root, mlflow_server, "train/replaced", width=4))
    model_dir = Path(first["model_path"]).parent
    with monkeypatch.context() as patch:
        _fail_after_training(patch)
        with pytest.raises(RuntimeError, match="learning curves"):
            train.run(_train_config(manifest, data_root, mlflow_server, "train/replaced", width=8))
    assert is_complete(model_dir)
    assert json.loads((model_dir / "result.json").read_text())["settings"]["width"] == 4

    # Back to the first settings: trained again, not returned as it was, since the MLflow run now records the
    # failed try (FAILED, with its settings in train.settings_changed); training brings the run back in line.
    again = train.run(_train_config(manifest, data_root, mlflow_server, "train/replaced", width=4))
    assert again["model_path"] == first["model_path"] and again["resumed_from_epoch"] == 0
    run = MlflowClient(mlflow_server).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "train.settings_changed" not in run.data.tags
    assert sorted(p.name for p in model_dir.iterdir()) == ["_COMPLETE", "model.keras", "result.json"]
    assert not [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".model")]


def _mixed_precision_on_cpu(tf, config):
    """What train._strategy does on a GPU pod, here on the CPU."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    return tf.distribute.get_strategy(), 0


def test_a_model_trained_in_mixed_precision_is_saved_in_float32_and_compress_accepts_it(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch) -> None:
    import keras

    from mlsteps import compress, data

    monkeypatch.setattr(train, "_strategy", _mixed_precision_on_cpu)
    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=64))["manifest"]
    try:
        result = train.run(_train_config(manifest, data_root, mlflow_server, "train/mixed"))
    finally:
        keras.mixed_precision.set_global_policy("float32")

    net = keras.models.load_model(result["model_path"], compile=False)
    assert {layer.dtype_policy.name for layer in net.layers} == {"float32"}
    images, _ = data.arrays(data.load_manifest(manifest), "test")
    compress.legacy_clone(net, images, result["model_path"])  # refuses a model whose rebuild predicts otherwise


def test_a_backup_made_in_another_precision_is_discarded_rather_than_resumed_without_its_optimizer(
        tmp_path, data_root, prepare, mlflow_server, monkeypatch, caplog) -> None:
    """A GPU try (mixed_float16) retried on a CPU pod (float32): the float32 model loads the backup's weights
    but skips its LossScaleOptimizer's state, so Adam and the learning-rate schedule would restart mid-way."""
    import keras

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    config = _train_config(manifest, data_root, mlflow_server, "train/precision", epochs=2)
    with monkeypatch.context() as patch:
        patch.setattr(train, "_strategy", _mixed_precision_on_cpu)
        _fail_after_training(patch)
        try:
            with pytest.raises(RuntimeError):
                train.run(config)
        finally:
            keras.mixed_precision.set_global_policy("float32")

    result = train.run(config)
    assert "discarding the epoch backup" in caplog.text
    assert result["resumed_from_epoch"] == 0  # trained again in float32, not "every epoch already done"


def test_images_per_second_counts_the_training_pass_not_the_validation(tmp_path, data_root, prepare,
                                                                         mlflow_server) -> None:
    from mlflow import MlflowClient

    prepared = prepare(idxdata.write_dataset(tmp_path / "source", train=300, test=50), val_fraction=0.5)
    result = train.run(_train_config(prepared["manifest"], data_root, mlflow_server, "train/throughput", epochs=2))
    client = MlflowClient(mlflow_server)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], key)}

    epoch, trained, rate = history("epoch_seconds"), history("train_seconds"), history("images_per_second")
    examples = json.loads(Path(prepared["manifest"]).read_text())["splits"]["train"]["count"]
    assert sorted(epoch) == sorted(trained) == sorted(rate) == [1, 2]
    for step in (1, 2):
        assert 0 < trained[step] < epoch[step]  # the validation pass comes after the training pass
        assert rate[step] == pytest.approx(examples / trained[step])


def test_register_twice_for_one_run_key_creates_one_version(tmp_path, data_root, prepare, mlflow_server) -> None:
    from mlflow import MlflowClient

    prepared = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))
    trained = train.run(train.TrainConfig(manifest=prepared["manifest"], data_root=str(data_root),
                                          run_key="register/k2", tracking_uri=mlflow_server,
                                          experiment="register_tests", epochs=1, batch_size=64, width=4))
    config = register.RegisterConfig(model_uri=trained["model_uri"], run_key="register/k2", dataset="custom",
                                     dataset_digest=prepared["digest"], metrics=json.dumps({"test_accuracy": 0.5}),
                                     float_metrics=json.dumps({"test_accuracy": 0.75, "passed": True}),
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
    assert tags["float_model.test_accuracy"] == "0.750000"
    assert "float_model.passed" not in tags, "only numbers are metrics"

    # A later run registers its version; this run's register, cleared and run again, leaves the alias there.
    later = register.run(dataclasses.replace(config, run_key="register/k3", dag_run_id="manual__2"))
    assert later["version"] == first["version"] + 1
    again = register.run(config)
    assert (again["version"], again["created"]) == (first["version"], False)
    assert int(client.get_model_version_by_alias("register_tests_model", register.CHALLENGER).version) == later["version"]

    # Two tries at once can both register (search, then register, is no transaction): the run's version is its
    # first, whichever was updated last (MLflow's default order).
    first_version = client.get_model_version("register_tests_model", str(first["version"]))
    duplicate = client.create_model_version("register_tests_model", first_version.source, run_id=first["run_id"],
                                            tags={tracking.RUN_KEY_TAG: "register/k2"},
                                            model_id=first_version.source.removeprefix("models:/"))
    client.set_model_version_tag("register_tests_model", duplicate.version, "gate.verdict", "passed")
    assert register.run(config)["version"] == first["version"]


def test_the_trained_model_is_logged_with_the_requirements_mlflow_would_infer(tmp_path, data_root, prepare,
                                                                              mlflow_server) -> None:
    """Pinned instead of inferred (MLflow loads the model in a subprocess for that, about 12 s a training): the
    list must stay what inference finds, or `mlflow models serve` of the float model installs too little."""
    import mlflow
    from mlflow.models import infer_pip_requirements

    prepared = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))
    trained = train.run(train.TrainConfig(manifest=prepared["manifest"], data_root=str(data_root),
                                          run_key="register/requirements", tracking_uri=mlflow_server,
                                          experiment="register_tests", epochs=1, batch_size=64, width=4))
    mlflow.set_tracking_uri(mlflow_server)
    folder = Path(mlflow.artifacts.download_artifacts(trained["model_uri"], dst_path=str(tmp_path / "model")))
    logged = (folder / "requirements.txt").read_text().split()
    assert logged == train.model_requirements()
    # MLflow's inference (it adds mlflow itself, and cloudpickle for the pyfunc loader when logging)
    assert set(infer_pip_requirements(str(folder), "tensorflow")) <= set(logged)


@pytest.mark.parametrize("uri", ["runs:/0123456789abcdef0123456789abcdef/model", "models:/m-0123456789abcdef"],
                         ids=["run", "logged-model"])
def test_register_refuses_a_model_mlflow_does_not_hold_and_leaves_no_empty_model(uri, mlflow_server) -> None:
    from mlflow import MlflowClient

    name = f"register_missing_{uri[:4]}"
    config = register.RegisterConfig(model_uri=uri, run_key="register/missing", dataset="custom",
                                     dataset_digest="0" * 64, model_name=name, tracking_uri=mlflow_server)
    with pytest.raises(register.StepError, match=f"--model-uri {re.escape(uri)}: MLflow has no "):
        register.run(config)
    assert not MlflowClient(mlflow_server).search_registered_models(f"name = '{name}'")


@pytest.mark.parametrize("flag", ["metrics", "float_metrics"])
def test_register_rejects_metrics_that_are_not_json(flag, mlflow_server) -> None:
    config = register.RegisterConfig(model_uri="models:/unused", run_key="register/bad", dataset="custom",
                                     dataset_digest="0" * 64, tracking_uri=mlflow_server, **{flag: "accuracy=0.9"})
    option = "--" + flag.replace("_", "-")
    with pytest.raises(register.StepError, match=f"{option} must be a JSON object"):
        register.run(config)


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "my alias", ""],
                         ids=["latest", "latest-capitalised", "version-like", "space", "empty"])
def test_register_refuses_an_alias_mlflow_would_refuse_before_registering_anything(alias, mlflow_server) -> None:
    from mlflow import MlflowClient

    config = register.RegisterConfig(model_uri="models:/unused", run_key="register/alias", dataset="custom",
                                     dataset_digest="0" * 64, model_name="register_alias_model", alias=alias,
                                     tracking_uri=mlflow_server)
    with pytest.raises(register.StepError, match="--alias"):
        register.run(config)
    assert MlflowClient(mlflow_server).search_model_versions("name = 'register_alias_model'") == []


@pytest.mark.parametrize("name", ["team/model", "team:model", " "], ids=["slash", "colon", "blank"])
def test_register_refuses_a_model_name_mlflow_would_refuse_before_calling_it(name) -> None:
    config = register.RegisterConfig(model_uri="models:/unused", run_key="register/name", dataset="custom",
                                     dataset_digest="0" * 64, model_name=name, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(register.StepError, match="--model-name .*use letters, digits"):
        register.run(config)


@pytest.mark.parametrize(("n_train", "n_val", "batch", "replicas", "expected"), [
    (54000, 6000, 128, 1, (422, 512)),  # one device: every example, partial last batches included
    (54000, 6000, 128, 2, (421, 512)),  # 6000 % 512 = 368: the last validation batch reaches both replicas
    (54000, 6000, 129, 3, (418, 513)),  # 512 is no multiple of 3
    (99, 11, 12, 3, (8, 6)),  # 11 validation images: batches of 6 and 5 (9 + 2 would leave a replica none)
    (80, 9, 8, 2, (10, 6)),  # 9: an odd first batch cannot split evenly; 8 + 1 would leave a replica none
], ids=["one-device", "two-gpus", "three-gpus", "small-validation-split", "odd-validation-split"])
def test_batches_split_evenly_over_the_gpus_and_every_validation_image_is_scored(n_train, n_val, batch, replicas,
                                                                                expected):
    steps, val_batch = train.replica_batches(n_train, n_val, batch, replicas)
    assert (steps, val_batch) == expected
    if replicas > 1:  # every replica gets part of every batch (a partial one goes out in slices of ceil(k / n))
        first, last = min(val_batch, n_val), n_val % val_batch
        assert first % replicas == 0 and (last == 0 or (replicas - 1) * -(-last // replicas) < last)


@pytest.mark.parametrize(("n_train", "n_val", "batch", "replicas", "words"), [
    (54000, 6000, 128, 3, r"--batch-size 128 does not split evenly over 3 GPUs: use a multiple of 3 \(126 or 129\)"),
    (50, 10, 64, 2, "--batch-size 64 is more than the 50 training examples"),
    (100, 1, 8, 2, "the validation split's 1 examples cannot be batched so that each of 2 GPUs"),
    (90, 10, 12, 3, "the validation split's 10 examples cannot be batched so that each of 3 GPUs"),
], ids=["uneven-batch", "batch-above-the-data", "validation-smaller-than-the-gpus", "validation-of-10-on-3"])
def test_batches_that_cannot_split_over_the_gpus_are_refused_naming_the_fix(n_train, n_val, batch, replicas, words):
    with pytest.raises(train.StepError, match=words):
        train.replica_batches(n_train, n_val, batch, replicas)


def test_training_on_three_replicas_with_uneven_splits_saves_a_model_that_predicts_any_batch(
        tmp_path, data_root, prepare, mlflow_server) -> None:
    """MirroredStrategy over 3 logical CPU devices stands in for 3 GPUs (Keras splits batches the same way): 180
    training images in batches of 21 leave 12, and 20 validation images do not divide by 3; before, training
    failed on both, and the saved model's 2-image predict failed on 3 replicas. Batch normalization is over
    the global batch of 21, not each replica's 7."""
    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=20))["manifest"]
    counts = json.loads(Path(manifest).read_text())["splits"]
    assert (counts["train"]["count"], counts["val"]["count"]) == (180, 20)
    assert train.replica_batches(180, 20, 21, 3) == (8, 15)  # validation in batches of 15 and 5
    config = {"manifest": manifest, "data_root": str(data_root), "run_key": "train/three-replicas",
              "tracking_uri": mlflow_server, "experiment": "train_tests", "epochs": 1, "batch_size": 21,
              "width": 4, "mixed_precision": False}
    script = ("import json, sys\n"
              "import tensorflow as tf\n"
              "cpu = tf.config.list_physical_devices('CPU')[0]\n"
              "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)\n"
              "from mlsteps import model, train\n"
              "train._strategy = lambda tf_, config: (tf.distribute.MirroredStrategy(\n"
              "    [f'/cpu:{i}' for i in range(3)]), 3)\n"
              "built = []\n"
              "compiled = model.compiled\n"
              "model.compiled = lambda **kw: built.append(compiled(**kw)) or built[-1]\n"
              "result = train.run(train.TrainConfig(**json.loads(sys.argv[1])))\n"
              "print('RESULT', json.dumps(result['metrics']))\n"
              "# Each replica's moving statistics of each batch normalization, as the trained model kept them\n"
              "stats = [[[float(t.numpy().sum()) for t in v.value.values] for v in (layer.moving_mean,\n"
              "          layer.moving_variance)] for layer in built[0].layers if 'batch_normalization' in layer.name]\n"
              "print('STATS', json.dumps(stats))\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True,
                         env=step_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    metrics = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert 0 <= metrics["val_accuracy"] <= 1
    # Normalized over the global batch: every replica holds the same moving statistics (each its own before,
    # from its slice of 7 images, and the saved model kept replica 0's).
    stats = json.loads(out.stdout.split("STATS ", 1)[1].splitlines()[0])
    assert len(stats) == 3 and all(len(set(per_replica)) == 1 and len(per_replica) == 3
                                   for layer in stats for per_replica in layer), stats
    import keras
    import numpy as np

    model = keras.models.load_model(tracking.run_dir(str(data_root), "train/three-replicas") / "model" / "model.keras")
    assert model.predict(np.zeros((2, 28, 28), np.float32), verbose=0).shape == (2, 10)


def test_a_damaged_finished_model_is_trained_again_not_returned_as_already_trained(
        tmp_path, data_root, prepare, mlflow_server, caplog) -> None:
    """evaluate refuses a damaged model.keras and says "run the train step again": that must then work."""
    import keras

    manifest = prepare(idxdata.write_dataset(tmp_path / "source", train=200, test=50))["manifest"]
    config = _train_config(manifest, data_root, mlflow_server, "train/damaged-model")
    first = train.run(config)
    model_path = Path(first["model_path"])
    model_path.write_bytes(model_path.read_bytes()[:1000])  # what a crash or a disk error can leave

    again = train.run(config)
    assert "is damaged" in caplog.text and "training again" in caplog.text
    assert again["resumed_from_epoch"] == 0 and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert keras.models.load_model(again["model_path"], compile=False).output_shape == (None, 10)


def _epoch_files(folder: Path, epoch: int, suffix: str = "") -> None:
    """Keras's backup of ``epoch``: weights (a real HDF5 file) and the epoch record, or their second copy."""
    import h5py
    import numpy as np

    with h5py.File(folder / f"latest.weights.h5{suffix}", "w") as weights:
        weights["epoch"] = np.full(4, epoch)
    (folder / f"training_metadata.json{suffix}").write_text(json.dumps({"epoch": epoch, "batch": 0}))


def test_first_epoch_weights_left_half_written_discard_the_backup_instead_of_failing_every_retry(tmp_path, caplog):
    """Keras falls back to its second copy only if there is one: a pod killed while writing the first epoch's
    weights left a file every retry failed on (OSError: truncated file)."""
    backup = tmp_path / "backup"
    settings = {"epochs": 3, "width": 4}
    train._backup_for(backup, settings)
    _epoch_files(backup, 1)
    weights = backup / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])

    train._backup_for(backup, settings)
    assert "discarding the epoch backup" in caplog.text and "no whole copy of the epoch before it" in caplog.text
    assert sorted(p.name for p in backup.iterdir()) == ["settings.json"]


def test_a_half_written_epoch_record_resumes_from_the_whole_copy_of_the_epoch_before(tmp_path, caplog):
    """Discarded whole, the backup lost every epoch although Keras's copy of the one before was intact."""
    import h5py

    backup = tmp_path / "backup"
    settings = {"epochs": 3, "width": 4}
    train._backup_for(backup, settings)
    _epoch_files(backup, 2, ".bkp")
    _epoch_files(backup, 3)
    (backup / "training_metadata.json").write_text('{"epo')  # killed while writing epoch 3's record

    train._backup_for(backup, settings)
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    with h5py.File(backup / "latest.weights.h5", "r") as weights:
        assert list(weights["epoch"][:]) == [2] * 4
    assert "resuming from the copy of the epoch before it" in caplog.text


def test_weights_written_without_their_epoch_record_resume_from_the_copy_of_that_epoch(tmp_path):
    """Killed after epoch 3's weights were written and before its record: weights of epoch 3 and a record saying
    2 both load, and Keras would train epoch 3 again on top of itself (its learning-rate schedule ahead)."""
    import h5py
    import numpy as np

    backup = tmp_path / "backup"
    settings = {"epochs": 4, "width": 4}
    train._backup_for(backup, settings)
    _epoch_files(backup, 2, ".bkp")
    _epoch_files(backup, 2)
    (backup / "latest.weights.h5").unlink()
    with h5py.File(backup / "latest.weights.h5", "w") as weights:
        weights["epoch"] = np.full(4, 3)

    train._backup_for(backup, settings)
    with h5py.File(backup / "latest.weights.h5", "r") as weights:
        assert list(weights["epoch"][:]) == [2] * 4
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2


def test_a_second_copy_left_half_written_is_dropped_and_the_latest_epoch_kept(tmp_path):
    backup = tmp_path / "backup"
    settings = {"epochs": 3, "width": 4}
    train._backup_for(backup, settings)
    _epoch_files(backup, 2, ".bkp")
    _epoch_files(backup, 3)
    (backup / "training_metadata.json.bkp").write_text("")  # killed while Keras copied it

    train._backup_for(backup, settings)
    assert sorted(p.name for p in backup.iterdir()) == ["latest.weights.h5", "settings.json",
                                                        "training_metadata.json"]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 3


def test_an_epoch_record_left_half_written_discards_the_backup_instead_of_failing_every_retry(tmp_path, caplog):
    """Keras rewrites training_metadata.json in place each epoch and falls back to its copy only on OSError:
    a pod killed while writing it left a file every retry failed on with a JSONDecodeError."""
    backup = tmp_path / "backup"
    settings = {"epochs": 3, "width": 4}
    train._backup_for(backup, settings)
    (backup / "training_metadata.json").write_text("")
    (backup / "latest.weights.h5").write_bytes(b"weights")

    train._backup_for(backup, settings)
    assert "discarding the epoch backup" in caplog.text and "JSONDecodeError" in caplog.text
    assert sorted(p.name for p in backup.iterdir()) == ["settings.json"]


def test_a_resumed_training_shuffles_its_first_epoch_unlike_epoch_one(tmp_path, data_root, prepare):
    """tf.data counts reshuffles from the process start: a try resumed after epoch 2 trained epoch 3 in epoch 1's
    order (a pod killed every epoch: every epoch in one order)."""
    import numpy as np

    from mlsteps import data

    manifest = data.load_manifest(prepare(idxdata.write_dataset(tmp_path / "source", train=300, test=50))["manifest"])
    backup = tmp_path / "backup"
    train._backup_for(backup, {"epochs": 4, "width": 4})

    def first_epoch_labels(seed: int) -> list[int]:
        ds = data.dataset(manifest, "train", batch_size=300, shuffle=True, seed=seed)
        return np.concatenate([labels.numpy() for _, labels in ds]).tolist()

    started = train.shuffle_seed(42, backup)
    _epoch_files(backup, 2)
    resumed = train.shuffle_seed(42, backup)
    assert started == 42, "a first try shuffles with the seed it was given"
    assert first_epoch_labels(resumed) != first_epoch_labels(started)
    _epoch_files(backup, 3)
    assert train.shuffle_seed(42, backup) not in (started, resumed), "each resumed epoch in its own order"
