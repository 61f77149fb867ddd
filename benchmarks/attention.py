"""Attention kernel benchmark: turbofx's streaming Triton kernel vs SDPA (flash, cuDNN), one process.

    python -m benchmarks.attention [--quick] [--json PATH] [--device cuda|cpu] [--workloads prefill,decode]
        [--contestants turbofx,sdpa-flash,sdpa-cudnn] [--iters N] [--warmup N] [--budget SECONDS]

The turbofx contestant is a tiny nn.Module whose forward calls ``torch.ops.turbofx.attention``,
compiled with ``turbofx.compile(..., cudagraphs=False)`` for each shape: the timed call is the compiled
module (CompiledModule -> Program -> ``_attention_runner`` -> Triton), captured inside this script's own
CUDA graph like the SDPA calls. turbofx's own graph replay is off on purpose: it copies q/k/v into
static buffers and clones the output on every call, which at decode (4,096 keys) is about twice the
kernel's own traffic and would cap the measured rate far below the kernel's (benchmarks/decode_step.py
times the same way).

Workloads (bf16, 32 query heads, 8 KV heads: GQA groups of 4, scale 1/sqrt(D))
  prefill  causal, Sq = Sk = S, batch 4, S in 1024/2048/4096, head dim 64 and 128
  decode   one query token (Sq = 1, not causal: it sees the whole cache), head dim 128,
           batch 1/16/64 over 2048/4096/16384 cached tokens
Metrics
  ms       median kernel time. On CUDA: a CUDA graph of several back-to-back calls is replayed
           and timed with CUDA events (host launch overhead excluded); the calls rotate over
           enough copies of q/k/v that the working set exceeds 3x the L2 cache, so decode reads
           come from HBM, not L2. Falls back to eager timing (column `timing`) if capture fails.
  call ms  eager per-call time of back-to-back calls (CUDA events around the loop): includes the
           host overhead of each contestant's Python/launch path (matters for decode)
  TFLOP/s  prefill: 4*B*H*S^2*D / 2 (causal)
  TB/s     decode: bytes of K and V (at the KV heads' count: what an ideal GQA kernel reads) + q + out
  err      max |out - ref| on batch 0 and the query heads of KV head 0, ref = SDPA math in fp32
  vs X     X's ms / this row's ms (> 1: faster than X)
SDPA is called with ``enable_gqa=True``; if a backend refuses that, the error is kept in the row's
`note` and it is retried with K/V expanded to H heads (outside the timed region; `kv` = expanded).
Any failure is a result row (status "error" + reason), never a crash.

On CPU (``--device cpu``) a tiny smoke configuration runs through Triton's interpreter (fp32,
B=1, H=2, Hkv=1, D=16, S=64; decode over 128 keys) so the script itself can be tested anywhere.
Goals (printed, not asserted): prefill >= 550 TFLOP/s at batch 4, 4096 tokens, head dim 128,
causal; decode at batch 1 over 4096 tokens >= 3.4 TB/s.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: on CPU it switches Triton's interpreter on before triton is imported)

import argparse, contextlib, gc, json, math, os, platform, signal, statistics, sys, time  # noqa: E401
import traceback, warnings  # noqa: E401

import torch
import torch.nn.functional as F

import turbofx.runtime.ops  # noqa: F401  (registers torch.ops.turbofx.attention)

CONTESTANTS = ("turbofx", "sdpa-flash", "sdpa-cudnn")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOALS = [  # (description, workload name, contestant, metric, threshold)
    ("prefill >= 550 TFLOP/s (batch 4, 4096 tokens, head dim 128, causal)", "prefill b4 s4096 d128", "turbofx",
     "tflops", 550.0),
    ("decode >= 3.4 TB/s (batch 1 over 4096 tokens)", "decode b1 kv4096 d128", "turbofx", "tbps", 3.4),
]


# ---------------------------------------------------------------- workloads

def workloads(args) -> list[dict]:
    """Each workload: name, kind, B, H, Hkv, Sq, Sk, D, causal."""
    out = []

    def prefill(b, h, hkv, s, d):
        out.append(dict(name=f"prefill b{b} s{s} d{d}", kind="prefill", B=b, H=h, Hkv=hkv, Sq=s, Sk=s, D=d,
                        causal=True))

    def decode(b, h, hkv, sk, d):
        out.append(dict(name=f"decode b{b} kv{sk} d{d}", kind="decode", B=b, H=h, Hkv=hkv, Sq=1, Sk=sk, D=d,
                        causal=False))

    kinds = args.workloads.split(",")
    if args.device.type == "cpu":  # smoke: Triton interpreter
        if "prefill" in kinds:
            prefill(1, 2, 1, 64, 16)
        if "decode" in kinds:
            decode(1, 2, 1, 128, 16)
        return out
    if "prefill" in kinds:
        lengths = (4096, 1024) if args.quick else (4096, 2048, 1024)
        for d in (128, 64):
            for s in lengths:
                prefill(4, 32, 8, s, d)
    if "decode" in kinds:
        pairs = ([(1, 4096), (16, 4096), (64, 16384)] if args.quick else
                 [(b, sk) for b in (1, 16, 64) for sk in (2048, 4096, 16384)])
        for b, sk in pairs:
            decode(b, 32, 8, sk, 128)
    # the goal workloads first, so a timeout still leaves them measured
    first = [w for g in GOALS for w in out if w["name"] == g[1]]
    return first + [w for w in out if w not in first]


def flops(w: dict) -> float:
    f = 4.0 * w["B"] * w["H"] * w["Sq"] * w["Sk"] * w["D"]
    return f / 2 if w["causal"] and w["Sq"] == w["Sk"] else f


def bytes_moved(w: dict, elt: int) -> float:
    kv = 2 * w["B"] * w["Hkv"] * w["Sk"] * w["D"]
    qo = 2 * w["B"] * w["H"] * w["Sq"] * w["D"]
    return float(kv + qo) * elt


# ---------------------------------------------------------------- contestants

class _TurbofxAttention(torch.nn.Module):
    def __init__(self, scale: float, causal: bool):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v):
        return torch.ops.turbofx.attention(q, k, v, None, self.scale, self.causal, 0, 0.0)


def build_turbofx(w: dict, example: tuple, rep: dict):
    # the kernel itself, not turbofx's graph runner (its static-input copies would be timed too)
    cm = turbofx.compile(_TurbofxAttention(w["scale"], w["causal"]), example, cudagraphs=False)
    report = turbofx.explain(cm)
    kinds = [k.kind for k in report.kernels]
    rep["target"], rep["kv"] = report.target, "gqa"  # the kernel reads each shared KV head directly
    if kinds != ["attention"]:  # e.g. an extern fallback: that would time the reference, not the kernel
        raise RuntimeError(f"expected one generated attention kernel, got steps {kinds}")
    try:
        step = next(s for s in cm._program.d["steps"] if s["type"] == "attention")
        rep["blocks"] = dict(step["blocks"])
    except Exception:  # informational only
        pass
    return lambda q, k, v: cm(q, k, v)


def build_sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend
    backend = getattr(SDPBackend, backend_name)

    def build(w: dict, example: tuple, rep: dict):
        q, k, v = example
        causal, scale = w["causal"], w["scale"]
        groups = w["H"] // w["Hkv"]

        def gqa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gqa(q, k, v)
                if q.is_cuda:
                    torch.cuda.synchronize()
            rep["kv"] = "gqa" if groups > 1 else "mha"
            return gqa
        except Exception as e:
            rep["note"] = (f"enable_gqa=True: {type(e).__name__}: {_first_line(e)}"[:200]
                           + _why(caught))[:600]
            if groups == 1:
                raise
        rep["kv"] = "expanded"

        def expanded(q, k, v):  # run_one passes k/v already expanded to H heads (untimed)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        expanded.expand_kv = groups
        return expanded

    build.context = lambda: _sdpa_kernel(backend)
    return build


def _sdpa_kernel(backend):
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(backend)


BUILDERS = {"turbofx": build_turbofx, "sdpa-flash": build_sdpa("FLASH_ATTENTION"),
            "sdpa-cudnn": build_sdpa("CUDNN_ATTENTION")}


def _why(caught) -> str:
    """SDPA explains a refused backend in warnings ("... not used because ..."): keep those."""
    msgs = []
    for w in caught:
        m = " ".join(str(w.message).split())
        if m not in msgs and ("because" in m or "not supported" in m or "Expected" in m or "requires" in m):
            msgs.append(m[:200])
    return (" [" + " / ".join(msgs[:4]) + "]") if msgs else ""


def _first_line(e: BaseException) -> str:
    s = str(e).strip().split(" This is likely due to")[0]
    lines = [l for l in s.splitlines() if l.strip()]
    # torch's "No available kernel" errors put the reasons in warnings; keep the message itself short
    return " / ".join(lines[:3]) if lines else ""


# ---------------------------------------------------------------- timing

def make_inputs(w: dict, dtype, device, copies: int, seed: int = 0) -> list[tuple]:
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(copies):
        q = torch.randn(w["B"], w["H"], w["Sq"], w["D"], generator=g, device=device, dtype=dtype)
        k = torch.randn(w["B"], w["Hkv"], w["Sk"], w["D"], generator=g, device=device, dtype=dtype)
        v = torch.randn(w["B"], w["Hkv"], w["Sk"], w["D"], generator=g, device=device, dtype=dtype)
        out.append((q, k, v))
    return out


def rotation_copies(w: dict, elt: int, device) -> int:
    """Copies of q/k/v so one pass over them exceeds 3x L2 (decode must read HBM, not L2)."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    ws = bytes_moved(w, elt)
    return max(1, min(16, math.ceil(3 * l2 / ws)))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(call, n_inputs: int, device, iters: int, inner: int) -> float:
    """Median ms per call of `inner` back-to-back calls (host overhead included)."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                call(i % n_inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for i in range(inner):
                call(i % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def time_graph(call, n_inputs: int, device, iters: int, inner: int) -> float:
    """Median ms per call from replaying a CUDA graph of `inner` calls (rotating over the inputs)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for i in range(min(n_inputs, 3)):
            call(i)
    torch.cuda.current_stream(device).wait_stream(s)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            call(i % n_inputs)
    graph.replay()
    sync(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def reference(w: dict, q, k, v) -> torch.Tensor:
    """SDPA math in fp32 over batch 0 and the query heads of KV head 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    groups = w["H"] // w["Hkv"]
    qs = q[:1, :groups].float()
    ks = k[:1, :1].float().expand(1, groups, -1, -1)
    vs = v[:1, :1].float().expand(1, groups, -1, -1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=w["causal"], scale=w["scale"])


def run_one(name: str, w: dict, inputs: list[tuple], ref: torch.Tensor, args) -> dict:
    device = args.device
    rep: dict = {"workload": w["name"], "kind": w["kind"], "contestant": name, "status": "error"}
    fn = None
    kvs = None
    build = BUILDERS[name]
    ctx = getattr(build, "context", contextlib.nullcontext)
    caught: list = []
    try:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with ctx(), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            fn = build(w, inputs[0], rep)
            groups = getattr(fn, "expand_kv", 0)
            kvs = [(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) if groups else (q, k, v)
                   for q, k, v in inputs]
            out = fn(*kvs[0])
            sync(device)
            rep["first_call_s"] = time.perf_counter() - t0  # compile / plan included
            groups_q = w["H"] // w["Hkv"]
            rep["max_abs_err"] = (out[:1, :groups_q].float() - ref).abs().max().item()
            del out

            def call(i):
                return fn(*kvs[i])

            for i in range(args.warmup):
                call(i % len(kvs))
            sync(device)
            est = time_eager(call, len(kvs), device, 1, 1)
            # enough calls per timing that a measurement is >= ~1 ms of work (and covers every copy)
            inner = max(len(kvs), min(64, math.ceil(1.0 / max(est, 1e-3))))
            if device.type == "cuda":
                inner = -(-inner // len(kvs)) * len(kvs)
            else:
                inner = 1
            rep["call_ms"] = time_eager(call, len(kvs), device, args.iters, inner)
            rep["ms"], rep["timing"] = rep["call_ms"], "eager"
            if device.type == "cuda":
                try:
                    rep["ms"] = time_graph(call, len(kvs), device, args.iters, inner)
                    rep["timing"] = f"cuda graph x{inner}"
                except Exception as e:
                    rep["graph_error"] = f"{type(e).__name__}: {_first_line(e)}"[:300]
                    sync(device)
                rep["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        elt = inputs[0][0].element_size()
        if w["kind"] == "prefill":
            rep["tflops"] = flops(w) / (rep["ms"] * 1e-3) / 1e12
        else:
            rep["tbps"] = bytes_moved(w, elt) / (rep["ms"] * 1e-3) / 1e12
        tol = 1e-2 if inputs[0][0].dtype == torch.float32 else 5e-2  # fp32 on GPU: tl.dot may use TF32
        rep["status"] = "ok" if rep["max_abs_err"] <= tol else "mismatch"
        if rep["status"] == "mismatch":
            rep["reason"] = f"max abs err {rep['max_abs_err']:.3g} > {tol:g} vs fp32 SDPA math"
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        rep["reason"] = (f"{type(e).__name__}: {_first_line(e)}"[:300] + _why(caught))[:800]
        rep.pop("kv", None)
    finally:
        fn = kvs = None  # release the inputs before the next contestant
        if device.type == "cuda":
            try:
                sync(device)
            except Exception:  # a sticky CUDA error: later rows will record it too
                pass
    print(f"[{w['name']}] {name}: {rep['status']} {rep.get('ms', '')} {rep.get('reason', '')}", file=sys.stderr,
          flush=True)
    return rep


# ---------------------------------------------------------------- report

def add_ratios(results: list[dict]) -> None:
    for r in results:
        if not r.get("ms"):
            continue
        for other in ("sdpa-flash", "sdpa-cudnn"):
            o = next((x for x in results if x["workload"] == r["workload"] and x["contestant"] == other
                      and x.get("ms") and x["status"] == "ok"), None)
            if o is not None and other != r["contestant"]:
                r[f"vs_{other}"] = o["ms"] / r["ms"]


def table(results: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = ["| workload | contestant | ms | TFLOP/s | TB/s | vs flash (x) | vs cudnn (x) | call ms | max abs err "
             "| kv | timing | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:140]}"
        lines.append(f"| {r['workload']} | {r['contestant']} | {f(r.get('ms'), '.4f')} | {f(r.get('tflops'), '.1f')} "
                     f"| {f(r.get('tbps'), '.3f')} | {f(r.get('vs_sdpa-flash'), '.2f')} "
                     f"| {f(r.get('vs_sdpa-cudnn'), '.2f')} | {f(r.get('call_ms'), '.4f')} "
                     f"| {f(r.get('max_abs_err'), '.2e')} | {r.get('kv', '-')} | {r.get('timing', '-')} "
                     f"| {status.replace('|', '/')} |")
    notes = [f"- {r['workload']}/{r['contestant']}: " + "; ".join(
        x for x in (r.get("reason") if r["status"] != "ok" else None, r.get("note"), r.get("graph_error") and
                    f"graph capture failed, eager timing: {r['graph_error']}") if x)
        for r in results if r["status"] != "ok" or r.get("note") or r.get("graph_error")]
    return "\n".join(lines + (["", "notes and failures:"] + notes if notes else []))


def goals(results: list[dict], meta: dict) -> tuple[str, list[dict]]:
    lines, out = ["goals (not asserted):"], []
    for desc, wl, who, metric, thr in GOALS:
        r = next((x for x in results if x["workload"] == wl and x["contestant"] == who), None)
        val = r.get(metric) if r else None
        met = val is not None and r["status"] == "ok" and val >= thr
        unit = "TFLOP/s" if metric == "tflops" else "TB/s"
        got = "not measured" if val is None else (
            f"{val:.3f} {unit}" + ("" if r["status"] == "ok" else f" ({r['status']})"))
        lines.append(f"- {who} {desc}: {got} -> {'MET' if met else 'not met'}")
        out.append({"goal": desc, "workload": wl, "contestant": who, "metric": metric, "threshold": thr,
                    "value": val, "met": met})
    if meta.get("hbm_tbps"):
        lines.append(f"  (this device's theoretical HBM bandwidth: {meta['hbm_tbps']:.2f} TB/s; decode reads rotate "
                     f"over copies larger than L2)")
    return "\n".join(lines), out


def device_meta(device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    meta = {"torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "turbofx": getattr(turbofx, "__version__", None)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=torch.cuda.get_device_name(device), capability=f"sm{props.major}{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=getattr(props, "L2_cache_size", 0) / 2**20, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock and bus:  # kHz, bits; DDR
            meta["hbm_tbps"] = 2 * clock * 1e3 * bus / 8 / 1e12
    else:
        meta["device"] = platform.processor() or "cpu"
        meta["note"] = "CPU smoke run through Triton's interpreter: timings are meaningless"
    return meta


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer lengths and iterations (~60-90 s on one H100)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after every row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--workloads", default="prefill,decode")
    p.add_argument("--contestants", default=",".join(CONTESTANTS))
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--budget", type=float, help="seconds; later workloads are skipped (recorded) once spent "
                                                "(default 85 with --quick on cuda, else none)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    if a.device.type == "cuda" and a.device.index is None:
        a.device = torch.device("cuda", torch.cuda.current_device())
    cuda = a.device.type == "cuda"
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.iters = a.iters or ((10 if a.quick else 30) if cuda else 2)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    if a.budget is None and cuda and a.quick:
        a.budget = 85.0
    unknown = set(a.contestants.split(",")) - set(BUILDERS)
    if unknown:
        p.error(f"unknown contestants {sorted(unknown)}; known: {list(BUILDERS)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    t_start = time.perf_counter()
    meta = device_meta(device)
    meta.update(dtype=args.dtype, quick=args.quick, iters=args.iters, warmup=args.warmup,
                cmd=" ".join(sys.argv),
                env={k: v for k, v in os.environ.items() if k.startswith(("TURBOFX_", "TRITON_"))})
    results: list[dict] = []
    goal_rows: list[dict] = []

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "goals": goal_rows, "results": results}, fh, indent=2, default=str)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still print what we have
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    dump()
    current = None
    try:
        for w in workloads(args):
            w["scale"] = w["D"] ** -0.5
            if args.budget is not None and time.perf_counter() - t_start > args.budget:
                for name in args.contestants.split(","):
                    results.append({"workload": w["name"], "kind": w["kind"], "contestant": name,
                                    "status": "skipped", "reason": f"time budget {args.budget:g} s spent"})
                continue
            inputs = ref = None
            try:
                elt = torch.empty((), dtype=dtype).element_size()
                inputs = make_inputs(w, dtype, device, rotation_copies(w, elt, device))
                ref = reference(w, *inputs[0])
            except Exception as e:
                for name in args.contestants.split(","):
                    results.append({"workload": w["name"], "kind": w["kind"], "contestant": name, "status": "error",
                                    "reason": f"inputs/reference: {type(e).__name__}: {_first_line(e)}"[:400]})
                dump()
                continue
            for name in args.contestants.split(","):
                current = {"workload": w["name"], "kind": w["kind"], "contestant": name, "status": "interrupted",
                           "reason": "SIGTERM/Ctrl-C (timeout) during this row"}
                rep = run_one(name, w, inputs, ref, args)
                rep.update(shape=dict(B=w["B"], H=w["H"], Hkv=w["Hkv"], Sq=w["Sq"], Sk=w["Sk"], D=w["D"],
                                      causal=w["causal"]), copies=len(inputs))
                results.append(rep)
                current = None
                add_ratios(results)
                dump()
            del inputs, ref
    except KeyboardInterrupt:
        meta["interrupted"] = True
        results.extend([current] if current else [])
        print("interrupted: partial results", file=sys.stderr)
    add_ratios(results)
    goal_text, goal_rows[:] = goals(results, meta)
    meta["seconds"] = time.perf_counter() - t_start
    dump()
    extra = f"  cudnn {meta.get('cudnn')}  {meta.get('capability')}" if device.type == "cuda" else ""
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  python {meta['python']}"
          f"{extra}  dtype {args.dtype}  iters {args.iters}  ({meta['seconds']:.1f} s)\n")
    print(table(results))
    print()
    print(goal_text)
    if meta.get("note"):
        print(f"\nnote: {meta['note']}")
    return 1 if meta.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
