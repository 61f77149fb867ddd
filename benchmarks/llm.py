"""Side-by-side LLM benchmark: eager, CUDA graphs, Inductor and turbofx on the same weights and inputs.

    python -m benchmarks.llm [--quick] [--json PATH] [--plot PATH] [--device cuda|cpu] [--dtype bf16|fp16|fp32]
        [--config MODEL_TYPE[:JSON]] [--batches 1,8,32] [--ctx 512,1024] [--prefill-len 2048] [--fresh-caches]
        [--quantize [SCHEMES]] [--quant-batches 1]

Contestants: eager; eager+cudagraph (a decode step captured with torch.cuda.graph over static inputs);
turbofx (decode: turbofx.compile(StaticDecoder(...)), the program owns the KV cache; prefill: turbofx.compile(
model, (ids,), {"use_cache": False}); on GPUs it replays its own CUDA graphs by default, see each row's
"turbofx" record); inductor (torch.compile); inductor+cudagraph (the inductor step, warmed up, captured
in a manual CUDA graph); inductor-reduce-overhead, last, in a child process with a timeout (it
segfaulted on an H200 before): a crash, timeout or "skipped cudagraphs" is its result (same seed, weights
checksum compared; --quick: first decode workload only). Manual CUDA graphs time decode only.
Decode: one step (one new token per sequence, batch B) onto a StaticCache holding ctx real tokens (max ctx+64);
all contestants run the same StaticDecoder and a step rewrites slot ctx, so calls repeat exactly. Prefill: one
forward of 1 x prefill_len, use_cache=False. Metrics: ms/step (= ms/token), tokens/s, % of the memory roofline
((weights + KV read) bytes at the copy bandwidth measured in this run), prefill TFLOP/s (2 x matmul params x
tokens + causal attention) vs a torch.mm peak measured in this run, compile s (first call), cold (first in the
process) and warm compile (again: after torch._dynamo.reset() for Inductor; a second turbofx.compile, kernel
cache on disk), peak memory. A failure is recorded in its row and never stops the others; the JSON is rewritten
after every row. On CPU the CUDA graph contestants are "skipped: no CUDA".
Quantized decode (--quantize, no value: int8,int4,w8a8,fp8; or a comma list of turbofx.quant names such as
int4-g64, int4+emb, fp8-dynamic): one more contestant per scheme, "turbofx[SCHEME]" (turbofx.compile(...,
quantize=SCHEME) on the same weights), run right after turbofx on the decode workloads of --quant-batches
(default 1) and on prefill. Each is checked against the eager model with the same quantized weights
dequantized (turbofx.quant.reference), not against the unquantized eager one; its decode bytes per step
count the quantized weights; its row records the program's resident state bytes (compiled.state_bytes(),
also for the turbofx row) and its time as a ratio of turbofx's unquantized time on the same workload
(project goals: int8 <= 0.55x, int4 <= 0.35x decode; prefill <= 1.1x). A scheme the target cannot run
(FP8 below sm89) is a "refused" row with the reason, not a failure.
"""
from __future__ import annotations

import argparse, gc, json, logging, logging.handlers, os, platform, signal, statistics, subprocess, sys, tempfile, time, traceback  # noqa: E401
from collections import Counter
from dataclasses import dataclass, field

import torch

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256)
PRESETS = {"llama-1b": LLAMA_1B, "llama-tiny": LLAMA_TINY}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RO = "inductor-reduce-overhead"
CONTESTANTS = ("eager", "eager+cudagraph", "turbofx", "inductor", "inductor+cudagraph", RO)
NEEDS_CUDA = ("eager+cudagraph", "inductor+cudagraph", RO)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT_DEFAULT = "int8,int4,w8a8,fp8"
# project goals, as ratios of turbofx's unquantized time on the same workload (lower is better)
DECODE_GOALS = {"int8": 0.55, "int4": 0.35}  # by the scheme's family: int4-g64, int4+emb, ... count as int4
PREFILL_GOAL = 1.1
CG_LOGS = [f"torch._inductor.cudagraph_utils.__{n}" for n in ("cudagraphs", "perf_hints")]  # "skipping cudagraphs"


def quant_contestant(scheme: str) -> str:
    return f"turbofx[{scheme}]"


def scheme_of(name: str) -> str | None:
    """The quantization scheme of a "turbofx[SCHEME]" contestant, else None."""
    return name[len("turbofx["):-1] if name.startswith("turbofx[") and name.endswith("]") else None


def decode_goal(scheme: str) -> float | None:
    family = scheme.split("+")[0].split("-")[0]  # int4-g64+emb -> int4
    return DECODE_GOALS.get(family)


def scheme_refusal(scheme: str, target) -> str | None:
    """Why ``target`` cannot run ``scheme`` (turbofx's own refusal text), or None: the check
    turbofx.compile makes before any work, so a refused scheme costs nothing."""
    from turbofx.compiler.driver import check_quantization
    from turbofx.errors import QuantizationError
    from turbofx.quant import parse

    try:
        check_quantization(parse(scheme), target)
    except QuantizationError as e:
        return str(e)
    return None


def make_config(spec: str | None, device: torch.device):
    from transformers import AutoConfig
    model_type, _, overrides = (spec or "llama").partition(":")
    kw = json.loads(overrides) if overrides else {}
    if model_type in PRESETS:
        kw, model_type = {**PRESETS[model_type], **kw}, "llama"
    elif model_type == "llama":
        kw = {**(LLAMA_1B if device.type == "cuda" else LLAMA_TINY), **kw}
    return AutoConfig.for_model(model_type, **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: torch.device, warmup: int, iters: int, inner: int = 1) -> float:
    """Median ms per call over `iters` samples of `inner` back-to-back calls (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda, times = device.type == "cuda", []
    for _ in range(iters):
        start, end = [torch.cuda.Event(enable_timing=True) if cuda else None for _ in range(2)]
        t0 = start.record() if cuda else time.perf_counter()
        for _ in range(inner):
            step()
        if cuda:
            end.record()
            end.synchronize()
        times.append((start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3) / inner)
    return statistics.median(times)


def probe(device: torch.device, dtype: torch.dtype) -> dict:
    """Copy bandwidth (a large device-to-device copy_, 2 x size bytes) and torch.mm peak, this run."""
    cuda = device.type == "cuda"
    n, m = (1 << 30, 8192) if cuda else (1 << 26, 512)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, 2, 10 if cuda else 3)
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: torch.mm(a, b), device, 3, 10 if cuda else 3, inner=5 if cuda else 1)
    return {"copy_gbps": 2 * n / copy_ms / 1e6, "copy_bytes": n, "mm_tflops": 2 * m**3 / mm_ms / 1e9,
            "mm_n": m, "mm_dtype": str(dtype).replace("torch.", "")}


def model_facts(model) -> dict:
    cfg = model.config.get_text_config(decoder=True)
    params = list({p.data_ptr(): p for p in model.parameters()}.values())  # tied weights once
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    heads = cfg.num_attention_heads
    return {"params": sum(p.numel() for p in params),  # an untied input embedding is only gathered:
            "matmul_params": sum(p.numel() for p in params) - (0 if tied else emb.numel()),
            "elt": emb.element_size(), "layers": cfg.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "weights_checksum": float(sum(p.float().sum().item() for p in params))}


def spec(kind: str, batch: int, tokens: int) -> dict:
    """A workload as recorded in every row; tokens: cached tokens (decode) or sequence length (prefill)."""
    name = f"decode b{batch} ctx{tokens}" if kind == "decode" else f"prefill {batch}x{tokens}"
    return {"workload": name, "kind": kind, "batch": batch, "tokens": tokens}


@dataclass
class Workload:
    spec: dict
    module: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name = property(lambda self: self.spec["workload"])
    kind = property(lambda self: self.spec["kind"])


def decode_workload(model, batch: int, ctx: int, filled: dict, gen, vocab: int) -> Workload:
    """A StaticDecoder of `batch` rows whose cache every row copies from one eager prefill of ctx tokens."""
    from turbofx.compiler.generation import StaticDecoder
    device, max_len = model.device, ctx + 64
    if ctx not in filled:
        src = filled[ctx] = StaticDecoder(model, 1, max_len).eval()
        ids, pos = torch.randint(vocab, (1, ctx), generator=gen).to(device), torch.arange(ctx, device=device)
        src(ids, pos, torch.ones(1, max_len, dtype=torch.long, device=device), pos[None])
    dec = StaticDecoder(model, batch, max_len).eval()
    for name, buf in dec.named_buffers():
        if name.startswith(("key_cache_", "value_cache_")):
            buf.copy_(filled[ctx].get_buffer(name).expand_as(buf))
    args = (torch.randint(vocab, (batch, 1), generator=gen).to(device), torch.tensor([ctx], device=device),
            torch.ones(batch, max_len, dtype=torch.long, device=device), torch.full((batch, 1), ctx, device=device))
    return Workload(spec("decode", batch, ctx), dec, args)


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


def cuda_graph(step):
    """Warm up on a side stream, capture one call; the replay returns the captured output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


def build(name: str, wl: Workload, built: dict):
    """The contestant's step for this workload, called once (so compiled); `built` keeps compiled fns."""
    if name.startswith("eager"):
        fn = wl.module
    elif name == "turbofx" or scheme_of(name):
        import turbofx
        fn = turbofx.compile(wl.module, wl.args, wl.kwargs, quantize=scheme_of(name))
    elif name == "inductor+cudagraph" and "inductor" in built:
        fn = built["inductor"]  # capture the inductor row's compiled step, no second compile
    else:
        torch._dynamo.reset()
        fn = torch.compile(wl.module, dynamic=False, mode="reduce-overhead" if name == RO else None)
    built[name] = fn

    def step():
        if name == RO:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*wl.args, **wl.kwargs)
    step()
    return cuda_graph(step) if name.endswith("+cudagraph") else step


def compile_twice(name: str, wl: Workload, rep: dict, state: dict, args) -> None:
    """Cold: this row's compile (the contestant's first in the process); warm: the same compile again."""
    entry = state["compile"][name] = {"workload": wl.name, "cold_s": rep["compile_s"]}
    if name == "inductor" and args.quick:
        entry["note"] = "warm compile skipped in --quick"
        return
    try:
        sync(args.dev)
        t0 = time.perf_counter()
        build(name, wl, state["built"])  # Inductor: after torch._dynamo.reset(), inside build
        sync(args.dev)
        entry["warm_s"] = time.perf_counter() - t0
    except Exception as e:
        traceback.print_exc()
        entry["note"] = f"warm compile failed: {type(e).__name__}: {e}"[:300]


def run_one(name: str, wl: Workload, ref, args, state: dict) -> tuple[dict, torch.Tensor | None]:
    dev, cuda = args.dev, args.dev.type == "cuda"
    rep: dict = {**wl.spec, "contestant": name, "status": "error"}
    if name in NEEDS_CUDA and not cuda or name.endswith("+cudagraph") and wl.kind != "decode":
        rep.update(status="skipped", reason="no CUDA" if not cuda else "decode only")
        return rep, None
    scheme = scheme_of(name)
    if scheme and wl.kind == "decode" and wl.spec["batch"] not in args.quant_batches:
        rep.update(status="skipped", reason=f"quantized rows run at decode batch {args.quant_batches} (--quant-batches)")
        return rep, None
    if scheme:
        from turbofx.codegen.target import detect
        why = scheme_refusal(scheme, detect(dev))
        if why is not None:
            rep.update(status="refused", reason=why)
            print(f"[{wl.name}] {name}: refused: {why}", file=sys.stderr, flush=True)
            return rep, None
    out = step = None
    grab, skips = logging.handlers.BufferingHandler(10_000), 0
    try:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if name == RO:
            from torch._dynamo.utils import counters
            for n in CG_LOGS:
                logging.getLogger(n).addHandler(grab)
            skips = counters["inductor"]["cudagraph_skips"]
        sync(dev)
        t0 = time.perf_counter()
        step = build(name, wl, state["built"])
        out = logits_of(step()).clone()
        sync(dev)
        rep["compile_s"] = time.perf_counter() - t0  # first call, compile (and capture) included
        rep["ms"] = time_ms(step, dev, args.warmup, args.iters, args.inner if wl.kind == "decode" else 1)
        if name == "turbofx" or scheme:
            explain(state["built"][name], rep)
            rep["state_bytes"] = state["built"][name].state_bytes()
        if cuda:
            rep["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            rep["extra_mib"] = rep["peak_mib"] - base / 2**20
        if scheme:  # checked against eager with the same quantized weights (dequantized), after the peak
            if ref is not None:  # how far quantization itself moved the logits: information, not a check
                rep["max_abs_err_vs_unquantized"] = (out.float() - ref.float()).abs().max().item()
            ref = quantized_reference(wl, scheme, state["built"][name])
        rep["status"] = "ok"
        if ref is not None:  # loose sanity check against eager: catches garbage, not rounding
            err = (out.float() - ref.float()).abs().max().item()
            rep["max_abs_err"], rep["rel_err"] = err, err / max(ref.float().abs().max().item(), 1e-6)
            if not rep["rel_err"] < 0.1:
                what = "eager with the same quantized weights" if scheme else "eager"
                rep["status"], rep["reason"] = "mismatch", f"max abs err {err:.3g} vs {what} (rel {rep['rel_err']:.3g})"
        if name == RO and counters["inductor"]["cudagraph_skips"] > skips:
            rep["status"] = "cudagraphs-skipped"
            rep["reason"] = "; ".join(r.getMessage() for r in grab.buffer)[:300] or "inductor counted a cudagraph skip"
        if name in ("inductor", "turbofx") and name not in state["compile"]:
            compile_twice(name, wl, rep, state, args)
    except Exception as e:
        traceback.print_exc()
        rep["reason"] = f"{type(e).__name__}: {e}"[:300]
        out = None
    finally:
        del step
        for n in CG_LOGS:
            logging.getLogger(n).removeHandler(grab)
    print(f"[{wl.name}] {name}: {rep['status']} {rep.get('ms', '')}", file=sys.stderr, flush=True)
    return rep, out


def explain(cm, rep: dict) -> None:
    import turbofx
    try:
        report = turbofx.explain(cm)
        rep["turbofx"] = {"kernels": len(report.kernels), "kinds": dict(Counter(k.kind for k in report.kernels)),
                          "stage_seconds": dict(report.stage_seconds),  # graph replay is on by default on GPUs:
                          "graph_replays": getattr(getattr(cm, "_runner", None), "replays", None),
                          "runtime_notes": list(getattr(report, "runtime_notes", []))[-5:]}
        if report.quantized:  # the weights the quantize pass took, bytes before and after
            rep["quantized"] = {"scheme": report.quantization.name, "weights": len(report.quantized),
                                "full_bytes": sum(q.full_bytes for q in report.quantized),
                                "quantized_bytes": sum(q.quantized_bytes for q in report.quantized)}
    except Exception as e:  # the benchmark still runs; the failure is recorded
        rep["explain_error"] = f"{type(e).__name__}: {e}"[:300]


def quantized_reference(wl: Workload, scheme: str, cm) -> torch.Tensor:
    """Logits of the eager workload module whose quantized layers (those the compiled program
    quantized) hold the same quantized weights, dequantized: what the quantized program must equal."""
    import turbofx
    from turbofx.quant import parse
    from turbofx.quant.reference import dequantized_model

    layers = [n for q in turbofx.explain(cm).quantized for n in q.layers]
    if wl.kind == "decode":  # a fresh StaticDecoder: after a capture the workload's cache layers hold traced
        from turbofx.compiler.generation import StaticDecoder  # tensors, which cannot be deep-copied

        src = wl.module
        ref_module = StaticDecoder(dequantized_model(src.model, parse(scheme), layers), wl.spec["batch"],
                                   src.get_buffer("key_cache_0").shape[2]).eval()
        mine = dict(src.named_buffers(recurse=False))
        for name, buf in ref_module.named_buffers(recurse=False):  # the same cache contents (and lengths)
            buf.copy_(mine[name])
    else:
        ref_module = dequantized_model(wl.module, parse(scheme), layers)
    try:
        return logits_of(ref_module(*wl.args, **wl.kwargs)).clone()
    finally:
        del ref_module


def run_child(args, meta: dict, specs: list[dict]) -> list[dict]:
    """The reduce-overhead rows, from a child process: a segfault there cannot take these results."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="llm-ro-")
    os.close(fd)
    quick = args.quick and any(sp["kind"] == "decode" for sp in specs)  # --quick: the first decode workload only
    batches, ctx = ([args.batches[0]], [args.ctx[0]]) if quick else (args.batches, args.ctx)
    argv = ["--child", "--json", path, "--contestants", f"eager,{RO}", "--device", args.device, "--dtype", args.dtype,
            "--batches", ",".join(map(str, batches)), "--ctx", ",".join(map(str, ctx)),
            "--prefill-len", str(args.prefill_len), "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--inner", str(args.inner), "--workloads", "decode" if quick else args.workloads]
    argv += (["--config", args.config] if args.config else []) + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    print(f"{RO}: child process, timeout {args.child_timeout}s", file=sys.stderr, flush=True)
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.llm", *argv], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=args.child_timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    os.unlink(path)
    rows = {r["workload"]: r for r in data.get("results", []) if r["contestant"] == RO}
    same = data.get("meta", {}).get("weights_checksum") in (None, meta["weights_checksum"])
    why = (f"timeout after {args.child_timeout}s" if rc is None else
           f"child killed by {signal.Signals(-rc).name}" if rc < 0 else f"child exited {rc}" if rc else "no row")
    tail = " / ".join(line.strip() for line in err.strip().splitlines()[-3:])
    out, first = [], None
    for sp in specs:
        wl, row = sp["workload"], {**sp, "contestant": RO}
        if wl in rows:
            out.append({**rows[wl], **({} if same else {"note": "child weights checksum differs"})})
        elif quick and wl != spec("decode", batches[0], ctx[0])["workload"]:
            out.append({**row, "status": "skipped", "reason": f"--quick: {RO} on the first decode workload only"})
        elif first is None:
            first = wl
            status = "timeout" if rc is None else "crash" if rc < 0 else "error"
            out.append({**row, "status": status, "reason": f"{why}: {tail}"[:300]})
        else:
            out.append({**row, "status": "not run", "reason": f"child stopped at {first} ({why})"})
    return out


def add_metrics(results: list[dict], facts: dict, probes: dict | None) -> None:
    f = facts
    for r in results:
        ms, b, n = r.get("ms"), r.get("batch", 1), r.get("tokens", 0)
        if not ms:
            continue
        if r["kind"] == "decode":
            r["ms_per_token"], r["tokens_per_s"] = ms, b * 1e3 / ms
            kv_read = 2 * f["layers"] * b * f["kv_heads"] * f["head_dim"] * (n + 1)  # keys and values, ctx + new token
            r["bytes_per_step"] = weight_bytes(r, f) + kv_read * f["elt"]
            if probes:
                r["roofline_pct"] = 100 * r["bytes_per_step"] / probes["copy_gbps"] / 1e6 / ms
        else:
            r["tokens_per_s"] = b * n * 1e3 / ms
            r["flops"] = 2 * f["matmul_params"] * b * n + 2 * f["layers"] * b * f["heads"] * f["head_dim"] * n * n
            r["tflops"] = r["flops"] / ms / 1e9
            if probes:
                r["mm_peak_pct"] = 100 * r["tflops"] / probes["mm_tflops"]
    for r in results:
        base = {x["contestant"]: x.get("ms") for x in results if x["workload"] == r["workload"] and x.get("ms")}
        for other in ("eager", "inductor"):
            if r.get("ms") and base.get(other):
                r[f"vs_{other}"] = base[other] / r["ms"]
        if scheme_of(r["contestant"]) and r.get("ms") and base.get("turbofx"):  # a time ratio: lower is better
            r["time_vs_turbofx"] = r["ms"] / base["turbofx"]


def weight_bytes(r: dict, facts: dict) -> int:
    """Weight bytes one decode step reads: every matmul weight once, the quantized ones (a quantized
    row's explain record) at their stored size."""
    full = facts["matmul_params"] * facts["elt"]
    q = r.get("quantized")  # (with +emb and an untied table, the table counts here though only rows are read)
    return full - q["full_bytes"] + q["quantized_bytes"] if q else full


def table(results: list[dict], compiles: dict, interpreter: bool = False) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = ["| workload | contestant | ms/step | tokens/s | roofline | vs eager | vs inductor | compile s "
             "| peak MiB | max abs err | status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        eff = (f"{r['roofline_pct']:.1f}% of copy BW" if "roofline_pct" in r else
               f"{r['tflops']:.3g} TF/s ({r['mm_peak_pct']:.1f}% mm)" if "mm_peak_pct" in r else "-")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:100]}"
        cells = [r["workload"], r["contestant"], f(r.get("ms"), ".3f"), f(r.get("tokens_per_s"), ".1f"), eff,
                 f(r.get("vs_eager"), ".2f"), f(r.get("vs_inductor"), ".2f"), f(r.get("compile_s"), ".1f"),
                 f(r.get("peak_mib"), ".0f"), f(r.get("max_abs_err"), ".2e"), status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| compile | workload | cold s | warm s | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {k} | {v['workload']} | {f(v.get('cold_s'), '.1f')} | {f(v.get('warm_s'), '.1f')} "
              f"| {v.get('note', '')} |" for k, v in compiles.items()]
    errors = [f"- {r['workload']}/{r['contestant']}: {r.get('reason') or r.get('explain_error') or r['status']}"
              for r in results if r["status"] not in ("ok", "skipped") or r.get("explain_error")]
    notes = [f"- {r['workload']}/turbofx: graph replays {r['turbofx'].get('graph_replays')}; "
             + "; ".join(r["turbofx"]["runtime_notes"])[:200] for r in results
             if r.get("turbofx") and (r["turbofx"]["graph_replays"] is not None or r["turbofx"]["runtime_notes"])]
    lines += ["", "failures:"] + errors if errors else []
    lines += quant_table(results, interpreter)
    return "\n".join(lines + (["", "turbofx runtime:"] + notes if notes else []))


def quant_table(results: list[dict], interpreter: bool = False) -> list[str]:
    """Quantized rows next to turbofx unquantized on each workload: time ratio (lower is better)
    against the project goal, weight bytes a decode step reads, resident state bytes. On the CPU
    (Triton's interpreter) the times say nothing of GPU speed: the goal column says so."""
    rows = [r for r in results if r["contestant"] == "turbofx" or scheme_of(r["contestant"])]
    if not any(scheme_of(r["contestant"]) for r in rows):
        return []

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    base = {r["workload"]: r for r in rows if r["contestant"] == "turbofx"}
    lines = ["", "quantized turbofx vs turbofx unquantized, same weights and inputs (time ratio: lower is better; "
             f"goals: decode {', '.join(f'{k} <= {v}x' for k, v in DECODE_GOALS.items())}, prefill <= {PREFILL_GOAL}x)",
             "| workload | contestant | ms/step | x turbofx | goal | weights read MB | state MiB | x turbofx state "
             "| rel err | status |", "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        scheme, b = scheme_of(r["contestant"]), base.get(r["workload"], {})
        goal = (PREFILL_GOAL if r["kind"] == "prefill" else decode_goal(scheme)) if scheme else None
        ratio = r.get("time_vs_turbofx")
        verdict = ("-" if goal is None else f"<= {goal}x " + ("n/a (interpreter)" if interpreter else "?" if ratio is None
                                                             else "met" if ratio <= goal else "missed"))
        state, bstate = r.get("state_bytes"), b.get("state_bytes")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:100]}"
        cells = [r["workload"], r["contestant"], f(r.get("ms"), ".3f"), "1.00" if not scheme and r.get("ms") else
                 f(ratio, ".2f"), verdict, f(r.get("bytes_per_step") and r["bytes_per_step"] / 1e6, ".1f"),
                 f(state and state / 2**20, ".1f"), f(state / bstate if state and bstate else None, ".2f"),
                 f(r.get("rel_err"), ".1e"), status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot (pip install matplotlib)")
        return
    rows = [r for r in results if r.get("kind") == "decode"]
    wls = list(dict.fromkeys(r["workload"] for r in rows))
    names = list(dict.fromkeys(r["contestant"] for r in rows if r.get("tokens_per_s")))
    if not wls or not names:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(wls)), 4.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        tps = {r["workload"]: r.get("tokens_per_s") for r in rows if r["contestant"] == n}
        ax.bar([j + i * w for j in range(len(wls))], [tps.get(x) or float("nan") for x in wls], w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(wls))], wls)
    ax.set(yscale="log", ylabel="decode tokens/s (higher is better)", title="decode throughput per contestant")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="decode batch 1,32 at ctx 512 + prefill, fewer iterations")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after every row)")
    p.add_argument("--plot", metavar="PATH", help="decode tokens/s PNG (default: next to --json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--config", help="MODEL_TYPE[:JSON overrides]; default llama (1B shape on cuda, tiny on cpu)")
    p.add_argument("--batches", help="decode batch sizes; default 1,8,32 (quick 1,32; cpu 1,4)")
    p.add_argument("--ctx", help="decode cached tokens; default 512,1024 (quick 512; cpu 64)")
    p.add_argument("--prefill-len", type=int, help="default 2048 on cuda, 32 on cpu")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--inner", type=int, help="decode calls per timed sample")
    p.add_argument("--workloads", default="decode,prefill")
    p.add_argument("--contestants", default=",".join(CONTESTANTS))
    p.add_argument("--child-timeout", type=int, help=f"seconds for the {RO} child; default 900 (quick 120)")
    p.add_argument("--fresh-caches", action="store_true", help="empty Inductor/Triton/turbofx caches: cold is cold")
    p.add_argument("--quantize", nargs="?", const=QUANT_DEFAULT, metavar="SCHEMES",
                   help=f"also turbofx with quantized weights, one row per scheme (a comma list of turbofx.quant "
                        f"names; without a value: {QUANT_DEFAULT})")
    p.add_argument("--quant-batches", default="1", help="decode batch sizes the quantized rows run at (default 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.batches = [int(x) for x in (a.batches or ("1,4" if not cuda else "1,32" if a.quick else "1,8,32")).split(",")]
    a.ctx = [int(x) for x in (a.ctx or ("64" if not cuda else "512" if a.quick else "512,1024")).split(",")]
    a.prefill_len = a.prefill_len or (2048 if cuda else 32)
    a.iters = a.iters or ((10 if a.quick else 20) if cuda else (2 if a.quick else 3))
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    a.inner = a.inner or ((5 if a.quick else 10) if cuda else 1)
    a.child_timeout = a.child_timeout or (120 if a.quick else 900)
    a.quantize = list(dict.fromkeys(x.strip() for x in (a.quantize or "").split(",") if x.strip()))
    a.quant_batches = [int(x) for x in a.quant_batches.split(",")]
    return a


def contestant_names(args) -> list[str]:
    """--contestants in order, the quantized rows right after turbofx (or at the end without it)."""
    names = [n for n in args.contestants.split(",") if n]
    quant = [quant_contestant(s) for s in args.quantize]
    at = names.index("turbofx") + 1 if "turbofx" in names else len(names)
    return names[:at] + quant + names[at:]


def load_model(args):
    import transformers
    from transformers import AutoModelForCausalLM
    cfg = make_config(args.config, args.dev)
    torch.manual_seed(0)
    with torch.device(args.dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[args.dtype]).eval()
    try:
        import triton
    except ImportError:
        triton = None
    facts = model_facts(model)
    cuda = args.dev.type == "cuda"
    meta = {"device": torch.cuda.get_device_name(args.dev) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": getattr(triton, "__version__", None),
            "transformers": transformers.__version__, "python": platform.python_version(), "dtype": args.dtype,
            "batches": args.batches, "ctx": args.ctx, "prefill_len": args.prefill_len, "iters": args.iters,
            "warmup": args.warmup, "inner": args.inner, "quick": args.quick, **facts, "config": cfg.to_dict(),
            "probes": None, "compile": {}}
    try:
        meta["probes"] = None if args.child else probe(args.dev, DTYPES[args.dtype])
    except Exception as e:  # no roofline columns then, but the contestants still run
        meta["probe_error"] = f"{type(e).__name__}: {e}"[:300]
    return model, cfg.get_text_config(decoder=True).vocab_size, meta


def run_all(args, model, vocab: int, specs: list[dict], meta: dict, results: list[dict], dump) -> None:
    """Every in-process contestant on every workload, then the reduce-overhead child."""
    names = contestant_names(args)
    here = [n for n in names if n != RO or args.child]
    gen, filled, state = torch.Generator().manual_seed(0), {}, {"built": {}, "compile": meta["compile"]}
    for sp in specs:
        try:
            wl = (decode_workload(model, sp["batch"], sp["tokens"], filled, gen, vocab) if sp["kind"] == "decode" else
                  Workload(sp, model, (torch.randint(vocab, (sp["batch"], sp["tokens"]), generator=gen).to(args.dev),),
                           {"use_cache": False}))
        except Exception as e:
            traceback.print_exc()
            results.extend({**sp, "contestant": c, "status": "error",
                            "reason": f"workload setup: {type(e).__name__}: {e}"[:300]} for c in here)
            continue
        ref = None
        for name in here:
            results.append({**sp, "contestant": name, "status": "interrupted"})  # until it returns
            results[-1], out = run_one(name, wl, ref, args, state)
            ref = out if name == "eager" else ref
            dump()
        del wl, ref
        state["built"].clear()
        torch._dynamo.reset()
    filled.clear()
    if RO in names and not args.child:
        results.extend(run_child(args, meta, specs) if args.dev.type == "cuda" else
                       [{**sp, "contestant": RO, "status": "skipped", "reason": "no CUDA"} for sp in specs])


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dev = torch.device(args.device)
    if args.fresh_caches and not args.child:
        fresh = tempfile.mkdtemp(prefix="llm-bench-caches-")
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TURBOFX_CACHE_DIR"):
            os.environ[var] = os.path.join(fresh, var.split("_")[0].lower())
    try:  # before triton/transformers: on CPU turbofx must switch on Triton's interpreter first
        import turbofx  # noqa: F401
    except Exception:
        traceback.print_exc()  # the turbofx and decode rows will record the error
    if args.quantize:  # a misspelt scheme stops here, before any model is built
        from turbofx.errors import QuantizationError
        from turbofx.quant import parse
        try:
            for scheme in args.quantize:
                parse(scheme)
        except QuantizationError as e:
            print(f"error: --quantize: {e}", file=sys.stderr)
            return 2
    model, vocab, meta = load_model(args)
    meta["quantize"] = args.quantize
    kinds = args.workloads.split(",")
    specs = [spec("decode", b, c) for c in args.ctx for b in args.batches if "decode" in kinds]
    specs += [spec("prefill", 1, args.prefill_len)] if "prefill" in kinds else []
    results: list[dict] = []
    at = CONTESTANTS.index("turbofx") + 1  # rows sort in CONTESTANTS order, the quantized ones after turbofx
    everyone = list(dict.fromkeys([*CONTESTANTS[:at], *map(quant_contestant, args.quantize), *CONTESTANTS[at:],
                                   *contestant_names(args)]))
    order = {(sp["workload"], c): i for i, (sp, c) in enumerate((sp, c) for sp in specs for c in everyone)}

    def dump() -> None:
        results.sort(key=lambda r: order.get((r["workload"], r["contestant"]), len(order)))
        add_metrics(results, meta, meta["probes"])
        if args.json:  # atomically: a reader, or a crash, never leaves half a file
            with open(args.json + ".tmp", "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=2, default=str)
            os.replace(args.json + ".tmp", args.json)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still print what we have
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with torch.no_grad():
            run_all(args, model, vocab, specs, meta, results, dump)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print("interrupted: partial results", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    dump()
    if not args.child:
        report(args, meta, results)
    return 1 if meta.get("interrupted") else 0


def report(args, meta: dict, results: list[dict]) -> None:
    pr = meta["probes"] or {}
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  transformers "
          f"{meta['transformers']}  dtype {args.dtype}  params {meta['params'] / 1e6:.1f}M  copy "
          f"{pr.get('copy_gbps', 0):.0f} GB/s  mm {pr.get('mm_tflops', 0):.3g} TFLOP/s  iters {args.iters}\n")
    text = table(results, meta["compile"], interpreter=args.dev.type != "cuda")
    print(text)
    if args.json:
        with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
            fh.write(text + "\n")
    if args.plot or args.json:
        plot(results, args.plot or os.path.splitext(args.json)[0] + ".png")


if __name__ == "__main__":
    sys.exit(main())
