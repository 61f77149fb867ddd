#!/usr/bin/env bash
# Installs everything and runs the CPU test suite (Triton interpreter; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
