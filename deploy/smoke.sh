#!/usr/bin/env bash
# The compose stack for real: build every image, up, use, break, down -v; one table at the end
# (docs/deployment.md "Smoke run"). Needs the Docker engine, Compose v2 (>= 2.24) and the
# project's venv (make install): the checks use `coolfusion generate` and the openai client.
#   deploy/smoke.sh [--out bench/deploy-smoke.json]      (make deploy-smoke)
# BASE_IMAGE: the official python:3.11-slim when it can be pulled, else an offline base built
# from Debian packages (deploy/offline-base.sh; needs root and debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
docker compose version >/dev/null || { echo "needs Docker Compose v2 (docker compose)" >&2; exit 1; }

if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    else
        echo "python:3.11-slim cannot be pulled: building an offline base (debootstrap)" >&2
        BASE_IMAGE="$(deploy/offline-base.sh)"
    fi
fi

# Wheels the builds take before any index (deploy/wheels/README.md): llama-cpp-python from pip's
# wheel cache (scripts/install.sh built it once), so the worker-cpu image does not compile it again.
cached="$(find "$("$VENV/bin/python" -m pip cache dir)/wheels" -name 'llama_cpp_python-0.3.36-*.whl' 2>/dev/null | head -1)"
[ -n "$cached" ] && cp -u "$cached" deploy/wheels/

export PATH="$VENV/bin:$PATH"
exec nice -n "${SMOKE_NICE:-10}" "$VENV/bin/python" deploy/smoke.py --base-image "$BASE_IMAGE" "$@"
