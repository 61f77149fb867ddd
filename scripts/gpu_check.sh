#!/usr/bin/env bash
# One call on the lent GPU machine does it all. Call it through the device tool from the repo root:
#   command "bash scripts/gpu_check.sh", timeout_s 560   (steps: 140 + 150 + 100 + 60 + 35 s + env, < ~8 min)
# The machine has torch 2.11 / triton 3.6 / transformers 5.17 / Python 3.12, no network, and the repo
# is NOT pip-installed: PYTHONPATH=$PWD, and the `torch_dynamo_backends` entry point is missing, so
# code must `import turbofx` before torch.compile(..., backend="turbofx").
# Everything lands in $OUT: env.txt, pytest_gpu.txt, bench.{txt,json}, attention.{txt,json},
# decode_step.{txt,json}, compile_time.{txt,json}, summary.txt.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
: > "$OUT/summary.txt"
step() {  # step NAME SECONDS CMD...: run under a timeout, tee into $OUT/NAME.txt, record the exit status
  local name=$1 secs=$2; shift 2
  echo "=== $name (timeout ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc ($((SECONDS - t0)) s)$([ "$rc" = 124 ] && echo ' TIMED OUT')" | tee -a "$OUT/summary.txt"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,triton,transformers,sys;print(sys.version.split()[0],torch.__version__,triton.__version__,transformers.__version__)"
  python3 -c "import turbofx; print('turbofx import ok from', turbofx.__file__)"
} 2>&1 | tee "$OUT/env.txt"
# 1. GPU tests (budget ~140 s)
step pytest_gpu 140 python3 -m pytest -q -m gpu -p no:cacheprovider tests  # no -x: see every GPU failure in one run
# 2. Side-by-side benchmark: eager / turbofx / Inductor in one process, table + JSON (budget ~150 s)
step bench 150 python3 -m benchmarks.llm --quick --json "$OUT/bench.json"
# 2b. Attention kernel: turbofx vs SDPA flash / cuDNN, prefill TFLOP/s and decode TB/s (budget 100 s;
#     the script skips remaining workloads after --budget seconds and writes JSON after every row)
step attention 100 python3 -m benchmarks.attention --quick --budget 70 --json "$OUT/attention.json"
# 2c. One decode step (rope + cache write + attention): fused vs unfused turbofx vs eager vs Inductor (60 s)
step decode_step 60 python3 -m benchmarks.decode_step --quick --json "$OUT/decode_step.json"
# 3. Compile-time breakdown (budget 35 s)
step compile_time 35 python3 -m benchmarks.compile_time --json "$OUT/compile_time.json"
echo "=== summary"; cat "$OUT/summary.txt"
