#!/usr/bin/env bash
# The main job: install, then compile SmolLM2-135M-Instruct with turbofx, generate greedily next to
# eager, print the answer, whether it equals eager, the compiler report and both speeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec turbofx demo smollm2 "$@"
