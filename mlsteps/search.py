"""Hyperparameter search, shared by the ``tune`` and ``select`` steps: search space, study storage, budgets.

The search space is declared once, below, and can be overridden per run with a JSON object whose keys are
the parameters to change::

    {"learning_rate": {"low": 0.0005, "high": 0.01, "log": true},   # a range (int for integer parameters)
     "width": [16, 32, 48],                                          # a list: one of these values
     "dropout": 0.2}                                                 # a value: fixed, not searched

The study lives in shared storage: ``OPTUNA_STORAGE`` (any SQLAlchemy URL; PostgreSQL in production),
else an SQLite file under the data root. Trials send heartbeats, so a worker killed mid-trial leaves a
trial that another worker marks failed (and retries once) instead of one that runs forever.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import NodeError, StepError, hide_passwords, without_password

log = logging.getLogger("mlsteps.search")

STORAGE_ENV = "OPTUNA_STORAGE"

# The default search space: parameter -> distribution. ``int`` parameters get integer ranges.
SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
    "width": {"type": "int", "low": 16, "high": 64, "step": 8},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}
INTEGER_PARAMETERS = ("batch_size", "width")
# What each parameter can be at all: (lowest, highest, whether each of those is allowed itself, whole number).
# The trigger form's limits (dags/mnist_training.py; a test holds them equal): a search trains nothing the form
# would refuse with the search off, and train refuses what lies outside.
DOMAINS: dict[str, tuple[float, float, bool, bool, bool]] = {
    "learning_rate": (0.0, 1.0, False, True, False),  # 0 < learning rate <= 1
    "batch_size": (8, 8192, True, True, True),  # 8 <= batch <= 8192
    "width": (4, 512, True, True, True),  # 4 <= filters in the first convolution <= 512
    "dropout": (0.0, 0.9, True, True, False),  # 0 <= dropout <= 0.9
}
MAX_STEPS = 10**6  # values a stepped range may hold
PRUNERS = ("successive_halving", "hyperband", "median", "none")
# Successive halving and Hyperband: a trial trains on past a rung (epochs 1, N, N^2, ...) only if it is in the
# best 1/N of the trials that reached that rung. 2 (more rungs, each keeping half) was measured against 3 and
# is not better on every budget (docs/benchmarks.md, "reduction factor 2").
HALVING_PRUNERS = ("successive_halving", "hyperband")
REDUCTION_FACTOR = 3
SAMPLERS = ("tpe", "random")
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}


def parse_space(overrides: str | dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The default space with ``overrides`` applied; every entry normalised to {"type": ..., ...}."""
    overrides = _parameters(overrides, "search space", "range",
                            '{"learning_rate": {"low": 0.001, "high": 0.01, "log": true}}')
    space = {name: dict(spec) for name, spec in SEARCH_SPACE.items()}
    for name, value in overrides.items():
        space[name] = _normalise(name, value)
    for name, spec in space.items():
        _distribution(name, spec)  # fail now, with the parameter's name, not inside a worker
        _check_domain(name, spec)
        if name in INTEGER_PARAMETERS:  # 32.0 -> 32: train's integer flags refuse "32.0"
            for key in ("low", "high", "step", "value"):
                if key in spec:
                    spec[key] = int(spec[key])
            if "choices" in spec:
                spec["choices"] = [int(c) for c in spec["choices"]]
        if spec["type"] == "categorical" and len(set(spec["choices"])) < len(spec["choices"]):
            # each a category of its own to the samplers: drawn twice as often, listed twice in the plots
            twice = sorted({c for c in spec["choices"] if spec["choices"].count(c) > 1})
            raise StepError(f"search space: {name}: {', '.join(map(str, twice))} given more than once in the "
                            "choices; list each value once")
    return space


def batch_split_error(space: dict[str, dict[str, Any]], gpus: int) -> str | None:
    """Why training on ``gpus`` GPUs could fail on a batch size the (parsed) space holds, or None: with several
    GPUs, train needs a batch that splits evenly over them, and would refuse the search's pick after the search."""
    if gpus <= 1:
        return None
    spec = space["batch_size"]
    if spec["type"] == "categorical":
        values: Any = spec["choices"]
    elif spec["type"] == "fixed":
        values = [spec["value"]]
    else:  # a whole-number range: every value from low to high in steps (1 on a log scale)
        values = range(int(spec["low"]), int(spec["high"]) + 1, int(spec.get("step") or 1))
    bad: list[int] = []
    for value in values:
        if int(value) % gpus:
            bad.append(int(value))
            if len(bad) == 6:
                break
    if not bad:
        return None
    fixed = sorted({-(-int(v) // gpus) * gpus for v in (spec.get("choices") or bad)})
    return (f"search space: batch_size may be {', '.join(map(str, bad))}, which do not split evenly over the {gpus} "
            f"GPUs train is given (the form's gpus), so train would refuse the search's pick; give batch sizes "
            f"that are multiples of {gpus} (e.g. search_space {{\"batch_size\": {json.dumps(fixed)}}}), or a "
            "number of GPUs that divides them")


def domain_error(name: str, value: Any) -> str | None:
    """Why ``value`` is not a possible value of hyperparameter ``name`` (see DOMAINS), or None if it is."""
    lowest, highest, low_ok, high_ok, whole = DOMAINS[name]
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    try:
        bad = (number is None or not math.isfinite(number) or (number < lowest if low_ok else number <= lowest)
               or (number > highest if high_ok else number >= highest)
               or (whole and not float(number).is_integer()))
    except OverflowError:  # an integer too large for a float
        bad = True
    if not bad:
        return None
    allowed = (f"{'>=' if low_ok else '>'} {lowest:g} and {'<=' if high_ok else '<'} {highest:g}"
               + (", a whole number" if whole else ""))
    return f"{value!r} is not a possible value; {name} must be {allowed}"


def _check_domain(name: str, spec: dict[str, Any]) -> None:
    """Refuse values the model cannot train with (a batch of 0, dropout 1.5, text) before any worker starts."""
    kind = spec["type"]
    values = (spec["choices"] if kind == "categorical" else [spec["value"]] if kind == "fixed"
              else [spec["low"], spec["high"]])
    for value in values:
        error = domain_error(name, value)
        if error:
            raise StepError(f"search space: {name}: {error}")


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # a JSON integer too large for a float: _check_domain names it
        return False


def _normalise(name: str, value: Any) -> dict[str, Any]:
    where = f"search space: {name}"
    if isinstance(value, list):
        if not value:
            raise StepError(f"{where}: an empty list of choices; give at least one value")
        return {"type": "categorical", "choices": value}
    if isinstance(value, dict):
        allowed = {"type", "low", "high", "log", "step", "choices"}
        extra = sorted(set(value) - allowed - {"value"})
        if extra:
            raise StepError(f"{where}: unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")
        kind = value.get("type")
        if "choices" in value or kind == "categorical":
            if not isinstance(value.get("choices"), list) or not value["choices"] or set(value) - {"type", "choices"}:
                raise StepError(f"{where}: a list of choices is {{\"choices\": [..]}} (or just [..]) and nothing "
                                "else; a range is {\"low\": .., \"high\": ..}")
            return {"type": "categorical", "choices": value["choices"]}
        default = SEARCH_SPACE[name]
        if kind == "fixed" or "value" in value:
            example = default["low"] if "low" in default else default["choices"][0]
            raise StepError(f"{where}: a fixed value is written as the value itself, e.g. \"{name}\": {example}")
        expected = "int" if name in INTEGER_PARAMETERS else "float"
        if kind not in (None, expected):
            raise StepError(f"{where}: a range of {name} is of type {expected}, not {kind!r} "
                            f"({name} takes {'whole numbers' if expected == 'int' else 'any number'}); "
                            "leave \"type\" out")
        if "log" in value and not isinstance(value["log"], bool):
            raise StepError(f"{where}: log is true or false (a JSON boolean), not {value['log']!r}")
        if "step" in value and (isinstance(value["step"], bool) or not isinstance(value["step"], (int, float))
                                or not value["step"] > 0):
            raise StepError(f"{where}: step is a number > 0, not {value['step']!r}")
        if "step" in value and "log" not in value and default.get("log"):
            raise StepError(f"{where}: a step cannot go with {name}'s default log scale; add \"log\": false")
        if value.get("log") and "step" not in value and default.get("step", 1) != 1:
            raise StepError(f"{where}: a log scale cannot go with {name}'s default step {default['step']:g}; "
                            "add \"step\": 1")
        # {"low": .., "high": ..} keeps the default's log scale and step
        inherited = {k: v for k, v in default.items() if k in ("log", "step") and k not in value}
        value = {**inherited, **value}
        missing = [k for k in ("low", "high") if k not in value]
        if missing:
            raise StepError(f"{where}: missing {' and '.join(missing)}; a range needs low and high")
        low, high, step = value["low"], value["high"], value.get("step")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
                      for v in (low, high, step or 1))
        if step is not None and numbers and high > low and (expected == "float" or all(
                float(v).is_integer() for v in (low, high, step))):  # else _distribution names the fraction
            steps = (high - low) / step if step > 0 else 0.0
            if steps > MAX_STEPS:  # Optuna's decimal arithmetic fails on such a step (DivisionImpossible)
                raise StepError(f"{where}: a step of {step:g} makes {steps:.3g} values between {low:g} and "
                                f"{high:g}; give a step of at least {(high - low) / MAX_STEPS:.3g}, or none")
            if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                # Optuna would quietly lower high to the last whole step ({"low": 8, "high": 12} -> only 8)
                source = f"the default step {step:g} of {name}" if "step" in inherited else f"step {step:g}"
                raise StepError(f"{where}: {low:g} to {high:g} is not a whole number of steps of {source}; "
                                "give a range whose ends differ by a multiple of it, or another \"step\"")
        return {**value, "type": expected}
    if isinstance(value, (int, float, str, bool)):
        return {"type": "fixed", "value": value}
    raise StepError(f"{where}: expected a range object, a list of choices or a fixed value, got {value!r}")


def _distribution(name: str, spec: dict[str, Any]) -> Any:
    import optuna.distributions as d

    where = f"search space: {name}"
    kind = spec.get("type")
    try:
        if kind == "float":
            return d.FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)),
                                       step=spec.get("step"))
        if kind == "int":
            for key in ("low", "high", "step"):
                if key in spec and not float(spec[key]).is_integer():
                    raise ValueError(f"{key} must be a whole number for {name}")
            return d.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)),
                                     step=int(spec.get("step", 1)))
        if kind == "categorical":
            return d.CategoricalDistribution(spec["choices"])
        if kind == "fixed":
            return None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise StepError(f"{where}: {exc}") from exc
    raise StepError(f"{where}: unknown type {kind!r}; use float, int, a list of choices or a fixed value")


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ask the trial for one value per parameter (fixed parameters are recorded as user attributes)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "fixed":
            values[name] = spec["value"]
            trial.set_user_attr(f"fixed.{name}", spec["value"])
        elif kind == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                             log=bool(spec.get("log", False)))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                               log=bool(spec.get("log", False)))
    return values


def _parameters(given: str | dict[str, Any] | None, where: str, kind: str, example: str) -> dict[str, Any]:
    """``given`` (a JSON object, as text or parsed; empty or None: {}) of searchable parameter -> ``kind``."""
    if isinstance(given, str):
        text = given.strip()
        try:
            given = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise StepError(f"{where}: not valid JSON ({exc}); expected an object such as {example}") from exc
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise StepError(f"{where}: expected a JSON object of parameter -> {kind}, got {given!r}")
    unknown = sorted(set(given) - set(SEARCH_SPACE))
    if unknown:
        raise StepError(f"{where}: unknown parameter(s) {', '.join(unknown)}; searchable: {', '.join(SEARCH_SPACE)}")
    return given


def parse_start_point(text: str, flag: str = "--start-from") -> dict[str, Any]:
    """A JSON object of hyperparameters (a start point of the search); every value a possible one (DOMAINS)."""
    values = _parameters(text, flag, "value",
                         '{"learning_rate": 0.003, "batch_size": 128, "width": 32, "dropout": 0.2}')
    for name, value in values.items():
        if error := domain_error(name, value):
            raise StepError(f"{flag}: {name}: {error}")
    return values


def _describe(spec: dict[str, Any]) -> str:
    if spec["type"] == "categorical":
        return f"one of {', '.join(str(c) for c in spec['choices'])}"
    text = f"{spec['low']:g} to {spec['high']:g}"
    return text + (f" in steps of {spec['step']:g}" if spec.get("step") not in (None, 1) else "")


def start_point(values: dict[str, Any], space: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """(trial params, notes): the values of ``values`` that ``space`` searches and can hold, typed as the
    sampler would give them; each value left out (outside the space, or fixed there) named in a note. What is
    left out the sampler chooses."""
    params: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in values.items():
        spec = space[name]
        if spec["type"] == "fixed":
            notes.append(f"{name}={value:g} left out: fixed at {spec['value']} in this search")
            continue
        inside = False
        if spec["type"] == "categorical":
            match = [c for c in spec["choices"] if c == value]
            if match:
                value, inside = match[0], True
        else:
            low, high, step = spec["low"], spec["high"], spec.get("step")
            if spec["type"] == "int" and float(value).is_integer():
                value = int(value)
                step = step or 1
            elif spec["type"] == "float":
                value = float(value)
            if (spec["type"] == "float" or isinstance(value, int)) and low <= value <= high:
                steps = (value - low) / step if step else 0.0
                inside = abs(steps - round(steps)) <= 1e-9 * max(1.0, abs(steps))
        if inside:
            params[name] = value
        else:
            notes.append(f"{name}={value:g} left out: outside the search space ({_describe(spec)})")
    return params, notes


def hyperparameters(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A finished trial's full set of hyperparameters (searched and fixed)."""
    values = dict(trial.params)
    for name, spec in space.items():
        if spec["type"] == "fixed":
            values[name] = spec["value"]
    return values


def storage_url(explicit: str | None, data_root: str) -> str:
    """--storage, else $OPTUNA_STORAGE, else an SQLite file on the data root (one machine or one volume)."""
    url = explicit or os.environ.get(STORAGE_ENV, "")
    if url:
        log.info("Optuna storage: %s", without_password(url))
        return url
    path = Path(data_root).resolve() / "optuna" / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("Optuna storage: SQLite file %s (no --storage or $%s)", path, STORAGE_ENV)
    return f"sqlite:///{path}"


class StorageUnavailable(NodeError):
    """The study's database did not answer (down, restarting, unreachable): worth retrying, unlike a bad URL."""


def _with_driver(url: str) -> str:
    """postgresql://... with the driver our images install (SQLAlchemy 2.1 picks psycopg 3 by default)."""
    import importlib.util

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        log.info("Optuna storage: postgresql:// taken as postgresql+psycopg2:// (the driver installed)")
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


@functools.cache
def _storage_class() -> type:
    """Optuna's RDB storage with two guarantees a search's workers rely on (see the methods)."""
    import fcntl
    import threading

    import optuna
    from optuna.trial import TrialState

    process_lock = threading.Lock()

    class SearchStorage(optuna.storages.RDBStorage):  # type: ignore[misc]
        def __init__(self, url: str, *, lock_file: Path | None, **kwargs: Any) -> None:
            self.lock_file = lock_file
            super().__init__(url, **kwargs)

        @contextlib.contextmanager
        def _state_lock(self) -> Any:
            # SQLite ignores SELECT ... FOR UPDATE, so two workers could both move one waiting trial (a lost
            # trial's retry) to running, or one could finish a trial another is failing as stale: state
            # changes take turns on a lock file next to the database. PostgreSQL locks the row itself.
            if self.lock_file is None:
                yield
                return
            with process_lock, self.lock_file.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

        def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
            # (what create_new_trial and Optuna's caching wrapper both call)
            trial = super()._create_new_trial(study_id, template_trial)
            if self.heartbeat_interval and trial.state == TrialState.RUNNING:
                # Optuna starts the heartbeat thread only once study.ask() returned (after reading the trial
                # back and the sampler's before_trial): a worker killed in that window, e.g. waiting on the
                # SQLite lock, would leave a running trial that no heartbeat check ever fails, stalling the
                # search.
                self.record_heartbeat(trial._trial_id)
            return trial

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            with self._state_lock():
                changed = super().set_trial_state_values(trial_id, state, values)
            if changed and state == TrialState.RUNNING and self.heartbeat_interval:
                self.record_heartbeat(trial_id)  # a waiting trial taken: beating from now, as above
            return changed

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            # Optuna passes over a running trial that has no heartbeat yet; its first one is written in a
            # transaction of its own, after the trial's: a worker killed in between, or a first heartbeat that
            # failed to write ("database is locked"), left a running trial nothing ever failed, and the other
            # workers waited on it until the time budget ran out. Without a heartbeat, a trial is stale once
            # it has been running for the grace period (by its start time, which Optuna stores as naive UTC
            # from the clock of the worker that took it).
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            stale = super()._get_stale_trial_ids(study_id)
            grace = self.grace_period or 2 * self.heartbeat_interval
            cutoff = (datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                      - datetime.timedelta(seconds=grace))
            with _create_scoped_session(self.scoped_session) as session:
                silent = (session.query(models.TrialModel.trial_id)
                          .outerjoin(models.TrialHeartbeatModel)
                          .filter(models.TrialModel.study_id == study_id,
                                  models.TrialModel.state == TrialState.RUNNING,
                                  models.TrialHeartbeatModel.trial_heartbeat_id.is_(None),
                                  models.TrialModel._datetime_start_utc < cutoff)
                          .all())
            return [*stale, *(trial_id for (trial_id,) in silent if trial_id not in stale)]

    return SearchStorage


def open_storage(url: str, heartbeat_seconds: int, *, retry_stale: bool = True) -> Any:
    """An RDB storage with heartbeats; a stale trial is failed and (``retry_stale``) retried once with the same
    parameters. ``select`` opens it without retries: once every worker has stopped, none would run them.

    A bad URL or a missing driver is a StepError (retrying cannot help); a database that does not answer
    raises StorageUnavailable, which the step runners retry.
    """
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    given, shown = url, without_password(url)  # never print credentials
    where = f"the Optuna storage {shown!r} (--storage / ${STORAGE_ENV})"
    lock_file = None
    try:
        url = _with_driver(url)
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise StepError(f"{where} is not an SQLAlchemy URL ({hide_passwords(str(exc), given)}); e.g. "
                        "postgresql+psycopg2://user:password@host:5432/optuna or sqlite:////data/optuna.db") from exc
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StepError(f"{where}: an in-memory SQLite database is private to each worker; give a file, "
                            "e.g. sqlite:////data/optuna/studies.db")
        folder = Path(parsed.database).parent
        if not folder.is_dir():  # SQLite's "unable to open database file", which no retry can fix
            raise StepError(f"{where}: folder {folder} does not exist; create it, or point the URL elsewhere")
        engine_kwargs = {"connect_args": {"timeout": 60}}  # workers take turns on the file lock
        lock_file = Path(parsed.database).with_name(Path(parsed.database).name + ".lock")
    else:
        engine_kwargs = {"pool_pre_ping": True}

    def cause(exc: Exception) -> str:
        message = hide_passwords(str(exc).replace(url, shown).replace(given, shown), given).strip()
        return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"

    try:
        with warnings.catch_warnings():  # the heartbeat retry callback is 'experimental' since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _storage_class()(
                url, lock_file=lock_file, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                grace_period=heartbeat_seconds * 3,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                if retry_stale else None)
    except sqlalchemy.exc.OperationalError as exc:  # refused, timed out, restarting, bad credentials, locked
        raise StorageUnavailable(f"cannot reach {where}: {cause(exc)}") from exc
    except optuna.exceptions.StorageInternalError as exc:
        # Optuna wraps what fails inside its own sessions (reading the schema version): an outage there too.
        if isinstance(exc.__cause__ or exc.__context__, sqlalchemy.exc.OperationalError):
            raise StorageUnavailable(f"cannot reach {where}: {cause(exc.__cause__ or exc.__context__)}") from exc
        raise StepError(f"cannot open {where}: {cause(exc)}") from exc
    except Exception as exc:  # missing driver, schema of another Optuna version...
        raise StepError(f"cannot open {where}: {cause(exc)}") from exc


def study_name(run_key: str) -> str:
    """One study per pipeline run: re-running the search for the same DAG run continues it. The run key as it
    is (Optuna takes any string): a file-safe rendering would give run ids like retrain:v2 and retrain+v2, both
    valid in Airflow, one study between them."""
    return run_key


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar keeps parallel workers from sampling the same point while trials are running.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=5)


def reduction_factor(pruner: str, given: int = 0) -> int | None:
    """The reduction factor ``pruner`` runs with: ``given``, or its default if 0; None for other pruners."""
    return (given or REDUCTION_FACTOR) if pruner in HALVING_PRUNERS else None


def make_pruner(name: str, max_epochs: int, given_reduction_factor: int = 0) -> Any:
    """The tune step's pruner; a reduction factor of 0 takes the default (REDUCTION_FACTOR)."""
    import optuna

    factor = reduction_factor(name, given_reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=factor)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=factor)
    if name == "median":
        # Epochs are steps 1, 2, ...: judge a trial from its second epoch on, against 3 finished trials. Trials
        # are never judged at their last epoch (nothing left to save): with 2 epochs, judge the first.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min(2, max(1, max_epochs - 1)))
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    errored: int = 0  # failed trials that raised an error (the others lost their worker)
    retrying: int = 0  # failed trials (lost with their worker) whose retry is waiting or running

    @property
    def finished(self) -> int:
        """Trials that count against the budget: complete or pruned (failed ones are retried or reported)."""
        return self.complete + self.pruned

    @property
    def failed_for_good(self) -> int:
        """Failed trials that will not be retried: raised an error, or lost with their worker and their retry."""
        return self.failed - self.retrying

    def as_dict(self) -> dict[str, int]:
        return {"complete": self.complete, "pruned": self.pruned, "failed": self.failed, "running": self.running,
                "waiting": self.waiting}


def counts(study: Any) -> Counts:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    errored = sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("error"))
    # RetryHeartbeatStaleTrialCallback's retry lists the trials it stands in for in its "retry_history".
    pending = {n for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)
               for n in t.system_attrs.get("retry_history", ())}
    retrying = sum(1 for t in trials if t.state == TrialState.FAIL and t.number in pending)
    return Counts(complete=states[TrialState.COMPLETE], pruned=states[TrialState.PRUNED],
                  failed=states[TrialState.FAIL], running=states[TrialState.RUNNING],
                  waiting=states[TrialState.WAITING], errored=errored, retrying=retrying)


TRIAL_ERROR_ATTR = "error.trial.{number}"  # study attribute: why a trial another worker failed ended


def failure_summary(study: Any) -> str:
    """'<n> of <m> failed trials: <most common cause>' for an error message."""
    from optuna.trial import TrialState

    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    noted = study.user_attrs
    errors = [t.user_attrs.get("error") or noted.get(TRIAL_ERROR_ATTR.format(number=t.number))
              or "worker stopped mid-trial (killed, evicted or out of memory); see that worker's log"
              for t in failed]
    examples = {}  # kind of cause -> its first message, as it was
    causes = collections.Counter()
    for error in errors:
        kind = _cause_kind(error)
        examples.setdefault(kind, error)
        causes[kind] += 1
    if not causes:
        return "no trial failed"
    kind, n = causes.most_common(1)[0]
    return f"most common cause ({n} of {len(failed)} failed trials): {examples[kind]}"


# A number on its own (not part of a name such as float16), or nan/inf.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])|\b(?:nan|inf)\b",
                     re.IGNORECASE)


def _cause_kind(error: str) -> str:
    """One cause, whatever its numbers: "NaN loss at batch 3" and "... at batch 7" are the same failure; HTTP
    status codes (403 is not 503) stay."""
    def blank(match: re.Match) -> str:
        text = match.group(0)
        return text if text.isdigit() and len(text) == 3 and 100 <= int(text) <= 599 else "#"

    return _NUMBER.sub(blank, error)


def fail_stale_trials(study: Any) -> None:
    """Mark trials whose worker stopped sending heartbeats as failed (and queue their retry, when the storage
    was opened with ``retry_stale``)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def epochs_run(trial: Any) -> int:
    """Training epochs a trial consumed (one intermediate value per epoch)."""
    return len(trial.intermediate_values)
