#!/usr/bin/env bash
# Podman for the image tests on a Debian 12 machine without a Docker engine or a registry (as root):
# installs podman, configures it as this kind of sandbox needs, and builds the local Python base image the
# Dockerfiles take as BASE_IMAGE. Idempotent: what is already there is kept. See docs/operations.md,
# "Containers without Docker". Then: make test TEST_MARKERS=   (or pytest tests/images -m slow)
# Settings (environment): MLOPS_TEST_BASE_IMAGE (localhost/debian-python:3.11).
set -euo pipefail
base=${MLOPS_TEST_BASE_IMAGE:-localhost/debian-python:3.11}
if [[ $(id -u) -ne 0 ]]; then
  echo "error: run as root (apt-get, /etc/containers and debootstrap need it)" >&2
  exit 1
fi
# catatonit: the init of the pause container that `podman kube play` builds for every pod (only recommended
# by Debian's podman, so --no-install-recommends leaves it out and kube play fails with "finding pause binary").
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null ||
  ! command -v catatonit >/dev/null; then
  echo "installing podman, runc, catatonit and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc catatonit debootstrap \
    >/dev/null
fi
conf=/etc/containers/containers.conf
if [[ ! -s $conf ]]; then
  # This sandbox refuses crun's cgroup handling and raising rlimits: runc, fixed ulimits, the host's network.
  mkdir -p /etc/containers
  printf '%s\n' '[containers]' 'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]' 'netns = "host"' \
    '[engine]' 'runtime = "runc"' >"$conf"
  echo "wrote $conf"
fi
if podman image exists "$base"; then
  echo "base image $base: present"
  exit 0
fi
# No registry: a root filesystem from Debian's packages, imported as an image (about a minute, 300 MB).
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "building $base from Debian packages (debootstrap)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
  bookworm "$rootfs" >/dev/null
tar -C "$rootfs" -c . | podman import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' - "$base" >/dev/null
echo "base image $base: built"
