#!/usr/bin/env bash
# Regenerate the locks that .ci/run, the Dockerfile and the README's commands install from
# (runtime.txt, dev.txt, and build.txt: the build backend, so no install resolves it afresh).
# Resolves the ranges in pyproject.toml for every platform (Linux, macOS) on Python 3.11+, with
# hashes; keeps existing pins unless you pass --upgrade (or --upgrade-package NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "scripts/lock.sh needs uv: python3 -m pip install uv" >&2; exit 1; }
common=(--universal --python-version 3.11 --generate-hashes --no-header --quiet "$@")
# The image ships the gRPC drop-in, so the runtime lock includes the [grpc] extra.
uv pip compile pyproject.toml --extra grpc "${common[@]}" -o requirements/runtime.txt
uv pip compile pyproject.toml --extra grpc --extra dev "${common[@]}" -o requirements/dev.txt
# The build backend, at the versions dev.txt pins where they overlap, so both files install together.
uv pip compile requirements/build.in --constraint requirements/dev.txt "${common[@]}" -o requirements/build.txt
