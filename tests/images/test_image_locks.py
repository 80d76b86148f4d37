"""Every image installs its pinned requirements against a lock, so indirect dependencies are fixed too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted([*ROOT.glob("images/*/Dockerfile"), ROOT / "mlflow" / "Dockerfile"])
INSTALL = re.compile(r"pip install[^\n]*?-r (\S+)")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[re.sub(r"\[.*\]", "", name).strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[str(p.relative_to(ROOT).parent) for p in DOCKERFILES])
def test_each_image_installs_pinned_requirements_against_a_lock_that_holds_them(dockerfile):
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if INSTALL.search(line)]
    assert installs, f"{dockerfile}: no pip install -r"
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY"))
    for line in installs:
        assert re.search(r" -c \S+", line), f"{dockerfile}: {line.strip()!r} installs without a lock (-c)"
    # The files installed from, as the repository holds them (COPY sources, matched by file name).
    sources = {Path(word).name: ROOT / word for word in copied.split() if (ROOT / word).is_file()}
    requirements = _pins(sources[Path(INSTALL.search(installs[0]).group(1)).name])
    lock = _pins(sources[Path(re.search(r" -c (\S+)", installs[0]).group(1)).name])
    unpinned = [name for name, version in requirements.items() if not version]
    assert not unpinned, f"{dockerfile}: unpinned requirements {unpinned}"
    differ = {name: (version, lock.get(name)) for name, version in requirements.items() if lock.get(name) != version}
    assert not differ, f"{dockerfile}: requirement pins that the lock does not hold (pin, lock): {differ}"
