"""Print the GPU lock of the steps image: the pins ``tensorflow[and-cuda]`` adds to the steps lock.

``make lock`` runs it after regenerating ``images/steps/constraints.txt``:

    pip install --dry-run --ignore-installed --report REPORT "tensorflow[and-cuda]" -c images/steps/constraints.txt
    python scripts/lock_gpu.py REPORT images/steps/constraints.txt > images/steps/constraints-gpu.txt

The steps Dockerfile installs the extra against both files (``--build-arg TF_EXTRAS=and-cuda``).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path


# What pip freeze leaves out of the steps lock (so the report lists them as new): not the extra's to pin.
FREEZE_EXCLUDES = {"pip", "setuptools", "wheel", "distribute"}


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def lock_pins(text: str) -> dict[str, str]:
    """``name == version`` lines of a pip-freeze lock, by normalised name."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def gpu_lock(report: dict, lock_text: str, *, today: datetime.date | None = None) -> str:
    """The lines of constraints-gpu.txt for a pip ``--report`` of ``tensorflow[and-cuda]`` against ``lock_text``."""
    locked = lock_pins(lock_text)
    resolved = {_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report.get("install", [])}
    tensorflow = resolved.get("tensorflow")
    if tensorflow is None or tensorflow != locked.get("tensorflow"):
        raise SystemExit(f"lock_gpu: the report resolved tensorflow {tensorflow}, the steps lock holds "
                         f"{locked.get('tensorflow')}: resolve 'tensorflow[and-cuda]' with -c of that lock")
    moved = {name: (locked[name], version) for name, version in resolved.items()
             if name in locked and locked[name] != version}
    if moved:
        raise SystemExit(f"lock_gpu: the CUDA extra moved pins of the steps lock (lock, resolved): {moved}")
    added = sorted((name, version) for name, version in resolved.items()
                   if name not in locked and name not in FREEZE_EXCLUDES)
    if not added:
        raise SystemExit("lock_gpu: the report adds nothing to the steps lock: was it resolved with [and-cuda]?")
    day = (today or datetime.date.today()).isoformat()
    header = (f"# CUDA libraries of tensorflow[and-cuda]=={tensorflow} (pip resolution on {day}); used with "
              "TF_EXTRAS=and-cuda. Regenerate with make lock.")
    return "\n".join([header, *(f"{name}=={version}" for name, version in added)]) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, lock = (Path(arg) for arg in argv)
    sys.stdout.write(gpu_lock(json.loads(report.read_text()), lock.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
