"""A run's config is checked against its DAG's params before the first task does anything.

Airflow validates the values of declared params, but a key that is not one (``{"epoch": 50}`` for
``epochs``) it passes on unused: the run would train with the defaults and say nothing. The first task of
each DAG refuses such a config, naming the key, the param it was probably meant to be and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from typing import Any


def unknown_keys_error(conf: Mapping[str, Any], declared: Iterable[str], *, dag_id: str) -> str | None:
    """Why a run's config is refused (a key that is not a param of the DAG), or None if it is not."""
    declared = sorted(declared)
    unknown = sorted(set(conf) - set(declared))
    if not unknown:
        return None
    named = []
    for key in unknown:
        close = get_close_matches(key, declared, n=1, cutoff=0.6)
        named.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"the run's config has {'a key' if len(unknown) == 1 else 'keys'} that {dag_id} does not take: "
            f"{', '.join(named)}. Airflow would ignore {'it' if len(unknown) == 1 else 'them'} and run with the "
            f"defaults; trigger again with the params' names: {', '.join(declared)}")


def check_conf(context: Mapping[str, Any]) -> None:
    """A ``pre_execute`` hook: fail the task at once, without retries, if the run's config has an unknown key."""
    from airflow.sdk.exceptions import AirflowFailException

    dag = context["dag"]
    error = unknown_keys_error(context["dag_run"].conf or {}, dag.params.keys(), dag_id=dag.dag_id)
    if error:
        raise AirflowFailException(error)
