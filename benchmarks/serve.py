"""Serving benchmark: a Poisson arrival trace replayed against three ways of serving it.

    python -m benchmarks.serve [--config MODEL_TYPE[:JSON]] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
        [--requests 32] [--rate 4.0] [--prompt-len 8,64] [--output-len 4,32] [--max-batch 8] [--page-size 16]
        [--max-num-tokens 256] [--contestants engine,static,hf] [--seed 0] [--json PATH]

Contestants (same weights, same trace, greedy):
  engine       turbofx.Engine: continuous batching over a paged KV cache, chunked prefill;
  static       static batches through turbofx.generate: when the server is free it takes up to
               --max-batch waiting requests, left-pads them to the longest prompt and generates the
               longest output of the batch (turbofx.generate does not stream: a request's tokens are
               stamped as if streamed, from the batch's measured prefill time and an even split of its
               measured decode time);
  hf           Hugging Face generate, one request at a time (a streamer stamps each token);
  hf-inductor  (CUDA only) HF generate over static batches, as `static`, with the model's forward
               compiled by Inductor (torch.compile) and a static cache: the issue's GPU baseline.

Clock: a discrete-event replay. Requests arrive on a virtual clock (exponential inter-arrival times
at --rate per second); the server is single-threaded, so the clock advances by the measured
duration of each unit of work (an engine step, a static batch, an HF request) and jumps to the next
arrival when the server is idle. Compilation happens before the replay (the engine compiles at
construction; static and hf-inductor warm every shape the trace needs first), so it is not counted.

Metrics per contestant: output tokens/s over the makespan (first arrival to last token), time to
first token (TTFT) and inter-token latency (ITL) p50/p99 in ms, and padding waste: the share of
token slots computed (prompt + generated, over all sequences of each launch) that served no request
(static: left padding, batch-padding rows, tokens past a request's own length; engine: decode
buckets' padding). Each request's tokens are compared with HF's (the `hf` contestant, or HF generate
alone when `hf` is not run): `tokens_match` counts requests whose greedy tokens are identical.
On CPU the kernels run in Triton's interpreter: the numbers measure the interpreter, not GPU kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import turbofx  # noqa: F401  (before triton/transformers: the CPU target switches the interpreter on)
import torch

from benchmarks.llm import DTYPES, make_config

CONTESTANTS = ("engine", "static", "hf", "hf-inductor")
NEEDS_CUDA = ("hf-inductor",)


@dataclass
class Request:
    index: int
    arrival: float  # seconds on the virtual clock
    prompt: list[int]
    output_len: int


@dataclass
class Served:
    """What one contestant did for one request: its tokens and when each arrived (virtual clock)."""

    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


@dataclass
class Result:
    contestant: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    requests: int = 0
    output_tokens: int = 0
    makespan_s: float = 0.0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    itl_p50_ms: float = math.nan
    itl_p99_ms: float = math.nan
    padding_waste: float = math.nan  # share of computed token slots that served no request
    tokens_match: int | None = None  # requests whose greedy tokens equal HF's
    notes: str = ""


def make_trace(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
               seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += float(torch.empty(1).exponential_(rate, generator=g))
        p = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        o = int(torch.randint(output_len[0], output_len[1] + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()  # 0..2: pad/bos/eos of the tiny configs
        out.append(Request(i, t, prompt, o))
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- contestants
def serve_engine(model, trace: list[Request], args) -> tuple[dict[int, Served], float, str]:
    engine = turbofx.Engine(model, max_batch_size=args.max_batch, max_num_tokens=args.max_num_tokens,
                            page_size=args.page_size, max_seq_len=args.max_seq_len)
    served = {r.index: Served() for r in trace}
    handles, pending, clock = {}, list(trace), 0.0
    computed = 0
    while pending or engine.has_work:
        while pending and pending[0].arrival <= clock:
            r = pending.pop(0)
            handles[r.index] = engine.submit(r.prompt, max_new_tokens=r.output_len)
        if not engine.has_work:
            clock = pending[0].arrival
            continue
        before = engine.stats.prefill_tokens + engine.stats.decode_tokens + engine.stats.padded_tokens
        t0 = time.perf_counter()
        engine.step()
        sync(args.dev)
        clock += time.perf_counter() - t0
        computed += engine.stats.prefill_tokens + engine.stats.decode_tokens + engine.stats.padded_tokens - before
        for i, h in handles.items():
            s = served[i]
            for tok in h.tokens[len(s.tokens):]:
                s.tokens.append(tok)
                s.times.append(clock)
    s = engine.stats
    engine.allocator.check()
    leak = engine.allocator.num_pages - engine.allocator.num_free
    notes = (f"{s.steps} steps, {s.preemptions} preemptions, compile {s.compile_seconds:.1f}s"
             + (f", {leak} pages not freed" if leak else ""))
    waste = s.padded_tokens / computed if computed else 0.0
    return served, waste, notes


def _static_batches(trace: list[Request], run_batch, args) -> tuple[dict[int, Served], float]:
    """Shared by `static` and `hf-inductor`: FIFO batches of what has arrived when the server is free.
    ``run_batch(prompts, max_new) -> (tokens [b][max_new], prefill_s, decode_s)``."""
    served = {r.index: Served() for r in trace}
    pending, clock = list(trace), 0.0
    useful = slots = 0
    while pending:
        if pending[0].arrival > clock:
            clock = pending[0].arrival
        batch = [r for r in pending if r.arrival <= clock][:args.max_batch]
        pending = [r for r in pending if r not in batch]
        max_new = max(r.output_len for r in batch)
        tokens, prefill_s, decode_s, bp, sp = run_batch([r.prompt for r in batch], max_new)
        steps = max(max_new - 1, 1)
        for r, toks in zip(batch, tokens):
            s = served[r.index]
            s.tokens = list(toks[:r.output_len])
            s.times = [clock + prefill_s + k * decode_s / steps for k in range(r.output_len)]
            useful += len(r.prompt) + r.output_len
        slots += bp * (sp + max_new)  # every row of the padded batch, every prompt and output slot
        clock += prefill_s + decode_s
    return served, 1.0 - useful / slots


def _padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    return ids.to(device), mask.to(device)


def serve_static(model, trace: list[Request], args) -> tuple[dict[int, Served], float, str]:
    from turbofx.compiler.generation import next_bucket

    def run_batch(prompts, max_new):
        ids, mask = _padded(prompts, 0, args.dev)
        res = turbofx.generate(model, ids, max_new_tokens=max_new, attention_mask=mask)
        bp = next_bucket(len(prompts), None, what="batch size")
        sp = next_bucket(ids.shape[1], None, multiple=16, what="prompt length")
        return res.new_tokens.tolist(), res.prefill_seconds, res.decode_seconds, bp, sp

    # prefill_seconds / decode_seconds exclude compiling; on a GPU the first launches also JIT-compile
    if args.dev.type == "cuda":
        _warm(trace, run_batch, args)
    served, waste = _static_batches(trace, run_batch, args)
    return served, waste, "batches padded to powers of two, prompts to multiples of 16"


def _warm(trace: list[Request], run_batch, args) -> None:
    """Run the trace's batches once untimed, so every program it needs is compiled before the replay."""
    _static_batches(trace, run_batch, args)


def _hf_generate(model, ids, mask, max_new, streamer=None, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False, pad_token_id=0, streamer=streamer, **kw)


class _Stamps:
    """A transformers streamer that stamps each generated token (the first ``put`` is the prompt)."""

    def __init__(self, device):
        self.device, self.times, self.prompt_seen = device, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def serve_hf(model, trace: list[Request], args) -> tuple[dict[int, Served], float, str]:
    served = {r.index: Served() for r in trace}
    clock = 0.0
    _hf_generate(model, torch.tensor([trace[0].prompt], device=args.dev), None, 2)  # warm-up
    for r in trace:
        clock = max(clock, r.arrival)
        ids = torch.tensor([r.prompt], device=args.dev)
        stamps = _Stamps(args.dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = _hf_generate(model, ids, torch.ones_like(ids), r.output_len, streamer=stamps)
        sync(args.dev)
        served[r.index].tokens = out[0, ids.shape[1]:].tolist()
        served[r.index].times = [clock + t - t0 for t in stamps.times]
        clock += time.perf_counter() - t0
    return served, 0.0, "one request at a time"


def serve_hf_inductor(model, trace: list[Request], args) -> tuple[dict[int, Served], float, str]:
    compiled = torch.compile(model.forward)  # default mode: a GPU check must fit its time budget
    model.forward = compiled
    try:
        def run_batch(prompts, max_new):
            ids, mask = _padded(prompts, 0, args.dev)
            sync(args.dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                _hf_generate(model, ids, mask, 1, cache_implementation="static")
            sync(args.dev)
            t1 = time.perf_counter()
            with torch.no_grad():
                out = _hf_generate(model, ids, mask, max_new, cache_implementation="static")
            sync(args.dev)
            t2 = time.perf_counter()
            # prefill ~ the one-token call; decode = the rest of the full call
            return out[:, ids.shape[1]:].tolist(), t1 - t0, max(t2 - t1 - (t1 - t0), 0.0), len(prompts), ids.shape[1]

        _warm(trace, run_batch, args)
        served, waste = _static_batches(trace, run_batch, args)
    finally:
        del model.forward
    return served, waste, "Inductor-compiled forward, static cache, static batches (prefill timed separately)"


SERVERS = {"engine": serve_engine, "static": serve_static, "hf": serve_hf, "hf-inductor": serve_hf_inductor}


# ----------------------------------------------------------------------------------------- metrics
def summarize(name: str, trace: list[Request], served: dict[int, Served], waste: float, notes: str,
              reference: dict[int, Served] | None) -> Result:
    ttft, itl, n_tokens, last = [], [], 0, 0.0
    for r in trace:
        s = served[r.index]
        n_tokens += len(s.tokens)
        if s.times:
            ttft.append(s.times[0] - r.arrival)
            itl += [b - a for a, b in zip(s.times, s.times[1:])]
            last = max(last, s.times[-1])
    makespan = last - trace[0].arrival
    match = None
    if reference is not None:
        match = sum(served[r.index].tokens == reference[r.index].tokens for r in trace)
    return Result(name, requests=len(trace), output_tokens=n_tokens, makespan_s=makespan,
                  tokens_per_s=n_tokens / makespan if makespan > 0 else math.nan,
                  ttft_p50_ms=1e3 * percentile(ttft, 50), ttft_p99_ms=1e3 * percentile(ttft, 99),
                  itl_p50_ms=1e3 * percentile(itl, 50), itl_p99_ms=1e3 * percentile(itl, 99),
                  padding_waste=waste, tokens_match=match, notes=notes)


def table(results: list[Result]) -> str:
    def f(v, fmt):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = ["| contestant | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | padding waste | "
             "tokens = HF | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.contestant} | {r.status}: {r.reason} | | | | | | | |")
            continue
        lines.append(f"| {r.contestant} | {f(r.tokens_per_s, '.1f')} | {f(r.ttft_p50_ms, '.0f')} | "
                     f"{f(r.ttft_p99_ms, '.0f')} | {f(r.itl_p50_ms, '.0f')} | {f(r.itl_p99_ms, '.0f')} | "
                     f"{f(100 * r.padding_waste, '.1f')}% | {r.tokens_match}/{r.requests} | {r.notes} |")
    return "\n".join(lines)


def _pair(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(",")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--{name}: expected MIN,MAX (whole numbers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"--{name}: expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="MODEL_TYPE[:JSON overrides] or a preset (llama-1b, llama-tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prompt-len", default="8,64", help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--output-len", default="4,32", help="MIN,MAX output tokens (uniform)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-num-tokens", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--contestants", default=None, help=f"comma list of {','.join(CONTESTANTS)} (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.dev = torch.device(a.device)
    a.dtype = a.dtype or ("bf16" if a.dev.type == "cuda" else "fp32")
    a.prompt_len, a.output_len = _pair(a.prompt_len, "prompt-len"), _pair(a.output_len, "output-len")
    if a.requests < 1 or not a.rate > 0 or a.max_batch < 1:
        raise SystemExit("--requests and --max-batch must be >= 1 and --rate > 0")
    a.contestants = a.contestants.split(",") if a.contestants else list(CONTESTANTS)
    unknown = set(a.contestants) - set(CONTESTANTS)
    if unknown:
        raise SystemExit(f"--contestants: unknown {sorted(unknown)}; choose from {', '.join(CONTESTANTS)}")
    a.max_seq_len = a.prompt_len[1] + a.output_len[1]
    return a


def main(argv=None) -> int:
    import transformers
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    cfg = make_config(args.config, args.dev)
    torch.manual_seed(0)
    with torch.device(args.dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[args.dtype]).eval()
    model.generation_config.eos_token_id = None  # every request generates exactly its output length
    vocab = cfg.get_text_config(decoder=True).vocab_size
    trace = make_trace(args.requests, args.rate, args.prompt_len, args.output_len, vocab, args.seed)
    meta = {"device": torch.cuda.get_device_name(args.dev) if args.dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
            "config": args.config or "llama (default preset)", "requests": args.requests, "rate": args.rate,
            "prompt_len": args.prompt_len, "output_len": args.output_len, "max_batch": args.max_batch,
            "page_size": args.page_size, "max_num_tokens": args.max_num_tokens, "seed": args.seed,
            "interpreter": args.dev.type == "cpu"}
    order = sorted(args.contestants, key=lambda c: c != "hf")  # HF first: it is the reference for the others
    results, reference = [], None

    def dump() -> None:  # after every row: a step killed by its timeout leaves the rows done
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "results": [asdict(r) for r in results]}, fh, indent=1)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still print and write what we have
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        if "hf" not in order:
            reference = serve_hf(model, trace, args)[0]
        run_all(model, trace, args, order, meta, results, reference, dump)
    except KeyboardInterrupt:
        print("[serve] interrupted: reporting the contestants done", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    results.sort(key=lambda r: CONTESTANTS.index(r.contestant))
    print(f"serving benchmark — {meta['device']}, {args.dtype}, {args.requests} requests at {args.rate}/s, prompts "
          f"{args.prompt_len}, outputs {args.output_len}, max batch {args.max_batch}"
          + (" (Triton interpreter: not GPU speed)" if meta["interpreter"] else ""))
    print(table(results))
    dump()
    done = {r.contestant for r in results}
    return 0 if all(r.status != "failed" for r in results) and done == set(order) else 1


def run_all(model, trace, args, order, meta, results, reference, dump) -> None:
    for name in order:
        if name in NEEDS_CUDA and args.dev.type != "cuda":
            results.append(Result(name, status="skipped", reason="needs CUDA"))
            continue
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                served, waste, notes = SERVERS[name](model, trace, args)
        except Exception as e:  # a contestant's failure is its row; the others still run
            results.append(Result(name, status="failed", reason=f"{type(e).__name__}: {e}"[:300]))
            continue
        if name == "hf":
            reference = served
        r = summarize(name, trace, served, waste, notes, reference)
        r.notes += f"; {time.perf_counter() - t0:.0f}s wall"
        results.append(r)
        dump()
        print(f"[serve] {name}: {r.tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.0f} ms", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
