"""GEMM family benchmark: turbofx's GEMV / split-K / tiled GEMM kernels vs torch.mm on LLM projection shapes.

    python -m benchmarks.gemm [--quick] [--json PATH] [--device cuda|cpu] [--dtype bf16|fp16|fp32]
        [--models llama-1b,llama-8b] [--phases decode,prefill] [--iters N] [--budget SECONDS]

Workloads: the projections of one decoder layer and the LM head, weights [N, K] as nn.Linear stores them,
  qkv      fused q/k/v projection   N = (heads + 2 kv_heads) x head_dim, K = hidden
  o        attention output          N = hidden, K = heads x head_dim
  gate_up  fused gate/up with the SwiGLU epilogue (silu(gate) * up): N = 2 x intermediate, K = hidden,
           output N / 2 columns
  down     MLP down projection plus the residual add: N = hidden, K = intermediate
  lm_head  N = vocab, K = hidden
for Llama-3.2-1B (hidden 2048, 32/8 heads, head dim 64, intermediate 8192, vocab 128256) and Llama-3-8B
(hidden 4096, 32/8 heads, head dim 128, intermediate 14336, vocab 128256);
  decode   M = 1, 4, 16 rows (tokens): memory bound; GB/s and % of the GPU's HBM bandwidth
  prefill  M = 512, 2048, 4096: compute bound; TFLOP/s and % of the GPU's dense matmul peak
--quick: decode M = 1, 16 and prefill M = 2048.
Contestants
  turbofx  ``turbofx.codegen.gemm.gemm(a, w, GemmSpec(...))``: the epilogue (SwiGLU, residual) inside the kernel
  torch    ``torch.mm(a, w.t())`` plus what torch needs for the same result: SwiGLU as ``silu(h[:, :n]) *
           h[:, n:]`` (two more kernels), the residual through ``torch.addmm(res, a, w.t())`` (cuBLAS adds it
           in its epilogue: torch's best single call), so both sides do the fused work
Metrics
  us       median time per call: a CUDA graph of back-to-back calls is replayed and timed with CUDA events
           after a warm-up (host launch overhead excluded; eager timing if capture fails, column
           `timing`); the calls rotate over enough copies of the operands that one pass over them
           exceeds 3x the L2 cache, so weights come from HBM, not L2
  GB/s     ideal bytes / time: A, W, the residual read once, the output written once (what a perfect
           kernel moves); the same bytes for both contestants
  % HBM    GB/s / the HBM bandwidth of the GPU matched by name in turbofx.compiler.roofline.GPUS
           (unmatched: raw GB/s only)
  TFLOP/s  2 M N K / time; % peak against the matched GPU's dense bf16 peak
  err      max |out - ref| over the rows checked (all of them up to 16 rows, else the first 16), ref the same
           epilogue on an fp32 matmul of the same operands; turbofx is "ok" when its error is at most twice
           torch's (or within 1e-3 of the largest |ref|)
  vs torch torch us / turbofx us (> 1: turbofx faster)
On CPU (no GPU) a tiny configuration (hidden 64) runs through Triton's interpreter: the script and the
kernels' results are checked, nothing is timed ("interpreter: not a speed measurement"). fp32 there by
default: Triton 3.9's interpreter casts fp32 to bf16 by truncation (round toward zero, seen here), so with
--dtype bf16 turbofx is 1 ulp off where torch (round to nearest) is half an ulp: an interpreter artefact.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: on CPU it switches Triton's interpreter on before triton is imported)

import argparse
import json
import math
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from turbofx.codegen.gemm import GemmSpec, gemm
from turbofx.codegen.target import detect
from turbofx.compiler import roofline

from benchmarks.attention import time_graph

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONTESTANTS = ("turbofx", "torch")
REF_ROWS = 16  # rows of each result compared with the fp32 reference


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


MODELS = {m.name: m for m in (
    ModelShape("llama-1b", 2048, 32, 8, 64, 8192, 128256),  # meta-llama/Llama-3.2-1B config.json
    ModelShape("llama-8b", 4096, 32, 8, 128, 14336, 128256),  # meta-llama/Meta-Llama-3-8B config.json
)}
TINY = ModelShape("tiny", 64, 4, 2, 16, 128, 256)  # CPU smoke: Triton's interpreter
DECODE_M, PREFILL_M = (1, 4, 16), (512, 2048, 4096)
QUICK_DECODE_M, QUICK_PREFILL_M = (1, 16), (2048,)
CPU_DECODE_M, CPU_PREFILL_M = (1, 4, 16), (32,)


@dataclass(frozen=True)
class Workload:
    model: str
    op: str  # qkv | o | gate_up | down | lm_head
    phase: str  # decode | prefill
    m: int
    n: int  # weight rows (gate_up: both halves)
    k: int
    epilogue: str  # none | swiglu | residual

    @property
    def name(self) -> str:
        return f"{self.model} {self.op} M{self.m} N{self.n} K{self.k}"

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.epilogue == "swiglu" else self.n

    def ideal_bytes(self, elt: int) -> int:
        reads = self.m * self.k + self.n * self.k + (self.m * self.n_out if self.epilogue == "residual" else 0)
        return (reads + self.m * self.n_out) * elt

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def layer_ops(s: ModelShape) -> list[tuple[str, int, int, str]]:
    """(op, N, K, epilogue) of one decoder layer's projections and the LM head."""
    return [("qkv", (s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden, "none"),
            ("o", s.hidden, s.heads * s.head_dim, "none"),
            ("gate_up", 2 * s.intermediate, s.hidden, "swiglu"),
            ("down", s.hidden, s.intermediate, "residual"),
            ("lm_head", s.vocab, s.hidden, "none")]


def workloads(models: list[ModelShape], phases: list[str], decode_m, prefill_m) -> list[Workload]:
    """Model by model (a --budget that runs out leaves whole models measured), decode before prefill."""
    out = []
    for model in models:
        for phase, ms in (("decode", decode_m), ("prefill", prefill_m)):
            if phase in phases:
                out += [Workload(model.name, op, phase, m, n, k, epi) for m in ms for op, n, k, epi in layer_ops(model)]
    return out


@dataclass
class Row:
    workload: str
    model: str
    op: str
    phase: str
    m: int
    n: int
    k: int
    epilogue: str
    contestant: str
    status: str = "error"  # ok | mismatch | error | skipped
    reason: str = ""
    err: float | None = None
    us: float | None = None
    gbps: float | None = None
    hbm_pct: float | None = None
    tflops: float | None = None
    peak_pct: float | None = None
    vs_torch: float | None = None
    timing: str = ""
    copies: int = 1
    first_call_s: float | None = None


# ------------------------------------------------------------------------------ the contestants


class Operands:
    """One copy of a workload's tensors: A [M, K], W [N, K], the residual [M, N_out] when there is one."""

    def __init__(self, w: Workload, dtype, device, gen: torch.Generator):
        self.a = torch.randn(w.m, w.k, generator=gen, device=device, dtype=torch.float32).to(dtype)
        self.w = (torch.randn(w.n, w.k, generator=gen, device=device, dtype=torch.float32) / math.sqrt(w.k)).to(dtype)
        self.res = (torch.randn(w.m, w.n_out, generator=gen, device=device, dtype=torch.float32).to(dtype)
                    if w.epilogue == "residual" else None)


def spec_of(w: Workload, dtype) -> GemmSpec:
    if w.epilogue == "swiglu":
        return GemmSpec(dtype, swiglu=True, activation="silu")
    return GemmSpec(dtype, residual=w.epilogue == "residual")


def turbofx_call(w: Workload, dtype, device):
    spec, target = spec_of(w, dtype), detect(device)  # the target once: the timed calls launch, nothing else
    return lambda x: gemm(x.a, x.w, spec, residual=x.res, target=target)


def torch_call(w: Workload, dtype, device):
    if w.epilogue == "swiglu":
        def swiglu(x):
            h = torch.mm(x.a, x.w.t())
            return F.silu(h[:, :w.n_out]) * h[:, w.n_out:]
        return swiglu
    if w.epilogue == "residual":
        return lambda x: torch.addmm(x.res, x.a, x.w.t())
    return lambda x: torch.mm(x.a, x.w.t())


CALLS = {"turbofx": turbofx_call, "torch": torch_call}


def reference(w: Workload, x: Operands) -> torch.Tensor:
    """The first REF_ROWS rows of the result, the matmul in fp32 and the epilogue on it."""
    a = x.a[:REF_ROWS].float()
    h = a @ x.w.float().t()
    if w.epilogue == "swiglu":
        return F.silu(h[:, :w.n_out]) * h[:, w.n_out:]
    if w.epilogue == "residual":
        return h + x.res[:REF_ROWS].float()
    return h


# ----------------------------------------------------------------------------------------- timing


def rotation_copies(w: Workload, elt: int, device) -> int:
    """Copies of the operands so one pass over them exceeds 3x L2 (weights then come from HBM)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20
    return max(1, min(32, math.ceil(3 * l2 / w.ideal_bytes(elt))))


def _eager_us(call, copies: list, iters: int) -> float:
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in copies:
            call(x)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(copies))
    return statistics.median(samples)


def time_call(call, copies: list, iters: int) -> tuple[float, str]:
    """Median us per call: a CUDA graph of `inner` calls rotating over the copies, replayed `iters` times
    (each replay one sample between CUDA events). Eager back-to-back calls if capture fails."""
    est = _eager_us(call, copies, 2)  # also the warm-up: JIT, allocator
    inner = len(copies) * max(1, min(64, math.ceil(2000.0 / max(est, 1.0) / len(copies))))  # ~2 ms a replay
    try:
        ms = time_graph(lambda i: call(copies[i % len(copies)]), len(copies), torch.device("cuda"), iters, inner)
        return ms * 1e3, f"cuda graph x{inner}"
    except Exception as e:  # noqa: BLE001  (recorded in the row)
        torch.cuda.synchronize()
        return _eager_us(call, copies, iters), f"eager ({type(e).__name__}: {_first_line(e)[:100]})"


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""


# ------------------------------------------------------------------------------------------ GPU spec


def gpu_spec(device) -> roofline.GpuSpec | None:
    """The roofline table's entry for this GPU, matched by name (a PCIe card has other numbers: none)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "pcie" in name.lower():
        return None
    for key in sorted(roofline.GPUS, key=len, reverse=True):
        if key.lower() in name.lower():
            return roofline.GPUS[key]
    return None


def device_meta(device, spec: roofline.GpuSpec | None) -> dict:
    import triton

    meta = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=torch.cuda.get_device_name(device), capability=f"sm{props.major}{props.minor}",
                    sms=props.multi_processor_count, l2_mib=getattr(props, "L2_cache_size", 0) / 2**20)
        clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock and bus:  # kHz, bits, double data rate: the theoretical peak, for reference
            meta["hbm_gbps_from_clocks"] = 2 * clock * 1e3 * bus / 8 / 1e9
        meta["roofline_gpu"] = asdict(spec) if spec else None
    else:
        meta.update(device=platform.processor() or "cpu", note="interpreter: not a speed measurement")
    return meta


# -------------------------------------------------------------------------------------------- rows


def run_workload(w: Workload, names: list[str], dtype, device, iters: int, spec) -> list[Row]:
    base = dict(workload=w.name, model=w.model, op=w.op, phase=w.phase, m=w.m, n=w.n, k=w.k, epilogue=w.epilogue)
    rows = [Row(**base, contestant=c) for c in names]
    elt = torch.empty((), dtype=dtype).element_size()
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        copies = [Operands(w, dtype, device, gen) for _ in range(rotation_copies(w, elt, device))]
        ref = reference(w, copies[0])
    except Exception as e:  # noqa: BLE001  (e.g. out of memory: a row, not a crash)
        for r in rows:
            r.reason = f"inputs/reference: {type(e).__name__}: {_first_line(e)[:300]}"
        return rows
    scale = ref.abs().max().item()
    for r in rows:
        r.copies = len(copies)
        try:
            call = CALLS[r.contestant](w, dtype, device)
            t0 = time.perf_counter()
            out = call(copies[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            r.first_call_s = time.perf_counter() - t0  # turbofx: Triton's JIT compile included
            r.err = (out[:REF_ROWS].float() - ref).abs().max().item()
            del out
            r.status = "ok"
            if device.type == "cuda":
                r.us, r.timing = time_call(call, copies, iters)
                r.gbps = w.ideal_bytes(elt) / r.us / 1e3
                r.tflops = w.flops / r.us / 1e6
                if spec is not None:
                    r.hbm_pct = 100 * r.gbps * 1e9 / spec.hbm_bytes_per_s
                    r.peak_pct = 100 * r.tflops * 1e12 / spec.matmul_flops_per_s
            else:
                r.timing = "interpreter: not a speed measurement"
        except Exception as e:  # noqa: BLE001  (a failure is a result row)
            r.status, r.reason = "error", f"{type(e).__name__}: {_first_line(e)[:300]}"
    by = {r.contestant: r for r in rows}
    t, base_row = by.get("turbofx"), by.get("torch")
    if t and base_row and t.status == "ok" and base_row.status == "ok":
        bound = max(2 * base_row.err, 1e-3 * scale)
        if t.err > bound:
            t.status, t.reason = "mismatch", f"err {t.err:.3g} > max(2 x torch's {base_row.err:.3g}, 1e-3 x |ref|)"
        if t.us and base_row.us:
            t.vs_torch = base_row.us / t.us
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[Row]) -> str:
    lines = ["| workload | epilogue | contestant | us | GB/s | % HBM | TFLOP/s | % peak | vs torch | max err | timing "
             "| status |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason[:140]}"
        decode = r.phase == "decode"
        lines.append(f"| {r.workload} | {r.epilogue} | {r.contestant} | {_f(r.us, '.2f')} "
                     f"| {_f(r.gbps if decode else None, '.0f')} | {_f(r.hbm_pct if decode else None, '.1f')} "
                     f"| {_f(None if decode else r.tflops, '.1f')} | {_f(None if decode else r.peak_pct, '.1f')} "
                     f"| {_f(r.vs_torch, '.2f')} | {_f(r.err, '.2e')} | {r.timing} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"decode M {QUICK_DECODE_M}, prefill M {QUICK_PREFILL_M}")
    ap.add_argument("--json", help="write the results as JSON (rewritten after every workload)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 in the CPU interpreter")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--contestants", default=",".join(CONTESTANTS))
    ap.add_argument("--iters", type=int, default=10, help="timed graph replays per row (median)")
    ap.add_argument("--budget", type=float, help="seconds; later workloads are recorded as skipped once spent")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[a.dtype or ("bf16" if cuda else "fp32")]
    names = a.contestants.split(",")
    if set(names) - set(CONTESTANTS):
        ap.error(f"--contestants: expected some of {CONTESTANTS}")
    phases = a.phases.split(",")
    if cuda:
        unknown = [m for m in a.models.split(",") if m not in MODELS]
        if unknown:
            ap.error(f"unknown models {unknown}; known: {list(MODELS)}")
        models = [MODELS[m] for m in a.models.split(",")]
        decode_m, prefill_m = (QUICK_DECODE_M, QUICK_PREFILL_M) if a.quick else (DECODE_M, PREFILL_M)
    else:  # the interpreter runs programs one by one: tiny shapes, results checked, nothing timed
        models, decode_m, prefill_m = [TINY], CPU_DECODE_M, CPU_PREFILL_M
    spec = gpu_spec(device)
    meta = device_meta(device, spec)
    meta.update(dtype=str(dtype).removeprefix("torch."), quick=a.quick, iters=a.iters, cmd=" ".join(sys.argv))
    rows: list[Row] = []

    def dump() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep and print what was measured
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term) if cuda else None
    t_start = time.perf_counter()
    try:
        for w in workloads(models, phases, decode_m, prefill_m):
            if a.budget is not None and time.perf_counter() - t_start > a.budget:
                rows += [Row(w.name, w.model, w.op, w.phase, w.m, w.n, w.k, w.epilogue, c, status="skipped",
                             reason=f"time budget {a.budget:g} s spent") for c in names]
                continue
            new = run_workload(w, names, dtype, device, a.iters, spec)
            rows += new
            for r in new:
                print(f"[{r.workload}] {r.contestant}: {r.status} {_f(r.us, '.2f')} us {r.reason}", file=sys.stderr,
                      flush=True)
            dump()
            if cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print("interrupted: partial results", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    meta["seconds"] = time.perf_counter() - t_start
    dump()
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  dtype {meta['dtype']}  "
          f"({meta['seconds']:.1f} s)")
    if cuda:
        print(f"roofline GPU: {spec.name} ({spec.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
              f"{spec.matmul_flops_per_s / 1e12:.0f} TFLOP/s dense)" if spec else
              "roofline GPU: this GPU is not in turbofx.compiler.roofline.GPUS: raw GB/s and TFLOP/s only")
    else:
        print("interpreter: not a speed measurement (tiny shapes; results checked against torch)")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
