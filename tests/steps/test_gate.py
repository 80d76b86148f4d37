"""gate: real registered versions in a real MLflow server, scored on a prepared test split.

The models are small pyfunc "oracles" for the synthetic dataset (class c is a bright square at a known
place), so their accuracies are known exactly: 100 %, or 100 % minus the classes they get wrong.
"""

from __future__ import annotations

import idxdata
import mlflow
import numpy as np
import pytest

from mlsteps import gate

SQUARES = [(2 + (c // 4) * 8, 2 + (c % 4) * 6) for c in range(10)]  # tests/idxdata.py's layout


class Oracle(mlflow.pyfunc.PythonModel):
    """Finds the bright square; answers class 0 for the classes in ``wrong``."""

    def __init__(self, wrong: tuple[int, ...] = ()) -> None:
        self.wrong = wrong

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        images = np.asarray(model_input, dtype=np.float32)
        brightness = np.stack([images[:, r:r + 6, c:c + 6].mean(axis=(1, 2)) for r, c in SQUARES], axis=1)
        classes = brightness.argmax(axis=1)
        classes[np.isin(classes, self.wrong)] = 0
        return np.eye(10, dtype=np.float32)[classes]


@pytest.fixture
def manifest(prepare, source_dir) -> str:
    return prepare(source_dir)["manifest"]  # 300 training, 100 test images, 10 per class


@pytest.fixture
def registry(mlflow_server, request):
    """A fresh registered model name; ``add(wrong)`` registers an oracle version and returns its number."""
    mlflow.set_tracking_uri(mlflow_server)
    name = f"gate_{request.node.name[:40]}"

    def add(wrong: tuple[int, ...] = ()) -> int:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Oracle(wrong), pip_requirements=["mlflow"],
                                           input_example=np.zeros((1, 28, 28), np.float32))
        return int(mlflow.register_model(info.model_uri, name).version)

    return name, add


def _gate(manifest: str, name: str, version: int, url: str, **kw) -> dict:
    return gate.run(gate.GateConfig(manifest=manifest, model_name=name, version=version, tracking_uri=url, **kw))


def test_first_model_meets_the_floor_only(manifest, registry, mlflow_server):
    name, add = registry
    result = _gate(manifest, name, add(), mlflow_server, min_accuracy=0.85)
    assert result["verdict"] == "passed" and result["accuracy"] == 1.0
    assert result["champion_version"] is None
    assert "no champion yet" in result["reasons"]


def test_below_the_floor_fails_and_says_so_in_the_version_tags(manifest, registry, mlflow_server):
    name, add = registry
    version = add(wrong=(1, 2, 3))  # 70 %
    result = _gate(manifest, name, version, mlflow_server, min_accuracy=0.85)
    assert result["verdict"] == "failed" and result["accuracy"] == pytest.approx(0.7)
    tags = mlflow.MlflowClient(mlflow_server).get_model_version(name, str(version)).tags
    assert tags["gate.verdict"] == "failed"
    assert "accuracy 70.00 % < floor 85.00 %" in tags["gate.reasons"]
    assert tags["gate.accuracy"] == "0.700000" and tags["gate.test_examples"] == "100"
    assert len(tags["gate.test_digest"]) == 64


@pytest.mark.parametrize(("max_regression", "verdict", "words"), [
    (5.0, "failed", "10.00 pt below the champion's 100.00 % (beyond the 5 pt drop allowed)"),
    (10.0, "passed", "10.00 pt below the champion's 100.00 % (within the 10 pt drop allowed)"),
], ids=["regression-beyond-the-limit", "regression-within-the-limit"])
def test_challenger_is_compared_with_the_champion_on_the_same_test_set(manifest, registry, mlflow_server,
                                                                       max_regression, verdict, words):
    name, add = registry
    champion = add()
    mlflow.MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", str(champion))
    challenger = add(wrong=(9,))  # 90 %
    result = _gate(manifest, name, challenger, mlflow_server, min_accuracy=0.5, max_regression=max_regression)
    assert result["verdict"] == verdict
    assert (result["champion_version"], result["champion_accuracy"]) == (champion, 1.0)
    assert words in result["reasons"]


class Constant(mlflow.pyfunc.PythonModel):
    """Answers class 0 (of ``classes``) for every image, whatever its size."""

    def __init__(self, classes: int = 10) -> None:
        self.classes = classes

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return np.eye(self.classes, dtype=np.float32)[np.zeros(len(model_input), dtype=int)]


def _champion_of_other_data(name: str, mlflow_server: str, dataset: str | None, image_shape: tuple[int, int],
                            classes: int) -> int:
    client = mlflow.MlflowClient(mlflow_server)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(classes), pip_requirements=["mlflow"],
                                       input_example=np.zeros((1, *image_shape), np.float32))
    version = int(mlflow.register_model(info.model_uri, name, tags={"dataset": dataset} if dataset else None).version)
    client.set_registered_model_alias(name, "champion", str(version))
    return version


@pytest.mark.parametrize(("dataset", "image_shape", "classes", "words"), [
    ("fashion_mnist", (28, 28), 10, "trained on fashion_mnist"),
    (None, (14, 14), 10, "takes images of (14, 14) and answers 10 classes"),
    (None, (28, 28), 3, "takes images of (28, 28) and answers 3 classes"),
], ids=["another-dataset", "another-image-size", "another-class-count"])
def test_a_champion_of_other_data_is_not_comparable_and_the_challenger_is_not_promoted(
        manifest, registry, mlflow_server, dataset, image_shape, classes, words):
    """Scored on this run's test images, a champion of another dataset scores near chance (any model of this
    data would beat it and replace it) or cannot run at all."""
    name, add = registry
    champion = _champion_of_other_data(name, mlflow_server, dataset, image_shape, classes)
    challenger = add()  # 100 % on this run's data
    result = _gate(manifest, name, challenger, mlflow_server, min_accuracy=0.5)
    assert result["verdict"] == "failed" and result["accuracy"] == 1.0
    assert (result["champion_version"], result["champion_accuracy"]) == (champion, None)
    assert f"not comparable with champion version {champion} ({words}; this run's test data: custom" in result["reasons"]
    assert f"trigger model_promotion with version {challenger}" in result["reasons"]


@pytest.mark.parametrize(("dataset", "words"), [
    (None, "champion version {champion} cannot be loaded (models:/{name}/{champion}: cannot load the model "
           "(ModuleNotFoundError"),
    ("fashion_mnist", "not comparable with champion version {champion} (trained on fashion_mnist"),
], ids=["same-data", "other-data"])
def test_a_champion_that_cannot_be_loaded_fails_the_challenger_saying_so_instead_of_every_run(
        tmp_path, manifest, registry, mlflow_server, dataset, words):
    """Its artifacts gone, or a loader an image upgrade dropped: the step failing (exit 2) failed every run
    until someone moved the alias. Its tags, read before loading it, may settle it without a load."""
    name, add = registry
    (tmp_path / "weights").write_text("x")
    with mlflow.start_run():  # a pyfunc whose loader module is not there any more
        info = mlflow.pyfunc.log_model(name="model", loader_module="mlsteps_loader_that_was_removed",
                                       data_path=str(tmp_path / "weights"), pip_requirements=["mlflow"])
    champion = int(mlflow.register_model(info.model_uri, name, tags={"dataset": dataset} if dataset else None).version)
    mlflow.MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", str(champion))
    challenger = add()
    result = _gate(manifest, name, challenger, mlflow_server, min_accuracy=0.5)
    assert result["verdict"] == "failed" and result["accuracy"] == 1.0
    assert (result["champion_version"], result["champion_accuracy"]) == (champion, None)
    assert words.format(champion=champion, name=name) in result["reasons"]
    assert f"trigger model_promotion with version {challenger}" in result["reasons"]


def test_a_champion_judged_on_another_test_set_is_not_comparable_and_one_judged_on_this_one_is(
        prepare, tmp_path, manifest, registry, mlflow_server):
    """Two custom datasets share the name "custom": the test set the champion was itself judged on tells them
    apart (a champion that trained on some of today's test images would score too high, one of other data
    near chance)."""
    name, add = registry
    client = mlflow.MlflowClient(mlflow_server)
    champion = add()
    _gate(manifest, name, champion, mlflow_server, min_accuracy=0.5)  # judged on this test set: tagged so
    client.set_registered_model_alias(name, "champion", str(champion))
    same = _gate(manifest, name, add(wrong=(9,)), mlflow_server, min_accuracy=0.5, max_regression=20)
    assert same["champion_accuracy"] == 1.0 and same["verdict"] == "passed"

    other = prepare(idxdata.write_dataset(tmp_path / "other", seed=7))["manifest"]  # custom too: another test set
    challenger = add()
    client.set_model_version_tag(name, str(challenger), "dataset_digest", gate.data.load_manifest(other)["digest"])
    result = _gate(other, name, challenger, mlflow_server, min_accuracy=0.5)
    assert result["verdict"] == "failed" and result["champion_accuracy"] is None
    assert f"not comparable with champion version {champion} (judged on another test set" in result["reasons"]


def test_a_challenger_judged_against_the_manifest_of_another_dataset_is_refused(prepare, tmp_path, manifest,
                                                                                registry, mlflow_server):
    name, add = registry
    version = add()
    mlflow.MlflowClient(mlflow_server).set_model_version_tag(name, str(version), "dataset_digest",
                                                             gate.data.load_manifest(manifest)["digest"])
    other = prepare(idxdata.write_dataset(tmp_path / "other", seed=7))["manifest"]
    with pytest.raises(gate.StepError, match="was trained on the prepared dataset .* pass the manifest"):
        _gate(other, name, version, mlflow_server)
    assert "gate.verdict" not in mlflow.MlflowClient(mlflow_server).get_model_version(name, str(version)).tags


@pytest.mark.parametrize(("failing", "error", "raised", "words"), [
    # Taken for "no champion yet", the verdict (floor only) would stick: a judged version is never re-judged.
    ((mlflow.MlflowClient, "get_model_version_by_alias"), ("API request failed with error code 503",
                                                          "TEMPORARILY_UNAVAILABLE"), "MlflowException", "503"),
    # Taken for "cannot load the model" (exit 2, not retried), the run would fail for good.
    ((mlflow.pyfunc, "load_model"), ("failed to download artifacts: 502 Bad Gateway", "INTERNAL_ERROR"),
     "NodeError", "registry or its artifact store failed"),
], ids=["champion-lookup", "model-download"])
def test_a_registry_outage_during_the_gate_fails_the_step_for_a_retry_and_judges_nothing(
        monkeypatch, manifest, registry, mlflow_server, failing, error, raised, words):
    from mlflow.exceptions import MlflowException

    name, add = registry
    version = add()

    def outage(*args, **kwargs):
        raise MlflowException(error[0], error_code=error[1])

    monkeypatch.setattr(*failing, outage)
    with pytest.raises(Exception, match=words) as stopped:  # NodeError: exit 1; an MlflowException too
        _gate(manifest, name, version, mlflow_server)
    assert type(stopped.value).__name__ == raised
    monkeypatch.undo()
    assert "gate.verdict" not in mlflow.MlflowClient(mlflow_server).get_model_version(name, str(version)).tags


def test_a_judged_version_keeps_its_verdict(manifest, registry, mlflow_server):
    name, add = registry
    version = add(wrong=(9,))
    first = _gate(manifest, name, version, mlflow_server, min_accuracy=0.85)
    again = _gate(manifest, name, version, mlflow_server, min_accuracy=0.95)  # a retry, other thresholds
    assert first == again and again["verdict"] == "passed"


@pytest.mark.parametrize(("challenger", "champion", "verdict"), [
    (0.90, None, "passed"), (0.84, None, "failed"), (0.90, 0.904, "passed"), (0.90, 0.906, "failed"),
    (0.95, 0.90, "passed"), (0.80, 0.70, "failed"),
], ids=["first-above-floor", "first-below-floor", "small-regression", "large-regression", "improvement",
        "improvement-below-floor"])
def test_decide(challenger, champion, verdict):
    assert gate.decide(challenger=challenger, champion=champion, min_accuracy=0.85, max_regression=0.5)[0] == verdict


def test_a_version_that_is_not_registered_is_an_input_error_not_a_retry(manifest, registry, mlflow_server):
    name, add = registry
    add()
    with pytest.raises(gate.StepError, match=f"{name} version 99 is not registered in MLflow"):
        _gate(manifest, name, 99, mlflow_server)


@pytest.mark.parametrize(("threshold", "words"), [
    ({"min_accuracy": 85}, "--min-accuracy is a fraction"),  # a percentage given for a fraction
    ({"max_regression": -1}, "--max-regression is in points and cannot be negative, got -1"),
    ({"max_regression": float("nan")}, "--max-regression is in points and cannot be negative, got nan"),
    ({"batch_size": 0}, "--batch-size must be at least 1 image, got 0"),
], ids=["percent-floor", "negative-regression", "nan-regression", "no-batch"])
def test_bad_thresholds_and_batch_sizes_are_refused_before_any_work(manifest, threshold, words):
    """No MLflow server here (the default tracking URI): the refusal comes before any connection."""
    with pytest.raises(gate.StepError, match=words):
        gate.run(gate.GateConfig(manifest=manifest, model_name="m", version=1, **threshold))


def test_re_judging_the_champion_itself_compares_it_with_no_champion_also_through_a_database_uri(
        manifest, mlflow_database):
    """Through a database URI MLflow answers version numbers as int (its server: str)."""
    mlflow.set_tracking_uri(mlflow_database)
    experiment = mlflow.MlflowClient(mlflow_database).get_experiment_by_name("database")
    with mlflow.start_run(experiment_id=experiment.experiment_id):  # set_experiment would outlive the test
        info = mlflow.pyfunc.log_model(name="model", python_model=Oracle(), pip_requirements=["mlflow"],
                                       input_example=np.zeros((1, 28, 28), np.float32))
    name = "gate_database"
    version = int(mlflow.register_model(info.model_uri, name).version)
    mlflow.MlflowClient(mlflow_database).set_registered_model_alias(name, "champion", str(version))
    result = _gate(manifest, name, version, mlflow_database, min_accuracy=0.85)
    assert result["verdict"] == "passed" and result["champion_version"] is None
    assert "this version is the champion already: the floor is the only rule" in result["reasons"]


def test_re_judging_the_champion_itself_compares_it_with_no_champion(manifest, registry, mlflow_server):
    """A version that is already champion when gated (deployed by hand first) is not compared with itself."""
    name, add = registry
    version = add()
    mlflow.MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", str(version))
    result = _gate(manifest, name, version, mlflow_server, min_accuracy=0.85)
    assert result["verdict"] == "passed" and result["champion_version"] is None
    assert "this version is the champion already: the floor is the only rule" in result["reasons"]


@pytest.mark.parametrize("alias", ["my champion", "latest"])
def test_a_champion_alias_mlflow_cannot_hold_is_refused_before_judging(manifest, registry, mlflow_server, alias):
    """MLflow answers an invalid alias as one naming nothing: judged on the floor only, a verdict kept for good."""
    name, add = registry
    version = add()
    with pytest.raises(gate.StepError, match=f"--champion-alias '{alias}': use letters, digits"):
        _gate(manifest, name, version, mlflow_server, champion_alias=alias)
    assert "gate.verdict" not in mlflow.MlflowClient(mlflow_server).get_model_version(name, str(version)).tags
