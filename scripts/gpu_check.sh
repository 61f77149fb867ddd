#!/usr/bin/env bash
# One call on the lent GPU machine does it all. Call it through the device tool from the repo root:
#   command "bash scripts/gpu_check.sh", timeout_s 540
# The whole script stops starting steps after $GPU_CHECK_BUDGET seconds (default 465, < 8 min): each
# step's timeout is cut to what is left, and `timeout -k 10` kills a step that ignores SIGTERM, so
# one stuck step cannot eat the later ones (a GPU machine gives 15 minutes in all, start included).
# Step budgets: env 15 + pytest 90 + pytest_quant 55 + bench 75 + bench_quant 105 + serve 45 + attention 30
# + decode_step 20 + gemm 20 + compile_time 10 = 465 s. Each step's timeout is cut to what is left of
# $GPU_CHECK_BUDGET (kill grace included, since `left` is measured), so the whole script ends by
# BUDGET + 10 s kill grace = 475 s < 8 min. (Budgets are estimates: no GPU has run this script yet.)
# The machine has torch 2.11 / triton 3.6 / transformers 5.17 / Python 3.12, no network, and the repo
# is NOT pip-installed: PYTHONPATH=$PWD, and the `torch_dynamo_backends` entry point is missing, so
# code must `import turbofx` before torch.compile(..., backend="turbofx").
# Everything lands in $OUT: env.txt, pytest_gpu.txt, junit.xml, pytest_quant.txt, junit_quant.xml,
# bench.{txt,json,md}, bench_quant.{txt,json,md}, attention.{txt,json}, decode_step.{txt,json},
# serve.{txt,json}, gemm.{txt,json}, compile_time.{txt,json}, summary.txt.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-465}
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
step env 15 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,triton,transformers,sys;print(sys.version.split()[0],torch.__version__,triton.__version__,transformers.__version__)"
  python3 -c "import turbofx; from turbofx.codegen.target import detect; print(\"turbofx from\", turbofx.__file__, \"->\", detect().describe())"'
# 1. GPU tests (budget 90 s); no -x: see every GPU failure in one run; junit + slowest 30 in $OUT
step pytest_gpu 90 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/junit.xml" --durations=30 tests
# 1b. Quantization tests with CUDA tensors (budget 55 s): these files run on the CPU interpreter in CI and
#     put their tensors on the GPU when there is one (tests/helpers.kernel_device): every quantized storage's
#     GEMM against the fp64 dequantizing reference (FP8 too: sm90), compiled quantized models against the
#     eager model with the same weights dequantized, through every door
step pytest_quant 55 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit_quant.xml" --durations=15 \
     tests/test_gemm_quant.py tests/test_quantize.py
# 2. Side-by-side benchmark (budget 75 s). Trimmed to fit: a 4-layer Llama-1B-shaped model (per-layer
#    costs as in the 16-layer one, a quarter of the compile time), decode batch 1 and 32 at ctx 512 +
#    prefill 2048; contestants eager, eager+cudagraph, turbofx, inductor. Left out here (run by hand,
#    `python3 -m benchmarks.llm --quick`): the 16 layers, inductor+cudagraph, and the
#    inductor-reduce-overhead child (alone up to 120 s).
echo "bench: TRIMMED to fit 75 s: 4 of 16 layers; contestants eager,eager+cudagraph,turbofx,inductor" \
     "(no inductor+cudagraph, no reduce-overhead child)" | tee -a "$OUT/summary.txt"
step bench 75 python3 -m benchmarks.llm --quick --config 'llama:{"num_hidden_layers": 4}' \
     --contestants eager,eager+cudagraph,turbofx,inductor --json "$OUT/bench.json"
# 2a. Quantized decode (budget 105 s): the full 16-layer Llama-3.2-1B shape (with fewer layers the bf16 LM
#     head's share of the bytes would hide what quantization saves), decode batch 1 at 512 cached tokens and
#     prefill 2048: turbofx bf16, then one row per scheme (time ratio vs turbofx bf16 against the goals
#     int8 <= 0.55x, int4 <= 0.35x, prefill <= 1.1x; resident state bytes; checked against the eager model
#     with the same weights dequantized), then Inductor; eager is the reference. int4+emb (LM head too) last:
#     the modelled 1B decode (benchmarks/decode_structure.py --quantize) needs it for the int4 goal.
#     JSON after every row: a timeout leaves the rows done.
step bench_quant 105 python3 -m benchmarks.llm --quick --batches 1 --ctx 512 --iters 5 --warmup 2 \
     --contestants eager,turbofx,inductor --quantize int8,int4,w8a8,fp8,int4+emb --json "$OUT/bench_quant.json"
# 2a'. Serving (budget 45 s): a Poisson trace of 24 requests (prompts 16-256, outputs 8-48 tokens) on a
#     4-layer Llama-1B-shaped bf16 model: HF one at a time, turbofx.Engine (continuous batching, paged KV,
#     decode graphs per bucket), static turbofx.generate batches, then HF static batches with an
#     Inductor-compiled forward; tokens/s, TTFT/ITL p50/p99, padding waste; JSON after every contestant
step serve 45 python3 -m benchmarks.serve --config 'llama:{"num_hidden_layers": 4}' --requests 24 --rate 8 \
     --prompt-len 16,256 --output-len 8,48 --max-batch 8 --json "$OUT/serve.json"
# 2b. Attention kernel: turbofx vs SDPA flash / cuDNN, prefill TFLOP/s and decode TB/s, the kernel timed
#     by itself (budget 30 s; the script skips remaining workloads after --budget seconds and writes
#     JSON after every row)
step attention 30 python3 -m benchmarks.attention --quick --budget 20 --json "$OUT/attention.json"
# 2c. One decode step (rope + cache write + attention): fused vs unfused turbofx vs eager vs Inductor (20 s)
step decode_step 20 python3 -m benchmarks.decode_step --quick --json "$OUT/decode_step.json"
# 2d. GEMM family vs torch.mm (budget 20 s): Llama-1B then 8B projections, decode M 1/16 (GB/s, % HBM)
#     and prefill M 2048 (TFLOP/s); JSON after every workload, later ones "skipped" after --budget 12 s
step gemm 20 python3 -m benchmarks.gemm --quick --budget 12 --json "$OUT/gemm.json"
# 3. Compile-time breakdown (budget 10 s): 4 of the 8B shape's 32 layers to fit (per-layer costs as in 32)
step compile_time 10 python3 -m benchmarks.compile_time --layers 4 --json "$OUT/compile_time.json"
echo "=== summary ($SECONDS s of ${BUDGET} s)"; cat "$OUT/summary.txt"
