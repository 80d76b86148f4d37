"""compress: real pruning, quantization and LiteRT on a small trained model; the gate; the registry round trip.

One model is trained once for the module (real Fashion-MNIST images when Debian's package is installed,
else the synthetic set), compressed with the step's CLI, registered, and served by `mlflow models serve`.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import idxdata
from mlsteps import compress, data, prep, register, tracking
from stepsupport import free_port, partial_leftovers, step_env

FASHION = Path("/usr/share/datasets/fashion-mnist")
MODEL_NAME = "compress_test_model"


def _source(folder: Path) -> Path:
    """3,000 training and 2,000 test images of Fashion-MNIST (synthetic squares where it is not installed)."""
    if not (FASHION / idxdata.NAMES["train_images"]).is_file():
        return idxdata.write_dataset(folder, train=3000, test=2000)
    from mlsteps import idx

    folder.mkdir(parents=True)
    for split, n in (("train", 3000), ("test", 2000)):
        for role, ndim in ((f"{split}_images", 3), (f"{split}_labels", 1)):
            path = FASHION / idxdata.NAMES[role]
            array = idx.parse(path, idx.decompress(path, path.read_bytes()), expect_ndim=ndim)[:n]
            payload = idxdata.idx_bytes(array.shape, array.astype(np.uint8).tobytes())
            (folder / idxdata.NAMES[role]).write_bytes(gzip.compress(payload, mtime=0))
    return folder


def _step(module: str, *args: str, result: Path, tracking_uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"mlsteps.{module}", *args, "--tracking-uri", tracking_uri,
                           "--result-path", str(result)], capture_output=True, text=True, env=step_env(),
                          timeout=600)


def _ok(out: subprocess.CompletedProcess[str], result: Path) -> dict[str, Any]:
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    """A prepared dataset and a model trained on it by the train step."""
    work = tmp_path_factory.mktemp("compress")
    data_root = work / "data"
    prepared = prep.run(prep.PrepConfig(data_root=str(data_root), dataset="custom",
                                        source_dir=str(_source(work / "source"))))
    common = ["--manifest", prepared["manifest"], "--data-root", str(data_root), "--run-key", "compress/base"]
    train = _ok(_step("train", *common, "--epochs", "3", "--batch-size", "64", result=work / "train.json",
                      tracking_uri=mlflow_server), work / "train.json")
    return {"work": work, "data_root": data_root, "manifest": prepared["manifest"], "prepared": prepared,
            "train": train, "common": common}


def _training_run(url: str, run_key: str) -> str:
    """The MLflow run validate and train make for a pipeline run: compress adds to it."""
    import mlflow

    mlflow.set_tracking_uri(url)
    return tracking.run_for(mlflow, run_key, experiment="mnist_training")


FAST = ["--finetune-epochs", "1", "--latency-runs", "50", "--representative-examples", "200"]


@pytest.fixture(scope="module")
def compressed(trained: dict[str, Any], mlflow_server: str) -> dict[str, Any]:
    """The step run as the DAG runs it (post-training, default threshold), pruning to 50 %."""
    result = trained["work"] / "compress.json"
    out = _step("compress", *trained["common"], "--model-path", trained["train"]["model_path"],
                "--sparsity", "0.5", *FAST, result=result, tracking_uri=mlflow_server)
    return {**_ok(out, result), "log": out.stdout + out.stderr}


@pytest.fixture(scope="module")
def registered(trained: dict[str, Any], compressed: dict[str, Any], mlflow_server: str) -> dict[str, Any]:
    prepared = trained["prepared"]
    return register.run(register.RegisterConfig(
        model_uri=compressed["model_uri"], run_key="compress/base", dataset="custom",
        dataset_digest=prepared["digest"], tags=json.dumps(compressed["tags"]), model_name=MODEL_NAME,
        float_model_uri=trained["train"]["model_uri"], tracking_uri=mlflow_server))


def _test_images(trained: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.arrays(data.load_manifest(trained["manifest"]), "test")
    return images.astype(np.float32), labels


def _litert_classes(tflite: str, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=tflite)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).argmax(axis=1)


def test_int8_is_3_5x_smaller_than_float_tflite_and_within_the_accuracy_threshold(trained, compressed):
    report = json.loads(Path(compressed["report"]).read_text())
    variants, reference = report["variants"], report["float_keras"]["accuracy"]
    assert set(variants) == {"float", "float16", "dynamic", "int8", "pruned_int8"}
    assert variants["float"]["size_bytes"] / variants["int8"]["size_bytes"] >= 3.5
    assert 100 * (reference - variants["int8"]["accuracy"]) <= 0.3
    assert reference > 0.6, "the model learned something, so the comparison means something"
    # Float TFLite is the same network as the Keras model.
    assert variants["float"]["accuracy"] == pytest.approx(reference, abs=0.002)
    # Pruning reached its target, and only the pruned model is that sparse.
    assert variants["pruned_int8"]["sparsity"] >= 0.49
    assert variants["int8"]["sparsity"] < 0.1
    for name, v in variants.items():
        assert Path(compressed["report"]).with_name(f"{name}.tflite").stat().st_size == v["size_bytes"]
        assert v["latency_p50_ms"] > 0 and v["latency_p99_ms"] >= v["latency_p50_ms"] and v["throughput_per_s"] > 0
    # Full-integer: every tensor between the float32 input and output is int8 (int32 for biases), weights
    # and activations alike; dynamic-range quantization, also ~3.7x smaller, would leave float activations.
    from ai_edge_litert.interpreter import Interpreter

    for name in ("int8", "pruned_int8"):
        interpreter = Interpreter(model_path=str(Path(compressed["report"]).with_name(f"{name}.tflite")))
        ends = {interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]}
        inner = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details() if t["index"] not in ends}
        assert inner <= {"int8", "int32"}, (name, inner)
        assert [np.dtype(interpreter.get_input_details()[0]["dtype"]).name,
                np.dtype(interpreter.get_output_details()[0]["dtype"]).name] == ["float32", "float32"]


def test_gate_choice_and_its_record_in_the_mlflow_run(compressed, mlflow_server):
    import mlflow

    report = json.loads(Path(compressed["report"]).read_text())
    variants = report["variants"]
    chosen = compressed["variant"]
    # The step applied the gate to what it measured, with the default threshold and tolerance.
    # Chosen on the validation split; the test split only reports.
    assert (chosen, compressed["reason"]) == compress.choose(
        variants, reference_accuracy=report["float_keras"]["val_accuracy"], max_drop_points=0.3,
        latency_tolerance=0.1, metric="val_accuracy")
    assert "on validation" in compressed["reason"]
    assert report["val_accuracy_drop_points"] == pytest.approx(
        100 * (report["float_keras"]["val_accuracy"] - variants[chosen]["val_accuracy"]))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(compressed["mlflow_run_id"])
    assert run.data.tags["compression.variant"] == chosen
    assert run.data.tags["compression.reason"] == compressed["reason"]
    assert run.data.metrics["compression.int8.size_bytes"] == variants["int8"]["size_bytes"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "compression")}
    assert {"compression/variants.json", "compression/tradeoff.png", "compression/report.json"} <= artifacts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "compression/variants")}
    assert logged == {f"compression/variants/{name}.tflite" for name in variants}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "compression/variants.json")).read_text())
    assert {"variant", "accuracy", "accuracy_drop_points", "size_bytes", "gzip_bytes", "latency_p50_ms",
            "latency_p99_ms", "throughput_per_s", "sparsity", "chosen"} <= set(table["columns"])
    assert sorted(row[table["columns"].index("variant")] for row in table["data"]) == sorted(variants)


def test_registered_version_carries_the_compressed_model_and_its_tags(trained, compressed, registered,
                                                                      mlflow_server):
    import mlflow

    version = mlflow.MlflowClient(mlflow_server).get_model_version(MODEL_NAME, str(registered["version"]))
    assert version.tags["compression.variant"] == compressed["variant"]
    assert float(version.tags["compression.accuracy_drop_points"]) == pytest.approx(
        compressed["accuracy_drop_points"], abs=1e-3)
    assert int(version.tags["compression.size_bytes"]) == compressed["size_bytes"]
    assert version.tags["float_model_uri"] == trained["train"]["model_uri"]
    report = json.loads(Path(compressed["report"]).read_text())
    assert float(version.tags["compression.sparsity"]) == pytest.approx(
        report["variants"][compressed["variant"]]["sparsity"], abs=1e-4)  # counted in the served .tflite
    assert float(version.tags["compression.val_accuracy"]) == pytest.approx(
        report["variants"][compressed["variant"]]["val_accuracy"], abs=1e-6)


def test_pyfunc_of_the_registered_version_predicts_the_same_classes_as_litert(trained, compressed, registered,
                                                                            mlflow_server):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    images, labels = _test_images(trained)
    model = mlflow.pyfunc.load_model(registered["model_uri"])
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)  # even from an int8 softmax
    expected = _litert_classes(compressed["tflite_path"], images)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected)
    assert np.mean(expected == labels) == pytest.approx(compressed["accuracy"], abs=1e-9)


def test_registering_a_changed_model_for_the_same_run_is_refused(trained, registered, mlflow_server):
    prepared = trained["prepared"]
    config = register.RegisterConfig(model_uri=trained["train"]["model_uri"], run_key="compress/base",
                                     dataset="custom", dataset_digest=prepared["digest"], model_name=MODEL_NAME,
                                     tracking_uri=mlflow_server)
    with pytest.raises(register.StepError, match="the model changed after registration"):
        register.run(config)


def test_mlflow_models_serve_runs_the_compressed_model(trained, compressed, registered, mlflow_server, tmp_path):
    images, _ = _test_images(trained)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", registered["model_uri"],
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            # as in an activated environment: the server execs `uvicorn` from PATH
            env=step_env(MLFLOW_TRACKING_URI=mlflow_server, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
            stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        body = json.dumps({"inputs": images[:16].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.asarray(json.load(response)["predictions"])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    np.testing.assert_array_equal(predictions.argmax(axis=1), _litert_classes(compressed["tflite_path"], images[:16]))


def test_impossible_threshold_keeps_float_and_records_the_reason(trained, mlflow_server):
    import mlflow

    result_path = trained["work"] / "impossible.json"
    _training_run(mlflow_server, "compress/impossible")
    args = [a if a != "compress/base" else "compress/impossible" for a in trained["common"]]
    out = _step("compress", *args, "--model-path", trained["train"]["model_path"], "--sparsity", "0",
                "--max-accuracy-drop", "-100", *FAST, result=result_path, tracking_uri=mlflow_server)
    result = _ok(out, result_path)
    assert result["variant"] == "float"
    assert result["reason"].startswith("no variant passed the gate")
    assert "int8 loses" in result["reason"] and "max -100" in result["reason"]
    assert Path(result["tflite_path"]).name == "float.tflite"
    assert result["tags"]["compression.variant"] == "float"
    run = mlflow.MlflowClient(mlflow_server).get_run(result["mlflow_run_id"])
    assert run.data.tags["compression.variant"] == "float"
    assert run.data.tags["compression.reason"] == result["reason"]


def test_rerun_with_the_same_settings_reuses_the_variants_and_the_logged_model(trained, compressed, mlflow_server):
    import mlflow

    result_path = trained["work"] / "again.json"
    # As after a crash between logging the model and recording it: the retry logs again and must find it.
    (Path(compressed["report"]).parent / "logged.json").unlink()
    out = _step("compress", *trained["common"], "--model-path", trained["train"]["model_path"],
                "--sparsity", "0.5", *FAST, result=result_path, tracking_uri=mlflow_server)
    again = _ok(out, result_path)
    assert again["model_uri"] == compressed["model_uri"]
    assert again["variants"] == compressed["variants"]
    assert "already built with these settings" in out.stdout and "already logged as" in out.stdout
    client = mlflow.MlflowClient(mlflow_server)
    table = json.loads(Path(client.download_artifacts(again["mlflow_run_id"], "compression/variants.json")).read_text())
    assert len(table["data"]) == len(compressed["variants"]), "the table is replaced, not appended to"
    assert [len(client.get_metric_history(again["mlflow_run_id"], f"compression.{name}.accuracy"))
            for name in compressed["variants"]] == [1] * len(compressed["variants"]), "a retry adds no points"
    tagged = json.loads(client.get_run(again["mlflow_run_id"]).data.tags["mlflow.loggedArtifacts"])
    assert tagged == [{"path": "compression/variants.json", "type": "table"}]


def test_quantization_aware_option_keeps_the_pruned_zeros_and_the_accuracy(trained, mlflow_server):
    result_path = trained["work"] / "qat.json"
    _training_run(mlflow_server, "compress/qat")
    args = [a if a != "compress/base" else "compress/qat" for a in trained["common"]]
    out = _step("compress", *args, "--model-path", trained["train"]["model_path"], "--sparsity", "0.5",
                "--method", "quantization_aware", "--train-examples", "1000", *FAST, result=result_path,
                tracking_uri=mlflow_server)
    result = _ok(out, result_path)
    report = json.loads(Path(result["report"]).read_text())
    qat = report["variants"]["pruned_qat_int8"]
    assert "pruned_int8" not in report["variants"]
    assert qat["sparsity"] >= 0.49, "pruning-preserving QAT keeps the zeros"
    assert report["variants"]["float"]["size_bytes"] / qat["size_bytes"] >= 3.5
    # What LiteRT measures on the test split, not the Keras QAT model: the conversion must keep it working.
    assert qat["accuracy"] >= report["variants"]["float"]["accuracy"] - 0.1, (qat, report["variants"]["float"])
    assert "quantization-aware training" in out.stdout


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_missing_or_corrupt_model_fails_clearly_and_writes_nothing(trained, mlflow_server, tmp_path, damage):
    import mlflow

    model = tmp_path / "model.keras"
    if damage == "garbage":
        model.write_bytes(b"this is not a keras model\n" * 100)
    elif damage == "truncated":
        original = Path(trained["train"]["model_path"]).read_bytes()
        model.write_bytes(original[: len(original) // 2])
    run_key = f"compress/broken-{damage}"
    args = [a if a != "compress/base" else run_key for a in trained["common"]]
    out = _step("compress", *args, "--model-path", str(model), *FAST, result=tmp_path / "result.json",
                tracking_uri=mlflow_server)
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {model}: ")
    assert ("not found" if damage == "missing" else "cannot load the trained model") in error
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "result.json").exists()
    run_dir = tracking.run_dir(str(trained["data_root"]), run_key)
    assert not (run_dir / "compression").exists()
    assert partial_leftovers(trained["data_root"]) == []
    assert not mlflow.MlflowClient(mlflow_server).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(mlflow_server).search_experiments()],
        filter_string=f"tags.`pipeline.run_key` = '{run_key}'")


def test_a_run_key_without_a_training_run_is_refused_before_any_work(trained, mlflow_server, tmp_path):
    """Under a mistyped key the variants went, after the whole build, to a new MLflow run of their own."""
    import mlflow

    run_key = "compress/never-trained"
    args = [a if a != "compress/base" else run_key for a in trained["common"]]
    out = _step("compress", *args, "--model-path", trained["train"]["model_path"], *FAST,
                result=tmp_path / "result.json", tracking_uri=mlflow_server)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"no MLflow run for run key '{run_key}'" in out.stderr and "check --run-key" in out.stderr
    assert "float Keras model" not in out.stdout + out.stderr, "refused before building anything"
    assert not (tracking.run_dir(str(trained["data_root"]), run_key) / "compression").exists()
    client = mlflow.MlflowClient(mlflow_server)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`pipeline.run_key` = '{run_key}'")


def _variant(accuracy: float, gz: int, latency: float, size: int = 100_000) -> dict[str, float]:
    return {"accuracy": accuracy, "gzip_bytes": gz, "size_bytes": size, "latency_p50_ms": latency}


@pytest.mark.parametrize(("variants", "expected", "why"), [
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.899, 90, 0.5), "pruned_int8": _variant(0.898, 30, 0.5)},
     "pruned_int8", "smallest of 2"),
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.899, 90, 0.5), "pruned_int8": _variant(0.89, 30, 0.5)},
     "int8", "smallest of 1"),
    ({"float": _variant(0.90, 300, 1.0), "float16": _variant(0.90, 150, 1.5)}, "float",
     "float16 is slower than float"),
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.85, 90, 0.5)}, "float", "int8 loses 5.00 pt"),
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.90, 90, 1.1)}, "int8", "smallest of 1"),
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.90, 90, 1.11)}, "float", "int8 is slower"),
    ({"float": _variant(0.90, 300, 1.0), "int8": _variant(0.91, 90, 0.5)}, "int8", "accuracy +1.00 pt"),
], ids=["smallest-passing-wins", "too-inaccurate-is-skipped", "slower-is-refused", "none-passes-keeps-float",
        "at-the-latency-tolerance-passes", "past-the-latency-tolerance-fails", "gain-passes"])
def test_gate_picks_the_smallest_variant_within_the_drop_and_no_slower_than_float(variants, expected, why):
    chosen, reason = compress.choose(variants, reference_accuracy=0.90, max_drop_points=0.3, latency_tolerance=0.1)
    assert chosen == expected
    assert why in reason


def test_the_gate_judges_the_validation_accuracy_it_is_given_not_the_test_accuracy():
    variants = {"float": {**_variant(0.90, 300, 1.0), "val_accuracy": 0.92},
                "int8": {**_variant(0.90, 90, 0.5), "val_accuracy": 0.91},  # fine on test, 1 pt down on val
                "dynamic": {**_variant(0.85, 100, 0.5), "val_accuracy": 0.919}}  # the other way round
    chosen, reason = compress.choose(variants, reference_accuracy=0.92, max_drop_points=0.3, latency_tolerance=0.1,
                                     metric="val_accuracy")
    assert chosen == "dynamic" and "on validation" in reason


def test_the_gate_gives_the_same_choice_and_words_whatever_order_the_variants_come_in():
    # The step decides on its variants in build order; report.json stores them with sorted keys, and readers
    # (the test below, a reviewer) re-apply the gate to the report. Ties and refusals must not depend on order.
    variants = {"float": _variant(0.90, 300, 1.0), "float16": _variant(0.90, 150, 1.5),
                "dynamic": _variant(0.90, 90, 1.3), "int8": _variant(0.80, 90, 0.5),
                "pruned_int8": _variant(0.90, 40, 1.05), "pruned_dynamic": _variant(0.90, 40, 1.05)}
    results = {compress.choose(dict(order), reference_accuracy=0.90, max_drop_points=0.3, latency_tolerance=0.1)
               for order in (list(variants.items()), sorted(variants.items()), list(reversed(variants.items())))}
    assert len(results) == 1
    no_winner = {k: v for k, v in variants.items() if not k.startswith("pruned")}
    reasons = {compress.choose(dict(order), reference_accuracy=0.90, max_drop_points=0.3, latency_tolerance=0.1)
               for order in (list(no_winner.items()), sorted(no_winner.items()))}
    assert len(reasons) == 1 and next(iter(reasons))[0] == "float"


def test_register_refuses_tags_that_are_not_a_json_object(mlflow_server):
    config = register.RegisterConfig(model_uri="models:/m-x", run_key="k", dataset="d", dataset_digest="0" * 64,
                                     tags="[1, 2]", tracking_uri=mlflow_server)
    with pytest.raises(register.StepError, match="--tags must be a JSON object"):
        register.run(config)


def test_negative_threshold_demands_a_gain():
    variants = {"float": _variant(0.90, 300, 1.0), "int8": _variant(0.902, 90, 0.5), "dynamic": _variant(0.91, 80, 0.5)}
    chosen, _ = compress.choose(variants, reference_accuracy=0.90, max_drop_points=-0.5, latency_tolerance=0.1)
    assert chosen == "dynamic"  # +1.0 pt passes; int8's +0.2 pt does not
    chosen, reason = compress.choose(variants, reference_accuracy=0.90, max_drop_points=-2, latency_tolerance=0.1)
    assert chosen == "float" and "dynamic loses -1.00 pt (max -2)" in reason


@pytest.mark.parametrize(("settings", "words"), [
    ({"method": "qat"}, "--method must be one of post_training, quantization_aware, got 'qat'"),
    ({"sparsity": 1.0}, r"--sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"--sparsity must be in \[0, 1\), got -0.1"),
    ({"finetune_epochs": 0}, "--finetune-epochs must be >= 1 with --sparsity > 0"),
    ({"sparsity": 0.0, "method": "quantization_aware", "finetune_epochs": 0}, "--finetune-epochs must be >= 1"),
    ({"max_accuracy_drop": 300}, r"--max-accuracy-drop is in percentage points \(-100..100\), got 300"),
    ({"threads": 0}, "--threads must be >= 1, got 0"),
    ({"latency_runs": 0}, "--latency-runs must be >= 1, got 0"),
    ({"representative_examples": 0}, "--representative-examples must be >= 1, got 0"),
    ({"seed": -1}, "--seed must be a whole number from 0 to 4294967295"),
    # -1 would refuse every variant as slower than float ("int8 is slower than float (0.026 vs 0.074 ms)")
    ({"latency_tolerance": -1.0}, "--latency-tolerance is a fraction of float TFLite's latency, 0 or more"),
    ({"latency_tolerance": float("nan")}, "--latency-tolerance is a fraction"),
    ({"finetune_learning_rate": 0.0}, "--finetune-learning-rate must be a number > 0, got 0.0"),
    ({"finetune_learning_rate": float("inf")}, "--finetune-learning-rate must be a number > 0, got inf"),
    ({"train_examples": -5}, r"--train-examples must be >= 0 \(0: all\), got -5"),
], ids=["unknown-method", "sparsity-one", "sparsity-negative", "no-finetuning-to-prune", "no-finetuning-for-qat",
        "drop-past-100", "no-threads", "no-latency-runs", "no-calibration-images", "negative-seed",
        "latency-tolerance-negative", "latency-tolerance-nan", "learning-rate-zero", "learning-rate-infinite",
        "train-examples-negative"])
def test_impossible_settings_are_refused_by_flag_before_any_work(tmp_path, settings, words):
    """The manifest does not exist: a check that let the settings through would fail on it instead."""
    config = compress.CompressConfig(manifest=str(tmp_path / "missing" / "manifest.json"), data_root=str(tmp_path),
                                     run_key="compress/bad-settings", model_path=str(tmp_path / "model.keras"),
                                     tracking_uri="http://127.0.0.1:9", **settings)
    with pytest.raises(compress.StepError, match=words):
        compress.run(config)
    assert list(tmp_path.iterdir()) == []
