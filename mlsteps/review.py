"""review: record a review decision on a model version; an approval moves the alias ``champion`` to it.

Decisions: ``approved`` (a reviewer approved it in Airflow), ``auto`` (the run promotes versions that pass
the gate), ``rejected`` (tagged, alias untouched), ``none`` (nothing to record: no review was asked for).
A version is promoted only while ``champion`` is still the version the gate compared it with (an approval
card may wait hours); a version that is already champion cannot be rejected by tags alone.
Tags: ``review.decision``, ``review.reviewer``, ``review.time``, ``review.comment``, and on promotion
``review.previous_champion``. Moving the alias is what promotion reacts to: the registry alias
``champion`` names the version that must be served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import tracking
from .core import StepError, cli, field

log = logging.getLogger("mlsteps.review")

DECISIONS = ("approved", "auto", "rejected", "none")


@dataclass(frozen=True)
class ReviewConfig:
    model_name: str = field(help="registered model name")
    version: int = field(help="the version reviewed")
    decision: str = field(help="approved, auto, rejected or none")
    reviewer: str = field("", help="who decided (the Airflow user who answered; 'pipeline' for auto)")
    comment: str = field("", help="the reviewer's comment")
    decided_at: str = field("", help="when (ISO 8601; default: now)")
    alias: str = field("champion", help="alias an approval moves to the version")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def run(config: ReviewConfig) -> dict[str, Any]:
    """Tag the version with the decision; on approval (or auto) point the alias at it."""
    if config.decision not in DECISIONS:
        raise StepError(f"--decision must be one of {', '.join(DECISIONS)}, got {config.decision!r}")
    tracking.check_alias("--alias", config.alias, "champion")
    if config.decision == "none":
        log.info("no review decision to record for %s version %s", config.model_name, config.version)
        return {"model_name": config.model_name, "version": config.version, "decision": "none", "promoted": False}
    mlflow = tracking.connect(config.tracking_uri)
    client = mlflow.MlflowClient()
    name, version = config.model_name, str(config.version)
    tags = tracking.registered_version(client, name, version).tags
    if config.decision in ("approved", "auto") and tags.get("gate.verdict") != "passed":
        raise StepError(f"{name} version {version} did not pass the quality gate "
                        f"({tags.get('gate.verdict', 'not judged')}: {tags.get('gate.reasons', '')}); not promoted")
    when = config.decided_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"review.decision": config.decision, "review.reviewer": config.reviewer or "unknown",
              "review.time": when, "review.comment": config.comment}
    # An outage fails the step (retried): taken for "no champion", it refused an approval for good (exit 2,
    # "champion is now version (none)"), or let one overwrite a champion set meanwhile.
    named = tracking.version_by_alias(client, name, config.alias)
    # str(): MLflow's SQL store (a database --tracking-uri) numbers versions as int, its server as str.
    current = str(named.version) if named is not None else None
    previous = None
    if config.decision == "rejected" and current == version:
        raise StepError(f"{name} version {version} is {config.alias} (approved earlier) and would stay served if "
                        f"only tagged rejected: move the alias {config.alias} back to version "
                        f"{tags.get('review.previous_champion') or '(none)'} in MLflow first (promotion follows it)")
    if config.decision in ("approved", "auto"):
        previous = current
        judged_against = tags.get("gate.champion_version")  # "" when there was no champion to compare with
        if previous != version and judged_against is not None and (previous or "") != judged_against:
            raise StepError(
                f"{name} version {version} was compared by the gate with {config.alias} version "
                f"{judged_against or '(none)'}, but {config.alias} is now version {previous or '(none)'}, which it "
                f"was never compared with; not promoted. To promote it anyway, move the alias {config.alias} to it "
                "in MLflow (promotion follows); to judge it against the new champion, delete its gate.* tags and "
                "clear the gate task.")
        if previous == version:  # a retry after the alias already moved: keep what the first try recorded
            record.pop("review.time")
            previous = tags.get("review.previous_champion") or None
        record["review.previous_champion"] = previous or ""
    promoted = config.decision in ("approved", "auto")
    # The decision last, after the alias moved: a version that says "approved" is (or was) the champion, and
    # a retry finds the previous champion recorded.
    decision = record.pop("review.decision")
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        client.set_registered_model_alias(name, config.alias, version)
    client.set_model_version_tag(name, version, "review.decision", decision)
    if promoted:
        log.info("%s version %s is now %s (was %s), %s by %s", name, version, config.alias, previous or "none",
                 config.decision, record["review.reviewer"])
    else:
        log.info("%s version %s rejected by %s: %s", name, version, record["review.reviewer"], config.comment)
    return {"model_name": name, "version": int(version), "decision": config.decision, "promoted": promoted,
            "previous_champion": int(previous) if previous else None}


def main(argv: list[str] | None = None) -> int:
    """``python -m mlsteps.review``: the step's CLI."""
    return cli(run, ReviewConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
