"""tune: a hyperparameter-search worker; takes trials from the shared Optuna study until the budget is spent.

Run any number of workers at once (one pod each) with the same flags: they share one study (TPE sampling,
pruning on per-epoch validation metrics) in the storage named by --storage / $OPTUNA_STORAGE. Each trial is a
nested MLflow run under the search's parent run. ``--setup-only`` creates the study and the parent run and
returns (the DAG does this once, before starting the workers). Re-running a worker for the same run key
continues the same study; the trial and time budgets count from the study's creation.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import data, search, tracking
from .core import SEED_MAX, StepError, cli, field, require_gpus, seed_error
from .gate import CHAMPION

log = logging.getLogger("mlsteps.tune")

SEARCH_TAG = "pipeline.search_for"  # on the parent run: the run key whose search it is


@dataclass(frozen=True, kw_only=True)
class TuneConfig(tracking.RunStepConfig):
    trials: int = field(20, help="trial budget of the whole search (complete + pruned trials, all workers)")
    timeout_minutes: float = field(120.0, help="time budget of the whole search, from its start; "
                                               "a running trial finishes")
    max_epochs: int = field(5, help="epochs of a trial that is never pruned")
    pruner: str = field("successive_halving", help=f"pruning of unpromising trials: {', '.join(search.PRUNERS)}")
    reduction_factor: int = field(0, help="successive halving and Hyperband: a trial trains on past a rung "
                                          "only if in the best 1/N there; successive halving's rungs are at "
                                          "epochs 1, N, N^2, ... (0: 3)")
    sampler: str = field("tpe", help=f"how trials are proposed: {', '.join(search.SAMPLERS)}")
    objective: str = field("val_accuracy", help=f"what the search optimises: {', '.join(search.OBJECTIVES)}")
    search_space: str = field("", help="JSON overrides of the default search space (mlsteps.search), e.g. "
                                       '\'{"learning_rate": {"low": 0.001, "high": 0.01}, "width": [32, 48], '
                                       '"dropout": 0.2}\'')
    train_examples: int = field(0, help="train each trial on the first N training examples (0: all)")
    start_from: str = field("", help="JSON object of hyperparameters the search trains first (its first trial), "
                                     'e.g. the trigger form\'s \'{"learning_rate": 0.003, "batch_size": 128, '
                                     '"width": 32, "dropout": 0.2}\'; a value outside the search space is left '
                                     "to the sampler")
    start_from_champion: str = field("", help="registered model name: the search trains its champion's "
                                              "hyperparameters first (those of the run that trained it); "
                                              "without a champion, --start-from's")
    storage: str | None = field(None, help="Optuna storage URL (default: $OPTUNA_STORAGE, else SQLite on "
                                           "the data root)")
    worker: int = field(0, help="this worker's index (seeds its sampler, names it in logs and MLflow)")
    threads: int = field(0, help="CPU threads for TensorFlow (0: all; give workers sharing a machine a share)")
    heartbeat_seconds: int = field(15, help="trial heartbeat; a trial silent for 3 heartbeats is failed")
    seed: int = field(42, help="base seed of the samplers and of each trial's weights and shuffling")
    setup_only: bool = field(False, help="create the study and its MLflow parent run, then stop")
    train_gpus: int = field(0, help="GPUs the training after the search is given (the form's gpus): every "
                                    "batch size of the space must split evenly over them (0 or 1: any)")


def _check(config: TuneConfig) -> None:
    problems = []
    if config.trials < 1:
        problems.append("--trials must be >= 1")
    if config.max_epochs < 1:
        problems.append("--max-epochs must be >= 1")
    if not math.isfinite(config.timeout_minutes) or config.timeout_minutes <= 0:
        problems.append(f"--timeout-minutes must be a number > 0, got {config.timeout_minutes}")
    if config.pruner not in search.PRUNERS:
        problems.append(f"--pruner {config.pruner!r} is not one of {', '.join(search.PRUNERS)}")
    if config.sampler not in search.SAMPLERS:
        problems.append(f"--sampler {config.sampler!r} is not one of {', '.join(search.SAMPLERS)}")
    if config.objective not in search.OBJECTIVES:
        problems.append(f"--objective {config.objective!r} is not one of {', '.join(search.OBJECTIVES)}")
    if config.train_examples < 0 or config.threads < 0 or config.worker < 0:
        problems.append("--train-examples, --threads and --worker must be >= 0")
    if config.reduction_factor == 1 or config.reduction_factor < 0:
        problems.append(f"--reduction-factor {config.reduction_factor} is not 0 (the pruner's default) or >= 2 "
                        "(1 would promote every trial)")
    elif config.reduction_factor and config.pruner not in search.HALVING_PRUNERS:
        problems.append(f"--reduction-factor applies to {' and '.join(search.HALVING_PRUNERS)}, not to --pruner "
                        f"{config.pruner}")
    if config.heartbeat_seconds < 1:
        problems.append("--heartbeat-seconds must be >= 1")
    if error := seed_error(config.seed):
        problems.append(error)
    try:
        search.parse_start_point(config.start_from)
    except StepError as exc:
        problems.append(str(exc))
    if config.train_gpus < 0:
        problems.append(f"--train-gpus must be >= 0, got {config.train_gpus}")
    if config.train_gpus > 1:  # (a space parse_space refuses is refused by open_study, naming the parameter)
        try:
            if error := search.batch_split_error(search.parse_space(config.search_space), config.train_gpus):
                problems.append(error)
        except StepError:
            pass
    if problems:
        raise StepError("; ".join(problems))


def trial_seed(seed: int, number: int) -> int:
    """Seed of trial ``number``'s weights and shuffling: ``seed`` + ``number``, wrapped into the range Keras takes
    (a --seed near 2**32 - 1 would otherwise fail every trial but the first)."""
    return (seed + number) % (SEED_MAX + 1)


def study_settings(config: TuneConfig, space: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """What defines a search: re-running it with other settings is refused rather than mixed into one study."""
    return {"space": space, "objective": config.objective, "max_epochs": config.max_epochs, "pruner": config.pruner,
            "reduction_factor": search.reduction_factor(config.pruner, config.reduction_factor),
            "sampler": config.sampler, "train_examples": config.train_examples, "dataset_digest": manifest["digest"]}


def open_study(config: TuneConfig, manifest: dict[str, Any], *, create: bool) -> tuple[Any, Any]:
    """(study, storage) for this run key, created with its settings if ``create``; checked against them."""
    import optuna

    space = search.parse_space(config.search_space)
    storage = search.open_storage(search.storage_url(config.storage, config.data_root), config.heartbeat_seconds)
    name = search.study_name(config.run_key)
    kwargs = {"study_name": name, "storage": storage,
              "pruner": search.make_pruner(config.pruner, config.max_epochs, config.reduction_factor)}
    settings = json.loads(json.dumps(study_settings(config, space, manifest)))  # as stored: JSON round trip
    if create:
        study = optuna.create_study(direction=search.OBJECTIVES[config.objective], load_if_exists=True, **kwargs)
        if study.user_attrs.get("settings", settings) != settings and "mlflow_run_id" not in study.user_attrs \
                and not study.get_trials(deepcopy=False):
            # A setup that failed before it finished (MLflow unreachable, say), retried with other flags: nothing
            # ran under the first ones, so they bind nothing (the direction included): start the study afresh.
            log.info("study %s: its setup never finished and no trial ran: created again with these settings", name)
            optuna.delete_study(study_name=name, storage=storage)
            study = optuna.create_study(direction=search.OBJECTIVES[config.objective], load_if_exists=True,
                                        **kwargs)
        if "settings" not in study.user_attrs:
            study.set_user_attr("settings", settings)
        if "created_at" not in study.user_attrs:  # the time budget counts from here, whichever try set it up
            study.set_user_attr("created_at", time.time())
        # For select to tell a spent budget from dead workers: the budget of the latest setup (a continued search
        # may bring a new one).
        study.set_user_attr("timeout_minutes", config.timeout_minutes)
    else:
        try:
            study = optuna.load_study(**kwargs)
        except KeyError as exc:
            raise StepError(f"no study {name!r} in the Optuna storage: run `mlsteps.tune --setup-only true` "
                            "with the same flags first") from exc
    stored = study.user_attrs.get("settings")
    if stored is not None and "reduction_factor" not in stored:  # started before the setting existed: then fixed
        stored = {**stored, "reduction_factor": search.reduction_factor(stored.get("pruner", ""))}
    if stored is not None and stored != settings:
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        raise StepError(f"study {name!r} was started with other settings ({', '.join(changed)} differ); "
                        "a search continues only with the settings it started with; for new settings use a "
                        "new DAG run (or, from the command line, another --run-key)")
    # Seeded by worker and by how far the study got: a worker's retry, or a continued search, must not propose
    # the trials its earlier try already ran (a fresh study's worker 0 still starts from --seed itself). Workers
    # are a million apart, so no two share a seed before a study holds a million trials.
    # The start point (a queued trial, not the sampler's) does not count: with it, a fresh study's worker 0
    # still proposes what it would without.
    ran = [t for t in study.get_trials(deepcopy=False) if "start_point" not in t.user_attrs]
    seed = config.seed + 1_000_003 * config.worker + len(ran)
    study.sampler = search.make_sampler(config.sampler, seed % (SEED_MAX + 1))  # the range NumPy takes
    return study, space


def champion_start(client: Any, model_name: str) -> tuple[dict[str, Any], str] | None:
    """(hyperparameters, label) of ``model_name``'s champion, read from the run that trained it; None if it has
    no champion, or its run recorded none (a model registered by hand)."""
    import mlflow.exceptions

    version = tracking.version_by_alias(client, model_name, CHAMPION)  # an outage fails the step (retried)
    if version is None:
        log.info("%s has no %r alias yet: no champion to start the search from", model_name, CHAMPION)
        return None
    label = f"champion {model_name} v{version.version}"
    try:
        data = client.get_run(version.run_id).data if version.run_id else None
    except mlflow.exceptions.MlflowException as exc:
        if not tracking.not_found(exc):
            raise
        data = None  # its run was deleted
    params = dict(data.params) if data else {}
    # Trained again with other settings (select picked another trial): MLflow params never change, the values
    # its model was trained with are in this tag (train.py); the params alone would name the first try's.
    try:
        retrained = json.loads((data.tags if data else {}).get(tracking.TRAIN_SETTINGS_CHANGED) or "{}")
    except ValueError:
        retrained = {}
    if isinstance(retrained, dict):
        params.update(retrained)
    values: dict[str, Any] = {}
    for name in search.SEARCH_SPACE:
        try:
            number = float(params[name])
        except (KeyError, ValueError):
            continue
        values[name] = int(number) if name in search.INTEGER_PARAMETERS and number.is_integer() else number
    if not values:
        log.info("%s: its run %s records no hyperparameters (%s); not a start point", label, version.run_id,
                 ", ".join(search.SEARCH_SPACE))
        return None
    return values, label  # a value no space can hold (parse_space refuses those) is left out by start_point


def enqueue_start(config: TuneConfig, study: Any, space: dict[str, Any], client: Any) -> None:
    """Queue the search's start point as its first trial, once per study (a retried setup does not add it
    again): the champion's hyperparameters, else --start-from's. Values outside the space go to the sampler."""
    if "start_point" in study.user_attrs:
        return
    start = champion_start(client, config.start_from_champion) if config.start_from_champion else None
    if start is None and config.start_from.strip():
        start = search.parse_start_point(config.start_from), "--start-from"
    if start is None:
        study.set_user_attr("start_point", None)
        return
    values, label = start
    params, notes = search.start_point(values, space)
    for note in notes:
        log.info("start point (%s): %s", label, note)
    if not params:
        log.info("start point (%s): no value inside the search space; the sampler chooses", label)
        study.set_user_attr("start_point", None)
        return
    # skip_if_exists: a setup that died between these two lines queues it once all the same
    study.enqueue_trial(params, user_attrs={"start_point": label}, skip_if_exists=True)
    study.set_user_attr("start_point", {"label": label, "params": params})
    client.set_tag(study.user_attrs["mlflow_run_id"], "search.start_point",
                   f"{label}: {json.dumps(params, sort_keys=True)}")
    log.info("first trial, the start point (%s): %s", label,
             " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))


def parent_run(mlflow: Any, config: TuneConfig, study: Any) -> str:
    """The search's MLflow parent run, created once (by the setup) and remembered in the study."""
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        return run_id
    run_id = tracking.run_for(mlflow, config.run_key, experiment=config.experiment, tag=SEARCH_TAG,
                              run_name=f"search {study.study_name}", tags={"optuna.study": study.study_name})
    # What defines the search; a setup that died before it finished, retried with other flags, finds its params
    # logged already (MLflow params never change): the tag search.settings_changed then has these.
    settings = {**study.user_attrs["settings"], "trials": config.trials, "timeout_minutes": config.timeout_minutes}
    tracking.log_params_once(mlflow, run_id, {k: json.dumps(v) if isinstance(v, dict) else str(v)
                                              for k, v in settings.items()}, "search.settings_changed")
    log.info("the search's MLflow run: %s", tracking.run_url(mlflow, run_id))
    study.set_user_attr("mlflow_run_id", run_id)
    return run_id


_TF_NOISE = re.compile(r"^(Graph execution error:|Detected at node|File \"|\[\[\{\{node)")


def error_summary(exc: BaseException) -> str:
    """``Type: message`` in one line: the message's first line, but for a TensorFlow op error the op's own
    message (its first line is always "Graph execution error:", then where the op was defined)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    meaningful = [re.sub(r"\s*\[\[\{\{node .*$", "", line) for line in lines if not _TF_NOISE.match(line)]
    message = next((line for line in meaningful if line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {message}"


def taken_over(config: TuneConfig) -> str:
    """Why a live worker's trial ended: another worker failed it as stale and queued its retry."""
    return (f"failed by another worker: no heartbeat from this one for {3 * config.heartbeat_seconds} s "
            "(database slow or unreachable?); its retry trains these hyperparameters again")


def note_taken_over(study: Any, number: int, config: Any) -> None:
    """Record why trial ``number`` failed where select's summary reads it: the trial itself is finished (failed
    by another worker), so it takes no attribute any more; without this the summary said "killed or out of
    memory" and sent the user looking for evictions instead of a slow database."""
    try:
        study.set_user_attr(search.TRIAL_ERROR_ATTR.format(number=number), taken_over(config)[:500])
    except Exception as exc:  # noqa: BLE001 (the storage may be what is failing: the worker's log says it)
        log.warning("worker %d: could not record why trial %d failed (%s)", config.worker, number,
                    type(exc).__name__)


class _Trainer:
    """Runs one trial: builds the model from the trial's hyperparameters, trains, reports every epoch."""

    def __init__(self, config: TuneConfig, manifest: dict[str, Any], space: dict[str, Any], mlflow: Any,
                 parent_run_id: str) -> None:
        import keras

        self.config, self.manifest, self.space, self.mlflow = config, manifest, space, mlflow
        self.client = mlflow.MlflowClient()
        self.parent_run_id = parent_run_id
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        self.keras = keras
        # Read the shards once per worker; every trial batches the cached examples its own way.
        self.train = data.examples(manifest, "train", limit=config.train_examples)
        self.val = data.examples(manifest, "val")
        self.n_train = int(self.train.cardinality())
        self.metric = config.objective
        self.trial_numbers: list[int] = []  # the trials this worker process started
        self.finished_run: str | None = None  # MLflow run of the last trial, once closed as finished
        self.interrupted = False  # the last trial ended with Ctrl-C

    def __call__(self, trial: Any) -> float:
        import optuna

        self.trial_numbers.append(trial.number)
        self.finished_run, self.interrupted = None, False
        trial.set_user_attr("worker", self.config.worker)
        run_id = None
        started = time.monotonic()
        try:
            hp = search.suggest(trial, self.space)
            start = trial.user_attrs.get("start_point")
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial {trial.number}" + (" (start point)" if start else ""),
                tags={"mlflow.parentRunId": self.parent_run_id, "optuna.study": trial.study.study_name,
                      "optuna.trial_number": str(trial.number), "search.worker": str(self.config.worker),
                      **({"search.start_point": start} if start else {})})
            run_id = run.info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            self.client.log_batch(run_id, params=[self.mlflow.entities.Param(k, str(v)) for k, v in hp.items()])
            log.info("worker %d: trial %d starts%s: %s", self.config.worker, trial.number,
                     f" (start point: {start})" if start else "",
                     " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()))
            value, pruned_at, epochs = self._fit(trial, hp, run_id)
        except Exception as exc:
            if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                cause = taken_over(self.config)
                note_taken_over(trial.study, trial.number, self.config)
            else:
                cause = error_summary(exc)
                try:  # before any MLflow call: it may be what failed
                    trial.set_user_attr("error", cause[:500])
                except optuna.exceptions.UpdateFinishedTrialError:  # failed meanwhile by another worker
                    cause = taken_over(self.config)
                    note_taken_over(trial.study, trial.number, self.config)
            log.warning("worker %d: trial %d failed: %s", self.config.worker, trial.number, cause)
            self._end_run(run_id, "FAIL", "FAILED", error=cause)
            raise
        except KeyboardInterrupt:
            self.interrupted = True
            self._end_run(run_id, "FAIL", "KILLED", error="interrupted (Ctrl-C)")
            raise
        finally:
            self.keras.backend.clear_session()
            gc.collect()
        seconds = time.monotonic() - started
        state = "PRUNED" if pruned_at is not None else "COMPLETE"
        self._end_run(run_id, state, "FINISHED")
        self.finished_run = run_id
        log.info("worker %d: trial %d %s: %s=%.4f after %d epoch(s) (%.0f s)", self.config.worker, trial.number,
                 state.lower(), self.metric, value, epochs, seconds)
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruned_at}")
        return value

    def _end_run(self, run_id: str | None, state: str, status: str, error: str = "") -> None:
        """Close the trial's MLflow run; best effort: the trial's result is in the study either way."""
        if run_id is None:
            return
        try:
            self.client.set_tag(run_id, "optuna.state", state)
            if error:
                self.client.set_tag(run_id, "error", error[:500])
            self.client.set_terminated(run_id, status)
        except Exception as mlflow_error:  # noqa: BLE001 - losing a trained trial over a tag would be worse
            log.warning("could not mark MLflow run %s %s: %s", run_id, status.lower(), mlflow_error)

    def _fit(self, trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        """Train one trial; return (last value of the objective, epoch it was pruned at or None, epochs run)."""
        from mlflow.entities import Metric

        from . import model as model_lib

        keras, config = self.keras, self.config
        seed = trial_seed(config.seed, trial.number)
        keras.utils.set_random_seed(seed)
        batch_size = int(hp["batch_size"])
        steps = -(-self.n_train // batch_size)
        net = model_lib.compiled(image_shape=tuple(self.manifest["image_shape"]),
                                 num_classes=self.manifest["num_classes"], width=int(hp["width"]),
                                 dropout=float(hp["dropout"]), learning_rate=float(hp["learning_rate"]),
                                 decay_steps=steps * config.max_epochs)
        client, metric = self.client, self.metric
        outcome: dict[str, Any] = {"pruned_at": None, "value": math.nan, "epochs": 0}

        class Report(keras.callbacks.Callback):
            """Log the epoch to the trial's MLflow run, report it to Optuna, stop if the pruner says so."""

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                metrics = {k: float(v) for k, v in (logs or {}).items()}
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, epoch + 1) for k, v in metrics.items()])
                value = metrics.get(metric, math.nan)
                if not math.isfinite(value):
                    raise FloatingPointError(f"{metric} is {value} after epoch {epoch + 1}: training diverged "
                                             f"(learning_rate={hp['learning_rate']:.3g})")
                outcome["value"] = value
                outcome["epochs"] = epoch + 1
                trial.report(value, epoch + 1)
                # Never after the last epoch: nothing is left to save, and a pruned trial's result is lost to
                # select (successive halving has no last rung: at 9 or 27 epochs it would ask for promotion).
                if epoch + 1 < config.max_epochs and trial.should_prune():
                    outcome["pruned_at"] = epoch + 1
                    self.model.stop_training = True

        net.fit(data.batches(self.train, batch_size=batch_size, shuffle=True, seed=seed),
                validation_data=data.batches(self.val, batch_size=512), epochs=config.max_epochs,
                callbacks=[keras.callbacks.TerminateOnNaN(raise_error=True), Report()], verbose=0)
        return outcome["value"], outcome["pruned_at"], outcome["epochs"]


def _save_failure(exc: BaseException) -> BaseException:
    """What failed when Optuna saved a trial, under what its _run_trial raises over it.

    When saving fails, its bookkeeping raises ``Should not reach.`` (AssertionError) over the failure if the
    objective had returned a value, or UnboundLocalError if reading the trial back failed too.
    """
    while exc.__context__ is not None and (
            (isinstance(exc, AssertionError) and "Should not reach" in str(exc))
            or (isinstance(exc, UnboundLocalError) and "updated_state" in str(exc))):
        exc = exc.__context__
    return exc


def _tell_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna refusing to save into a trial that is no longer running.

    ``Cannot tell a FAIL trial`` (ValueError) when the trial was failed before the save began, or
    UpdateFinishedTrialError when that change landed mid-save.
    """
    import optuna

    return isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a FAIL trial"))


def optimize_one(study: Any, trainer: _Trainer, config: Any) -> None:
    """Run one trial of ``study``; a trial that fails is recorded as failed and the worker goes on."""
    from optuna.trial import TrialState

    started = len(trainer.trial_numbers)
    try:
        study.optimize(trainer, n_trials=1, catch=(Exception,), gc_after_trial=False)
    except Exception as exc:  # re-raised unless another worker failed our trial as stale while it was saved
        cause = _save_failure(exc)
        number = trainer.trial_numbers[-1] if len(trainer.trial_numbers) > started else None  # None: not ours
        if number is not None and trainer.interrupted:  # Ctrl-C: the failed save hid it
            raise KeyboardInterrupt from exc
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is None or trial.state != TrialState.FAIL or not _tell_refused(cause):
            saved = trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            if number is not None and trainer.finished_run is not None and not saved:
                # Its MLflow run was closed as finished, but the result never reached the study: the trial
                # will be failed as stale and retried, so the run must not go on saying it completed.
                trainer._end_run(trainer.finished_run, "FAIL", "FAILED",
                                 error=f"result not saved in the study ({type(cause).__name__}); retried")
            if cause is not exc:
                raise cause from None  # the real failure (a storage outage, say), not Optuna's bookkeeping
            raise
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None or run_id != trainer.finished_run:
            return  # given up during training: the trainer said so and closed its MLflow run
        log.warning("worker %d: trial %d was %s (%s when saving its result); going on", config.worker, number,
                    taken_over(config), type(cause).__name__)
        # Its MLflow run was closed as finished just before the result failed to save: say what happened.
        note_taken_over(study, number, config)
        trainer._end_run(run_id, "FAIL", "FAILED", error=taken_over(config))


def run(config: TuneConfig) -> dict[str, Any]:
    _check(config)
    manifest = data.load_manifest(config.manifest)
    study, space = open_study(config, manifest, create=config.setup_only)
    mlflow = tracking.connect(config.tracking_uri)
    parent_run_id = parent_run(mlflow, config, study)
    summary = {"study": study.study_name, "mlflow_run_id": parent_run_id, "worker": config.worker,
               "settings": asdict(config) | {"tracking_uri": None, "storage": None}}
    if config.setup_only:
        enqueue_start(config, study, space, mlflow.MlflowClient())
        log.info("study %s ready for %d trials (%s sampler, %s pruner, up to %d epochs each); MLflow run %s",
                 study.study_name, config.trials, config.sampler, config.pruner, config.max_epochs,
                 tracking.run_url(mlflow, parent_run_id))
        return {**summary, "counts": search.counts(study).as_dict()}

    import optuna
    import tensorflow as tf

    require_gpus(tf, param="search_gpus")  # the form's field for trial workers
    if config.threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.threads)
        tf.config.threading.set_inter_op_parallelism_threads(config.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say more, once
    trainer = _Trainer(config, manifest, space, mlflow, parent_run_id)
    deadline = float(study.user_attrs.get("created_at", time.time())) + config.timeout_minutes * 60
    ran, stopped = 0, ""
    while True:
        search.fail_stale_trials(study)  # a dead worker's trial: failed, and retried once
        now = search.counts(study)
        if now.finished >= config.trials:
            stopped = "trial budget spent"
            log.info("worker %d: trial budget spent (%d of %d)", config.worker, now.finished, config.trials)
            break
        if now.finished == 0 and now.failed_for_good >= min(3, config.trials):
            if now.running and time.time() < deadline:
                # Another worker's trial may still finish: its verdict decides (stopping here would leave the
                # rest of the budget to that worker alone); not past the time budget.
                time.sleep(min(config.heartbeat_seconds, 5))
                continue
            # Systematic (trials raising errors, or killing their worker: out of memory): stop here; select
            # reports it once, with the most common cause, for the whole search. A trial lost with its worker
            # counts once its retry has run too: workers evicted together must not end the search.
            stopped = "every trial failed"
            log.error("worker %d: the first %d trials all failed, stopping; %s", config.worker,
                      now.failed_for_good, search.failure_summary(study))
            break
        if now.errored >= config.trials:
            stopped = "as many trials failed as the budget"
            log.warning("worker %d: %d trials failed, as many as the budget; stopping", config.worker, now.errored)
            break
        if time.time() >= deadline:
            stopped = "time budget spent"
            log.info("worker %d: time budget of %g min spent", config.worker, config.timeout_minutes)
            break
        if now.finished + now.running >= config.trials and not now.waiting:
            # The rest of the budget is running elsewhere; stay to take over if one of those workers dies.
            # (Between this check and the next trial's start another worker may start one too: a search can
            # end up to workers - 1 trials over budget.)
            time.sleep(min(config.heartbeat_seconds, 5))
            continue
        optimize_one(study, trainer, config)
        ran += 1
    final = search.counts(study)
    mine = set(trainer.trial_numbers)
    epochs = sum(search.epochs_run(t) for t in study.get_trials(deepcopy=False) if t.number in mine)
    log.info("worker %d done: ran %d trial(s), %d epochs; study %s: %s", config.worker, ran, epochs,
             study.study_name, final.as_dict())
    return {**summary, "trials_run": ran, "epochs": epochs, "counts": final.as_dict(), "stopped": stopped}


def main(argv: list[str] | None = None) -> int:
    return cli(run, TuneConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
