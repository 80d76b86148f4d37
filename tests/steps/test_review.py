"""review: decisions recorded on real model versions in a real MLflow registry; approval moves `champion`."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from mlsteps import review


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return np.zeros((len(model_input), 10), np.float32)


@pytest.fixture
def versions(mlflow_server, request):
    """A fresh registered model with two versions; the first is champion, the second passed the gate."""
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    name = f"review_{request.node.name[:40]}"
    numbers = []
    for verdict in ("passed", "passed"):
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, name).version
        client.set_model_version_tag(name, version, "gate.verdict", verdict)
        # What the gate compared it with: nothing for the first, the first (champion) for the second.
        client.set_model_version_tag(name, version, "gate.champion_version", str(numbers[0]) if numbers else "")
        numbers.append(int(version))
    client.set_registered_model_alias(name, "champion", str(numbers[0]))
    return name, numbers, client


def _review(name: str, version: int, url: str, decision: str, **kw) -> dict:
    return review.run(review.ReviewConfig(model_name=name, version=version, decision=decision, tracking_uri=url, **kw))


def test_approval_moves_champion_and_records_reviewer_time_and_comment(versions, mlflow_server):
    name, (old, new), client = versions
    result = _review(name, new, mlflow_server, "approved", reviewer="ada", comment="better on shirts",
                     decided_at="2026-11-27T09:00:00+00:00")
    assert result == {"model_name": name, "version": new, "decision": "approved", "promoted": True,
                      "previous_champion": old}
    assert client.get_model_version_by_alias(name, "champion").version == str(new)
    tags = client.get_model_version(name, str(new)).tags
    assert {k: tags[k] for k in ("review.decision", "review.reviewer", "review.comment", "review.time",
                                 "review.previous_champion")} == {
        "review.decision": "approved", "review.reviewer": "ada", "review.comment": "better on shirts",
        "review.time": "2026-11-27T09:00:00+00:00", "review.previous_champion": str(old)}


def test_rejection_tags_the_version_and_leaves_champion_alone(versions, mlflow_server):
    name, (old, new), client = versions
    assert _review(name, new, mlflow_server, "rejected", reviewer="ada", comment="no")["promoted"] is False
    assert client.get_model_version_by_alias(name, "champion").version == str(old)
    tags = client.get_model_version(name, str(new)).tags
    assert (tags["review.decision"], tags["review.comment"]) == ("rejected", "no")


def test_a_version_that_failed_the_gate_is_never_promoted(versions, mlflow_server):
    name, (old, new), client = versions
    client.set_model_version_tag(name, str(new), "gate.verdict", "failed")
    with pytest.raises(review.StepError, match="did not pass the quality gate"):
        _review(name, new, mlflow_server, "auto")
    assert client.get_model_version_by_alias(name, "champion").version == str(old)


@pytest.mark.parametrize("decision", ["approved", "rejected"])
def test_a_version_that_is_not_registered_is_an_input_error_not_a_retry(decision, versions, mlflow_server):
    name, _, _ = versions
    with pytest.raises(review.StepError, match=f"{name} version 99 is not registered in MLflow"):
        _review(name, 99, mlflow_server, decision)


def test_nothing_to_record_touches_nothing(versions, mlflow_server):
    name, (old, new), client = versions
    assert _review(name, new, mlflow_server, "none")["promoted"] is False
    assert "review.decision" not in client.get_model_version(name, str(new)).tags
    assert client.get_model_version_by_alias(name, "champion").version == str(old)


def _register_another(name: str, client) -> str:
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, name).version
    client.set_model_version_tag(name, version, "gate.verdict", "passed")
    return version


def test_an_approval_after_champion_moved_on_since_the_gate_promotes_nothing(versions, mlflow_server):
    name, (old, new), client = versions
    newer = _register_another(name, client)
    client.set_registered_model_alias(name, "champion", newer)  # moved while the approval card waited
    with pytest.raises(review.StepError, match=f"compared by the gate with champion version {old}, but champion is "
                                               f"now version {newer}"):
        _review(name, new, mlflow_server, "approved", reviewer="ada")
    assert client.get_model_version_by_alias(name, "champion").version == newer
    assert "review.decision" not in client.get_model_version(name, str(new)).tags


def test_a_retried_approval_keeps_what_the_first_try_recorded(versions, mlflow_server):
    name, (old, new), client = versions
    _review(name, new, mlflow_server, "approved", reviewer="ada", decided_at="2026-11-27T09:00:00+00:00")
    again = _review(name, new, mlflow_server, "approved", reviewer="ada", decided_at="2026-11-27T10:00:00+00:00")
    assert again["previous_champion"] == old
    tags = client.get_model_version(name, str(new)).tags
    assert (tags["review.time"], tags["review.previous_champion"]) == ("2026-11-27T09:00:00+00:00", str(old))


def test_rejecting_the_version_that_is_champion_is_refused_and_says_how_to_undo_it(versions, mlflow_server):
    name, (old, new), client = versions
    _review(name, new, mlflow_server, "approved", reviewer="ada")
    with pytest.raises(review.StepError, match=f"move the alias champion back to version {old}"):
        _review(name, new, mlflow_server, "rejected", reviewer="bob")
    tags = client.get_model_version(name, str(new)).tags
    assert tags["review.decision"] == "approved"


def test_a_registry_outage_while_reading_the_champion_fails_for_a_retry_and_records_nothing(
        versions, mlflow_server, monkeypatch):
    """Taken for "no champion", an approval of a version the gate compared with the champion was refused for good
    (exit 2: "champion is now version (none)")."""
    from mlflow.exceptions import MlflowException

    name, numbers, client = versions

    def outage(*args, **kwargs):
        raise MlflowException("API request failed with error code 503", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", outage)
    with pytest.raises(MlflowException, match="503"):  # not a StepError: the runner retries it
        _review(name, numbers[1], mlflow_server, "approved", reviewer="ana")
    monkeypatch.undo()
    assert "review.decision" not in client.get_model_version(name, str(numbers[1])).tags
    assert client.get_model_version_by_alias(name, "champion").version == str(numbers[0])
    assert _review(name, numbers[1], mlflow_server, "approved", reviewer="ana")["promoted"]  # the retry


def test_an_approval_whose_alias_move_failed_says_nothing_was_decided_and_its_retry_promotes(
        versions, mlflow_server, monkeypatch):
    """review.decision "approved" was written before the alias moved: with the move failing to the end, the
    version said approved by ada at 9:00, but never was champion."""
    from mlflow.exceptions import MlflowException

    name, (old, new), client = versions

    def outage(*args, **kwargs):
        raise MlflowException("API request failed with error code 503", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", outage)
    with pytest.raises(MlflowException, match="503"):
        _review(name, new, mlflow_server, "approved", reviewer="ada")
    monkeypatch.undo()
    assert "review.decision" not in client.get_model_version(name, str(new)).tags
    assert client.get_model_version_by_alias(name, "champion").version == str(old)
    assert _review(name, new, mlflow_server, "approved", reviewer="ada")["previous_champion"] == old
    assert client.get_model_version(name, str(new)).tags["review.decision"] == "approved"


@pytest.mark.parametrize("alias", ["my champion", "latest", "v2"])
def test_an_alias_mlflow_cannot_hold_is_refused_naming_the_flag(versions, mlflow_server, alias):
    """MLflow answers an invalid alias as one that names nothing, and resolves "latest" to the newest version."""
    name, (old, new), client = versions
    with pytest.raises(review.StepError, match=f"--alias '{alias}': use letters, digits"):
        _review(name, new, mlflow_server, "approved", reviewer="ada", alias=alias)
    assert not any(k.startswith("review.") for k in client.get_model_version(name, str(new)).tags)


def test_a_database_tracking_uri_approves_and_guards_the_champion_as_the_server_does(mlflow_database, tmp_path):
    """Through a database URI MLflow answers version numbers as int: compared with the str the step holds, an
    approval was refused ("champion is now version 1, which it was never compared with") and the champion
    could be rejected while it stayed served."""
    client = mlflow.MlflowClient(mlflow_database)
    name = "review_database"
    client.create_registered_model(name)
    old, new = (int(client.create_model_version(name, str(tmp_path), tags={"gate.verdict": "passed"}).version)
                for _ in range(2))
    client.set_model_version_tag(name, str(new), "gate.champion_version", str(old))
    client.set_registered_model_alias(name, "champion", str(old))
    with pytest.raises(review.StepError, match=f"version {old} is champion"):
        _review(name, old, mlflow_database, "rejected")
    assert "review.decision" not in client.get_model_version(name, str(old)).tags
    result = _review(name, new, mlflow_database, "approved", reviewer="ada")
    assert (result["promoted"], result["previous_champion"]) == (True, old)
    assert int(client.get_model_version_by_alias(name, "champion").version) == new
