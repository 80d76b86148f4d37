"""select: pick the best trial of a finished search, plot the search, hand its hyperparameters to train.

Runs after every ``tune`` worker has stopped (whether or not any succeeded): a search with at least one
complete trial yields its best one; a search in which every trial failed ends with one error naming the
most common cause. The plots (optimization history, per-epoch curves with pruning, parameter importances,
parallel coordinates) and a table of all trials go to the search's MLflow parent run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import search, tracking
from .core import StepError, cli, field

log = logging.getLogger("mlsteps.select")


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    # No manifest: select reads only the study, so it can run (and say why) when the steps before the search
    # failed and left no results to pass on.
    data_root: str = field(help="root folder; the default Optuna storage is SQLite on it")
    run_key: str = field(help="identifies the pipeline run (DAG id / run id): its study is named after it")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    storage: str | None = field(None, help="Optuna storage URL (default: $OPTUNA_STORAGE, else SQLite on the "
                                           "data root)")
    heartbeat_seconds: int = field(15, help="the workers' trial heartbeat; a trial silent for 3 heartbeats "
                                            "counts as failed")


def _settle(study: Any, heartbeat_seconds: int) -> None:
    """Fail the trials of workers that died. select runs once every worker stopped, but a dead worker's trial
    turns stale only 3 heartbeats after its last one: wait that long at most for such trials (a trial whose
    worker still beats stays running, and select uses what finished)."""
    search.fail_stale_trials(study)
    deadline = time.monotonic() + 4 * heartbeat_seconds
    while (running := search.counts(study).running) and time.monotonic() < deadline:
        log.info("%d trial(s) still running; waiting up to %.0f s for their heartbeats to stop or go on",
                 running, deadline - time.monotonic())
        time.sleep(min(heartbeat_seconds, max(0.1, deadline - time.monotonic())))
        search.fail_stale_trials(study)
    if running:
        log.warning("%d trial(s) still running with a live heartbeat: is a worker still training? selecting "
                    "from the trials that finished", running)


def _close_abandoned_runs(client: Any, study: Any) -> None:
    """MLflow runs whose state is not their trial's: a failed trial's run still 'running' (the worker died
    mid-trial), or closed as COMPLETE/PRUNED by a worker killed before the study saved the result (the trial
    went stale, failed and was retried), is marked failed with the cause; a complete or pruned trial's run
    still 'running' (MLflow did not answer when its worker closed it) is closed as the study has it."""
    from mlflow.exceptions import MlflowException
    from optuna.trial import TrialState

    finished = (TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=finished):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:  # deleted by hand: nothing to close
            log.info("trial %d: MLflow run %s not found (%s)", trial.number, run_id, exc.error_code)
            continue
        if trial.state != TrialState.FAIL:
            if run.info.status == "RUNNING":
                client.set_tag(run_id, "optuna.state", trial.state.name)
                client.set_terminated(run_id, "FINISHED")
            continue
        if run.info.status == "RUNNING" or run.data.tags.get("optuna.state", "FAIL") != "FAIL":
            cause = ("worker stopped mid-trial" if run.info.status == "RUNNING" else
                     "worker stopped before the study saved this result; the trial was failed and retried")
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_tag(run_id, "error", trial.user_attrs.get("error") or cause)
            client.set_terminated(run_id, "FAILED")


def _why_no_trial(study: Any) -> str:
    """The likeliest reason a study holds no trial, from what its setup recorded."""
    if not study.user_attrs.get("mlflow_run_id"):
        return ("create_study did not finish (it records the search's MLflow run last); see its log, fix the "
                "cause (often MLflow unreachable) and clear create_study")
    created = study.user_attrs.get("created_at")
    minutes = study.user_attrs.get("timeout_minutes")
    if created is not None and minutes is not None and time.time() < float(created) + float(minutes) * 60:
        return ("no worker started a trial, with time left in the budget: the tune tasks failed before their "
                "first trial (or never started); see their logs")
    return ("the time budget (search_timeout_minutes, counted from the study's creation) was spent before a "
            "worker started one, or no worker ran; see the tune tasks' logs, and trigger a new run with a larger "
            "time budget")


def best_trial(study: Any) -> tuple[Any, str, float]:
    """(trial, state, value): the best complete trial; if none completed, the pruned trial whose last epoch
    scored best, with that score."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        return best, "complete", best.value
    if all(t.state == TrialState.WAITING for t in trials):  # none, or only the queued start point
        raise StepError(f"search {study.study_name}: no trial ran: {_why_no_trial(study)}")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not pruned:
        raise StepError(f"search {study.study_name}: no trial finished ({search.counts(study).as_dict()}); "
                        f"{search.failure_summary(study)}")
    sign = 1 if study.direction == StudyDirection.MAXIMIZE else -1

    def last(t: Any) -> float:
        return t.intermediate_values[max(t.intermediate_values)]

    best = max(pruned, key=lambda t: sign * last(t))
    return best, "pruned", last(best)


def _trials_table(study: Any, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["number", "state", "value", "epochs", *names, "worker", "seconds", "mlflow_run_id", "error",
                      "start_point"])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
                t.datetime_start else ""
            out.writerow([t.number, t.state.name, "" if t.value is None else t.value, search.epochs_run(t),
                          *[t.params.get(n, "") for n in names], t.user_attrs.get("worker", ""), seconds,
                          t.user_attrs.get("mlflow_run_id", ""), t.user_attrs.get("error", ""),
                          t.user_attrs.get("start_point", "")])


def _plots(study: Any, folder: Path) -> list[Path]:
    """Optuna's own plots (matplotlib flavour: PNGs that the MLflow UI shows inline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    made = []
    plots = {"optimization_history": vis.plot_optimization_history,
             "intermediate_values": vis.plot_intermediate_values,
             "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of < 2 trials
                log.info("no %s plot: %s", name, exc)
                plt.close("all")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(10, 5.5)
            fig.tight_layout()
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close("all")
            made.append(path)
    return made


def run(config: SelectConfig) -> dict[str, Any]:
    import optuna

    storage = search.open_storage(search.storage_url(config.storage, config.data_root), config.heartbeat_seconds,
                                  retry_stale=False)  # every worker has stopped: none would run a retry
    name = search.study_name(config.run_key)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        raise StepError(f"no study {name!r} in the Optuna storage: the search never started for this run "
                        "(create_study did not run or failed: see its log, and those of the tasks before it)"
                        ) from exc
    _settle(study, config.heartbeat_seconds)
    settings = study.user_attrs.get("settings") or {}
    parent = study.user_attrs.get("mlflow_run_id")
    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    _close_abandoned_runs(client, study)
    counts = search.counts(study)
    epochs = sum(search.epochs_run(t) for t in study.get_trials(deepcopy=False))
    try:
        best, kind, value = best_trial(study)  # raises, naming the most common cause, if nothing finished
    except StepError as exc:
        if parent:  # the search run says why it failed, and lists its trials
            with tempfile.TemporaryDirectory() as tmp:
                _trials_table(study, Path(tmp) / "trials.csv")
                client.log_artifact(parent, str(Path(tmp) / "trials.csv"), "search")
            client.set_tag(parent, "error", str(exc)[:5000])
            client.set_terminated(parent, "FAILED")
        raise
    hp = search.hyperparameters(best, settings.get("space", {}))
    objective = settings.get("objective", "val_accuracy")
    if kind == "pruned":
        log.warning("no trial completed; using pruned trial %d (best last epoch)", best.number)
    if counts.failed:
        log.warning("%d trial(s) failed; %s", counts.failed, search.failure_summary(study))

    if parent:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _trials_table(study, folder / "trials.csv")
            (folder / "best.json").write_text(json.dumps(
                {"trial": best.number, "state": kind, objective: value, "hyperparameters": hp}, indent=2) + "\n")
            for path in [folder / "trials.csv", folder / "best.json", *_plots(study, folder)]:
                client.log_artifact(parent, str(path), "search")
        from mlflow.entities import Metric, RunTag

        # A search continued (more trials, same DAG run) is selected again: its step (trials finished so far)
        # and time make these the run's latest values, and tags, unlike params, can change.
        metrics = {f"best_{objective}": value, "trials_complete": counts.complete, "trials_pruned": counts.pruned,
                   "trials_failed": counts.failed, "epochs_total": epochs}
        now = int(time.time() * 1000)
        tags = {**{f"best.{k}": str(v) for k, v in hp.items()}, "search.best_trial": str(best.number),
                "search.best_run_id": best.user_attrs.get("mlflow_run_id", ""),
                "search.best_is_start_point": str(bool(best.user_attrs.get("start_point"))).lower()}
        client.log_batch(parent, metrics=[Metric(k, float(v), now, counts.finished) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        if "error" in client.get_run(parent).data.tags:  # an earlier select's failure, fixed since (tasks cleared)
            client.delete_tag(parent, "error")
        client.set_terminated(parent, "FINISHED")
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
    start = best.user_attrs.get("start_point")
    log.info("best of %d trials (%s): trial %d%s, %s=%.4f: %s; %d epochs in all", len(study.trials),
             counts.as_dict(), best.number, f" (the start point: {start})" if start else "",
             objective, value, shown, epochs)
    if parent:
        log.info("search run: %s", tracking.run_url(mlflow, parent))
    return {"hyperparameters": hp, "trial": best.number, "trial_state": kind,
            "value": None if not math.isfinite(value) else value, "objective": objective, "study": name,
            "search_run_id": parent, "trial_run_id": best.user_attrs.get("mlflow_run_id"),
            "start_point": start,
            "counts": counts.as_dict(), "epochs": epochs}


def main(argv: list[str] | None = None) -> int:
    return cli(run, SelectConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
