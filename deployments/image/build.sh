#!/usr/bin/env bash
# Build the outrelay container image with podman, from a fresh Debian machine,
# without any image registry:
#   1. a debootstrap root file system (bookworm, minbase + python3, python3-venv,
#      iptables) is made once and cached as a tarball, then imported as
#      localhost/outrelay-base:bookworm;
#   2. the outrelay wheel and its dependencies are built on the host (PyPI or
#      the host's pip configuration) into the build context;
#   3. podman builds the multi-stage Containerfile FROM that local base.
#
# usage: deployments/image/build.sh [TAG]     (default TAG: localhost/outrelay:VERSION)
# env:   OUTRELAY_IMAGE_CACHE  cache directory for the base tarball
#                              (default ${XDG_CACHE_HOME:-~/.cache}/outrelay-image)
#        DEBIAN_MIRROR         (default http://deb.debian.org/debian)
#        PODMAN_RUN_OPTS       extra options of the build's RUN steps (default: nofile and
#                              nproc limits of 4096: podman's defaults are above the hard
#                              limits of some sandboxes, where crun's setrlimit then fails)
#        PYTHON                host Python used to build wheels (default python3; its
#                              minor version must be the base's, 3.11 on bookworm)
# Needs root (debootstrap) and: podman, debootstrap. Prints the image tag last.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
CACHE=${OUTRELAY_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrelay-image}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE_IMAGE=localhost/outrelay-base:$SUITE
BASE_TAR=$CACHE/debian-$SUITE-outrelay-base.tar
VERSION=$(PYTHONPATH=src "$PYTHON" -c 'import outrelay; print(outrelay.__version__)')
TAG=${1:-localhost/outrelay:$VERSION}
read -r -a RUN_OPTS <<<"${PODMAN_RUN_OPTS:---ulimit nofile=4096:4096 --ulimit nproc=4096:4096}"

mkdir -p "$CACHE"
if [ ! -s "$BASE_TAR" ]; then
  echo "build.sh: debootstrap $SUITE -> $BASE_TAR" >&2
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,iptables,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >&2
  # Keep the image small: no apt lists or downloaded .debs.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar --numeric-owner -C "$root" -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$root"
  trap - EXIT
fi
if ! podman image exists "$BASE_IMAGE" \
   || [ "$(podman image inspect --format '{{index .Labels "outrelay.base.tar"}}' "$BASE_IMAGE" 2>/dev/null)" != "$(stat -c %Y "$BASE_TAR")" ]; then
  echo "build.sh: podman import $BASE_TAR -> $BASE_IMAGE" >&2
  podman import --change "LABEL outrelay.base.tar=$(stat -c %Y "$BASE_TAR")" \
    --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >&2
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/wheels"
echo "build.sh: wheels for outrelay $VERSION" >&2
PIP_NO_WARN_SCRIPT_LOCATION=1 "$PYTHON" -m pip wheel -q --wheel-dir "$ctx/wheels" . >&2
cp Containerfile "$ctx/"
podman build "${RUN_OPTS[@]}" --build-arg BASE="$BASE_IMAGE" --build-arg VERSION="$VERSION" \
  -f "$ctx/Containerfile" -t "$TAG" "$ctx" >&2
echo "$TAG"
