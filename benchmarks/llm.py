"""Side-by-side LLM benchmark: eager vs turbofx vs Inductor, one process, same weights and inputs.

    python -m benchmarks.llm [--quick] [--json PATH] [--device cuda|cpu] [--dtype bf16|fp16|fp32]
        [--config MODEL_TYPE[:JSON]] [--ctx 512] [--prefill-len 2048] [--iters N]

Workloads
  prefill  one forward of input_ids 1 x prefill_len, use_cache=False
  decode   ms per token: one forward of a single new token at batch 1 on a transformers StaticCache
           (max length ctx+8) that eager pre-filled with ctx tokens; the cache's position counter
           is rewound to ctx before every call (outside the timed region)
Ratios are speedups: other_ms / ms (> 1 means faster than eager / Inductor). A contestant that fails
is recorded as status "error" with the reason and never stops the others. `--config llama-1b`,
`llama-tiny` or any transformers model type, optionally followed by ':' and JSON overrides.
"""
from __future__ import annotations

import argparse, gc, inspect, json, platform, signal, statistics, sys, time, traceback  # noqa: E401

import torch

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=4096)
LLAMA_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=4096)
PRESETS = {"llama-1b": LLAMA_1B, "llama-tiny": LLAMA_TINY}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONTESTANTS = ("eager", "turbofx", "inductor")  # turbofx before Inductor's long compile


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


def time_ms(fn, before, warmup: int, iters: int, device: torch.device) -> float:
    """Median ms of `fn()`; `before()` runs untimed ahead of every call."""
    times = []
    for i in range(warmup + iters):
        before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def cache_spelling(model) -> tuple[str, bool]:
    """(name of the cache kwarg, whether forward takes cache_position): transformers 5.24 renamed
    `past_key_values=` to `cache=` and dropped `cache_position`; 5.17 has `past_key_values=` only."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def decode_inputs(model, ctx_ids: torch.Tensor, next_tok: torch.Tensor):
    """A fresh StaticCache pre-filled by eager with ctx tokens; returns (kwargs, rewind)."""
    from transformers import StaticCache
    ctx, device = ctx_ids.shape[1], ctx_ids.device
    cache = StaticCache(config=model.config, max_cache_len=ctx + 8)
    name, has_pos = cache_spelling(model)
    prefill = {"input_ids": ctx_ids, name: cache, "use_cache": True}
    if has_pos:
        prefill["cache_position"] = torch.arange(ctx, device=device)
    model(**prefill)
    kwargs = {"input_ids": next_tok, name: cache, "use_cache": True}
    if has_pos:
        kwargs["cache_position"] = torch.tensor([ctx], device=device)

    def rewind() -> None:  # StaticLayer.update advances `cumulative_length` in place (5.x)
        for layer in getattr(cache, "layers", []):
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(ctx)
    return kwargs, rewind


def build(name: str, model, kwargs: dict):
    if name == "eager":
        return model
    if name == "inductor":
        torch._dynamo.reset()
        return torch.compile(model)
    import turbofx
    return turbofx.compile(model, example_args=(), example_kwargs=kwargs)


def explain(cm, rep: dict) -> None:
    import turbofx
    try:
        report = turbofx.explain(cm)
        kinds: dict[str, int] = {}
        for k in report.kernels:
            kinds[k.kind] = kinds.get(k.kind, 0) + 1
        rep["turbofx"] = {"kernels": len(report.kernels), "kinds": kinds,
                          "stage_seconds": dict(report.stage_seconds)}
    except Exception as e:  # the benchmark still runs; the failure is recorded
        rep["explain_error"] = f"{type(e).__name__}: {e}"[:300]


def run_one(name, workload, model, make_inputs, ref, args, device) -> tuple[dict, torch.Tensor | None]:
    rep: dict = {"workload": workload, "contestant": name, "status": "error"}
    out = fn = None
    try:
        gc.collect()
        kwargs, before = make_inputs()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        fn = build(name, model, kwargs)
        before()
        out = logits_of(fn(**kwargs))
        sync(device)
        rep["compile_s"] = time.perf_counter() - t0  # first call, compile included
        if name == "turbofx":
            explain(fn, rep)
        rep["ms"] = time_ms(lambda: fn(**kwargs), before, args.warmup, args.iters, device)
        if device.type == "cuda":
            rep["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rep["status"] = "ok"
        if ref is not None:  # loose sanity check against eager: catches garbage, not rounding
            err = (out.float() - ref.float()).abs().max().item()
            rep["max_abs_err"], rep["rel_err"] = err, err / max(ref.float().abs().max().item(), 1e-6)
            if not rep["rel_err"] < 0.1:
                rep["status"], rep["reason"] = "mismatch", f"max abs err {err:.3g} vs eager (rel {rep['rel_err']:.3g})"
    except Exception as e:
        traceback.print_exc()
        rep["reason"] = f"{type(e).__name__}: {e}"[:300]
        out = None
    finally:
        del fn
        if name == "inductor":
            torch._dynamo.reset()
    print(f"[{workload}] {name}: {rep.get('status')} {rep.get('ms', '')}", file=sys.stderr, flush=True)
    return rep, out


def add_ratios(results: list[dict]) -> None:
    for r in results:
        base = {x["contestant"]: x.get("ms") for x in results
                if x["workload"] == r["workload"] and x.get("ms")}
        if r.get("ms"):
            for other in ("eager", "inductor"):
                if base.get(other):
                    r[f"vs_{other}"] = base[other] / r["ms"]


def table(results: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = ["| workload | contestant | ms | vs eager (x) | vs inductor (x) | compile s | peak MiB | max abs err | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:120]}"
        lines.append(f"| {r['workload']} | {r['contestant']} | {f(r.get('ms'), '.3f')} | {f(r.get('vs_eager'), '.2f')} "
                     f"| {f(r.get('vs_inductor'), '.2f')} | {f(r.get('compile_s'), '.1f')} | {f(r.get('peak_mib'), '.0f')} "
                     f"| {f(r.get('max_abs_err'), '.2e')} | {status.replace('|', '/')} |")
    errors = [f"- {r['workload']}/{r['contestant']}: {r.get('reason') or r.get('explain_error') or r['status']}"
              for r in results if r["status"] != "ok" or r.get("explain_error")]
    return "\n".join(lines + (["", "failures:"] + errors if errors else []))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations (~3 min on one H100)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after every contestant)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--config", help="MODEL_TYPE[:JSON overrides]; default llama (1B shape on cuda, tiny on cpu)")
    p.add_argument("--ctx", type=int, default=512, help="cached tokens for decode")
    p.add_argument("--prefill-len", type=int, help="default 2048 on cuda, 32 on cpu")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--workloads", default="prefill,decode")
    p.add_argument("--contestants", default=",".join(CONTESTANTS))
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.prefill_len = a.prefill_len or (2048 if cuda else 32)
    a.iters = a.iters or ((10 if a.quick else 30) if cuda else (3 if a.quick else 5))
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if "turbofx" in args.contestants:
        try:  # before triton/transformers: on CPU turbofx must switch on Triton's interpreter first
            import turbofx  # noqa: F401
        except Exception:
            traceback.print_exc()  # the turbofx contestants will record the error
    import transformers
    from transformers import AutoModelForCausalLM
    cfg = make_config(args.config, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.get_text_config(decoder=True).vocab_size
    prefill_ids = torch.randint(vocab, (1, args.prefill_len), generator=gen).to(device)
    ctx_ids = torch.randint(vocab, (1, args.ctx), generator=gen).to(device)
    next_tok = torch.randint(vocab, (1, 1), generator=gen).to(device)
    try:
        import triton
    except ImportError:
        triton = None
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": getattr(triton, "__version__", None), "transformers": transformers.__version__,
            "python": platform.python_version(), "dtype": args.dtype, "ctx": args.ctx,
            "prefill_len": args.prefill_len, "iters": args.iters, "warmup": args.warmup, "quick": args.quick,
            "cache_kwarg": cache_spelling(model)[0], "cache_position": cache_spelling(model)[1],
            "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_dict()}
    results: list[dict] = []

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=2, default=str)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still print what we have
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    workloads = {
        "prefill": lambda: ({"input_ids": prefill_ids, "use_cache": False}, lambda: None),
        "decode": lambda: decode_inputs(model, ctx_ids, next_tok),
    }
    current = None
    try:
        with torch.no_grad():
            for workload in args.workloads.split(","):
                ref = None
                for name in args.contestants.split(","):
                    current = {"workload": workload, "contestant": name, "status": "interrupted"}
                    rep, out = run_one(name, workload, model, workloads[workload], ref, args, device)
                    if name == "eager" and out is not None:
                        ref = out.clone()
                    results.append(rep)
                    current = None
                    add_ratios(results)
                    dump()
                del ref
    except KeyboardInterrupt:
        meta["interrupted"] = True
        results.extend([current] if current else [])
        print("interrupted: partial results", file=sys.stderr)
    add_ratios(results)
    dump()
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  transformers "
          f"{meta['transformers']}  dtype {args.dtype}  params {meta['params'] / 1e6:.1f}M  ctx {args.ctx}  "
          f"prefill {args.prefill_len}  iters {args.iters}\n")
    print(table(results))
    return 1 if meta.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
