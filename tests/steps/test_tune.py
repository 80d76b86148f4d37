"""tune and select: parallel workers share one study, survive a killed peer, and hand the best trial to train."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import idxdata
import pytest
from stepsupport import step_env

from mlsteps import prep, search
from mlsteps.core import StepError

STEP_TIMEOUT = 300  # seconds one step process may take before the test gives up on it
EXPERIMENT = "tune_tests"
FIXED = {"width": 8, "batch_size": 32}  # a small net: a trial on ~270 examples trains in seconds
START_LINE = re.compile(r"mlsteps\.tune: worker (\d+): trial (\d+) starts(?: \(start point: [^)]*\))?: ")
END_LINE = re.compile(r"mlsteps\.tune: worker (\d+): trial (\d+) (complete|pruned|failed): ")

integration = pytest.mark.integration


# --- the search space -------------------------------------------------------------------------------------------


def test_empty_overrides_give_the_default_space() -> None:
    assert search.parse_space("") == search.SEARCH_SPACE
    assert search.parse_space("  ") == search.SEARCH_SPACE
    assert search.parse_space({}) == search.SEARCH_SPACE


def test_a_range_without_log_keeps_the_default_log_scale() -> None:
    space = search.parse_space({"learning_rate": {"low": 1e-4, "high": 1e-1}, "width": {"low": 8, "high": 32}})
    assert space["learning_rate"] == {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
    assert space["width"] == {"type": "int", "low": 8, "high": 32, "step": 8}
    assert search.parse_space({"learning_rate": {"low": 1e-4, "high": 1e-1, "log": False}})["learning_rate"][
        "log"] is False


def test_overrides_replace_only_the_parameters_they_name() -> None:
    space = search.parse_space(json.dumps({"width": 8, "batch_size": [32, 64],
                                           "learning_rate": {"low": 0.001, "high": 0.05, "log": True}}))

    assert space["width"] == {"type": "fixed", "value": 8}
    assert space["batch_size"] == {"type": "categorical", "choices": [32, 64]}
    assert space["learning_rate"] == {"type": "float", "low": 0.001, "high": 0.05, "log": True}
    assert space["dropout"] == search.SEARCH_SPACE["dropout"]
    assert set(space) == set(search.SEARCH_SPACE)


def test_a_range_of_an_integer_parameter_is_an_integer_range() -> None:
    space = search.parse_space({"width": {"low": 8, "high": 32, "step": 8}, "dropout": {"low": 0.1, "high": 0.3}})

    assert space["width"] == {"type": "int", "low": 8, "high": 32, "step": 8}
    assert space["dropout"] == {"type": "float", "low": 0.1, "high": 0.3}


def test_the_default_space_is_not_changed_by_overrides() -> None:
    before = json.dumps(search.SEARCH_SPACE, sort_keys=True)
    search.parse_space({"learning_rate": {"low": 0.001, "high": 0.002}, "width": [8]})
    assert json.dumps(search.SEARCH_SPACE, sort_keys=True) == before


def test_suggest_returns_fixed_values_and_searched_values_within_their_ranges() -> None:
    import optuna

    space = search.parse_space({"width": 8, "batch_size": [16, 32],
                                "learning_rate": {"low": 0.001, "high": 0.01, "log": True},
                                "dropout": {"low": 0.0, "high": 0.5}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        values = search.suggest(trial, space)
        study.tell(trial, 0.5)
        assert values["width"] == 8
        assert values["batch_size"] in (16, 32)
        assert 0.001 <= values["learning_rate"] <= 0.01
        assert 0.0 <= values["dropout"] <= 0.5
    frozen = study.trials[-1]
    assert "width" not in frozen.params
    assert search.hyperparameters(frozen, space) == {**frozen.params, "width": 8}


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ('{"momentum": 0.9}', ["unknown parameter", "momentum"]),
        ('{"width": 8', ["not valid JSON"]),
        ('[8, 16]', ["expected a JSON object"]),
        ('{"learning_rate": {"low": 0.01, "high": 0.001}}', ["learning_rate", "low"]),
        ('{"learning_rate": {"low": 0, "high": 0.01, "log": true}}', ["learning_rate"]),
        ('{"width": {"low": 8, "high": 32, "step": 4.5}}', ["width", "step must be a whole number"]),
        ('{"width": {"low": 8.5, "high": 32}}', ["width", "low must be a whole number"]),
        ('{"width": {"low": 8}}', ["width", "missing high"]),
        ('{"dropout": {"low": 0.1, "high": 0.2, "scale": 2}}', ["dropout", "unknown field", "scale"]),
        ('{"batch_size": []}', ["batch_size", "empty list"]),
        ('{"dropout": {"low": "a", "high": 0.5}}', ["dropout"]),
        ('{"width": null}', ["width", "expected a range object"]),
        ('{"width": {"type": "categorical", "low": 8, "high": 16}}', ["width", "list of choices"]),
        ('{"learning_rate": {"type": "fixed", "low": 1, "high": 2}}', ["learning_rate", "fixed value"]),
        ('{"batch_size": {"value": 64}}', ["batch_size", 'written as the value itself, e.g. "batch_size": 32']),
        ('{"batch_size": 0}', ["batch_size", "must be >= 8"]),
        ('{"batch_size": [4, 32]}', ["batch_size", "4 is not a possible value", ">= 8"]),
        ('{"batch_size": [0, 32]}', ["batch_size", "0 is not a possible value"]),
        ('{"width": {"low": 0, "high": 16}}', ["width", "must be >= 4"]),
        ('{"width": 8.5}', ["width", "whole number"]),
        ('{"dropout": 1.5}', ["dropout", "<= 0.9"]),
        ('{"dropout": {"low": 0.2, "high": 0.95}}', ["dropout", "<= 0.9"]),
        ('{"learning_rate": -0.1}', ["learning_rate", "must be > 0"]),
        ('{"learning_rate": NaN}', ["learning_rate", "must be > 0"]),
        ('{"width": "wide"}', ["width", "'wide' is not a possible value"]),
        ('{"batch_size": "32"}', ["batch_size", "'32' is not a possible value"]),
        ('{"width": 1e400}', ["width", "inf is not a possible value"]),
        ('{"width": [8, 10' + '0' * 400 + ']}', ["width", "is not a possible value"]),
        ('{"width": {"type": "float", "low": 8, "high": 16}}', ["width", "of type int, not 'float'"]),
        ('{"learning_rate": {"type": "int", "low": 1, "high": 2}}', ["learning_rate", "of type float"]),
        ('{"learning_rate": {"low": 0.001, "high": 0.01, "log": "false"}}', ["learning_rate", "JSON boolean"]),
        ('{"dropout": {"low": 0.0, "high": 0.5, "step": "0.1"}}', ["dropout", "step is a number > 0"]),
        ('{"width": {"low": 8, "high": 12}}', ["width", "not a whole number of steps of the default step 8"]),
        ('{"dropout": {"low": 0.0, "high": 0.5, "step": 0.2}}', ["dropout", "not a whole number of steps"]),
        ('{"dropout": {"low": 0, "high": 0.5, "step": 1e-30}}', ["dropout", "step of 1e-30 makes", "at least 5e-07"]),
        ('{"learning_rate": {"low": 0.001, "high": 0.01, "step": 0.001}}', ["learning_rate", '"log": false']),
        ('{"width": {"low": 8, "high": 64, "log": true}}', ["width", "default step 8", '"step": 1']),
        ('{"width": {"low": 64, "high": 1024}}', ["width", "1024 is not a possible value", "<= 512"]),
        ('{"batch_size": [64, 16384]}', ["batch_size", "<= 8192"]),
        ('{"learning_rate": {"low": 0.01, "high": 2, "log": true}}', ["learning_rate", "<= 1"]),
        ('{"width": {"low": 16, "high": 1' + '0' * 400 + '}}', ["width"]),
        ('{"width": {"low": 16, "high": 64, "step": 1' + '0' * 400 + '}}', ["width"]),
        ('{"batch_size": [32, 32.0, 64]}', ["batch_size", "32 given more than once"]),
    ],
    ids=["unknown-parameter", "bad-json", "not-an-object", "low-above-high", "log-of-zero", "fractional-int-step",
         "fractional-int-low", "missing-high", "unknown-field", "no-choices", "non-numeric-low", "null",
         "categorical-without-choices", "fixed-as-range", "fixed-as-object", "batch-of-zero", "a-choice-below-the-forms",
         "a-choice-of-zero", "width-from-zero",
         "fractional-fixed-width", "dropout-above-one", "dropout-range-beyond-the-forms", "negative-learning-rate",
         "nan-learning-rate", "text-width", "numeric-text-batch", "infinite-width", "huge-integer-width",
         "float-range-of-an-integer", "int-range-of-a-float", "log-as-text", "step-as-text",
         "range-not-a-multiple-of-the-default-step", "range-not-a-multiple-of-its-step", "a-step-of-a-billionth-of-a-billionth",
         "step-on-a-log-scale",
         "log-scale-on-the-default-step", "width-beyond-the-forms", "batch-beyond-the-forms",
         "learning-rate-beyond-the-forms", "huge-integer-high", "huge-integer-step", "a-choice-given-twice"],
)
def test_invalid_search_space_is_refused_naming_the_parameter(overrides, names) -> None:
    with pytest.raises(StepError, match=r"^search space") as raised:
        search.parse_space(overrides)
    for name in names:
        assert name in str(raised.value)


def test_whole_floats_of_integer_parameters_become_integers_that_train_accepts() -> None:
    space = search.parse_space({"batch_size": [32.0, 64], "width": {"low": 8.0, "high": 32.0, "step": 8.0}})
    assert space["batch_size"] == {"type": "categorical", "choices": [32, 64]}
    assert space["width"] == {"type": "int", "low": 8, "high": 32, "step": 8}
    assert all(type(c) is int for c in space["batch_size"]["choices"])
    assert type(search.parse_space({"width": 16.0})["width"]["value"]) is int


def test_a_step_that_divides_the_range_is_kept_and_a_matching_type_is_accepted() -> None:
    space = search.parse_space({"width": {"type": "int", "low": 8, "high": 12, "step": 1},
                                "dropout": {"low": 0.0, "high": 0.3, "step": 0.1},
                                "learning_rate": {"low": 0.001, "high": 0.01, "step": 0.001, "log": False}})
    assert space["width"] == {"type": "int", "low": 8, "high": 12, "step": 1}
    assert space["dropout"] == {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1}
    assert space["learning_rate"]["step"] == 0.001 and space["learning_rate"]["log"] is False


def test_no_overrides_at_all_give_the_default_space() -> None:
    assert search.parse_space(None) == search.SEARCH_SPACE


def _epoch_one_verdicts(pruner: Any, values: list[float]) -> list[bool]:
    """Whether ``pruner`` stops each of a sequence of trials after an epoch 1 with the given accuracy."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    verdicts = []
    for value in values:
        trial = study.ask()
        trial.report(value, 1)
        verdicts.append(trial.should_prune())
        if verdicts[-1]:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return verdicts


def test_successive_halving_keeps_the_best_third_of_a_rung_unless_given_another_reduction_factor() -> None:
    # The sixth trial is third of six at epoch 1: in the best half, not in the best third.
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.35]

    assert search.reduction_factor("successive_halving") == 3
    assert _epoch_one_verdicts(search.make_pruner("successive_halving", 9), values)[-1] is True
    assert _epoch_one_verdicts(search.make_pruner("successive_halving", 9, 2), values)[-1] is False
    assert search.reduction_factor("hyperband") == 3 and search.reduction_factor("median", 2) is None
    # Hyperband passes it to every bracket's successive halving (Optuna keeps no public accessor).
    assert search.make_pruner("hyperband", 9, 2)._reduction_factor == 2


def test_the_median_pruner_judges_two_epoch_trials_at_their_first_epoch() -> None:
    """Trials are never judged at their last epoch: with a warm-up of 2 epochs a 2-epoch search pruned nothing."""
    values = [0.8, 0.8, 0.8, 0.1]  # three finished trials, then a hopeless one
    assert _epoch_one_verdicts(search.make_pruner("median", 2), values)[-1]
    assert not _epoch_one_verdicts(search.make_pruner("median", 9), values)[-1]  # longer trials: from epoch 2


def test_select_marks_failed_a_trial_run_closed_as_complete_whose_result_never_reached_the_study(
        tmp_path, mlflow_server) -> None:
    """Killed between closing its MLflow run and the study saving the result: the trial went stale, was
    failed and retried; its run must not keep saying COMPLETE (with a score better than the winner's, say)."""
    import optuna
    from mlflow import MlflowClient

    from mlsteps import select

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("select_mislabelled"))
    client.set_tag(run.info.run_id, "optuna.state", "COMPLETE")
    client.set_terminated(run.info.run_id, "FINISHED")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)

    select._close_abandoned_runs(client, study)

    closed = client.get_run(run.info.run_id)
    assert (closed.info.status, closed.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert "before the study saved this result" in closed.data.tags["error"]


@pytest.mark.parametrize("state", ["COMPLETE", "PRUNED"])
def test_select_closes_the_run_of_a_finished_trial_that_mlflow_left_running(state, tmp_path, mlflow_server) -> None:
    """MLflow did not answer when the worker closed the trial's run (the trial was saved anyway): after
    select, no trial run of the search is left RUNNING."""
    import optuna
    from mlflow import MlflowClient

    from mlsteps import select

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment(f"select_left_running_{state.lower()}"))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    if state == "COMPLETE":
        study.tell(trial, 0.8)
    else:
        trial.report(0.5, 1)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    select._close_abandoned_runs(client, study)

    closed = client.get_run(run.info.run_id)
    assert (closed.info.status, closed.data.tags["optuna.state"]) == ("FINISHED", state)


@pytest.mark.parametrize(("flags", "message"), [
    (["--reduction-factor", "1"], "--reduction-factor 1 is not 0 (the pruner's default) or >= 2"),
    (["--reduction-factor", "-2"], "--reduction-factor -2 is not 0 (the pruner's default) or >= 2"),
    (["--reduction-factor", "2", "--pruner", "median"],
     "--reduction-factor applies to successive_halving and hyperband, not to --pruner median"),
], ids=["one", "negative", "median-pruner"])
def test_a_reduction_factor_that_cannot_apply_is_refused_naming_the_flag(tmp_path, flags, message) -> None:
    done = subprocess.run([sys.executable, "-m", "mlsteps.tune", "--manifest", str(tmp_path / "none.json"),
                           "--data-root", str(tmp_path), "--run-key", "r", *flags],
                          capture_output=True, text=True, env=step_env(), timeout=120)

    assert done.returncode == 2, done.stderr
    assert message in done.stderr


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_the_samplers_and_keras_cannot_take_is_refused_naming_the_flag(tmp_path, seed) -> None:
    from mlsteps import tune

    config = tune.TuneConfig(manifest=str(tmp_path / "none.json"), data_root=str(tmp_path), run_key="r", seed=seed)
    with pytest.raises(StepError, match=f"--seed must be a whole number from 0 to 4294967295, got {seed}"):
        tune.run(config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("gpus", "space", "refused"), [
    (3, "", "batch_size may be 32, 64, 128, 256, which do not split evenly over the 3 GPUs"),
    (3, '{"batch_size": [48, 96, 100]}', "batch_size may be 100, which do not split evenly over the 3 GPUs"),
    (4, '{"batch_size": {"low": 32, "high": 64, "step": 2}}', "batch_size may be 34, 38, 42, 46, 50, 54,"),
    (3, '{"batch_size": [48, 96, 192]}', None),
    (2, "", None),
    (0, '{"batch_size": 33}', None),
], ids=["default-space-3-gpus", "one-choice-off", "range-step-off", "multiples", "default-space-2-gpus", "cpu"])
def test_a_search_whose_batch_sizes_cannot_split_over_trains_gpus_is_refused_before_any_trial(tmp_path, gpus, space,
                                                                                               refused) -> None:
    """With several GPUs train needs a batch that splits over them: found out after the search, the search's
    hours are lost (train refuses its pick, exit 2, not retried)."""
    from mlsteps import tune

    config = tune.TuneConfig(manifest=str(tmp_path / "none.json"), data_root=str(tmp_path), run_key="r",
                             search_space=space, train_gpus=gpus, setup_only=True)
    with pytest.raises(StepError) as stopped:
        tune.run(config)
    if refused:
        assert refused in str(stopped.value) and "multiples of" in str(stopped.value)
        assert list(tmp_path.iterdir()) == []  # refused before the study or MLflow heard of it
    else:  # past the check: the missing manifest is what stops it
        assert "split evenly" not in str(stopped.value) and "manifest not found" in str(stopped.value)


def test_trial_seeds_stay_in_the_range_keras_takes_when_the_base_seed_is_near_its_top() -> None:
    from mlsteps import tune

    assert [tune.trial_seed(2**32 - 2, n) for n in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
    assert tune.trial_seed(42, 7) == 49


# --- the start point --------------------------------------------------------------------------------------------


def test_a_start_point_keeps_the_values_the_space_holds_typed_as_the_sampler_gives_them() -> None:
    space = search.parse_space({"dropout": 0.1})  # dropout fixed: not searched

    params, notes = search.start_point({"learning_rate": 0.003, "batch_size": 128.0, "width": 40.0,
                                        "dropout": 0.2}, space)

    assert params == {"learning_rate": 0.003, "batch_size": 128, "width": 40}
    assert [type(params[k]) for k in ("batch_size", "width")] == [int, int]
    assert notes == ["dropout=0.2 left out: fixed at 0.1 in this search"]


@pytest.mark.parametrize(("values", "note"), [
    ({"batch_size": 100}, "batch_size=100 left out: outside the search space (one of 32, 64, 128, 256)"),
    ({"width": 20}, "width=20 left out: outside the search space (16 to 64 in steps of 8)"),
    ({"width": 72}, "width=72 left out: outside the search space (16 to 64 in steps of 8)"),
    ({"learning_rate": 0.05}, "learning_rate=0.05 left out: outside the search space (0.0003 to 0.01)"),
])
def test_a_start_value_outside_the_search_space_is_left_to_the_sampler_and_named(values, note) -> None:
    params, notes = search.start_point({**values, "dropout": 0.25}, search.parse_space({}))

    assert params == {"dropout": 0.25}
    assert notes == [note]


@pytest.mark.parametrize(("text", "message"), [
    ("[0.003]", "--start-from: expected a JSON object of parameter -> value"),
    ("{learning_rate: 1}", "--start-from: not valid JSON"),
    ('{"lr": 0.003}', "--start-from: unknown parameter(s) lr; searchable: learning_rate"),
    ('{"batch_size": 0}', "--start-from: batch_size: 0 is not a possible value; batch_size must be >= 8"),
    ('{"dropout": "0.2"}', "--start-from: dropout: '0.2' is not a possible value"),
])
def test_a_start_point_that_is_not_hyperparameters_is_refused_before_anything_runs(tmp_path, text,
                                                                                  message) -> None:
    from mlsteps import tune

    config = tune.TuneConfig(manifest=str(tmp_path / "missing.json"), data_root=str(tmp_path),
                             run_key="tune_tests/bad-start", tracking_uri=f"file://{tmp_path / 'mlruns'}",
                             start_from=text)
    with pytest.raises(StepError, match=re.escape(message)):
        tune.run(config)
    assert list(tmp_path.iterdir()) == []


def _champion(tracking_uri: str, name: str, params: dict[str, str]) -> str:
    """A registered model whose version 1, aliased champion, was trained by a run with ``params``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT))
    run = client.create_run(experiment.experiment_id)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return version.version


@pytest.mark.parametrize("champion", ["trained", "no model", "no alias", "no hyperparameters"])
def test_the_search_starts_from_the_champions_hyperparameters_else_the_given_ones_once(tmp_path, mlflow_server,
                                                                                     champion) -> None:
    import optuna
    from mlflow import MlflowClient

    from mlsteps import tune

    client = MlflowClient(mlflow_server)
    name = f"tune_start_{champion.replace(' ', '_')}"
    if champion == "trained":  # params as train logs them (strings), plus others that are not hyperparameters
        _champion(mlflow_server, name, {"learning_rate": "0.001", "batch_size": "64", "width": "48",
                                        "dropout": "0.3", "epochs": "5", "parameters": "87594"})
    elif champion == "no hyperparameters":  # e.g. registered by hand
        _champion(mlflow_server, name, {"note": "imported"})
    elif champion == "no alias":  # registered, never promoted
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT))
    parent = client.create_run(experiment.experiment_id).info.run_id
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_run_id", parent)
    config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key="tune_tests/start",
                             start_from='{"learning_rate": 0.003, "batch_size": 128, "width": 32, "dropout": 0.2}',
                             start_from_champion=name)

    tune.enqueue_start(config, study, search.parse_space({}), client)
    # a retried setup, or the same run's search continued later, when the form or the champion changed
    tune.enqueue_start(dataclasses.replace(config, start_from='{"learning_rate": 0.005}'), study,
                       search.parse_space({}), client)

    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["WAITING"]
    expected = ({"learning_rate": 0.001, "batch_size": 64, "width": 48, "dropout": 0.3}, f"champion {name} v1") \
        if champion == "trained" else ({"learning_rate": 0.003, "batch_size": 128, "width": 32, "dropout": 0.2},
                                       "--start-from")
    assert (trials[0].system_attrs["fixed_params"], trials[0].user_attrs["start_point"]) == expected
    assert client.get_run(parent).data.tags["search.start_point"] == (
        f"{expected[1]}: {json.dumps(expected[0], sort_keys=True)}")
    # the worker trains exactly those values
    asked = study.ask()
    assert search.suggest(asked, search.parse_space({})) == expected[0]


class _Registry:
    """A registry client whose champion lookup or run read fails as told (what a real server cannot be made to do
    on demand: be down, or have lost the champion's run)."""

    def __init__(self, alias_error: str = "", run_error: str = "") -> None:
        self.alias_error, self.run_error, self.tags = alias_error, run_error, {}

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        if self.alias_error:
            raise MlflowException(f"alias lookup: {self.alias_error}", error_code=ErrorCode.Value(self.alias_error))
        return types.SimpleNamespace(version="3", run_id="gone")

    def get_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        raise MlflowException(f"run {run_id}: {self.run_error}", error_code=ErrorCode.Value(self.run_error))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.tags[key] = value


def test_a_champion_trained_again_with_other_settings_starts_the_search_from_those() -> None:
    """MLflow params never change: a run trained again with another trial's values keeps the first try's params,
    and the values its model has in tag train.settings_changed. The params alone named the wrong start point."""
    from mlsteps import tune

    run = types.SimpleNamespace(data=types.SimpleNamespace(
        params={"learning_rate": "0.001", "batch_size": "64", "width": "48", "dropout": "0.3", "epochs": "5"},
        tags={"train.settings_changed": json.dumps({"learning_rate": "0.004", "width": "32", "epochs": "8"})}))

    class Registry(_Registry):
        def get_run(self, run_id: str) -> Any:
            return run

    values, label = tune.champion_start(Registry(), "fashion")
    assert values == {"learning_rate": 0.004, "batch_size": 64, "width": 32, "dropout": 0.3}
    assert label == "champion fashion v3"


@pytest.mark.parametrize("error", ["TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"])
def test_a_registry_that_does_not_answer_fails_the_setup_instead_of_starting_without_the_champion(
        tmp_path, error) -> None:
    import optuna
    from mlflow.exceptions import MlflowException

    from mlsteps import tune

    study = optuna.create_study(direction="maximize")
    config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key="tune_tests/registry-down",
                             start_from='{"learning_rate": 0.003}', start_from_champion="fashion")

    with pytest.raises(MlflowException, match=error):
        tune.enqueue_start(config, study, search.parse_space({}), _Registry(alias_error=error))
    assert study.get_trials(deepcopy=False) == [] and "start_point" not in study.user_attrs  # asked again on retry


def test_a_champion_whose_run_is_gone_gives_way_to_the_given_start_point(tmp_path) -> None:
    import optuna

    from mlsteps import tune

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_run_id", "parent")
    registry = _Registry(run_error="RESOURCE_DOES_NOT_EXIST")
    config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key="tune_tests/run-gone",
                             start_from='{"learning_rate": 0.003}', start_from_champion="fashion")

    tune.enqueue_start(config, study, search.parse_space({}), registry)

    [trial] = study.get_trials(deepcopy=False)
    assert (trial.system_attrs["fixed_params"], trial.user_attrs["start_point"]) == (
        {"learning_rate": 0.003}, "--start-from")
    assert registry.tags == {"search.start_point": '--start-from: {"learning_rate": 0.003}'}


def test_a_setup_that_died_after_queueing_the_start_point_does_not_queue_it_twice(tmp_path) -> None:
    import optuna

    from mlsteps import tune

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_run_id", "parent")
    study.enqueue_trial({"learning_rate": 0.003}, user_attrs={"start_point": "--start-from"})  # then it died
    config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key="tune_tests/died",
                             start_from='{"learning_rate": 0.003}')

    tune.enqueue_start(config, study, search.parse_space({}), _Registry())

    assert len(study.get_trials(deepcopy=False)) == 1
    assert study.user_attrs["start_point"] == {"label": "--start-from", "params": {"learning_rate": 0.003}}


def test_a_search_without_a_start_point_queues_no_trial(tmp_path, mlflow_server) -> None:
    import optuna
    from mlflow import MlflowClient

    from mlsteps import tune

    client = MlflowClient(mlflow_server)
    study = optuna.create_study(direction="maximize")
    config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key="tune_tests/no-start",
                             start_from_champion="")

    tune.enqueue_start(config, study, search.parse_space({}), client)

    assert study.get_trials(deepcopy=False) == []
    assert study.user_attrs["start_point"] is None


def test_the_start_point_does_not_change_what_the_sampler_proposes(tmp_path) -> None:
    """With a start point queued, worker 0 of a fresh study still proposes what it would without it (the
    benchmark compares TPE's start-up trials with random search's)."""
    from mlsteps import tune

    proposals = []
    for key, start in (("plain", False), ("started", True)):
        config = tune.TuneConfig(manifest="unused", data_root=str(tmp_path), run_key=f"tune_tests/seed-{key}",
                                 storage=f"sqlite:///{tmp_path / 'optuna.db'}", sampler="random")
        study, space = tune.open_study(config, {"digest": "d"}, create=True)
        if start:
            study.enqueue_trial({"learning_rate": 0.003, "batch_size": 128, "width": 32, "dropout": 0.2},
                                user_attrs={"start_point": "--start-from"})
        study, space = tune.open_study(config, {"digest": "d"}, create=False)  # as a worker opens it
        if start:
            assert search.suggest(study.ask(), space)["learning_rate"] == 0.003
        proposals.append(search.suggest(study.ask(), space))

    assert proposals[0] == proposals[1]


# --- running steps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "expected"), [("maximize", 1), ("minimize", 0)])
def test_with_no_complete_trial_select_takes_the_pruned_trial_whose_last_epoch_scored_best(direction,
                                                                                          expected) -> None:
    import optuna

    from mlsteps import select

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction)
    for curve in ({1: 0.5, 2: 0.3}, {1: 0.4}):  # best-ever 0.5 (trial 0) is not what a pruned trial ended with
        trial = study.ask()
        for epoch, value in curve.items():
            trial.report(value, epoch)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    best, kind, value = select.best_trial(study)

    assert (best.number, kind, value) == (expected, "pruned", [0.3, 0.4][expected])


def test_a_search_run_selected_after_an_earlier_select_failed_no_longer_says_why_it_failed(tmp_path,
                                                                                         mlflow_server) -> None:
    """Workers that failed before their first trial (docs: fix, clear, go on): select failed, tagging the search
    run's error; selected again once trials finished, the run was FINISHED with a best trial and still said
    "no trial ran"."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState, create_trial

    from mlsteps import select

    client = MlflowClient(mlflow_server)
    parent = client.create_run(client.create_experiment("select_error_cleared")).info.run_id
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    import optuna

    study = optuna.create_study(study_name="k", storage=url, direction="maximize")
    study.set_user_attr("mlflow_run_id", parent)
    config = select.SelectConfig(data_root=str(tmp_path), run_key="k", tracking_uri=mlflow_server, storage=url,
                                 heartbeat_seconds=1)
    with pytest.raises(StepError):
        select.run(config)
    assert "error" in client.get_run(parent).data.tags

    from optuna.distributions import FloatDistribution

    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.8, params={"learning_rate": 0.01},
                                 distributions={"learning_rate": FloatDistribution(0.001, 0.1, log=True)},
                                 intermediate_values={1: 0.8}))
    select.run(config)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["search.best_trial"] == "0"
    assert "error" not in run.data.tags


def test_select_for_a_run_whose_search_never_started_says_so(tmp_path) -> None:
    """select runs once the workers are done even if a task before the search failed (then no earlier task
    left a result, so it takes none): it must name the cause, not fail on a missing flag or study."""
    done = subprocess.run([sys.executable, "-m", "mlsteps.select", "--data-root", str(tmp_path), "--run-key",
                           "mnist_training/manual__1", "--tracking-uri", f"file://{tmp_path / 'mlruns'}"],
                          capture_output=True, text=True, env=step_env(), timeout=STEP_TIMEOUT)

    assert done.returncode == 2, done.stderr
    assert "the search never started for this run (create_study did not run or failed" in done.stderr


_RUNNING: set[Step] = set()  # started and not yet waited for


@pytest.fixture(autouse=True)
def _no_step_outlives_its_test() -> Iterator[None]:
    """A test interrupted (Ctrl-C, make test's TERM) or failed while steps ran leaves none running: pytest
    tears fixtures down on KeyboardInterrupt too, and the session would otherwise wait on their threads."""
    yield
    for step in list(_RUNNING):
        step.stop()


class Step:
    """A step subprocess; reader threads collect its stdout lines (with arrival times) and its stderr."""

    def __init__(self, module: str, args: list[str], *, name: str = "",
                 kill_on: re.Pattern[str] | None = None) -> None:
        self.name = name or module
        self.command = [sys.executable, "-m", f"mlsteps.{module}", *args]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL, env=step_env())
        self.lines: list[tuple[float, str]] = []
        self.stderr_lines: list[str] = []
        self.kill_on = kill_on
        self.killed_on: re.Match[str] | None = None
        self.killed_at: float | None = None
        self.ended_at: float | None = None
        self.timed_out = False
        self._watchdog = threading.Timer(STEP_TIMEOUT, self._time_out)
        self._watchdog.daemon = True
        self._watchdog.start()
        _RUNNING.add(self)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _time_out(self) -> None:
        self.timed_out = True
        self.process.kill()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if self.kill_on is not None and self.killed_on is None and (match := self.kill_on.search(line)):
                self.process.kill()
                self.killed_on, self.killed_at = match, time.monotonic()
        self.ended_at = time.monotonic()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def describe(self) -> str:
        return f"{self.name}:\n{self.output[-4000:]}\n--- stderr ---\n{self.stderr[-3000:]}"

    def stop(self) -> None:
        """Kill the process if it still runs and release it (what wait does last, however it ends)."""
        _RUNNING.discard(self)
        self._watchdog.cancel()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=STEP_TIMEOUT + 30)
            for reader in self._readers:
                reader.join(timeout=30)
        finally:
            self.stop()
        if self.timed_out:
            pytest.fail(f"ran past {STEP_TIMEOUT} s: {self.describe()}")
        return code

    def starts(self) -> list[tuple[float, int, int]]:
        """(time, worker, trial number) of every 'trial N starts' line."""
        return [(t, int(m.group(1)), int(m.group(2))) for t, line in self.lines if (m := START_LINE.search(line))]


@dataclass
class Search:
    """One search (study + MLflow parent run) and the flags its steps share."""

    root: Path
    manifest: str
    data_root: Path
    tracking_uri: str
    run_key: str
    trials: int
    max_epochs: int
    pruner: str
    space: dict[str, Any]
    sampler: str = "random"
    objective: str = "val_accuracy"
    timeout_minutes: float = 120.0
    heartbeat_seconds: int = 15
    storage_url: str = ""  # default: a SQLite file of its own
    start_from: str = ""  # --start-from of the setup
    results: Path = field(init=False)
    setup_output: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.results = self.root / "results"
        self.results.mkdir(parents=True, exist_ok=True)

    @property
    def storage(self) -> str:
        return self.storage_url or f"sqlite:///{self.root / 'optuna.db'}"

    def _common(self, result: str) -> list[str]:
        return ["--data-root", str(self.data_root), "--run-key", self.run_key, "--tracking-uri", self.tracking_uri,
                "--storage", self.storage, "--heartbeat-seconds", str(self.heartbeat_seconds), "--result-path",
                str(self.results / result)]

    def tune_args(self, *, worker: int = 0, setup: bool = False, space: dict[str, Any] | None = None,
                  result: str | None = None) -> list[str]:
        space_json = json.dumps(self.space if space is None else space)
        return [*self._common(result or f"{'setup' if setup else f'worker{worker}'}.json"),
                "--manifest", self.manifest, "--experiment", EXPERIMENT, "--trials", str(self.trials),
                "--max-epochs", str(self.max_epochs), "--pruner", self.pruner,
                "--sampler", self.sampler, "--objective", self.objective, "--timeout-minutes",
                str(self.timeout_minutes), "--seed", "7", "--search-space", space_json,
                "--worker", str(worker), "--threads", "1", "--setup-only", "true" if setup else "false",
                "--start-from", self.start_from]

    def setup(self) -> dict[str, Any]:
        step = Step("tune", self.tune_args(setup=True))
        assert step.wait() == 0, step.describe()
        self.setup_output = step.output
        return self.result("setup.json")

    def workers(self, count: int, *, kill: dict[int, re.Pattern[str]] | None = None) -> list[Step]:
        """Start ``count`` workers at once; return them once all have exited."""
        steps = [Step("tune", self.tune_args(worker=i), name=f"tune worker {i}", kill_on=(kill or {}).get(i))
                 for i in range(count)]
        try:
            for step in steps:
                step.wait()
        finally:  # interrupted while waiting on one (in a module fixture too): the others do not run on
            for step in steps:
                step.stop()
        return steps

    def select(self) -> Step:
        step = Step("select", self._common("select.json"))
        step.wait()
        return step

    def result(self, name: str) -> dict[str, Any]:
        return json.loads((self.results / name).read_text())

    def study(self) -> Any:
        import optuna

        return optuna.load_study(study_name=search.study_name(self.run_key),
                                 storage=search.open_storage(self.storage, self.heartbeat_seconds))

    def trials_now(self) -> list[Any]:
        return self.study().get_trials(deepcopy=False)


def _new_search(root: Path, tracking_uri: str, run_key: str, **settings: Any) -> Search:
    data_root = root / "data"
    data_root.mkdir(parents=True)
    source = idxdata.write_dataset(root / "source", train=300, test=100)
    prepared = prep.run(prep.PrepConfig(data_root=str(data_root), dataset="custom", source_dir=str(source)))
    return Search(root=root, manifest=prepared["manifest"], data_root=data_root, tracking_uri=tracking_uri,
                  run_key=run_key, **settings)


def _states(trials: list[Any]) -> Counter[str]:
    return Counter(t.state.name for t in trials)


def _nested_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000)


# --- two workers, one study -------------------------------------------------------------------------------------


@dataclass
class SharedSearch:
    search: Search
    setup: dict[str, Any]
    workers: list[Step]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_search(request, tmp_path_factory, mlflow_server) -> SharedSearch:
    """Eight trials by two workers started together, successive halving over up to 3 epochs; the study in a
    SQLite file (one machine) or in PostgreSQL (production's shared storage).

    Successive halving judges at epoch 1 (rungs at epochs 1, 3, 9, ... with its default reduction factor 3);
    a trial that trained every epoch is complete, never pruned after its last epoch, which would save nothing
    and hide its result from `select`. Its verdicts depend on the order trials arrive in (one that beats every
    earlier one always goes on), so the first four are set: two that learn (the first is the setup's start
    point, --start-from), then two whose learning rate is too small to move in one epoch, each certain to be
    stopped there. The sampler proposes the other four.
    """
    storage = request.getfixturevalue("postgresql") if request.param == "postgresql" else ""
    found = _new_search(tmp_path_factory.mktemp("shared"), mlflow_server, f"tune_tests/shared-{request.param}",
                        trials=8, max_epochs=3, pruner="successive_halving", storage_url=storage,
                        space={**FIXED, "learning_rate": {"low": 1e-6, "high": 0.05, "log": True}},
                        start_from=json.dumps({"learning_rate": 0.03, "dropout": 0.0, "width": 16}))
    setup = found.setup()
    study = found.study()
    for learning_rate in (0.03, 1e-6, 1e-6):
        study.enqueue_trial({"learning_rate": learning_rate, "dropout": 0.0})
    workers = found.workers(2)
    for worker in workers:
        assert worker.process.returncode == 0, worker.describe()
    return SharedSearch(found, setup, workers)


@integration
def test_two_workers_share_the_trial_budget_without_running_a_trial_twice(shared_search) -> None:
    found, workers = shared_search.search, shared_search.workers
    trials = found.trials_now()
    states = _states(trials)

    assert states["COMPLETE"] + states["PRUNED"] >= found.trials
    assert len(trials) <= found.trials + len(workers) - 1, states
    assert set(states) <= {"COMPLETE", "PRUNED"}, states
    # Every trial was started by exactly one worker, the one the study records, which also ran its MLflow run.
    starts = [(worker, number) for step in workers for _, worker, number in step.starts()]
    assert sorted(number for _, number in starts) == sorted(t.number for t in trials)
    by_number = {t.number: t for t in trials}
    for worker, number in starts:
        assert by_number[number].user_attrs["worker"] == worker
    # ... and each trial has exactly one MLflow run, tagged with that worker.
    nested = _nested_runs(found.tracking_uri, shared_search.setup["mlflow_run_id"])
    assert Counter(r.data.tags["optuna.trial_number"] for r in nested) == Counter(str(t.number) for t in trials)
    assert {r.info.run_id: (r.data.tags["optuna.trial_number"], r.data.tags["search.worker"]) for r in nested} == {
        t.user_attrs["mlflow_run_id"]: (str(t.number), str(t.user_attrs["worker"])) for t in trials}
    # Each worker reports only its own trials, and the two results add up to the study.
    ran = [found.result(f"worker{i}.json")["trials_run"] for i in range(len(workers))]
    assert sum(ran) == len(trials)
    assert all(ran), f"both workers should have run trials: {ran}"


@integration
def test_two_workers_train_at_the_same_time(shared_search) -> None:
    trials = shared_search.search.trials_now()
    zero = [t for t in trials if t.user_attrs["worker"] == 0]
    one = [t for t in trials if t.user_attrs["worker"] == 1]

    overlapping = [(a.number, b.number) for a in zero for b in one
                   if a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping, "no trial of worker 0 overlapped in time with one of worker 1"


@integration
def test_successive_halving_stops_hopeless_trials_early(shared_search) -> None:
    found = shared_search.search
    trials = found.trials_now()
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]

    assert pruned, f"no trial was pruned: {_states(trials)}"
    assert {2, 3} <= {t.number for t in pruned}, {t.number: t.intermediate_values for t in trials}
    assert complete
    assert found.study().user_attrs["settings"]["reduction_factor"] == 3  # successive halving's default
    for trial in pruned:
        assert 1 <= len(trial.intermediate_values) < found.max_epochs
    for trial in complete:
        assert sorted(trial.intermediate_values) == list(range(1, found.max_epochs + 1))
    pruned_lines = [line for step in shared_search.workers for _, line in step.lines if END_LINE.search(line)
                    and " pruned: " in line]
    assert len(pruned_lines) == len(pruned)


@integration
def test_select_returns_the_best_complete_trial_and_logs_the_search(shared_search) -> None:
    from mlflow import MlflowClient

    found = shared_search.search
    step = found.select()
    assert step.process.returncode == 0, step.describe()
    result = found.result("select.json")
    trials = found.trials_now()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best_value = max(t.value for t in complete)
    best = next(t for t in complete if t.number == result["trial"])

    assert result["trial_state"] == "complete"
    assert best.value == best_value == result["value"]
    assert result["hyperparameters"] == {**best.params, **FIXED}
    assert set(result["hyperparameters"]) == set(search.SEARCH_SPACE)
    assert result["objective"] == "val_accuracy"
    assert result["trial_run_id"] == best.user_attrs["mlflow_run_id"]
    assert result["search_run_id"] == shared_search.setup["mlflow_run_id"]
    assert result["counts"] == {**dict.fromkeys(("complete", "pruned", "failed", "running", "waiting"), 0),
                                **{k.lower(): v for k, v in _states(trials).items()}}
    assert result["epochs"] == sum(len(t.intermediate_values) for t in trials)

    client = MlflowClient(found.tracking_uri)
    parent = result["search_run_id"]
    nested = _nested_runs(found.tracking_uri, parent)
    assert len(nested) == len(trials)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in nested) == sorted(t.number for t in trials)
    assert {r.info.run_id: r.data.tags["optuna.state"] for r in nested} == {
        t.user_attrs["mlflow_run_id"]: t.state.name for t in trials}
    assert all(r.info.status == "FINISHED" for r in nested)
    artifacts = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/trials.csv", "search/best.json", "search/optimization_history.png",
            "search/intermediate_values.png", "search/param_importances.png",
            "search/parallel_coordinate.png"} <= artifacts
    table = client.download_artifacts(parent, "search/trials.csv", str(found.root))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert {int(r["number"]): r["state"] for r in rows} == {t.number: t.state.name for t in trials}
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["search.best_trial"] == str(best.number)
    # The start point (--start-from): trial 0, with width left at the search's fixed 8
    assert {int(r["number"]): r["start_point"] for r in rows} == {t.number: "--start-from" if t.number == 0 else ""
                                                                  for t in trials}
    assert "width=16 left out: fixed at 8 in this search" in found.setup_output
    start = next(t for t in trials if t.number == 0)
    assert (start.params, start.user_attrs["start_point"]) == ({"learning_rate": 0.03, "dropout": 0.0}, "--start-from")
    assert {r.info.run_name: r.data.tags.get("search.start_point") for r in nested if r.data.tags.get(
        "search.start_point")} == {"trial 0 (start point)": "--start-from"}
    assert parent_run.data.tags["search.start_point"] == '--start-from: {"dropout": 0.0, "learning_rate": 0.03}'
    assert parent_run.data.tags["search.best_is_start_point"] == str(best.number == 0).lower()
    assert result["start_point"] == ("--start-from" if best.number == 0 else None)


@integration
def test_rerunning_a_worker_after_the_budget_is_spent_runs_no_trial(shared_search) -> None:
    found = shared_search.search
    before = [(t.number, t.state.name) for t in found.trials_now()]

    step = Step("tune", found.tune_args(worker=0, result="rerun.json"))
    assert step.wait() == 0, step.describe()

    assert [(t.number, t.state.name) for t in found.trials_now()] == before
    assert not step.starts()
    assert "trial budget spent" in step.output
    result = found.result("rerun.json")
    assert result["trials_run"] == 0
    assert result["mlflow_run_id"] == shared_search.setup["mlflow_run_id"]


@integration
def test_dag_runs_whose_run_ids_differ_only_in_punctuation_get_studies_of_their_own(tmp_path,
                                                                                   mlflow_server) -> None:
    """Airflow accepts both run ids; a file-safe study name made them one study, the second run's search
    finding the first's trials (and its budget spent)."""
    import dataclasses

    import optuna

    first = _new_search(tmp_path, mlflow_server, "tune_tests/retrain:v2", trials=2, max_epochs=1, pruner="none",
                        space=FIXED)
    first.setup()
    dataclasses.replace(first, run_key="tune_tests/retrain+v2").setup()  # same storage
    names = set(optuna.get_all_study_names(first.storage))
    assert {"tune_tests/retrain:v2", "tune_tests/retrain+v2"} <= names


@integration
def test_setup_again_with_another_search_space_is_refused(shared_search) -> None:
    found = shared_search.search
    before = len(found.trials_now())

    step = Step("tune", found.tune_args(setup=True, space={**FIXED, "learning_rate": 0.01}, result="resetup.json"))
    code = step.wait()

    assert code == 2, step.describe()
    assert "error: " in step.stderr
    assert "other settings" in step.stderr and "space differ" in step.stderr
    assert not (found.results / "resetup.json").exists()
    assert len(found.trials_now()) == before


@integration
def test_a_search_started_before_the_reduction_factor_setting_continues_with_the_factor_it_ran_with(
        tmp_path, mlflow_server) -> None:
    found = _new_search(tmp_path, mlflow_server, "tune_tests/older", trials=2, max_epochs=2,
                        pruner="successive_halving", space=FIXED)
    found.setup()
    study = found.study()
    older = {k: v for k, v in study.user_attrs["settings"].items() if k != "reduction_factor"}
    study.set_user_attr("settings", older)  # as a search started by the previous version stored it

    again = Step("tune", found.tune_args(setup=True, result="again.json"))
    other = Step("tune", [*found.tune_args(setup=True, result="other.json"), "--reduction-factor", "2"])

    assert again.wait() == 0, again.describe()
    assert other.wait() == 2, other.describe()
    assert "reduction_factor differ" in other.stderr


def test_a_setup_that_failed_before_it_finished_binds_no_settings(tmp_path, mlflow_server) -> None:
    """MLflow did not answer the first setup (after the study was created): the retry may change the flags."""
    found = _new_search(tmp_path, mlflow_server, "tune_tests/setup_failed", trials=2, max_epochs=3, pruner="none",
                        space=FIXED, objective="val_loss")
    failed = Step("tune", [*found.tune_args(setup=True, result="failed.json"), "--tracking-uri",
                           "http://127.0.0.1:9"])
    assert failed.wait() == 1, failed.describe()
    assert "cannot reach the MLflow tracking server" in failed.stderr

    found.max_epochs, found.objective = 2, "val_accuracy"
    found.setup()
    study = found.study()
    assert study.user_attrs["settings"]["max_epochs"] == 2 and study.direction.name == "MAXIMIZE"
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_server).get_run(study.user_attrs["mlflow_run_id"])
    assert (run.data.params["max_epochs"], run.data.params["objective"]) == ("2", "val_accuracy")
    assert "search.settings_changed" not in run.data.tags
    # Once a setup finished, the settings hold (a continued search keeps them).
    found.max_epochs = 4
    again = Step("tune", found.tune_args(setup=True, result="again.json"))
    assert again.wait() == 2 and "max_epochs differ" in again.stderr, again.describe()


@integration
def test_selecting_a_continued_search_again_updates_the_search_runs_best(tmp_path, mlflow_server) -> None:
    from mlflow import MlflowClient

    found = _new_search(tmp_path, mlflow_server, "tune_tests/continued", trials=2, max_epochs=2, pruner="none",
                        space={**FIXED, "learning_rate": {"low": 1e-7, "high": 0.02, "log": True}})
    found.setup()
    study = found.study()
    for learning_rate in (1e-7, 1e-7, 0.01, 0.01):  # two that cannot learn, then two that can
        study.enqueue_trial({"learning_rate": learning_rate, "dropout": 0.0})
    assert found.workers(1)[0].process.returncode == 0
    first = found.select()
    assert first.process.returncode == 0, first.describe()
    before = found.result("select.json")

    found.trials = 4  # the same DAG run's search, given a larger budget, then selected again
    assert found.workers(1)[0].process.returncode == 0
    again = found.select()
    assert again.process.returncode == 0, again.describe()
    after = found.result("select.json")

    assert before["trial"] in (0, 1) and after["trial"] in (2, 3), (before, after)
    assert after["value"] > before["value"]
    run = MlflowClient(found.tracking_uri).get_run(after["search_run_id"])
    assert run.data.tags["search.best_trial"] == str(after["trial"])
    assert {k: run.data.tags[f"best.{k}"] for k in after["hyperparameters"]} == {
        k: str(v) for k, v in after["hyperparameters"].items()}
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(after["value"])
    assert run.data.metrics["trials_complete"] == 4
    # One point per select, at the number of trials finished then: the search's progress, newest last.
    history = MlflowClient(found.tracking_uri).get_metric_history(run.info.run_id, "trials_complete")
    assert sorted((m.step, m.value) for m in history) == [(2, 2.0), (4, 4.0)]


@integration
def test_a_val_loss_search_with_the_median_pruner_prunes_and_selects_the_lowest_loss(tmp_path,
                                                                                    mlflow_server) -> None:
    found = _new_search(tmp_path, mlflow_server, "tune_tests/median", trials=5, max_epochs=3, pruner="median",
                        objective="val_loss", sampler="tpe",
                        space={**FIXED, "learning_rate": {"low": 1e-6, "high": 0.05, "log": True}})
    found.setup()
    study = found.study()
    # Three that learn, then one too slow to move: certain to be stopped at epoch 2. TPE proposes the rest.
    for learning_rate in (0.03, 0.02, 0.01, 1e-6):
        study.enqueue_trial({"learning_rate": learning_rate, "dropout": 0.0})
    [worker] = found.workers(1)
    assert worker.process.returncode == 0, worker.describe()
    trials = found.trials_now()
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]

    # The median pruner judges from epoch 2 on, once 3 trials completed, and never at the last epoch; it stops
    # a trial whose loss is above the median of the complete trials' losses at the same epoch.
    assert pruned and 3 in {t.number for t in pruned}, _states(trials)
    for trial in pruned:
        epoch = max(trial.intermediate_values)
        assert 2 <= epoch < found.max_epochs and sorted(trial.intermediate_values) == list(range(1, epoch + 1))
        before = [t.intermediate_values[epoch] for t in complete if t.number < trial.number]
        assert len(before) >= 3 and trial.intermediate_values[epoch] > statistics.median(before)
    step = found.select()
    assert step.process.returncode == 0, step.describe()
    result = found.result("select.json")
    assert result["objective"] == "val_loss"
    assert result["value"] == min(t.value for t in complete)


@integration
def test_hyperband_prunes_only_trials_of_brackets_with_a_rung_before_the_last_epoch(tmp_path,
                                                                                   mlflow_server) -> None:
    found = _new_search(tmp_path, mlflow_server, "tune_tests/hyperband", trials=7, max_epochs=3,
                        pruner="hyperband",
                        space={**FIXED, "learning_rate": {"low": 1e-6, "high": 0.05, "log": True}})
    found.setup()
    study = found.study()
    # Hyperband over epochs 1-3 with reduction factor 3 has two brackets, each a successive halving: bracket 0
    # has rungs at epochs 1 and 3, bracket 1 only at epoch 3, the last epoch, so its trials always complete.
    # A trial's bracket is a hash of the study name and trial number; ask the pruner the tune step uses.
    pruner = search.make_pruner("hyperband", found.max_epochs)
    pruner._try_initialization(study)
    bracket = {n: pruner._get_bracket_id(study, types.SimpleNamespace(number=n)) for n in range(found.trials)}
    # Set every trial, so the verdicts do not hang on the order of random ones: the first of bracket 0 learns,
    # every other trial has too small a learning rate to move in one epoch.
    first = min(n for n, b in bracket.items() if b == 0)
    for n in range(found.trials):
        study.enqueue_trial({"learning_rate": 0.03 if n == first else 1e-6, "dropout": 0.0})
    [worker] = found.workers(1)
    assert worker.process.returncode == 0, worker.describe()
    trials = found.trials_now()
    pruned = [t for t in trials if t.state.name == "PRUNED"]

    assert set(bracket.values()) == {0, 1}, bracket
    assert pruned, _states(trials)
    assert all(bracket[t.number] == 0 and max(t.intermediate_values) == 1 for t in pruned)
    assert all(t.state.name == "COMPLETE" for t in trials if bracket[t.number] == 1)
    # Brackets are judged apart: bracket 1's trials trained on from epoch-1 accuracies below bracket 0's best,
    # which is what stopped bracket 0's.
    best_of_bracket_0 = max(t.intermediate_values[1] for t in trials if bracket[t.number] == 0)
    assert all(t.intermediate_values[1] < best_of_bracket_0 for t in trials if bracket[t.number] == 1)
    step = found.select()
    assert step.process.returncode == 0, step.describe()
    assert found.result("select.json")["value"] == max(t.value for t in trials if t.state.name == "COMPLETE")


@integration
def test_a_search_whose_time_budget_is_spent_before_any_trial_says_so(tmp_path, mlflow_server) -> None:
    found = _new_search(tmp_path, mlflow_server, "tune_tests/late", trials=4, max_epochs=2, pruner="none",
                        space=FIXED, timeout_minutes=0.001)
    found.setup()
    [worker] = found.workers(1)  # starts well after 0.06 s

    assert worker.process.returncode == 0, worker.describe()
    assert not worker.starts()
    assert found.result("worker0.json")["stopped"] == "time budget spent"
    step = found.select()
    assert step.process.returncode == 2, step.describe()
    assert "no trial ran: the time budget" in step.stderr


def test_a_worker_given_a_gpu_it_cannot_see_names_search_gpus_and_select_says_no_trial_ran(
        tmp_path, mlflow_server, monkeypatch) -> None:
    """As the DAG runs it by default: create_study queued a start point, so the study is not empty although no
    worker started a trial."""
    found = _new_search(tmp_path, mlflow_server, "tune_tests/no_gpu", trials=2, max_epochs=1, pruner="none",
                        space=FIXED, start_from='{"learning_rate": 0.003, "dropout": 0.2}')
    found.setup()
    assert [t.state.name for t in found.trials_now()] == ["WAITING"]
    monkeypatch.setenv("MLSTEPS_EXPECTED_GPUS", "1")  # a pod given search_gpus=1, on TensorFlow without CUDA
    [worker] = found.workers(1)
    monkeypatch.delenv("MLSTEPS_EXPECTED_GPUS")

    assert worker.process.returncode == 1, worker.describe()  # a node fault: the runner retries it
    assert "or set search_gpus to 0 in the trigger form" in worker.output + worker.stderr, worker.describe()
    step = found.select()
    assert step.process.returncode == 2, step.describe()
    assert "no trial ran: no worker started a trial, with time left in the budget" in step.stderr, step.describe()


# --- a worker dies mid-trial ------------------------------------------------------------------------------------


@integration
def test_a_trial_of_a_killed_worker_is_failed_and_retried_by_the_other(tmp_path, mlflow_server) -> None:
    from mlflow import MlflowClient

    found = _new_search(tmp_path, mlflow_server, "tune_tests/killed", trials=4, max_epochs=2, pruner="none",
                        space={**FIXED, "learning_rate": {"low": 0.001, "high": 0.02, "log": True}},
                        heartbeat_seconds=2)
    setup = found.setup()

    survivor, killed = found.workers(2, kill={1: START_LINE})

    assert killed.killed_on is not None, killed.describe()
    assert killed.process.returncode == -9
    assert survivor.process.returncode == 0, survivor.describe()
    assert survivor.ended_at is not None and killed.killed_at is not None
    assert survivor.ended_at > killed.killed_at
    lost = int(killed.killed_on.group(2))
    trials = found.trials_now()
    by_number = {t.number: t for t in trials}
    states = _states(trials)

    assert by_number[lost].state.name == "FAIL"
    assert by_number[lost].user_attrs["worker"] == 1
    assert states["COMPLETE"] >= found.trials
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    assert states["FAIL"] == 1, states
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.number > lost
    assert retry.state.name == "COMPLETE"
    assert retry.params == by_number[lost].params
    assert retry.user_attrs["worker"] == 0
    assert retry.user_attrs["mlflow_run_id"] != by_number[lost].user_attrs["mlflow_run_id"]
    assert any(number == retry.number for _, _, number in survivor.starts())

    step = found.select()
    assert step.process.returncode == 0, step.describe()
    result = found.result("select.json")
    assert result["trial_state"] == "complete"
    assert result["counts"] == {"complete": states["COMPLETE"], "pruned": 0, "failed": 1, "running": 0, "waiting": 0}
    client = MlflowClient(found.tracking_uri)
    lost_run = client.get_run(by_number[lost].user_attrs["mlflow_run_id"])
    assert lost_run.info.status == "FAILED"
    assert lost_run.data.tags["optuna.state"] == "FAIL"
    assert "worker stopped mid-trial" in lost_run.data.tags["error"]
    nested = _nested_runs(found.tracking_uri, setup["mlflow_run_id"])
    assert len(nested) == len(trials)
    assert not [r.info.run_id for r in nested if r.info.status == "RUNNING"]


@integration
def test_a_worker_with_no_trial_left_to_start_stays_to_retry_a_dead_workers_trial(tmp_path, mlflow_server) -> None:
    """Budget 2, two workers, one killed as its trial starts: the other finishes its own trial with nothing
    left to start, and must wait for the lost trial to go stale (15 s here) and retry it, not leave."""
    found = _new_search(tmp_path, mlflow_server, "tune_tests/take_over", trials=2, max_epochs=1, pruner="none",
                        space=FIXED, heartbeat_seconds=5)
    found.setup()

    survivor, killed = found.workers(2, kill={1: START_LINE})

    assert killed.killed_on is not None, killed.describe()
    assert survivor.process.returncode == 0, survivor.describe()
    lost = int(killed.killed_on.group(2))
    assert _states(found.trials_now()) == {"COMPLETE": 2, "FAIL": 1}
    [retry] = [t for t in found.trials_now() if t.system_attrs.get("failed_trial") == lost]
    assert retry.state.name == "COMPLETE" and any(n == retry.number for _, _, n in survivor.starts())
    assert found.result("worker0.json")["stopped"] == "trial budget spent"


@integration
def test_select_started_right_after_a_worker_died_fails_its_trial_and_closes_the_trials_run(tmp_path,
                                                                                          mlflow_server) -> None:
    """In the DAG select starts seconds after the last worker stopped: a trial whose worker was just killed
    still has a fresh heartbeat then, so select waits until it goes stale instead of leaving it running."""
    from mlflow import MlflowClient

    found = _new_search(tmp_path, mlflow_server, "tune_tests/select_after_kill", trials=2, max_epochs=1,
                        pruner="none", space={**FIXED, "learning_rate": 0.01, "dropout": 0.1},
                        heartbeat_seconds=5)  # stale 15 s after the kill: select is up and checking long before
    found.setup()
    [killed] = found.workers(1, kill={0: re.compile(r"mlsteps\.tune: worker 0: trial 1 starts: ")})
    assert killed.killed_on is not None, killed.describe()

    step = found.select()

    assert step.process.returncode == 0, step.describe()
    assert "still running; waiting" in step.output
    trials = {t.number: t for t in found.trials_now()}
    assert (trials[0].state.name, trials[1].state.name) == ("COMPLETE", "FAIL")
    result = found.result("select.json")
    assert (result["trial"], result["counts"]["running"], result["counts"]["failed"]) == (0, 0, 1)
    lost_run = MlflowClient(found.tracking_uri).get_run(trials[1].user_attrs["mlflow_run_id"])
    assert (lost_run.info.status, lost_run.data.tags["optuna.state"]) == ("FAILED", "FAIL")


# --- nothing can train ------------------------------------------------------------------------------------------


CAUSE = "DataLossError"


def _damage_training_shards(found: Search) -> None:
    """Storage trouble after prep: every training shard damaged mid-file (its records' checksums break), in a
    dataset prepared before prep recorded shard checksums (its manifest has none, so every step takes it and
    each trial fails reading it: what the search must survive)."""
    from mlsteps import data

    for shard in data.split_files(data.load_manifest(found.manifest), "train"):
        raw = bytearray(Path(shard).read_bytes())
        raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64
        Path(shard).write_bytes(bytes(raw))
    manifest = json.loads(Path(found.manifest).read_text())
    for split in manifest["splits"].values():
        split.pop("file_sha256")
    Path(found.manifest).write_text(json.dumps(manifest))


@integration
def test_a_search_whose_every_trial_fails_stops_early_and_names_the_cause(tmp_path, mlflow_server) -> None:
    found = _new_search(tmp_path, mlflow_server, "tune_tests/broken", trials=6, max_epochs=2, pruner="none",
                        space=FIXED)
    found.setup()
    _damage_training_shards(found)

    [worker] = found.workers(1)

    # The worker stops (cleanly: the search's one error comes from select, below) and says why.
    assert worker.process.returncode == 0, worker.describe()
    assert "all failed" in worker.output
    assert "most common cause (3 of 3 failed trials)" in worker.output and CAUSE in worker.output
    assert json.loads((found.results / "worker0.json").read_text())["stopped"] == "every trial failed"
    trials = found.trials_now()
    assert _states(trials) == {"FAIL": 3}, "the worker stops after three failures instead of spending the budget"
    assert all(CAUSE in t.user_attrs["error"] for t in trials)

    step = found.select()
    assert step.process.returncode == 2, step.describe()
    assert "no trial finished" in step.stderr
    assert "most common cause" in step.stderr and CAUSE in step.stderr
    assert not (found.results / "select.json").exists()
    # The search's MLflow run ends FAILED with that message, and no trial run is left running.
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(trials[0].user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).info.status == "FAILED"
    assert CAUSE in client.get_run(parent).data.tags["error"]
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in trials} == {"FAILED"}


@integration
def test_three_failures_do_not_stop_a_worker_while_another_workers_trial_may_still_finish(tmp_path,
                                                                                         mlflow_server) -> None:
    """The early stop is for a search in which nothing can train: a trial still running elsewhere may finish
    (it did here), and stopping would leave the rest of the budget to that one worker."""
    import optuna

    found = _new_search(tmp_path, mlflow_server, "tune_tests/fail_then_finish", trials=5, max_epochs=1,
                        pruner="none", space=FIXED, heartbeat_seconds=5)
    found.setup()
    study = found.study()
    space = search.parse_space(FIXED)
    for _ in range(3):  # e.g. a learning rate that diverged on the first trials
        trial = study.ask()
        search.suggest(trial, space)
        trial.set_user_attr("error", "FloatingPointError: val_accuracy is nan after epoch 1: training diverged")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    other = threading.Thread(target=study.optimize, kwargs={  # another worker's trial, finishing in 20 s
        "func": lambda t: (search.suggest(t, space), time.sleep(20), 0.7)[-1], "n_trials": 1})
    other.start()
    while search.counts(study).running == 0:
        time.sleep(0.2)

    [worker] = found.workers(1)
    other.join()

    assert worker.process.returncode == 0, worker.describe()
    assert "all failed" not in worker.output
    assert json.loads((found.results / "worker0.json").read_text())["stopped"] == "trial budget spent"
    assert _states(found.trials_now()) == {"FAIL": 3, "COMPLETE": 5}


@integration
def test_a_worker_stops_once_as_many_trials_failed_as_the_budget_even_after_one_finished(tmp_path,
                                                                                        mlflow_server) -> None:
    """Failed trials do not count against the trial budget (they are retried or reported), so a search whose
    trials all fail after one finished would otherwise run until its time budget is spent."""
    import optuna

    found = _new_search(tmp_path, mlflow_server, "tune_tests/broken_later", trials=3, max_epochs=1, pruner="none",
                        space=FIXED, timeout_minutes=1.5)
    found.setup()
    space = search.parse_space(found.space)
    study = found.study()
    study.add_trial(optuna.trial.create_trial(  # one trial finished before the data broke
        params={"learning_rate": 0.005, "dropout": 0.1}, value=0.5,
        distributions={name: search._distribution(name, space[name]) for name in ("learning_rate", "dropout")}))
    _damage_training_shards(found)

    [worker] = found.workers(1)

    assert worker.process.returncode == 0, worker.describe()
    assert found.result("worker0.json")["stopped"] == "as many trials failed as the budget"
    assert _states(found.trials_now()) == {"COMPLETE": 1, "FAIL": 3}


@integration
def test_a_search_whose_every_trial_kills_its_worker_stops_and_select_names_the_cause(tmp_path,
                                                                                         mlflow_server) -> None:
    """Out of memory on every trial: each worker dies mid-trial, so none can report why. Airflow retries the
    task; a lost trial counts once its retry (same parameters) died too, and the try that finds three such
    failures and nothing finished stops cleanly, so that select runs and ends the search with the one error
    the user needs (not an upstream failure)."""
    found = _new_search(tmp_path, mlflow_server, "tune_tests/oom", trials=6, max_epochs=2, pruner="none",
                        space={**FIXED, "learning_rate": 0.01, "dropout": 0.1}, heartbeat_seconds=1)
    found.setup()

    killed = []
    for attempt in range(4):  # four tries of the task (the DAG gives tune 4 retries), each killed mid-trial
        [step] = found.workers(1, kill={0: START_LINE})
        assert step.killed_on is not None, step.describe()
        killed.append(int(step.killed_on.group(2)))
        time.sleep(4)  # past the grace period of 3 heartbeats: the next worker marks the trial failed
    [last] = found.workers(1)

    assert last.process.returncode == 0, last.describe()
    assert not last.starts(), "the worker ran a trial after three trials had killed their workers"
    assert json.loads((found.results / "worker0.json").read_text())["stopped"] == "every trial failed"
    assert "most common cause (4 of 4 failed trials): worker stopped mid-trial" in last.output
    trials = found.trials_now()
    assert sorted(t.number for t in trials if t.state.name == "FAIL") == killed == [0, 1, 2, 3]
    assert {t.number: t.system_attrs.get("failed_trial") for t in trials} == {0: None, 1: 0, 2: None, 3: 2}
    assert _states(trials) == {"FAIL": 4}

    step = found.select()
    assert step.process.returncode == 2, step.describe()
    assert "no trial finished" in step.stderr
    assert "worker stopped mid-trial (killed, evicted or out of memory)" in step.stderr


@integration
def test_workers_evicted_together_do_not_end_the_search_their_retries_run(tmp_path, mlflow_server) -> None:
    """Three workers lost at once (a node pre-empted) before any trial finished: three failed trials, each
    with a retry queued. The next worker runs the retries instead of calling the search failed."""
    import optuna

    found = _new_search(tmp_path, mlflow_server, "tune_tests/evicted", trials=3, max_epochs=1, pruner="none",
                        space={**FIXED, "learning_rate": 0.01, "dropout": 0.1})
    found.setup()
    study = found.study()
    with warnings.catch_warnings():  # 'experimental' since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    lost = [study.ask() for _ in range(3)]  # three trials running at once ...
    for trial in lost:  # ... whose workers vanished: what fail_stale_trials leaves behind
        search.suggest(trial, search.parse_space(found.space))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        retry(study, study.trials[trial.number])
    assert _states(found.trials_now()) == {"FAIL": 3, "WAITING": 3}

    [worker] = found.workers(1)

    assert worker.process.returncode == 0, worker.describe()
    assert found.result("worker0.json")["stopped"] == "trial budget spent"
    trials = found.trials_now()
    assert _states(trials) == {"FAIL": 3, "COMPLETE": 3}
    assert sorted(t.system_attrs.get("failed_trial") for t in trials if t.state.name == "COMPLETE") == [0, 1, 2]
