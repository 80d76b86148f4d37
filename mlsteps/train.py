"""train: fit the CNN on the prepared TFRecords, checkpoint every epoch, resume, log everything to MLflow.

Uses every GPU of its pod (MirroredStrategy, mixed precision; the saved model computes in float32) and
the CPU otherwise. A re-run for the same run key resumes after the last finished epoch (Keras
BackupAndRestore, of the same settings only); a run key whose model is already trained with the same
settings returns that model instead of training again. A failed try marks the MLflow run FAILED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import data, tracking
from .core import (NodeError, StepError, atomic_directory, cli, field, is_complete, require_gpus, seed_error,
                   write_json_atomic)

log = logging.getLogger("mlsteps.train")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(tracking.RunStepConfig):
    epochs: int = field(5, help="training epochs")
    batch_size: int = field(128, help="global batch size (split across GPUs)")
    learning_rate: float = field(0.003, help="peak learning rate of Adam, decayed to 0 by a cosine schedule")
    width: int = field(32, help="filters of the first conv layer; later layers use twice as many")
    dropout: float = field(0.2, help="dropout rate before the classifier")
    seed: int = field(42, help="seed for weights, shuffling and dropout")
    mixed_precision: bool = field(True, help="use float16 compute when a GPU is present")
    search_run_id: str | None = field(None, help="MLflow run of the hyperparameter search these settings came from")
    search_trial: int | None = field(None, help="number of the search trial these settings came from")


# What MLflow's own inference logs for the model (it loads the model in a subprocess for that, about 12 s a
# training here: numpy and tensorflow, plus mlflow and cloudpickle), pinned to this environment's versions.
MODEL_REQUIREMENTS = ("mlflow", "cloudpickle", "numpy", "tensorflow")


def model_requirements() -> list[str]:
    """The logged float model's pip requirements: ``MODEL_REQUIREMENTS`` at the versions installed here."""
    import importlib.metadata

    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def _strategy(tf: Any, config: TrainConfig) -> tuple[Any, int]:
    gpus = require_gpus(tf)
    if not gpus:
        log.info("no GPU visible: training on the CPU")
        return tf.distribute.get_strategy(), 0
    if config.mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("training on %d GPU(s) with MirroredStrategy", gpus)
    return tf.distribute.MirroredStrategy(), gpus


def replica_batches(n_train: int, n_val: int, batch_size: int, replicas: int) -> tuple[int, int]:
    """Training steps per epoch and the validation batch size, for batches split over ``replicas`` devices.

    One device: every example, validation in batches of at least 512. Several (MirroredStrategy): Keras splits
    each batch over the replicas and builds its step from the first one, which must split evenly, and a replica
    left without an example fails in BatchNormalization. So the batch must be a multiple of the replicas (else
    an input error naming the fix), training drops its last partial batch (another random remainder each
    epoch), and validation takes a batch size whose first batch splits evenly and whose last one reaches every
    replica (every validation example is still scored). A partial batch of k goes out in slices of
    ceil(k / replicas): 4 images over 3 replicas are 2, 2 and none.
    """
    if replicas == 1:
        return -(-n_train // batch_size), max(batch_size, 512)
    if batch_size % replicas:
        lower, upper = batch_size // replicas * replicas, -(-batch_size // replicas) * replicas
        raise StepError(f"--batch-size {batch_size} does not split evenly over {replicas} GPUs: use a multiple of "
                        f"{replicas} ({f'{lower} or ' if lower else ''}{upper}), or another number of GPUs")
    if n_train < batch_size:
        raise StepError(f"--batch-size {batch_size} is more than the {n_train} training examples: with {replicas} "
                        "GPUs every batch is a full one; use a smaller batch")
    for size in range(-(-max(batch_size, 512) // replicas) * replicas, 0, -replicas):
        first, last = min(size, n_val), n_val % size
        if first % replicas == 0 and (last == 0 or (replicas - 1) * -(-last // replicas) < last):
            return n_train // batch_size, size
    raise StepError(f"the validation split's {n_val} examples cannot be batched so that each of {replicas} GPUs "
                    "gets part of every batch; prepare the data with a larger --val-fraction, or train on fewer "
                    "GPUs")


def _progress_callback(keras: Any, mlflow_client: Any, run_id: str, epochs: int, examples: int,
                       learning_rate: float) -> Any:
    class Progress(keras.callbacks.Callback):
        """One MLflow metrics batch per finished epoch, sent before the backup is written, and one log line
        after it (``announce``): a line "epoch N/M" means epoch N is saved.

        ``images_per_second`` is the training pass's (``train_seconds``: up to the validation's start);
        ``epoch_seconds`` includes the validation.
        """

        first_epoch: int | None = None
        _trained: float | None = None

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if self.first_epoch is None:
                self.first_epoch = epoch
                if epoch:
                    log.info("resuming from checkpoint: epoch %d/%d", epoch + 1, epochs)
            self._started = time.monotonic()
            self._trained = None

        def on_test_begin(self, logs: dict | None = None) -> None:  # fit's validation pass
            if self._trained is None:
                self._trained = time.monotonic() - self._started

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.monotonic() - self._started
            trained = seconds if self._trained is None else self._trained
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics["epoch_seconds"] = seconds
            metrics["train_seconds"] = trained
            metrics["images_per_second"] = examples / trained if trained else 0.0
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            mlflow_client.log_batch(run_id, metrics=[Metric(k, v, now, epoch + 1) for k, v in metrics.items()])
            self._logged = metrics
            diverged = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            if diverged:
                # Before the backup callback: the diverged epoch is not saved, and no model is.
                raise StepError(f"training diverged: {', '.join(diverged)} not finite after epoch {epoch + 1} "
                                f"(--learning-rate {learning_rate:g}); lower the learning rate")

        def announce(self, epoch: int, logs: dict | None = None) -> None:
            metrics = self._logged
            shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if "second" not in k)
            log.info("epoch %d/%d %s (%.1f s; training %.0f img/s)", epoch + 1, epochs, shown,
                     metrics["epoch_seconds"], metrics["images_per_second"])

    return Progress()


def _learning_curves(mlflow_client: Any, run_id: str, path: Path) -> None:
    """Plot loss and accuracy per epoch from MLflow's history, so resumed runs show every epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key in (metric, f"val_{metric}"):
            history = sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            by_epoch = {m.step: m.value for m in history}  # last write per epoch wins after a resume
            if by_epoch:
                ax.plot(list(by_epoch), list(by_epoch.values()), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(config: TrainConfig) -> dict[str, Any]:
    manifest = data.load_manifest(config.manifest)
    if config.epochs < 1:
        raise StepError(f"--epochs must be >= 1, got {config.epochs}")
    if error := seed_error(config.seed):
        raise StepError(error)
    from .search import domain_error  # the search's domains: a value the search may pick, train accepts

    for name in ("learning_rate", "batch_size", "width", "dropout"):
        error = domain_error(name, getattr(config, name))
        if error:
            raise StepError(f"--{name.replace('_', '-')}: {error}")
    workdir = tracking.run_dir(config.data_root, config.run_key)
    model_dir = workdir / "model"
    settings = {**asdict(config), "dataset_digest": manifest["digest"]}
    for key in ("tracking_uri", "manifest", "data_root"):
        settings.pop(key)
    previous = _finished(model_dir) if is_complete(model_dir) else None
    if previous is not None and previous["settings"] == settings and not (model_dir / SUPERSEDED).exists():
        log.info("model for %s already trained with these settings: %s", config.run_key, model_dir)
        _close_run(config, previous.get("mlflow_run_id"), model_dir)
        return previous
    if previous is not None:
        # Kept until the new model is saved (a failed try leaves it in place), but no longer this run's
        # result: the MLflow run now records the new try, so going back to these settings trains again.
        log.info("a model for other settings is in %s: training again", model_dir)
        write_json_atomic(model_dir / SUPERSEDED, {"by": settings})

    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    run_id = tracking.run_for(mlflow, config.run_key, experiment=config.experiment)
    client.update_run(run_id, status="RUNNING")  # a retry after a failed try
    try:
        return _train(config, manifest, settings, workdir, mlflow, run_id)
    except BaseException as exc:
        # Not left RUNNING for good: the MLflow run shows that training failed (a retry reopens it).
        try:
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception as unreachable:  # noqa: BLE001 - the training error is the one to report
            log.warning("could not mark MLflow run %s failed: %s", run_id, unreachable)
        raise


SUPERSEDED = "_SUPERSEDED"  # in a finished model's folder once a training with other settings started


def _close_run(config: TrainConfig, run_id: str | None, model_dir: Path) -> None:
    """A pipeline run cleared after it finished: validate reopened its MLflow run (RUNNING), and a training that
    finds its model done must end it, or it shows RUNNING for good. Best effort: the model is the result. The
    run the finished model names (none is created); not while another try trains other settings there."""
    if not run_id:
        return
    try:
        mlflow = tracking.connect(config.tracking_uri)
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING" and not (model_dir / SUPERSEDED).exists():
            client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - an MLflow outage (or a deleted run) must not fail a finished training
        log.warning("could not mark the MLflow run %s of %s finished: %s", run_id, config.run_key, exc)


def _finished(model_dir: Path) -> dict[str, Any] | None:
    """The result of a finished training in ``model_dir``, or None when its files are damaged (a node that
    crashed after the folder was renamed into place, a disk error): evaluate would refuse the model, and
    training again is the only fix, so it must not be skipped as "already trained"."""
    import zipfile

    try:
        result = json.loads((model_dir / "result.json").read_text())
        with zipfile.ZipFile(model_dir / "model.keras") as archive:
            damaged = archive.testzip()
        if damaged is None and isinstance(result, dict) and "settings" in result:
            return result
        reason = f"{damaged} fails its checksum" if damaged else "result.json has no settings"
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("the finished model in %s is damaged (%s): training again", model_dir, reason)
    return None


def _backup_for(backup_dir: Path, settings: dict[str, Any]) -> None:
    """Keep an epoch backup only if it was made with these settings; mark the backup folder with them.

    A backup of other settings (a retry after the hyperparameters changed) would not load into this
    network, or would silently continue the other settings' training.
    """
    marker = backup_dir / "settings.json"
    if backup_dir.exists():
        why = ""
        try:
            if not marker.is_file() or json.loads(marker.read_text()) != settings:
                why = "it was not made with these settings"
        except ValueError as exc:
            why = f"{exc.__class__.__name__} in {marker.name} ({exc})"
        why = why or _repair_backup(backup_dir)
        if why:
            log.warning("discarding the epoch backup in %s: %s; training from scratch", backup_dir, why)
            shutil.rmtree(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, settings)


BACKUP_WEIGHTS, BACKUP_RECORD = "latest.weights.h5", "training_metadata.json"  # Keras's BackupAndRestore files
SECOND_COPY = ".bkp"  # its double_checkpoint copies of the epoch before


def _damaged(weights: Path, record: Path) -> str:
    """Why an epoch's weights and record (both written in place by Keras) are not whole, or "" when they are."""
    import h5py

    def read(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            item[()]  # every value: a file cut short can open and still fail on a layer (Keras: ValueError)

    try:
        _epoch(record)
        with h5py.File(weights, "r") as archive:
            if not len(archive):
                return "no weights in it"
            archive.visititems(read)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _epoch(record: Path) -> int:
    return int(json.loads(record.read_text())["epoch"])


def _repair_backup(backup_dir: Path) -> str:
    """Leave a Keras epoch backup Keras can resume from; return why it cannot be kept ("" when it can).

    Keras copies the last epoch's files to their second copy, then rewrites them in place, and falls back to the
    copy only when the weights fail to load; a pod killed meanwhile left files every retry failed on: an epoch
    record half written (JSONDecodeError), or the first epoch's weights half written (no copy yet to fall back
    to), or new weights beside the record of the epoch before. The newest whole pair of one epoch is kept: the
    latest, else the copy before it; a damaged copy beside a whole latest epoch (killed while copying) is
    dropped, Keras makes it again.
    """
    weights, record = backup_dir / BACKUP_WEIGHTS, backup_dir / BACKUP_RECORD
    copy_weights, copy_record = (backup_dir / f"{weights.name}{SECOND_COPY}",
                                 backup_dir / f"{record.name}{SECOND_COPY}")
    if not any(path.exists() for path in (weights, record, copy_weights, copy_record)):
        return ""  # nothing backed up yet
    latest = _damaged(weights, record)
    has_copy = copy_weights.exists() or copy_record.exists()
    copy = _damaged(copy_weights, copy_record) if has_copy else "there is none"
    if not latest:
        if has_copy and copy:
            log.warning("the second copy of the epoch backup in %s is damaged (%s; a pod killed while copying): "
                        "dropped, the latest epoch is whole", backup_dir, copy)
            copy_weights.unlink(missing_ok=True)
            copy_record.unlink(missing_ok=True)
            return ""
        if not has_copy or _epoch(record) != _epoch(copy_record):
            return ""
        # Both whole and of one epoch: killed after the new weights were written and before their record was,
        # the weights may be an epoch ahead of their record (resumed so, that epoch would be trained twice).
        latest = "its weights may be of the epoch after its record's"
    if not copy:
        log.warning("the latest epoch of the backup in %s is damaged (%s): resuming from the copy of the epoch "
                    "before it", backup_dir, latest)
        for source, target in ((copy_weights, weights), (copy_record, record)):
            scratch = target.with_name(f"{target.name}.restoring")
            shutil.copyfile(source, scratch)
            os.replace(scratch, target)
        return ""
    return f"its latest epoch is damaged ({latest}) and there is no whole copy of the epoch before it"


def shuffle_seed(seed: int, backup_dir: Path) -> int:
    """The training data's shuffle seed: ``seed``, moved on by the epochs a backup holds.

    tf.data reshuffles each epoch from the seed, counting epochs from the process start: a resumed try would
    otherwise train its first epoch in the order of epoch 1 (a kill each epoch: every epoch in one order).
    """
    record = backup_dir / BACKUP_RECORD
    return seed + _epoch(record) if record.is_file() else seed


def _final_metrics(client: Any, run_id: str, history: dict[str, list[float]], epochs: int) -> dict[str, float]:
    """The last epoch's metrics: from this fit, or from MLflow when every epoch was done by an earlier try."""
    if history:
        return {k: float(v[-1]) for k, v in history.items()}
    final = {}
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        last = [m for m in client.get_metric_history(run_id, key) if m.step == epochs]
        if last:
            final[key] = max(last, key=lambda m: m.timestamp).value
    return final


def _train(config: TrainConfig, manifest: dict[str, Any], settings: dict[str, Any], workdir: Path, mlflow: Any,
           run_id: str) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from . import model as model_lib

    client = mlflow.MlflowClient()
    model_dir = workdir / "model"
    backup_dir = workdir / "backup"
    source = {"hyperparameters.source": "trigger form"}
    if config.search_run_id:
        source = {"hyperparameters.source": "search", "search.run_id": config.search_run_id,
                  "search.trial_number": str(config.search_trial)}
    for key, value in source.items():
        client.set_tag(run_id, key, value)
    keras.utils.set_random_seed(config.seed)
    strategy, gpus = _strategy(tf, config)
    replicas = strategy.num_replicas_in_sync
    # A backup resumes only in the precision it was made in: under mixed_float16 the optimizer is wrapped in a
    # LossScaleOptimizer, whose state a float32 model skips when it loads the backup (a GPU try resumed on a CPU
    # pod, or with --mixed-precision changed, would restart Adam and its learning-rate schedule mid-training).
    backup_settings = {**settings, "dtype_policy": keras.mixed_precision.global_policy().name}
    n_train = manifest["splits"]["train"]["count"]
    steps_per_epoch, val_batch = replica_batches(n_train, manifest["splits"]["val"]["count"], config.batch_size,
                                                 replicas)
    with strategy.scope():
        net = model_lib.compiled(image_shape=tuple(manifest["image_shape"]), num_classes=manifest["num_classes"],
                                 width=config.width, dropout=config.dropout, learning_rate=config.learning_rate,
                                 decay_steps=steps_per_epoch * config.epochs, synchronized=replicas > 1)
    params = {**{k: v for k, v in settings.items() if k != "run_key"}, "parameters": net.count_params(),
              "gpus": gpus, "train_examples": n_train}
    # Trained again with other settings (select picked another trial, say): those are in train.settings_changed.
    tracking.log_params_once(mlflow, run_id, params, tracking.TRAIN_SETTINGS_CHANGED)
    log.info("model %s: %d parameters; %d training examples, batch %d, %d epochs",
             net.name, net.count_params(), n_train, config.batch_size, config.epochs)

    # The backup outlives fit(): if logging to MLflow fails afterwards, the retry restores the last epoch
    # instead of training again. It is removed once the finished model is in place. Two copies: a pod
    # killed while writing one resumes from the other.
    _backup_for(backup_dir, backup_settings)
    seed = shuffle_seed(config.seed, backup_dir)
    if seed != config.seed:
        log.info("resuming after epoch %d: training data shuffled with seed %d", seed - config.seed, seed)
    train_ds = data.dataset(manifest, "train", batch_size=config.batch_size, shuffle=True, seed=seed,
                            drop_remainder=replicas > 1)
    val_ds = data.dataset(manifest, "val", batch_size=val_batch)
    # Images one epoch trains on: several GPUs drop the last partial batch.
    trained_images = n_train if replicas == 1 else steps_per_epoch * config.batch_size
    progress = _progress_callback(keras, client, run_id, config.epochs, trained_images, config.learning_rate)
    # progress first: an epoch is backed up only once MLflow has its metrics, so an outage while logging them
    # retrains that epoch on the retry instead of skipping it with its metrics lost.
    callbacks = [progress,
                 keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True, delete_checkpoint=False),
                 keras.callbacks.LambdaCallback(on_epoch_end=progress.announce)]
    try:
        history = net.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks, verbose=0,
                          shuffle=False)  # the dataset shuffles itself
    except tf.errors.ResourceExhaustedError as exc:
        # A NodeError (retried: a shared GPU may have had less free memory), in one line naming what to change;
        # the epochs done are backed up.
        where = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "the CPU"
        raise NodeError(f"out of memory training batches of {config.batch_size} at width {config.width} on "
                        f"{where} ({str(exc.message).splitlines()[0][:200]}): lower --batch-size or --width, or "
                        "train on more GPUs (the batch is split over them)") from None
    if keras.mixed_precision.global_policy().name != "float32" or replicas > 1:
        # The variables are float32 already; what is saved, evaluated, compressed and served computes in
        # float32 too (a mixed_float16 model would run in float16 on CPU pods and differ from compress's
        # float32 rebuild), outside the strategy (a distributed model splits even a 2-image predict over
        # its replicas, and fails with more replicas than images).
        keras.mixed_precision.set_global_policy("float32")
        trained = net
        net = model_lib.build(image_shape=tuple(manifest["image_shape"]), num_classes=manifest["num_classes"],
                              width=config.width, dropout=config.dropout)
        net.set_weights(trained.get_weights())

    workdir.mkdir(parents=True, exist_ok=True)
    curves = workdir / "learning_curves.png"
    _learning_curves(client, run_id, curves)
    client.log_artifact(run_id, str(curves), "plots")

    import mlflow.tensorflow
    import numpy as np
    from mlflow.models import infer_signature

    example = np.zeros((2, *manifest["image_shape"]), dtype=np.float32)
    signature = infer_signature(example, net.predict(example, verbose=0))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(net, name="model", signature=signature, input_example=example,
                                           pip_requirements=model_requirements())
    final = _final_metrics(client, run_id, history.history, config.epochs)
    # No epoch began: an earlier try had trained them all and failed afterwards.
    resumed_from = config.epochs if progress.first_epoch is None else progress.first_epoch
    result = {"mlflow_run_id": run_id, "model_uri": info.model_uri, "model_path": str(model_dir / "model.keras"),
              "metrics": final, "epochs": config.epochs, "resumed_from_epoch": resumed_from,
              "parameters": net.count_params(), "settings": settings}
    url = tracking.run_url(mlflow, run_id)  # the last MLflow call comes before the model is in place
    with atomic_directory(model_dir, replace=True) as scratch:
        net.save(scratch / "model.keras")
        write_json_atomic(scratch / "result.json", result)
    shutil.rmtree(backup_dir, ignore_errors=True)
    log.info("trained: %s; MLflow run %s", {k: round(v, 4) for k, v in final.items()}, url)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(run, TrainConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
