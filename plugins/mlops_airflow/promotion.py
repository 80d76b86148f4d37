"""The Airflow tasks of model_promotion: reconcile serving to the registry alias ``champion``.

plan (no-op when serving already runs the champion) -> infra_validate (a step: the candidate in the real
model server) -> deploy -> smoke_test -> record; on a failure of infra_validate, deploy or smoke_test,
rollback puts serving and the alias back where they were, tags the version, and fails the run. record
failing (MLflow unreachable after its retries) fails the run without a rollback: the version serves, and
the next run reconciles serving to the alias (which a version given by hand has then not moved).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from mlops_airflow.runconf import check_conf

log = logging.getLogger(__name__)

CHAMPION = "champion"
# How long the smoke test asks again when another version answers: the Deployment's preStop (5 s) plus
# kube-proxy's lag in forgetting a terminating pod.
SMOKE_SETTLE_SECONDS = 20.0
# An int8 model's softmax output is quantized in steps of 1/256: ten classes may sum to 1 +- 10 * 0.5/256.
SUM_TOLERANCE = 0.05


def _context() -> tuple[Any, Any]:
    from mlops_airflow import registry, settings

    loaded = settings.load()
    return loaded, registry.Registry(loaded.tracking_uri)


def _target(settings: Any, model_name: str) -> Any:
    from mlops_airflow import deploy

    return deploy.for_settings(settings, model_name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@task.short_circuit(task_id="plan", execution_timeout=timedelta(minutes=5), pre_execute=check_conf)
def plan(params: dict[str, Any] | None = None, triggering_asset_events: Any = None,
         run_id: str | None = None, dag_run: Any = None) -> dict[str, Any]:
    """What to deploy: ``version`` if given, else the champion; nothing if it is already served."""
    from mlops_airflow.deploy import TargetUnavailable

    assert params is not None
    settings, registry = _context()
    name = params["model_name"]
    events = [event for found in (triggering_asset_events or {}).values() for event in found]
    moved = {(event.extra or {}).get("model_name") for event in events}
    if events and name not in moved:  # one model server serves one registered model
        log.info("the alias %s moved for %s, but serving serves %s: nothing to do", CHAMPION,
                 ", ".join(sorted(m or "?" for m in moved)), name)
        return {}
    run_type = getattr(dag_run, "run_type", "") or ""
    run_type = str(getattr(run_type, "value", run_type))  # the SDK's DagRunType: str() is "DagRunType.SCHEDULED"
    manual = int(params.get("version") or 0) > 0
    champion = registry.alias(name, CHAMPION)
    wanted = str(int(params["version"])) if manual else champion  # 3.0 (a JSON client's) is version 3
    if wanted is None or registry.version(name, wanted) is None:
        if not registry.exists(name):
            # A misspelt model_name (or MLOPS_MODEL_NAME) would otherwise pass every run as "nothing to serve".
            unknown = (f"{name} is not a registered model in MLflow at {settings.tracking_uri}: check the "
                       "model_name param (its default is MLOPS_MODEL_NAME)")
            if run_type.endswith("scheduled"):  # before the first training registers it, too: not a failure
                log.warning("%s; nothing to serve", unknown)
                return {}
            raise AirflowFailException(unknown)
        if wanted is None:
            log.info("%s has no version with alias %s: nothing to serve", name, CHAMPION)
            return {}
        raise AirflowFailException(f"{name} version {wanted} is not registered; check the version param")
    try:
        before = _target(settings, name).current()
    except TargetUnavailable as exc:
        raise AirflowFailException(str(exc)) from None
    if before.version == wanted and before.pinned and not before.problem:
        if manual and champion != wanted:  # the alias follows a version given by hand, served or not
            registry.set_alias(name, CHAMPION, wanted)
            log.info("serving already runs %s version %s: alias %s moved to it (was %s)", name, wanted, CHAMPION,
                     champion or "unset")
        else:
            log.info("serving already runs %s version %s (%s): nothing to do", name, wanted, CHAMPION)
        return {}
    trigger = "manual" if manual else ("mlflow webhook" if events else
                                       "schedule" if run_type.endswith("scheduled") else "by hand")
    log.info("promoting %s version %s (serving now: %s%s%s; trigger: %s)", name, wanted, before.version or "nothing",
             "" if before.pinned else ", through an alias: pinned by this promotion",
             f", but {before.problem}" if before.problem else "", trigger)
    return {"model_name": name, "version": wanted, "previous_version": before.version,
            "previous_model_uri": before.model_uri, "trigger": trigger, "run_id": run_id,
            "champion_at_plan": champion}


def _plan(ti: Any) -> dict[str, Any]:
    return ti.xcom_pull(task_ids="plan")


@task(task_id="deploy", execution_timeout=timedelta(minutes=30))
def deploy(ti: Any = None) -> dict[str, Any]:
    from mlops_airflow.deploy import DeployFailed

    planned = _plan(ti)
    settings, registry = _context()
    name, version = planned["model_name"], planned["version"]
    try:
        _target(settings, name).deploy(version)
    except DeployFailed as exc:
        registry.set_tags(name, version, {"promotion.deploy": f"failed: {exc}"})
        raise AirflowFailException(f"{name} version {version} did not come up: {exc}") from None
    log.info("%s version %s deployed to the %s target", name, version, settings.deploy_target)
    return {"deployed": version, "target": settings.deploy_target}


def smoke(url: str, name: str, version: str, requests: int, timeout: float = 10.0,
          settle: float | None = None, clock: Any = time.monotonic, sleep: Any = time.sleep) -> str:
    """``requests`` predictions from the live endpoint, each from ``version``; the first problem raises.

    Each request goes on a new connection, so that a Service spreads them over its pods (one kept-alive
    connection would test one pod). For ``settle`` seconds an answer from another version is asked again: a
    finished rollout's old pods keep serving a few seconds (preStop) until kube-proxy forgets them.
    """
    import httpx

    settle = SMOKE_SETTLE_SECONDS if settle is None else settle
    rng = random.Random(0)
    settled_by = clock() + settle
    again = 0
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                      limits=httpx.Limits(max_keepalive_connections=0)) as http:
        try:  # the served model's input shape, e.g. [-1, 28, 28]
            height, width = http.get(f"/v2/models/{name}").json()["inputs"][0]["shape"][1:]
        except (httpx.TransportError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise AssertionError(f"{url} has no metadata for {name}: {type(exc).__name__}: {exc}") from None
        i = 0
        while i < requests:
            image = [[float(rng.randint(0, 255)) for _ in range(width)] for _ in range(height)]
            try:
                response = http.post(f"/v1/models/{name}:predict", json={"instances": [image]})
            except httpx.TransportError as exc:
                raise AssertionError(f"request {i + 1} to {url} failed: {type(exc).__name__}: {exc}") from None
            if response.status_code != 200:
                raise AssertionError(f"request {i + 1} got HTTP {response.status_code}: {response.text[:300]}")
            served = response.headers.get("x-model-version")
            if served != version:
                if clock() < settled_by:
                    again += 1
                    log.info("request %d was answered by version %s, not %s: an old pod still in the Service's "
                             "endpoints, asked again", i + 1, served, version)
                    sleep(1)
                    continue
                raise AssertionError(f"request {i + 1} was answered by version {served}, not {version}"
                                     + (f" ({again} earlier answers of other versions, over {settle:g} s)"
                                        if again else ""))
            try:
                row = [float(p) for p in response.json()["predictions"][0]]
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # another service, a proxy's page
                raise AssertionError(f"request {i + 1}: the answer is not a prediction ({type(exc).__name__}: "
                                     f"{exc}): {response.text[:300]}") from None
            if len(row) < 2 or abs(sum(row) - 1) > SUM_TOLERANCE:
                raise AssertionError(f"request {i + 1}: not a probability row: {row}")
            i += 1
    return f"passed: {requests} requests to {url}, all answered by version {version}" + (
        f" (after {again} answers of an older version while the rollout settled)" if again else "")


@task(task_id="smoke_test", execution_timeout=timedelta(minutes=10))
def smoke_test(params: dict[str, Any] | None = None, ti: Any = None) -> str:
    assert params is not None
    planned = _plan(ti)
    settings, registry = _context()
    name, version = planned["model_name"], planned["version"]
    try:
        verdict = smoke(settings.serving_url, name, version, int(params["smoke_requests"]))
    except AssertionError as exc:
        registry.set_tags(name, version, {"promotion.smoke_test": f"failed: {exc}"})
        raise AirflowFailException(f"smoke test of {name} version {version} failed: {exc}") from None
    registry.set_tags(name, version, {"promotion.smoke_test": verdict})
    return verdict


@task(task_id="record", execution_timeout=timedelta(minutes=5))
def record(ti: Any = None) -> dict[str, Any]:
    """Tag what is served now; a manual promotion also moves the alias, so the contract holds."""
    planned = _plan(ti)
    _, registry = _context()
    name, version = planned["model_name"], planned["version"]
    registry.set_tags(name, version, {"promotion.status": "serving", "promotion.deployed_at": _now(),
                                      "promotion.previous_version": planned["previous_version"] or "",
                                      "promotion.trigger": planned["trigger"],
                                      "promotion.dag_run_id": planned["run_id"] or ""})
    # One version says "serving": the one served before, and any other still tagged so (what served before was
    # unknown to plan: a server that had given up loading, pods answering several versions).
    previous = planned["previous_version"]
    replaced = set(registry.versions_tagged(name, "promotion.status", "serving"))
    if previous and registry.version(name, previous) is not None:  # not deleted since
        replaced.add(previous)
    for other in sorted(replaced - {version}, key=int):
        registry.set_tags(name, other, {"promotion.status": "replaced", "promotion.replaced_by": version,
                                        "promotion.replaced_at": _now()})
    # Only a version given by hand moves the alias, and only from where plan saw it: a reviewer who approved
    # another version meanwhile wins, and the run that approval's webhook queued deploys it next. Otherwise
    # the alias, moved on or not, stays: it names what must be served.
    champion = registry.alias(name, CHAMPION)
    if planned["trigger"] == "manual" and champion != version:
        if champion == planned.get("champion_at_plan", champion):
            registry.set_alias(name, CHAMPION, version)
            log.info("alias %s of %s moved to version %s (promoted by hand)", CHAMPION, name, version)
        else:
            log.warning("alias %s of %s moved to version %s during this promotion of version %s (an approval): "
                        "left there; the next run deploys it", CHAMPION, name, champion, version)
    return {"model_name": name, "serving": version, "previous_version": planned["previous_version"]}


@task(task_id="rollback", trigger_rule="one_failed", execution_timeout=timedelta(minutes=30))
def rollback(ti: Any = None) -> None:
    """Serving back to what it was, the alias back to that version (if it still names the failed one); the
    version served before, deployed again, keeps its alias and status (tag ``promotion.redeploy``).

    Skipped when plan itself failed (its downstream tasks are then upstream_failed, which fires one_failed too):
    nothing was changed, and plan's own error is the run's reason.
    """
    from mlops_airflow.deploy import DeployFailed, Serving

    planned = _plan(ti)
    if not planned:
        raise AirflowSkipException("plan failed before anything was changed; nothing to roll back")
    settings, registry = _context()
    name, failed, previous = planned["model_name"], planned["version"], planned["previous_version"]
    # The registry first: if serving cannot be put back (below, retried), the alias and tags already say the
    # version failed, so no later run takes it for the reconciled champion; the next run (the alias move's
    # webhook, or the schedule) deploys the previous version again if this one could not.
    again = failed == previous  # the version served before, deployed again (its rollout was stuck, or pinned)
    if again:
        # It serves (or served) before this run, and the alias names it: moving the alias to where it is would
        # only fire MLflow's alias event, whose run would fail the same way; "failed" would hide that it serves.
        registry.set_tags(name, failed, {"promotion.redeploy": f"failed at {_now()} (run {planned['run_id']}): "
                                                               "see that run's failed task"})
    else:
        if registry.alias(name, CHAMPION) == failed:  # not if a reviewer moved it on meanwhile
            if previous:
                registry.set_alias(name, CHAMPION, previous)
            else:
                registry.delete_alias(name, CHAMPION)
        registry.set_tags(name, failed, {"promotion.status": "failed", "promotion.failed_at": _now(),
                                         "promotion.rolled_back_to": previous or "",
                                         "promotion.dag_run_id": planned["run_id"] or ""})
    try:
        _target(settings, name).restore(Serving(previous, planned["previous_model_uri"]))
    except DeployFailed as exc:
        if again:
            raise DeployFailed(f"deploying {name} version {failed} again failed, and so did putting serving back "
                               f"as it was: {exc}") from None
        raise DeployFailed(f"alias {CHAMPION} of {name} is back at version {previous or '(none)'} and version "
                           f"{failed} is tagged failed, but serving could not be put back: {exc}") from None
    if again:
        raise AirflowFailException(f"deploying {name} version {failed} again (it served before this run) failed "
                                   "(reason in the failed task's log); serving is back as it was, alias "
                                   f"{CHAMPION} unchanged")
    raise AirflowFailException(f"promotion of {name} version {failed} failed (reason in its promotion.* tags and "
                               f"the failed task's log); serving and alias {CHAMPION} are back at version "
                               f"{previous or '(none)'}")
