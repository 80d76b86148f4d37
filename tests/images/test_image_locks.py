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


def test_images_run_as_the_user_the_pods_and_the_serving_manifest_declare_and_own_what_they_write():
    """The images are built only in the slow podman tests: these lines are what a pod's securityContext and
    the data volume rely on (runAsUser must be the image's user; the steps write /data and /airflow/xcom)."""
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "plugins"))
    from mlops_airflow.pods import RUN_AS_USER

    deployment = next(d for d in yaml.safe_load_all((ROOT / "k8s/serving/deployment.yaml").read_text())
                      if d and d.get("kind") == "Deployment")
    manifest_user = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    for image, declared in (("steps", RUN_AS_USER), ("serving", manifest_user)):
        text = (ROOT / "images" / image / "Dockerfile").read_text()
        users = re.findall(r"^USER (\S+)", text, flags=re.M)
        assert users and users[-1] == str(declared), f"images/{image}: runs as {users}, pods declare {declared}"
    steps = (ROOT / "images/steps/Dockerfile").read_text().replace("\\\n", " ")
    owned = re.search(rf"chown {RUN_AS_USER}:{RUN_AS_USER} ([^&\n]+)", steps)
    assert owned and {"/data", "/airflow/xcom"} <= set(owned.group(1).split()), "the step user must own its outputs"


def _lock_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_gpu", ROOT / "scripts" / "lock_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_lock_is_for_the_tensorflow_of_the_steps_lock_and_moves_none_of_its_pins():
    """The GPU image installs tensorflow[and-cuda] against both locks: a TensorFlow bump without make lock
    would leave CUDA pins resolved for the old one (or pins pip cannot satisfy together)."""
    text = (ROOT / "images/steps/constraints-gpu.txt").read_text()
    built_for = re.search(r"tensorflow\[and-cuda\]==(\S+)", text.splitlines()[0])
    steps = _pins(ROOT / "images/steps/constraints.txt")
    assert built_for and built_for.group(1) == steps["tensorflow"], (
        f"constraints-gpu.txt was resolved for {built_for and built_for.group(1)}, the steps lock holds "
        f"tensorflow {steps['tensorflow']}: run make lock")
    gpu = _pins(ROOT / "images/steps/constraints-gpu.txt")
    assert gpu and all(name.startswith("nvidia-") for name in gpu), gpu
    assert not set(gpu) & set(steps), "the GPU lock repeats pins of the steps lock"


def test_lock_gpu_pins_what_the_cuda_extra_adds_and_refuses_a_report_of_another_tensorflow():
    lock_gpu = _lock_gpu()
    lock = "# Lock\ntensorflow==2.21.0\nnumpy==2.1.3\n"

    def report(*pins):
        return {"install": [{"metadata": {"name": name, "version": version}} for name, version in pins]}

    import datetime

    text = lock_gpu.gpu_lock(report(("tensorflow", "2.21.0"), ("numpy", "2.1.3"), ("nvidia_nccl_cu12", "2.32.3"),
                                    ("nvidia-cublas-cu12", "12.9.3.13"), ("setuptools", "84.2.1")),
                             lock, today=datetime.date(2026, 12, 7))
    assert text.splitlines() == [
        "# CUDA libraries of tensorflow[and-cuda]==2.21.0 (pip resolution on 2026-12-07); used with "
        "TF_EXTRAS=and-cuda. Regenerate with make lock.",
        "nvidia-cublas-cu12==12.9.3.13", "nvidia-nccl-cu12==2.32.3"]
    with pytest.raises(SystemExit, match="resolved tensorflow 2.22.0, the steps lock holds 2.21.0"):
        lock_gpu.gpu_lock(report(("tensorflow", "2.22.0"), ("nvidia-nccl-cu12", "2.32.3")), lock)
    with pytest.raises(SystemExit, match=r"moved pins of the steps lock.*numpy"):
        lock_gpu.gpu_lock(report(("tensorflow", "2.21.0"), ("numpy", "2.2.0"), ("nvidia-nccl-cu12", "2.32.3")), lock)
    with pytest.raises(SystemExit, match="adds nothing"):
        lock_gpu.gpu_lock(report(("tensorflow", "2.21.0")), lock)
