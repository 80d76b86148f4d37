"""The local Python base image the image tests build on; they skip where podman or that image is missing."""

from __future__ import annotations

import shutil

import pytest
from podmanlib import BASE, PYTHON_BASE, podman


@pytest.fixture(scope="session")
def python_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.skip(f"base image {BASE} not present (see docs/operations.md, 'Containers without Docker')")
    # An image imported from a root filesystem has no PATH; give it the usual one (python:3.11-slim has it).
    containerfile = tmp_path_factory.mktemp("base") / "Containerfile"
    containerfile.write_text(f"FROM {BASE}\nENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
    podman("build", "-t", PYTHON_BASE, "-f", str(containerfile), str(containerfile.parent))
    return PYTHON_BASE
