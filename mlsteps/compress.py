"""compress: prune, quantize and convert the trained model to TFLite; measure every variant; keep the best.

Variants: float32 TFLite (the reference), float16 and dynamic-range quantization, full-integer int8
post-training quantization (representative dataset from the training split), and magnitude pruning
to ``--sparsity`` with fine-tuning followed by int8 quantization (post-training, or pruning-preserving
quantization-aware training with ``--method quantization_aware``). Each is run with the LiteRT
interpreter: accuracy on the validation and test splits, size raw and gzipped, batch-1 latency, batched
throughput.

Gate: the smallest variant (gzipped) whose validation accuracy is at most ``--max-accuracy-drop`` points
below the float Keras model's and whose batch-1 latency is no worse than float TFLite's wins (the test split
only reports: it did not choose); if none passes, the float
TFLite model is kept and the reason is recorded. The winner is logged to the training run as an MLflow
pyfunc model (``compressed_model``, LiteRT inside) that ``register`` turns into the model version.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, tracking
from . import model as model_lib
from .core import StepError, atomic_directory, cli, field, is_complete, seed_error, write_json_atomic
from .model import ModelLoadError

log = logging.getLogger("mlsteps.compress")

METHODS = ("post_training", "quantization_aware")
FLOAT = "float"
PYFUNC_NAME = "compressed_model"
REPORT_TAG = "compression.report_sha256"  # on the logged model: which report.json it was logged from


class EmptySplitError(StepError):
    """A split compression needs is empty (train: calibration and fine-tuning; val: the gate; test: the report)."""
MIN_PRUNED_KERNEL = 1024  # weights; smaller conv/dense kernels are left dense
# Pins written into the logged pyfunc model's requirements (what `mlflow models serve` installs).
LITERT_REQUIREMENT = "ai-edge-litert==2.3.0"


@dataclass(frozen=True, kw_only=True)
class CompressConfig(tracking.RunStepConfig):
    model_path: str = field(help="the trained Keras model (model.keras) written by train")
    sparsity: float = field(0.82, help="fraction of conv/dense weights pruned to zero (kernels under "
                                       f"{MIN_PRUNED_KERNEL} weights stay dense; 0: no pruned variant)")
    method: str = field("post_training", help="int8 for the pruned model: post_training or quantization_aware")
    max_accuracy_drop: float = field(0.3, help="largest accepted validation-accuracy drop, in percentage points, "
                                               "against the float Keras model (negative: demand a gain)")
    latency_tolerance: float = field(0.1, help="a variant may be this fraction slower than float TFLite at "
                                               "batch 1 and still count as no worse (timer noise)")
    finetune_epochs: int = field(5, help="epochs of fine-tuning while pruning (and of QAT)")
    finetune_learning_rate: float = field(1e-3, help="peak Adam learning rate of the fine-tuning while pruning "
                                                     "(cosine decay to 0); QAT uses a tenth of it, constant")
    batch_size: int = field(128, help="fine-tuning batch size")
    train_examples: int = field(0, help="fine-tune on the first N training examples (0: all)")
    representative_examples: int = field(500, help="training images used to calibrate int8 ranges")
    threads: int = field(2, help="CPU threads of the LiteRT interpreter when measuring latency and throughput")
    latency_runs: int = field(300, help="timed batch-1 inferences per variant")
    throughput_batch: int = field(256, help="batch size of the throughput measurement")
    seed: int = field(42, help="seed of the fine-tuning")


def _check(config: CompressConfig) -> None:
    if config.method not in METHODS:
        raise StepError(f"--method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if not 0 <= config.sparsity < 1:
        raise StepError(f"--sparsity must be in [0, 1), got {config.sparsity}")
    if (config.sparsity > 0 or config.method == "quantization_aware") and config.finetune_epochs < 1:
        raise StepError(f"--finetune-epochs must be >= 1 with --sparsity > 0 or --method quantization_aware "
                        f"(pruning and QAT happen while fine-tuning), got {config.finetune_epochs}")
    if not -100 <= config.max_accuracy_drop <= 100:
        raise StepError(f"--max-accuracy-drop is in percentage points (-100..100), got {config.max_accuracy_drop}")
    if error := seed_error(config.seed):
        raise StepError(error)
    for name in ("threads", "latency_runs", "throughput_batch", "representative_examples", "batch_size"):
        if getattr(config, name) < 1:
            raise StepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if not (math.isfinite(config.latency_tolerance) and config.latency_tolerance >= 0):
        raise StepError(f"--latency-tolerance is a fraction of float TFLite's latency, 0 or more (0.1: 10 % "
                        f"slower still counts as no worse), got {config.latency_tolerance}")
    if not (math.isfinite(config.finetune_learning_rate) and config.finetune_learning_rate > 0):
        raise StepError(f"--finetune-learning-rate must be a number > 0, got {config.finetune_learning_rate}")
    if config.train_examples < 0:
        raise StepError(f"--train-examples must be >= 0 (0: all), got {config.train_examples}")


def legacy_clone(net: Any, images: np.ndarray, path: str) -> Any:
    """The same network rebuilt with tf-keras (Keras 2), which tensorflow-model-optimization requires.

    Checked by comparing predictions: a model of another architecture is refused, not silently changed.
    """
    import keras
    import tf_keras


    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    dropouts = [layer for layer in net.layers if isinstance(layer, keras.layers.Dropout)]
    image_shape = tuple(int(d) for d in net.input_shape[1:])
    fix = "compress handles the pipeline's CNN (mlsteps.model.build): train it with the train step"
    if not convs or len(image_shape) != 2:
        raise ModelLoadError(f"{path}: model {net.name!r} is not the pipeline's CNN; {fix}")
    clone = model_lib.build(image_shape=image_shape, num_classes=int(net.output_shape[-1]),
                            width=int(convs[0].filters), dropout=float(dropouts[0].rate) if dropouts else 0.0,
                            keras_module=tf_keras)
    try:
        clone.set_weights(net.get_weights())
    except ValueError as exc:
        raise ModelLoadError(f"{path}: model {net.name!r} does not match the pipeline's CNN ({exc}); {fix}") from None
    sample = images[:64].astype(np.float32)
    difference = float(np.max(np.abs(clone.predict(sample, verbose=0) - net.predict(sample, verbose=0))))
    if difference > 1e-4:
        raise ModelLoadError(f"{path}: the tf-keras rebuild of model {net.name!r} predicts differently "
                             f"(max |diff| {difference:.2g}): it has layers mlsteps.model.build does not; {fix}")
    return clone


def _pruned(clone: Any, config: CompressConfig, train_ds: Any, val_ds: Any, steps_per_epoch: int) -> Any:
    """Magnitude pruning of every conv and dense kernel to ``config.sparsity``, fine-tuned; wrappers stripped."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    total = config.finetune_epochs * steps_per_epoch
    # Prune in ~30 steps over the first two thirds, then fine-tune with the final mask.
    frequency = max(1, total // 45)
    end_step = frequency * max(1, (2 * total // 3) // frequency)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=config.sparsity,
                                                    begin_step=0, end_step=end_step, frequency=frequency)

    def wrap(layer: Any) -> Any:
        fresh = layer.__class__.from_config(layer.get_config())  # leave the float clone untouched
        # A kernel this small (the first conv, 9 x width, below width 114) saves nothing when pruned and costs
        # accuracy.
        big = layer.weights and int(np.prod(layer.weights[0].shape)) >= MIN_PRUNED_KERNEL
        if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)) and big:
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, pruning_schedule=schedule)
        return fresh

    pruned = tf_keras.models.clone_model(clone, clone_function=wrap)
    _copy_weights(clone, pruned)
    # Decayed to 0 like the training schedule, so the last steps settle instead of leaving the model mid-stride.
    rate = tf_keras.optimizers.schedules.CosineDecay(config.finetune_learning_rate, max(1, total))
    pruned.compile(optimizer=tf_keras.optimizers.Adam(rate),
                   loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log.info("pruning to %.0f%% sparsity while fine-tuning %d epoch(s) (%d steps)", 100 * config.sparsity,
             config.finetune_epochs, total)
    pruned.fit(train_ds, validation_data=val_ds, epochs=config.finetune_epochs, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), _epoch_log(tf_keras, "pruning")])
    return tfmot.sparsity.keras.strip_pruning(pruned)


def _copy_weights(source: Any, wrapped: Any) -> None:
    """Give each layer of ``wrapped`` (some inside pruning wrappers) the trained weights of its ``source`` twin."""
    by_name = {layer.name: layer for layer in source.layers}
    for layer in wrapped.layers:
        inner = getattr(layer, "layer", layer)
        if inner.name in by_name and inner.weights:
            inner.set_weights(by_name[inner.name].get_weights())


def _epoch_log(tf_keras: Any, what: str) -> Any:
    """A tf-keras callback that logs one line per fine-tuning epoch."""

    class EpochLog(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            shown = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
            log.info("%s fine-tuning epoch %d: %s", what, epoch + 1, shown)

    return EpochLog()


def _quantization_aware(pruned: Any, config: CompressConfig, train_ds: Any, val_ds: Any) -> Any:
    """Pruning-preserving quantization-aware training of the pruned model (the zeros stay zeros)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    quantize = tfmot.quantization.keras

    class Passthrough(quantize.QuantizeConfig):
        """Reshape has no weights and no quantized kernel: left as it is (the input layer quantizes 0..255)."""

        def get_weights_and_quantizers(self, layer: Any) -> list:
            return []

        def get_activations_and_quantizers(self, layer: Any) -> list:
            return []

        def set_quantize_weights(self, layer: Any, quantize_weights: list) -> None:
            pass

        def set_quantize_activations(self, layer: Any, quantize_activations: list) -> None:
            pass

        def get_output_quantizers(self, layer: Any) -> list:
            return []

        def get_config(self) -> dict:
            return {}

    class ScaledOutput(Passthrough):
        """Rescaling's output (0..1) quantized over the range each batch has. Left unquantized, the converter
        folds its 1/255 into the first conv's int8 kernel, whose scale QAT fixed for the unscaled weights: every
        weight rounded to zero and the model answered one class. (A moving-average quantizer would keep most
        of its initial -6..6 range over a short fine-tuning.)"""

        def get_output_quantizers(self, layer: Any) -> list:
            return [quantize.quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                           narrow_range=False)]

    def annotate(layer: Any) -> Any:
        if isinstance(layer, tf_keras.layers.Rescaling):
            return quantize.quantize_annotate_layer(layer, quantize_config=ScaledOutput())
        if isinstance(layer, tf_keras.layers.Reshape):
            return quantize.quantize_annotate_layer(layer, quantize_config=Passthrough())
        return quantize.quantize_annotate_layer(layer)

    annotated = tf_keras.models.clone_model(pruned, clone_function=annotate)
    with quantize.quantize_scope({"Passthrough": Passthrough, "ScaledOutput": ScaledOutput}):
        model = quantize.quantize_apply(annotated, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    model.compile(optimizer=tf_keras.optimizers.Adam(config.finetune_learning_rate / 10),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log.info("quantization-aware training, %d epoch(s)", config.finetune_epochs)
    model.fit(train_ds, validation_data=val_ds, epochs=config.finetune_epochs, verbose=0,
              callbacks=[_epoch_log(tf_keras, "QAT")])
    return model


def convert(model: Any, mode: str, representative: np.ndarray | None = None) -> bytes:
    """TFLite flatbuffer of a tf-keras model: float, float16, dynamic, int8 (full integer) or qat (already fake-quantized)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != FLOAT:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        # Full-integer: every op int8 (conversion fails rather than fall back to float); float32 in and out,
        # so callers send the same pixels as to the float model.
        converter.representative_dataset = lambda: ([representative[i:i + 1]] for i in range(len(representative)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _interpreter(content: bytes, threads: int, batch: int, image_shape: tuple[int, ...]) -> tuple[Any, int, int]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    inp = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(inp, [batch, *image_shape])
    interpreter.allocate_tensors()
    return interpreter, inp, interpreter.get_output_details()[0]["index"]


def accuracy_of(content: bytes, images: np.ndarray, labels: np.ndarray, config: CompressConfig) -> float:
    """The .tflite's accuracy on (images, labels), in batches of ``throughput_batch``."""
    batch = min(config.throughput_batch, max(1, len(images)))
    return _accuracy(_interpreter(content, config.threads, batch, images.shape[1:]), batch, images, labels)


def _accuracy(built: tuple[Any, int, int], batch: int, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of an interpreter built for ``batch`` images (the last batch padded)."""
    interpreter, inp, out = built
    image_shape = images.shape[1:]
    predicted = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = np.zeros((batch, *image_shape), np.float32)
        padded[:len(chunk)] = chunk
        interpreter.set_tensor(inp, padded)
        interpreter.invoke()
        predicted.append(interpreter.get_tensor(out)[:len(chunk)].argmax(axis=1))
    return float(np.mean(np.concatenate(predicted) == labels)) if len(labels) else 0.0


def measure(content: bytes, images: np.ndarray, labels: np.ndarray, config: CompressConfig) -> dict[str, float]:
    """Accuracy on (images, labels), size raw and gzipped, batch-1 latency (p50/p99) and batched throughput."""
    image_shape = images.shape[1:]
    batch = min(config.throughput_batch, max(1, len(images)))
    interpreter, inp, out = built = _interpreter(content, config.threads, batch, image_shape)
    accuracy = _accuracy(built, batch, images, labels)
    # Throughput: repeat full batches for at least half a second.
    full = np.resize(images, (batch, *image_shape)).astype(np.float32)
    interpreter.set_tensor(inp, full)
    interpreter.invoke()
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < 0.5:
        interpreter.set_tensor(inp, full)
        interpreter.invoke()
        runs += 1
    throughput = runs * batch / (time.perf_counter() - started)
    single, inp1, out1 = _interpreter(content, config.threads, 1, image_shape)
    samples = [images[i % len(images)][None] for i in range(config.latency_runs + 20)]
    times = []
    for i, sample in enumerate(samples):
        started = time.perf_counter()
        single.set_tensor(inp1, sample)
        single.invoke()
        single.get_tensor(out1)
        if i >= 20:  # the first calls warm caches and XNNPACK's packed weights
            times.append(time.perf_counter() - started)
    return {"accuracy": accuracy, "size_bytes": len(content), "gzip_bytes": len(gzip.compress(content, mtime=0)),
            "latency_p50_ms": 1000 * float(np.percentile(times, 50)),
            "latency_p99_ms": 1000 * float(np.percentile(times, 99)), "throughput_per_s": throughput}


def sparsity_of(content: bytes) -> float:
    """Share of exact zeros among the weights of the convolution and dense kernels in a .tflite model."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    kernels = {op["inputs"][1] for op in interpreter._get_ops_details()  # noqa: SLF001 - no public op listing
               if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED") and len(op["inputs"]) > 1}
    zeros = total = 0
    for detail in interpreter.get_tensor_details():
        if detail["index"] in kernels:
            try:
                values = interpreter.get_tensor(detail["index"])
            except ValueError:
                continue
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    return zeros / total if total else 0.0


def choose(variants: dict[str, dict[str, Any]], *, reference_accuracy: float, max_drop_points: float,
           latency_tolerance: float, metric: str = "accuracy") -> tuple[str, str]:
    """The gate: (winning variant, why). Smallest variant within the accuracy drop and no slower than float.

    ``metric``: the variants' accuracy the gate compares with ``reference_accuracy`` (compress: ``val_accuracy``,
    so that the test split, which reports the choice, did not make it).
    """
    float_latency = variants[FLOAT]["latency_p50_ms"]
    split = " on validation" if metric == "val_accuracy" else ""
    passed, refused = [], []
    # By name, not as given: the step's variants (build order) and its report.json (keys sorted) must give the
    # same choice and the same words, so that the record can be checked against what it records.
    for name, v in sorted(variants.items()):
        if name == FLOAT:
            continue
        drop = 100 * (reference_accuracy - v[metric])
        if drop > max_drop_points + 1e-9:
            refused.append(f"{name} loses {drop:.2f} pt{split} (max {max_drop_points:g})")
        elif v["latency_p50_ms"] > float_latency * (1 + latency_tolerance):
            refused.append(f"{name} is slower than float ({v['latency_p50_ms']:.3f} vs {float_latency:.3f} ms)")
        else:
            passed.append(name)
    if not passed:
        return FLOAT, "no variant passed the gate: " + "; ".join(refused) if refused else "no variant to compare"
    # Smallest as shipped: gzipped (what pruning shrinks; registries and images store it compressed), then raw.
    best = min(passed, key=lambda n: (variants[n]["gzip_bytes"], variants[n]["size_bytes"]))
    v = variants[best]
    return best, (f"smallest of {len(passed)} variant(s) within {max_drop_points:g} pt{split} and no slower than "
                  f"float: {variants[FLOAT]['gzip_bytes'] / v['gzip_bytes']:.1f}x smaller than float TFLite gzipped, "
                  f"accuracy {100 * (v[metric] - reference_accuracy):+.2f} pt{split}")


def _plot(path: Path, variants: dict[str, dict[str, Any]], chosen: str, reference: dict[str, float],
          max_drop_points: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted(variants, key=lambda n: -variants[n]["gzip_bytes"])  # largest (float) first
    for name in names:
        v = variants[name]
        color = "tab:red" if name == chosen else "tab:blue"
        left.scatter(v["gzip_bytes"] / 1024, 100 * v["val_accuracy"], s=40 + 200 * v["latency_p50_ms"] /
                     max(x["latency_p50_ms"] for x in variants.values()), color=color, alpha=0.7)
        left.annotate(f"{name}\n{v['latency_p50_ms']:.3f} ms", (v["gzip_bytes"] / 1024, 100 * v["val_accuracy"]),
                      fontsize=8, xytext=(5, 5), textcoords="offset points")
    left.scatter(reference["gzip_bytes"] / 1024, 100 * reference["val_accuracy"], marker="s", color="gray")
    left.annotate("Keras float (h5)", (reference["gzip_bytes"] / 1024, 100 * reference["val_accuracy"]),
                  fontsize=8, xytext=(5, -12), textcoords="offset points")
    floor = 100 * reference["val_accuracy"] - max_drop_points
    left.axhline(floor, color="tab:red", linestyle="--", linewidth=1)
    left.text(0.01, floor, f" gate: {max_drop_points:g} pt below float", transform=left.get_yaxis_transform(),
              fontsize=8, color="tab:red", va="bottom")
    left.set_xscale("log")
    left.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("size gzipped (KiB, log scale)")
    left.set_ylabel("validation accuracy (%): what the gate compares")
    left.set_title(f"size vs accuracy (marker area: batch-1 latency)\nred: chosen = {chosen}", fontsize=10)
    left.grid(alpha=0.3)
    x = np.arange(len(names))
    right.bar(x - 0.2, [variants[n]["latency_p50_ms"] for n in names], 0.4, label="batch-1 p50 (ms)")
    twin = right.twinx()
    twin.bar(x + 0.2, [variants[n]["throughput_per_s"] for n in names], 0.4, color="tab:orange",
             label="throughput (img/s)")
    right.set_xticks(x, names, rotation=20)
    right.set_ylabel("latency p50 (ms)")
    twin.set_ylabel("images/s")
    right.set_title("speed on CPU (LiteRT)")
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _settings(config: CompressConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    # gate: what the variants were chosen on (a report from before the validation split chose is rebuilt)
    settings = {**asdict(config), "dataset_digest": manifest["digest"], "gate": "val_accuracy"}
    for key in ("tracking_uri", "manifest", "data_root", "experiment"):
        settings.pop(key)
    model = Path(config.model_path)
    settings["model_mtime_ns"] = model.stat().st_mtime_ns if model.exists() else None
    return settings


def compute(config: CompressConfig, manifest: dict[str, Any], net: Any, out: Path) -> dict[str, Any]:
    """Build and measure every variant of the trained model ``net`` into ``out``; return the report (no MLflow)."""
    # After Keras 3 has loaded the model: tensorflow-model-optimization switches tf.keras to tf-keras.
    import tf_keras

    tf_keras.utils.set_random_seed(config.seed)
    for split in ("train", "val", "test"):
        if not manifest["splits"][split]["count"]:
            raise EmptySplitError(f"{config.manifest}: the {split} split is empty; compress calibrates and "
                                  "fine-tunes on train, chooses on val and reports on test: prepare a dataset "
                                  "with all three")
    test_images, test_labels = data.arrays(manifest, "test")
    test_images = test_images.astype(np.float32)
    val_images, val_labels = data.arrays(manifest, "val")
    val_images = val_images.astype(np.float32)
    examples = data.examples(manifest, "train", limit=config.train_examples)
    representative = np.stack([x for x, _ in examples.take(config.representative_examples).as_numpy_iterator()])
    representative = representative.astype(np.float32)
    clone = legacy_clone(net, test_images, config.model_path)
    reference_accuracy, reference_val = (
        float(np.mean(net.predict(images, batch_size=512, verbose=0).argmax(axis=1) == labels))
        for images, labels in ((test_images, test_labels), (val_images, val_labels)))
    keras_file = out / "float_keras.h5"  # what TensorFlow's pruning guide compares against: no optimizer state
    tf_keras.models.save_model(clone, keras_file, include_optimizer=False)
    reference = {"accuracy": reference_accuracy, "val_accuracy": reference_val,
                 "size_bytes": keras_file.stat().st_size,
                 "gzip_bytes": len(gzip.compress(keras_file.read_bytes(), mtime=0))}
    keras_file.unlink()
    log.info("float Keras model: test accuracy %.4f, validation %.4f, %d bytes as h5 (%d gzipped)",
             reference_accuracy, reference_val, reference["size_bytes"], reference["gzip_bytes"])

    builds: dict[str, Any] = {FLOAT: lambda: convert(clone, FLOAT), "float16": lambda: convert(clone, "float16"),
                              "dynamic": lambda: convert(clone, "dynamic"),
                              "int8": lambda: convert(clone, "int8", representative)}
    if config.sparsity > 0 or config.method == "quantization_aware":
        train_n = int(examples.cardinality())
        steps = -(-train_n // config.batch_size)
        train_ds = data.batches(examples, batch_size=config.batch_size, shuffle=True, seed=config.seed)
        val_ds = data.dataset(manifest, "val", batch_size=512)
        prefix = "pruned_" if config.sparsity > 0 else ""

        def compressed() -> bytes:
            model = _pruned(clone, config, train_ds, val_ds, steps) if config.sparsity > 0 else clone
            if config.method == "quantization_aware":
                return convert(_quantization_aware(model, config, train_ds, val_ds), "qat")
            return convert(model, "int8", representative)

        builds[prefix + ("qat_int8" if config.method == "quantization_aware" else "int8")] = compressed

    variants: dict[str, dict[str, Any]] = {}
    for name, build in builds.items():
        started = time.monotonic()
        content = build()
        (out / f"{name}.tflite").write_bytes(content)
        variants[name] = {**measure(content, test_images, test_labels, config), "sparsity": sparsity_of(content),
                          "val_accuracy": accuracy_of(content, val_images, val_labels, config)}
        v = variants[name]
        log.info("%-16s test accuracy %.4f (%+.2f pt), validation %.4f (%+.2f pt)  %7d B (%6d gz)  batch-1 p50 "
                 "%.3f ms  %6.0f img/s  sparsity %.2f  [%.0f s]", name, v["accuracy"],
                 100 * (v["accuracy"] - reference_accuracy), v["val_accuracy"],
                 100 * (v["val_accuracy"] - reference_val), v["size_bytes"], v["gzip_bytes"], v["latency_p50_ms"],
                 v["throughput_per_s"], v["sparsity"], time.monotonic() - started)
    # Chosen on the validation split: the test split reports the chosen variant's accuracy without having
    # picked it (a choice among variants within 0.3 pt on test would fit the test set's noise).
    chosen, reason = choose(variants, reference_accuracy=reference_val, max_drop_points=config.max_accuracy_drop,
                            latency_tolerance=config.latency_tolerance, metric="val_accuracy")
    log.info("chosen: %s (%s)", chosen, reason)
    _plot(out / "tradeoff.png", variants, chosen, reference, config.max_accuracy_drop)
    return {"variants": variants, "float_keras": reference, "chosen": chosen, "reason": reason,
            "accuracy_drop_points": 100 * (reference_accuracy - variants[chosen]["accuracy"]),
            "val_accuracy_drop_points": 100 * (reference_val - variants[chosen]["val_accuracy"]),
            "settings": _settings(config, manifest), "image_shape": list(test_images.shape[1:])}


def version_tags(report: dict[str, Any], config: CompressConfig) -> dict[str, str]:
    """What the registered version says about its compression (register copies these onto the version)."""
    v = report["variants"][report["chosen"]]
    return {"compression.variant": report["chosen"], "compression.sparsity": f"{v['sparsity']:.4f}",
            "compression.target_sparsity": f"{config.sparsity:g}", "compression.method": config.method,
            "compression.size_bytes": str(v["size_bytes"]), "compression.gzip_bytes": str(v["gzip_bytes"]),
            "compression.accuracy": f"{v['accuracy']:.6f}",
            "compression.accuracy_drop_points": f"{report['accuracy_drop_points']:.4f}",
            "compression.val_accuracy": f"{v['val_accuracy']:.6f}",  # what the gate compared
            "compression.latency_p50_ms": f"{v['latency_p50_ms']:.4f}",
            "compression.size_vs_float_tflite": f"{v['size_bytes'] / report['variants'][FLOAT]['size_bytes']:.4f}",
            "compression.reason": report["reason"][:5000]}


def _log_table(client: Any, run_id: str, rows: list[dict[str, Any]], path: Path) -> None:
    """``compression/<path name>`` as an MLflow table that a retry or a rebuild replaces: ``log_table`` appends
    to an existing one (rows of two builds, two chosen)."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    pd.DataFrame(rows).to_json(path, orient="split", index=False)  # log_table's format
    client.log_artifact(run_id, str(path), "compression")
    listed = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": f"compression/{path.name}", "type": "table"}  # what lists it as a table in the UI
    if entry not in listed:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))


def _log(mlflow: Any, run_id: str, report: dict[str, Any], out: Path, config: CompressConfig) -> dict[str, Any]:
    """Log the table, the plot, every .tflite and the chosen one as a pyfunc model to the training run; return
    what register needs."""
    client = mlflow.MlflowClient()
    tags = version_tags(report, config)
    rows = [{"variant": name, **{k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()},
             "accuracy_drop_points": round(100 * (report["float_keras"]["accuracy"] - values["accuracy"]), 4),
             "val_accuracy_drop_points": round(100 * (report["float_keras"]["val_accuracy"] - values["val_accuracy"]),
                                               4),
             "chosen": name == report["chosen"]} for name, values in report["variants"].items()]
    now = int(time.time() * 1000)
    # A retry (a failure after log_batch) logs only what changed: MLflow keeps every point, charts doubled ones.
    logged = client.get_run(run_id).data.metrics
    metrics = [mlflow.entities.Metric(key, value, now, 0)
               for key, value in ((f"compression.{row['variant']}.{name}", float(row[name])) for row in rows
                                  for name in ("accuracy", "size_bytes", "gzip_bytes", "latency_p50_ms",
                                               "throughput_per_s"))
               if logged.get(key) != value]
    client.log_batch(run_id, metrics=metrics, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
    _log_table(client, run_id, rows, out / "variants.json")
    client.log_artifact(run_id, str(out / "tradeoff.png"), "compression")
    client.log_artifact(run_id, str(out / "report.json"), "compression")
    for name in report["variants"]:
        client.log_artifact(run_id, str(out / f"{name}.tflite"), "compression/variants")

    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = report["image_shape"]
    # One unnamed tensor: requests send a bare array ({"inputs": [...]}), no input name to know.
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, report["num_classes"]))]))
    chosen = out / f"{report['chosen']}.tflite"
    # A retry after a failure between log_model and logged.json finds the model it already logged.
    digest = hashlib.sha256((out / "report.json").read_bytes()).hexdigest()
    experiment_id = client.get_run(run_id).info.experiment_id
    earlier = [m for m in mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND name = '{PYFUNC_NAME}' AND tags.`{REPORT_TAG}` = '{digest}'")
        if str(m.status).endswith("READY")]
    if earlier:
        model_uri = f"models:/{earlier[0].model_id}"
        log.info("%s already logged as %s", chosen.name, model_uri)
        return {"mlflow_run_id": run_id, "model_uri": model_uri, "tags": tags}
    import importlib.metadata as md

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(tags={REPORT_TAG: digest},
            name=PYFUNC_NAME, python_model=str(Path(__file__).with_name("litert_model.py")),
            artifacts={"tflite": str(chosen)}, signature=signature,
            input_example=np.zeros((1, *shape), np.float32),
            pip_requirements=[f"mlflow=={md.version('mlflow')}", f"numpy=={md.version('numpy')}", LITERT_REQUIREMENT],
            metadata={k: v for k, v in tags.items() if k != "compression.reason"})
    log.info("logged %s (%s) as %s; MLflow run %s", chosen.name, report["chosen"], info.model_uri,
             tracking.run_url(mlflow, run_id))
    return {"mlflow_run_id": run_id, "model_uri": info.model_uri, "tags": tags}


def run(config: CompressConfig) -> dict[str, Any]:
    """Build, measure and gate the variants (or reuse them for the same settings); log the winner to MLflow."""
    _check(config)
    manifest = data.load_manifest(config.manifest)
    out_dir = tracking.run_dir(config.data_root, config.run_key) / "compression"
    settings = _settings(config, manifest)
    report_path, logged_path = out_dir / "report.json", out_dir / "logged.json"
    built = is_complete(out_dir) and json.loads(report_path.read_text())["settings"] == settings
    logged = json.loads(logged_path.read_text()) if built and logged_path.is_file() else None
    if not logged:
        net = None if built else model_lib.load_trained(config.model_path, manifest)
        # The training run, before the fine-tuning: under a mistyped run key (or a deleted run) the variants
        # went to a new empty run, found only after the whole build.
        mlflow = tracking.connect(config.tracking_uri)
        run_id = tracking.run_for(mlflow, config.run_key, experiment=config.experiment, create=False)
        if not built:
            # Built for other settings (or another model), or never: a failure keeps the previous complete result.
            with atomic_directory(out_dir, replace=True) as scratch:
                report = compute(config, manifest, net, scratch)
                report["num_classes"] = manifest["num_classes"]
                write_json_atomic(scratch / "report.json", report)
        else:
            log.info("variants for %s already built with these settings: %s", config.run_key, out_dir)
        logged = _log(mlflow, run_id, json.loads(report_path.read_text()), out_dir, config)
        write_json_atomic(logged_path, logged)
    else:
        log.info("variants for %s already built with these settings and logged: %s", config.run_key, out_dir)
    report = json.loads(report_path.read_text())
    chosen = report["variants"][report["chosen"]]
    return {**logged, "variant": report["chosen"], "reason": report["reason"],
            "tflite_path": str(out_dir / f"{report['chosen']}.tflite"), "report": str(report_path),
            "accuracy": chosen["accuracy"], "float_accuracy": report["float_keras"]["accuracy"],
            "accuracy_drop_points": report["accuracy_drop_points"], "size_bytes": chosen["size_bytes"],
            "variants": {name: {k: v[k] for k in ("accuracy", "size_bytes", "gzip_bytes", "latency_p50_ms")}
                         for name, v in report["variants"].items()}}


def main(argv: list[str] | None = None) -> int:
    """``python -m mlsteps.compress``: the step's CLI."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return cli(run, CompressConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
