"""The search's shared study under trouble: dead and slow workers, racing workers, retries, storage outages."""

from __future__ import annotations

import multiprocessing
import re
import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from mlsteps import search, tune
from mlsteps.core import NodeError, StepError

HEARTBEAT = 1  # seconds; a trial is stale after 3
FIXED = {"width": 8, "batch_size": 32, "dropout": 0.1}


def _study(url: str, name: str = "s") -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=search.open_storage(url, HEARTBEAT), direction="maximize",
                               load_if_exists=True)


def _ask(study: Any) -> Any:
    """study.ask() as a worker's optimize loop does it (heartbeats are meant for optimize: no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return study.ask()


def _states(study: Any) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


# --- a worker that dies before its first heartbeat --------------------------------------------------------------


def test_a_trial_whose_worker_died_before_its_heartbeat_thread_started_is_still_failed_and_retried(
        tmp_path) -> None:
    """Optuna starts a trial's heartbeat thread only once study.ask() returned; a worker killed before that
    used to leave a running trial that no heartbeat check could fail, so the other workers waited for it
    until the time budget ran out. Its retry, taken from the queue, must beat from the start as well."""
    study = _study(f"sqlite:///{tmp_path / 'optuna.db'}")
    _ask(study)  # trial 0: created, then the worker is gone (no heartbeat thread ever ran)

    time.sleep(3 * HEARTBEAT + 1)
    search.fail_stale_trials(study)
    assert _states(study) == {0: "FAIL", 1: "WAITING"}  # failed, and its retry queued

    retry = _ask(study)  # another worker takes the retry ... and dies at once too
    assert retry.number == 1
    time.sleep(3 * HEARTBEAT + 1)
    search.fail_stale_trials(study)
    assert _states(study) == {0: "FAIL", 1: "FAIL"}  # one retry each (max_retry=1): nothing left running


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_trial_whose_first_heartbeat_failed_to_write_is_still_failed_and_retried(database, tmp_path, monkeypatch,
                                                                                    request) -> None:
    """The trial and its first heartbeat are written in two transactions: a first heartbeat lost to "database is
    locked" (or a kill in between) left a running trial without any, which Optuna's check passes over."""
    import sqlalchemy.exc

    url = f"sqlite:///{tmp_path / 'optuna.db'}" if database == "sqlite" else request.getfixturevalue("postgresql")
    study = _study(url, name=f"first-heartbeat-{tmp_path.name}")
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's caching wrapper
    real, lost = storage.record_heartbeat, []

    def locked_once(trial_id: int) -> None:
        if not lost:
            lost.append(trial_id)
            raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("database is locked"))
        real(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", locked_once)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        _ask(study)  # the worker's optimize ends here; trial 0 stays running, without a heartbeat
    assert _states(study) == {0: "RUNNING"}
    search.fail_stale_trials(study)
    assert _states(study) == {0: "RUNNING"}, "not before the grace period"

    time.sleep(3 * HEARTBEAT + 1)
    search.fail_stale_trials(study)
    assert _states(study) == {0: "FAIL", 1: "WAITING"}  # failed, and its retry queued


def test_a_worker_waiting_on_another_workers_trial_stops_once_the_time_budget_is_spent(tmp_path,
                                                                                       monkeypatch) -> None:
    """The first trials all failed and another worker's trial still runs: the worker waits for its verdict,
    but it waited past the time budget for good when that trial never ended (up to the task's 12 h timeout,
    on each try)."""
    import threading

    from optuna.trial import TrialState, create_trial

    config = _config(tmp_path, timeout_minutes=1.0, trials=5)
    study, _ = tune.open_study(config, {"digest": "d"}, create=True)
    study.set_user_attr("created_at", time.time() - 3600)  # the time budget ran out an hour ago
    for i in range(3):
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": f"ValueError: boom {i}"}))
    other = _ask(study)  # another worker's trial, beating for as long as the test runs
    storage = getattr(study._storage, "_backend", study._storage)
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.3):
            storage.record_heartbeat(other._trial_id)

    threading.Thread(target=beat, daemon=True).start()
    monkeypatch.setattr(tune.data, "load_manifest", lambda path: {"digest": "d"})
    monkeypatch.setattr(tune.tracking, "connect", lambda uri: types.SimpleNamespace())
    monkeypatch.setattr(tune, "parent_run", lambda mlflow, config, study: "P")
    monkeypatch.setattr(tune, "_Trainer", lambda *args: types.SimpleNamespace(trial_numbers=[]))
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(tune.run(config)), daemon=True)
    try:
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "still waiting on the other trial, an hour past the time budget"
    finally:
        beating.set()
    assert outcome[0]["stopped"] == "every trial failed"
    assert _states(study)[other.number] == "RUNNING"


# --- two workers on one SQLite file -----------------------------------------------------------------------------


def _take_waiting_trials(url: str, count: int, start: Any, out: Any) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="s", storage=search.open_storage(url, HEARTBEAT))
    start.wait()
    out.put([_ask(study).number for _ in range(count)])


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_workers_never_take_the_same_waiting_trial(database, tmp_path, request) -> None:
    """Waiting trials are the retries of lost trials. SQLite ignores SELECT ... FOR UPDATE, so without a lock
    two workers both moved one waiting trial to running (about 1 in 13 here) and trained it twice; PostgreSQL
    locks the trial's row itself (no lock file)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if database == "sqlite" else request.getfixturevalue("postgresql")
    study = _study(url)
    for k in range(120):
        study.enqueue_trial({"x": k}, skip_if_exists=False)
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [context.Process(target=_take_waiting_trials, args=(url, 60, start, out)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    taken = [out.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)

    assert sorted(taken[0] + taken[1]) == list(range(120))  # each queued trial went to exactly one worker


# --- a live worker whose trial another worker failed ------------------------------------------------------------


class _Runs:
    """Stands in for the MLflow client (the trial's run): records what the trainer tells it."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
        self.calls.append(("create_run", run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="R"))

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.calls.append(("set_tag", key, value))

    def set_terminated(self, run_id: str, status: str) -> None:
        if self.fail_on == "set_terminated":
            raise ConnectionError("MLflow server restarting")
        self.calls.append(("set_terminated", status))


def _trainer(fit: Any, runs: _Runs) -> Any:
    """A tune worker's trainer whose training is ``fit`` (the trial bookkeeping around it is the real one)."""
    trainer = object.__new__(tune._Trainer)
    trainer.config = types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT)
    trainer.space = search.parse_space({**FIXED, "learning_rate": {"low": 0.001, "high": 0.01}})
    trainer.experiment_id, trainer.parent_run_id, trainer.metric = "0", "P", "val_accuracy"
    trainer.client, trainer.trial_numbers = runs, []
    trainer.mlflow = types.SimpleNamespace(entities=types.SimpleNamespace(Param=lambda k, v: (k, v)))
    trainer.keras = types.SimpleNamespace(backend=types.SimpleNamespace(clear_session=lambda: None))
    trainer._fit = fit
    return trainer


@pytest.mark.parametrize("then", ["reports the next epoch", "fails in training"])
def test_a_trial_failed_by_another_worker_while_training_ends_that_trial_and_the_worker_goes_on(
        tmp_path, then) -> None:
    """A worker whose heartbeats stalled (database slow) has its trial failed and retried by another worker;
    when it next reports an epoch (or its training fails) it must give the trial up and close its MLflow run,
    not crash the worker."""
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    other_worker = search.open_storage(url, HEARTBEAT)

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        trial.report(0.5, 1)
        other_worker.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # judged stale elsewhere
        if then == "fails in training":
            raise MemoryError("out of memory")
        trial.report(0.6, 2)  # the next epoch
        return 0.6, None, 2

    runs = _Runs()
    tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT))

    assert _states(study) == {0: "FAIL"}
    assert ("set_terminated", "FAILED") in runs.calls
    [error] = [c[2] for c in runs.calls if c[:2] == ("set_tag", "error")]
    assert "failed by another worker" in error
    # select's one error names it too, not "killed or out of memory" (the trial itself takes no attribute now)
    assert "failed by another worker" in search.failure_summary(study)


def _fail_elsewhere_when_saving(study: Any, url: str) -> None:
    """Another worker fails the trial as stale just as this one starts saving its result."""
    from optuna.trial import TrialState

    other_worker = search.open_storage(url, HEARTBEAT)
    after_trial = study.sampler.after_trial

    def judged_stale_meanwhile(study_: Any, trial: Any, state: Any, values: Any) -> None:
        other_worker.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        after_trial(study_, trial, state, values)

    study.sampler.after_trial = judged_stale_meanwhile


@pytest.mark.parametrize("when", ["while-saving", "before-saving"])
@pytest.mark.parametrize("outcome", ["complete", "pruned"])
def test_a_trial_failed_by_another_worker_when_its_result_is_saved_does_not_crash_the_worker(
        tmp_path, outcome, when) -> None:
    """The other worker's change can land once the last epoch was reported: before the save, which Optuna then
    refuses ("Cannot tell a FAIL trial"), or during it (UpdateFinishedTrialError); Optuna covers either with its
    own "Should not reach." AssertionError when the objective returned a value. Each used to end the worker."""
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    other_worker = search.open_storage(url, HEARTBEAT)
    if when == "while-saving":
        _fail_elsewhere_when_saving(study, url)

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        trial.report(0.5, 1)
        if when == "before-saving":
            other_worker.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        return (0.5, 1, 1) if outcome == "pruned" else (0.5, None, 1)

    runs = _Runs()
    tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT))

    assert _states(study) == {0: "FAIL"}
    # Its MLflow run, closed as finished just before, ends failed like the trial, saying why.
    assert [c for c in runs.calls if c[0] == "set_terminated"] == [("set_terminated", "FINISHED"),
                                                                   ("set_terminated", "FAILED")]
    assert ("set_tag", "optuna.state", "FAIL") in runs.calls
    [error] = [c[2] for c in runs.calls if c[:2] == ("set_tag", "error")]
    assert "failed by another worker" in error
    assert "failed by another worker" in search.failure_summary(study)


def test_a_trial_that_failed_on_its_own_keeps_its_cause_when_another_worker_fails_it_while_it_is_saved(
        tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    _fail_elsewhere_when_saving(study, url)

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        raise MemoryError("out of memory")

    runs = _Runs()
    tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT))

    assert _states(study) == {0: "FAIL"}
    assert [c[2] for c in runs.calls if c[:2] == ("set_tag", "error")] == ["MemoryError: out of memory"]
    assert [c for c in runs.calls if c[0] == "set_terminated"] == [("set_terminated", "FAILED")]


def test_ctrl_c_stops_the_worker_even_when_another_worker_had_failed_its_trial(tmp_path) -> None:
    """Optuna records an interrupted trial as failed and re-raises the interrupt; when the trial was already
    failed elsewhere, that record is refused instead, and the refusal hid the Ctrl-C: the worker went on."""
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    other_worker = search.open_storage(url, HEARTBEAT)

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        trial.report(0.5, 1)
        other_worker.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        raise KeyboardInterrupt

    runs = _Runs()
    with pytest.raises(KeyboardInterrupt):
        tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT))

    assert [c for c in runs.calls if c[0] == "set_terminated"] == [("set_terminated", "KILLED")]


@pytest.mark.parametrize("read_back", ["works", "fails-too"])
@pytest.mark.parametrize("failed_elsewhere", [False, True], ids=["running", "failed-by-another-worker-too"])
@pytest.mark.parametrize("outcome", ["complete", "pruned"])
def test_a_result_that_fails_to_save_for_another_reason_ends_the_worker_with_that_error(
        tmp_path, outcome, failed_elsewhere, read_back) -> None:
    """Only the refusal to save into a trial another worker failed is passed over; any other failure to save a
    result (here the database going away) ends the worker, so Airflow retries it, naming the real error rather
    than what Optuna's bookkeeping raises over it ("Should not reach.", or UnboundLocalError when it cannot read
    the trial back either), even when another worker had failed the trial as well."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    if failed_elsewhere:
        _fail_elsewhere_when_saving(study, url)
    save, read = study._storage.set_trial_state_values, study._storage.get_trial
    gone = []

    def database_gone(trial_id: int, state: Any, values: Any = None) -> bool:
        if state.is_finished():
            gone.append(True)
            raise ConnectionError("database went away")
        return save(trial_id, state, values)

    def read_while_gone(trial_id: int) -> Any:
        if gone and read_back == "fails-too":
            raise ConnectionError("database went away")
        return read(trial_id)

    study._storage.set_trial_state_values, study._storage.get_trial = database_gone, read_while_gone

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        trial.report(0.5, 1)
        return (0.5, 1, 1) if outcome == "pruned" else (0.5, None, 1)

    runs = _Runs()
    with pytest.raises(ConnectionError, match="database went away"):
        tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0, heartbeat_seconds=HEARTBEAT))

    # Left to the heartbeat check once this worker is gone (when another worker has not failed it already).
    assert _states(study) == {0: "FAIL" if failed_elsewhere else "RUNNING"}
    # Its MLflow run, closed as finished before the save, no longer says so: the trial will be retried.
    assert [c for c in runs.calls if c[0] == "set_terminated"] == [("set_terminated", "FINISHED"),
                                                                    ("set_terminated", "FAILED")]


def test_a_trained_trial_is_kept_when_mlflow_fails_to_close_its_run(tmp_path) -> None:
    study = _study(f"sqlite:///{tmp_path / 'optuna.db'}")

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        trial.report(0.8, 1)
        return 0.8, None, 1

    tune.optimize_one(study, _trainer(fit, _Runs(fail_on="set_terminated")), types.SimpleNamespace(worker=0))

    [trial] = study.get_trials(deepcopy=False)
    assert (trial.state.name, trial.value) == ("COMPLETE", 0.8)


def test_a_trial_failing_inside_tensorflow_records_the_ops_message_not_graph_execution_error(tmp_path) -> None:
    """TensorFlow's op errors start "Graph execution error:" and where the op was defined: the cause that
    select names (and the trial's MLflow run shows) is the op's own message."""
    import tensorflow as tf

    study = _study(f"sqlite:///{tmp_path / 'optuna.db'}")

    @tf.function
    def gather(indices):
        return tf.gather(tf.constant([1.0, 2.0]), indices)

    def fit(trial: Any, hp: dict[str, Any], run_id: str) -> tuple[float, int | None, int]:
        gather(tf.constant([5]))  # as a label beyond the classifier's outputs fails inside fit
        raise AssertionError("not reached")

    runs = _Runs()
    tune.optimize_one(study, _trainer(fit, runs), types.SimpleNamespace(worker=0))  # the trial fails, not the worker
    [trial] = study.get_trials(deepcopy=False)
    assert trial.user_attrs["error"] == "InvalidArgumentError: indices[0] = 5 is not in [0, 2)"
    assert ("set_tag", "error", "InvalidArgumentError: indices[0] = 5 is not in [0, 2)") in runs.calls


# --- a worker's retry -------------------------------------------------------------------------------------------


def _config(tmp_path: Path, **overrides: Any) -> tune.TuneConfig:
    settings = {"manifest": "m", "data_root": str(tmp_path), "run_key": "k", "tracking_uri": "unused",
                "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "trials": 8, "max_epochs": 1, "pruner": "none",
                "sampler": "random", "search_space": '{"width": 8, "batch_size": 32, "dropout": 0.1}',
                "heartbeat_seconds": HEARTBEAT, "seed": 7}
    return tune.TuneConfig(**{**settings, **overrides})


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_workers_retry_does_not_propose_again_the_trials_its_first_try_ran(tmp_path, sampler) -> None:
    """Airflow retries a failed worker with the same flags (same --worker, same --seed): seeded by those
    alone, its sampler replayed the first try's proposals, spending the budget on trials already run."""
    manifest = {"digest": "d"}
    tune.open_study(_config(tmp_path, sampler=sampler), manifest, create=True)
    proposed = []
    for _try in range(2):
        study, space = tune.open_study(_config(tmp_path, sampler=sampler), manifest, create=False)
        study.optimize(lambda trial: search.suggest(trial, space)["learning_rate"], n_trials=2)
        proposed.append([t.params["learning_rate"] for t in study.get_trials(deepcopy=False)][-2:])

    assert not set(proposed[0]) & set(proposed[1]), proposed


def test_a_fresh_studys_first_worker_samples_from_the_seed_it_was_given(tmp_path) -> None:
    """What the benchmark relies on: TPE's start-up trials are random search's with the same --seed."""
    import optuna

    config = _config(tmp_path, sampler="tpe")
    tune.open_study(config, {"digest": "d"}, create=True)
    study, space = tune.open_study(config, {"digest": "d"}, create=False)
    study.optimize(lambda trial: search.suggest(trial, space)["learning_rate"], n_trials=3)
    plain = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=config.seed))
    plain.optimize(lambda trial: search.suggest(trial, space)["learning_rate"], n_trials=3)

    assert [t.params for t in study.get_trials()] == [t.params for t in plain.get_trials()]


# --- the storage itself -----------------------------------------------------------------------------------------


def test_a_database_that_does_not_answer_is_retryable_and_a_bad_url_is_not(tmp_path) -> None:
    with pytest.raises(search.StorageUnavailable, match=r"cannot reach the Optuna storage .*u:\*\*\*@") as down:
        search.open_storage("postgresql+psycopg2://u:secret@127.0.0.1:1/optuna", HEARTBEAT)
    # exit 1 in one line (no traceback): the step runners retry it
    assert isinstance(down.value, NodeError) and not isinstance(down.value, StepError)
    assert "secret" not in str(down.value)
    with pytest.raises(StepError, match="not an SQLAlchemy URL"):
        search.open_storage("not a url", HEARTBEAT)
    with pytest.raises(StepError, match="in-memory SQLite database is private to each worker"):
        search.open_storage("sqlite://", HEARTBEAT)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://optuna:s3cret@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
    ("postgresql+psycopg2://db:5432/optuna?user=optuna&password=s3cret&sslmode=require",
     "postgresql+psycopg2://db:5432/optuna?user=optuna&password=***&sslmode=require"),
    ("optuna:s3cret@db/optuna", "optuna:***@db/optuna"),
    ("postgres ql://optuna:s3cret@db/optuna", "postgres ql://optuna:***@db/optuna"),
    ("postgresql://optuna:s3/c@ret@db/optuna", "postgresql://optuna:***@db/optuna"),
    ("postgresql://optuna:s3?cret@db/optuna", "postgresql://optuna:***@db/optuna"),
    ("postgresql://optuna@db:5432/optuna", "postgresql://optuna@db:5432/optuna"),
    ("sqlite:////data/optuna/studies.db", "sqlite:////data/optuna/studies.db"),
], ids=["user-password", "query-password", "no-scheme", "scheme-typo", "unescaped-at-and-slash",
        "unescaped-question-mark", "no-password", "sqlite"])
def test_storage_urls_are_logged_without_their_password(url, shown, caplog) -> None:
    """Every search task logs the URL, and Airflow shows task logs in its UI: also a URL with a typo (the one
    an error message has to quote) or an unescaped character in its password loses the password."""
    import logging

    with caplog.at_level(logging.INFO, logger=search.log.name):
        search.storage_url(url, "/unused")
    assert f"Optuna storage: {shown}" in caplog.text


@pytest.mark.parametrize(("url", "error", "words"), [
    ("postgresql://optuna:s3cret@127.0.0.1:1/optuna", search.StorageUnavailable, "Connection refused"),
    ("postgresql+psycopg2://127.0.0.1:1/optuna?user=optuna&password=s3cret", search.StorageUnavailable,
     "Connection refused"),
    ("optuna:s3cret@127.0.0.1:1/optuna", StepError, "is not an SQLAlchemy URL"),
    ("postgres ql://optuna:s3cret@127.0.0.1:1/optuna", StepError, "is not an SQLAlchemy URL"),
    # the driver takes "ret@127.0.0.1" for the host, and says so
    ("postgresql://optuna:s3/c@ret@127.0.0.1:1/optuna", search.StorageUnavailable, "could not translate host name"),
], ids=["user-password", "query-password", "no-scheme", "scheme-typo", "unescaped-at-and-slash"])
def test_storage_errors_quote_the_url_and_the_drivers_words_without_the_password(url, error, words) -> None:
    with pytest.raises(error, match=words) as raised:
        search.open_storage(url, HEARTBEAT)
    assert type(raised.value) is error
    message = str(raised.value)
    assert search.without_password(url) in message
    assert not any(piece in message for piece in ("s3cret", "s3/c", "ret@")), message


def test_a_plain_postgresql_url_uses_the_installed_driver() -> None:
    assert search._with_driver("postgresql://u:p%40ss@db:5432/optuna") == \
        "postgresql+psycopg2://u:p%40ss@db:5432/optuna"
    assert search._with_driver("postgresql+psycopg2://u@db/optuna") == "postgresql+psycopg2://u@db/optuna"
    assert search._with_driver("sqlite:////data/optuna.db") == "sqlite:////data/optuna.db"


def test_a_sqlite_url_in_a_missing_folder_is_a_configuration_error_not_an_outage(tmp_path) -> None:
    with pytest.raises(StepError, match=r"folder .*nowhere does not exist"):
        search.open_storage(f"sqlite:///{tmp_path / 'nowhere' / 'optuna.db'}", HEARTBEAT)


def test_an_outage_inside_optunas_own_session_is_still_retryable(tmp_path, monkeypatch) -> None:
    import sqlalchemy.exc
    from optuna.storages._rdb import models

    def connection_lost(*args: Any, **kwargs: Any) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT version_info", {}, Exception("server closed the connection"))

    # Optuna reads the schema version inside its own session, which wraps the error in StorageInternalError.
    monkeypatch.setattr(models.VersionInfoModel, "find", connection_lost)
    with pytest.raises(search.StorageUnavailable, match="server closed the connection"):
        search.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", HEARTBEAT)


# --- what select reports ----------------------------------------------------------------------------------------


def _failed(study: Any, error: str | None) -> None:
    import optuna

    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"error": error} if error else {}))


def test_the_most_common_cause_counts_one_failure_whatever_its_numbers() -> None:
    import optuna

    study = optuna.create_study()
    for batch, lr in ((3, 0.41), (17, 0.92), (2, 1.5e-1)):
        _failed(study, f"RuntimeError: NaN or Inf loss encountered at batch {batch}; learning_rate={lr}")
    _failed(study, None)  # a worker that died
    summary = search.failure_summary(study)
    assert summary.startswith("most common cause (3 of 4 failed trials): RuntimeError: NaN or Inf loss")
    assert "batch 3; learning_rate=0.41" in summary  # one real message, as it was



def test_failures_that_differ_in_an_http_status_or_a_name_stay_apart() -> None:
    import optuna

    study = optuna.create_study()
    for code in (403, 503, 503):
        _failed(study, f"MlflowException: API request failed with error code {code} != 200")
    _failed(study, "TypeError: expected float16, got float32")
    assert search.failure_summary(study) == ("most common cause (2 of 4 failed trials): MlflowException: API "
                                             "request failed with error code 503 != 200")
    assert search._cause_kind("expected float16, got float32") == "expected float16, got float32"


def test_select_queues_no_retry_of_a_dead_workers_trial_since_no_worker_is_left(tmp_path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    _ask(study)  # a worker took a trial, then died: its heartbeat stops
    time.sleep(3 * HEARTBEAT + 1)
    as_select = optuna.load_study(study_name="s", storage=search.open_storage(url, HEARTBEAT, retry_stale=False))
    search.fail_stale_trials(as_select)
    assert _states(as_select) == {0: "FAIL"}  # no WAITING copy that nobody would ever run
    assert search.counts(as_select).failed_for_good == 1


@pytest.mark.parametrize(("setup", "expected"), [
    ({}, "create_study did not finish"),
    ({"mlflow_run_id": "r", "created_at": "now", "timeout_minutes": 60}, "no worker started a trial, with time left"),
    ({"mlflow_run_id": "r", "created_at": 0.0, "timeout_minutes": 60}, "the time budget (search_timeout_minutes"),
], ids=["setup-unfinished", "workers-failed", "budget-spent"])
@pytest.mark.parametrize("start_point", [False, True], ids=["empty", "start-point-queued"])
def test_select_says_why_no_trial_ran(setup, expected, start_point) -> None:
    """Also when create_study queued a start point (the DAG's default) that no worker took."""
    import optuna

    from mlsteps import select

    study = optuna.create_study()
    for key, value in setup.items():
        study.set_user_attr(key, time.time() if value == "now" else value)
    if start_point:
        study.enqueue_trial({"learning_rate": 0.003, "batch_size": 128})
    with pytest.raises(StepError, match=re.escape(expected)):
        select.best_trial(study)


def test_a_time_budget_that_is_not_a_finite_number_is_refused() -> None:
    from mlsteps import tune

    config = tune.TuneConfig(manifest="m.json", data_root="/tmp", run_key="k", timeout_minutes=float("nan"))
    with pytest.raises(StepError, match="--timeout-minutes must be a number > 0, got nan"):
        tune._check(config)
