#!/usr/bin/env bash
# Builds the image deploy/docker/*.Dockerfile use as BASE_IMAGE on a machine that reaches apt and
# pip but no image registry: a `debootstrap --variant=minbase` Debian rootfs, `docker import`ed,
# plus Debian's Python in a venv on PATH (base-offline.Dockerfile). Prints the image name.
#   deploy/offline-base.sh [NAME]        (default coolfusion/python-base:bookworm; root for debootstrap)
set -euo pipefail
NAME="${1:-coolfusion/python-base:bookworm}"
ROOTFS_IMAGE=coolfusion/debian-rootfs:bookworm
cd "$(dirname "$0")/.."
if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "$NAME"
    exit 0
fi
if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    ROOTFS="$(mktemp -d)"
    trap 'rm -rf "$ROOTFS"' EXIT
    debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >&2
    # debootstrap keeps the packages it installed and apt's caches: 100+ MB no image needs.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import - "$ROOTFS_IMAGE" >&2
fi
# The build context: the Dockerfile and the host's extra CA certificates (public certificates).
CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT" "${ROOTFS:-}"' EXIT
mkdir "$CONTEXT/ca"
cp deploy/docker/base-offline.Dockerfile "$CONTEXT/Dockerfile"
find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$CONTEXT/ca/" \; 2>/dev/null || true
docker build -q --build-arg ROOTFS_IMAGE="$ROOTFS_IMAGE" -t "$NAME" "$CONTEXT" >&2
echo "$NAME"
