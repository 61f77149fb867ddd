#!/usr/bin/env bash
# One call on the lent GPU machine does it all. Call it through the device tool from the repo root:
#   command "bash scripts/gpu_check.sh", timeout_s 540
# The whole script stops starting steps after $GPU_CHECK_BUDGET seconds (default 450, < 8 min): each
# step's timeout is cut to what is left, and `timeout -k 10` kills a step that ignores SIGTERM, so
# one stuck step cannot eat the later ones (a GPU machine gives 15 minutes in all, start included).
# Step budgets: env 20 + pytest 115 + bench 110 + attention 70 + decode_step 45 + gemm 60 + compile_time 30
# = 450 s. Each step's timeout is cut to what is left of $GPU_CHECK_BUDGET (kill grace included, since
# `left` is measured), so the whole script ends by BUDGET + 10 s kill grace = 460 s < 8 min.
# The machine has torch 2.11 / triton 3.6 / transformers 5.17 / Python 3.12, no network, and the repo
# is NOT pip-installed: PYTHONPATH=$PWD, and the `torch_dynamo_backends` entry point is missing, so
# code must `import turbofx` before torch.compile(..., backend="turbofx").
# Everything lands in $OUT: env.txt, pytest_gpu.txt, junit.xml, bench.{txt,json}, attention.{txt,json},
# decode_step.{txt,json}, gemm.{txt,json}, compile_time.{txt,json}, summary.txt.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-450}
: > "$OUT/summary.txt"
step() {  # step NAME SECONDS CMD...: run under a timeout, tee into $OUT/NAME.txt, record the exit status
  local name=$1 secs=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name SKIPPED: ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"; return
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name (timeout ${secs}s, kill after 10 s more): $*"
  local t0=$SECONDS
  timeout -k 10 "$secs" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc ($((SECONDS - t0)) s)$( { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && echo ' TIMED OUT')" \
    | tee -a "$OUT/summary.txt"
}
step env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,triton,transformers,sys;print(sys.version.split()[0],torch.__version__,triton.__version__,transformers.__version__)"
  python3 -c "import turbofx; from turbofx.codegen.target import detect; print(\"turbofx from\", turbofx.__file__, \"->\", detect().describe())"'
# 1. GPU tests (budget 115 s); no -x: see every GPU failure in one run; junit + slowest 30 in $OUT
step pytest_gpu 115 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/junit.xml" --durations=30 tests
# 2. Side-by-side benchmark (budget 110 s). Trimmed to fit: a 4-layer Llama-1B-shaped model (per-layer
#    costs as in the 16-layer one, a quarter of the compile time), decode batch 1 and 32 at ctx 512 +
#    prefill 2048; contestants eager, eager+cudagraph, turbofx, inductor. Left out here (run by hand,
#    `python3 -m benchmarks.llm --quick`): the 16 layers, inductor+cudagraph, and the
#    inductor-reduce-overhead child (alone up to 120 s).
echo "bench: TRIMMED to fit 110 s: 4 of 16 layers; contestants eager,eager+cudagraph,turbofx,inductor" \
     "(no inductor+cudagraph, no reduce-overhead child)" | tee -a "$OUT/summary.txt"
step bench 110 python3 -m benchmarks.llm --quick --config 'llama:{"num_hidden_layers": 4}' \
     --contestants eager,eager+cudagraph,turbofx,inductor --json "$OUT/bench.json"
# 2b. Attention kernel: turbofx vs SDPA flash / cuDNN, prefill TFLOP/s and decode TB/s, the kernel timed
#     by itself (budget 70 s; the script skips remaining workloads after --budget seconds and writes
#     JSON after every row)
step attention 70 python3 -m benchmarks.attention --quick --budget 48 --json "$OUT/attention.json"
# 2c. One decode step (rope + cache write + attention): fused vs unfused turbofx vs eager vs Inductor (45 s)
step decode_step 45 python3 -m benchmarks.decode_step --quick --json "$OUT/decode_step.json"
# 2d. GEMM family vs torch.mm (budget 60 s): Llama-1B then 8B projections, decode M 1/16 (GB/s, % HBM)
#     and prefill M 2048 (TFLOP/s); JSON after every workload, later ones "skipped" after --budget 45 s
step gemm 60 python3 -m benchmarks.gemm --quick --budget 45 --json "$OUT/gemm.json"
# 3. Compile-time breakdown (budget 30 s)
step compile_time 30 python3 -m benchmarks.compile_time --json "$OUT/compile_time.json"
echo "=== summary ($SECONDS s of ${BUDGET} s)"; cat "$OUT/summary.txt"
