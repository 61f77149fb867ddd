"""Decode-step benchmark: one layer's RoPE + KV-cache write + attention over the cache, one process.

    python -m benchmarks.decode_step [--quick] [--json PATH] [--device cuda|cpu] [--iters N]

The step is written the way HF decoders write it (rope on q and k, ``index_copy_`` of the new row
into static cache buffers, SDPA over the whole cache with GQA and a bool mask). Contestants:
  eager             PyTorch as written
  turbofx           the attention_prologue pass: one kernel (rope, cache write, attention)
  turbofx-unfused   ``disable="attention_prologue"``: rope kernels, index_put_, attention kernel
  inductor          torch.compile (default mode)
Workloads: bf16, 32 query heads, 8 KV heads, head dim 128; --quick: batch 1 over a 16384-slot cache
and batch 16 over 4096 (the new token in the last slot, so every cached key is read).
Metrics
  us        median time per step: a CUDA graph of several steps is replayed (host overhead
            excluded); the steps rotate over enough copies of the caches that the working set
            exceeds 3x the L2 cache, so the cache is read from HBM. Eager timing if capture fails.
  TB/s      bytes of the K and V caches (the KV heads' count) / time: what an ideal step must read
  err       max |out - eager out| of the step's attention output
On CPU (``--device cpu``) a tiny configuration runs through Triton's interpreter (fp32, D 16,
cache 64) so the script itself can be tested; Inductor is skipped there.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: on CPU it switches Triton's interpreter on before triton is imported)

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep(torch.nn.Module):
    def __init__(self, b: int, hkv: int, cache_len: int, d: int, dtype, device):
        super().__init__()
        self.register_buffer("k_cache", torch.randn(b, hkv, cache_len, d, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.randn(b, hkv, cache_len, d, dtype=dtype, device=device))

    def forward(self, q, k, v, positions, cos, sin, mask):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys = self.k_cache.index_copy_(2, positions, k)
        values = self.v_cache.index_copy_(2, positions, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def inputs(b, h, hkv, cache_len, d, dtype, device):
    pos = cache_len - 1
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, 1, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(b, hkv, 1, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(b, hkv, 1, d, generator=g, device=device, dtype=dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.cat([pos * inv] * 2)[None, None].expand(b, 1, d)
    mask = torch.ones(b, 1, 1, cache_len, dtype=torch.bool, device=device)
    return q, k, v, torch.tensor([pos], device=device), freqs.cos().to(dtype), freqs.sin().to(dtype), mask


def build(name: str, module: DecodeStep, args: tuple):
    if name == "eager":
        return module
    if name == "turbofx":
        return turbofx.compile(module, args, cudagraphs=False)
    if name == "turbofx-unfused":
        return turbofx.compile(module, args, cudagraphs=False, disable="attention_prologue")
    if name == "inductor":
        return torch.compile(module)
    raise ValueError(name)


def time_steps(fns: list, args: tuple, iters: int, device) -> tuple[float, str]:
    """Median seconds per step over the rotating copies; CUDA graph replay on GPUs."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)](*args)
        return (time.perf_counter() - t0) / iters, "eager"
    for f in fns:  # warm-up: JIT compilation, autotuning, allocator
        f(*args)
    torch.cuda.synchronize()
    timing = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fns[i % len(fns)](*args)
        run = graph.replay
    except Exception as e:  # noqa: BLE001  (recorded in the row)
        timing = f"eager ({type(e).__name__}: {str(e).splitlines()[0][:120]})"

        def run():
            for i in range(iters):
                fns[i % len(fns)](*args)
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(samples), timing


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        dtype, shapes, contestants, iters = torch.float32, [(1, 2, 1, 64, 16)], ["eager", "turbofx", "turbofx-unfused"], 2
    else:
        dtype, iters = torch.bfloat16, a.iters
        pairs = [(1, 16384), (16, 4096)] if a.quick else [(1, 4096), (1, 16384), (4, 4096), (16, 4096), (64, 4096)]
        shapes = [(b, 32, 8, cache_len, 128) for b, cache_len in pairs]
        contestants = ["eager", "turbofx", "turbofx-unfused", "inductor"]
    rows = []
    for b, h, hkv, cache_len, d in shapes:
        args = inputs(b, h, hkv, cache_len, d, dtype, device)
        kv_bytes = 2 * b * hkv * cache_len * d * torch.finfo(dtype).bits // 8
        copies = 1
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            copies = max(1, min(16, -(-3 * l2 // kv_bytes)))
        base = DecodeStep(b, hkv, cache_len, d, dtype, device)
        with torch.no_grad():
            expected = copy.deepcopy(base)(*args)
        for name in contestants:
            row = {"workload": f"decode-step b{b} kv{cache_len} d{d}", "contestant": name, "copies": copies}
            try:
                with torch.no_grad():
                    fns = [build(name, copy.deepcopy(base), args) for _ in range(copies)]
                    row["err"] = (fns[0](*args).float() - expected.float()).abs().max().item()
                    seconds, row["timing"] = time_steps(fns, args, iters, device)
                row.update(status="ok", us=seconds * 1e6, tbps=kv_bytes / seconds / 1e12)
            except Exception as e:  # noqa: BLE001  (a failure is a result row, not a crash)
                row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rows.append(row)
            print(_line(row), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"device": str(device), "name": _device_name(device), "rows": rows}, f, indent=1)
    return rows


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['workload']:28s} {r['contestant']:16s} ERROR {r['reason']}"
    return (f"{r['workload']:28s} {r['contestant']:16s} {r['us']:9.1f} us  {r['tbps']:6.3f} TB/s  "
            f"err {r['err']:.2e}  ({r['timing']}, {r['copies']} cache copies)")


if __name__ == "__main__":
    main(sys.argv[1:])
