"""A Program: ordered kernel launches and extern ATen calls over planned buffers.

A Program is plain data (JSON-serialisable ``to_dict``/``from_dict``): value slots, steps, size
symbols bound from input shapes, and which slot holds each output. Kernel outputs are allocated
by the runtime with the strides the graph promised; a planned output may reuse the tensor of a
dead buffer with the same shape, strides and dtype. Running is one tight loop.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("turbofx.runtime")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                   "channels_last": torch.channels_last}
_LAYOUTS = {"strided": torch.strided}


def _compile_expr(src: str):
    return compile(src, "<turbofx-size>", "eval")


def _eval(code, env: dict) -> int:
    return eval(code, {"max": max, "min": min}, env)


# ---------------------------------------------------------------- argument templates

class _Ref:
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


class _Expr:
    __slots__ = ("code",)

    def __init__(self, src: str) -> None:
        self.code = _compile_expr(src)


def decode_arg(x):
    """JSON template -> runtime template (refs and compiled size expressions)."""
    if isinstance(x, list):
        return [decode_arg(a) for a in x]
    if isinstance(x, dict):
        (k, v), = x.items()
        if k == "$v":
            return _Ref(v)
        if k == "$e":
            return _Expr(v)
        if k == "$dtype":
            return _DTYPES[v]
        if k == "$device":
            return torch.device(v)
        if k == "$mf":
            return _MEMORY_FORMATS[v]
        if k == "$layout":
            return _LAYOUTS[v]
        if k == "$float":
            return float(v)
        if k == "$tuple":
            return tuple(decode_arg(a) for a in v)
        if k == "$kw":
            return {kk: decode_arg(vv) for kk, vv in v.items()}
        raise ValueError(f"unknown argument tag {k}")
    return x


def _resolve(x, values: list, env: dict):
    if isinstance(x, _Ref):
        return values[x.i]
    if isinstance(x, _Expr):
        return _eval(x.code, env)
    if isinstance(x, list):
        return [_resolve(a, values, env) for a in x]
    if isinstance(x, tuple):
        return tuple(_resolve(a, values, env) for a in x)
    if isinstance(x, dict):
        return {k: _resolve(v, values, env) for k, v in x.items()}
    return x


def resolve_op(name: str) -> Callable:
    if name == "getitem":
        return operator.getitem
    ns, rest = name.split("::", 1)
    packet, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload or "default")


# ---------------------------------------------------------------- steps

@dataclass
class Alloc:
    """A kernel output: allocate with these sizes/strides, or reuse value ``reuse``'s tensor."""

    value: int
    shape: list[str]
    stride: list[str]
    dtype: str
    device: str
    reuse: int | None = None


@dataclass
class KernelStep:
    kernel: str
    args: list[int]  # value slots: inputs then outputs
    allocs: list[Alloc]
    size_args: list[str]
    xnumel: str
    rnumel: str | None
    xblock_max: int
    rblock_budget: int
    num_warps: int
    rblock_max: int | None = None  # looped reductions: the tile length (None: the whole row)
    kind: str = "pointwise"
    nodes: list[str] = field(default_factory=list)


@dataclass
class ExternStep:
    op: str
    args: Any  # JSON template
    kwargs: Any
    out: int
    node: str = ""
    reason: str = ""


class Program:
    def __init__(self, d: dict, kernels: dict[str, Callable]):
        self.d = d
        self.n_values = d["n_values"]
        self.inputs: list[int] = d["inputs"]
        self.bindings = d["bindings"]  # [symbol, input position, dim or None]
        self.outputs = [decode_arg(o) for o in d["outputs"]]
        self.frees: list[list[int]] = d["frees"]
        self.steps = []
        for s in d["steps"]:
            if s["type"] == "varlen_attention":
                self.steps.append(self._varlen_runner(s, kernels[s["kernel"]]))
            elif s["type"] == "attention":
                self.steps.append(self._attention_runner(s, kernels[s["kernel"]], kernels[s["combine"]],
                                                         kernels.get(s.get("cache", {}).get("kv_write"))))
            elif s["type"] == "kernel":
                ks = KernelStep(**{k: v for k, v in s.items() if k != "type"})
                ks.allocs = [Alloc(**a) for a in s["allocs"]]
                fn = kernels[ks.kernel]
                self.steps.append(self._kernel_runner(ks, fn))
            else:
                es = ExternStep(**{k: v for k, v in s.items() if k != "type"})
                self.steps.append(self._extern_runner(es))

    @staticmethod
    def _kernel_runner(ks: KernelStep, fn):
        allocs = [(a.value, [_compile_expr(e) for e in a.shape], [_compile_expr(e) for e in a.stride],
                   _DTYPES[a.dtype], torch.device(a.device), a.reuse) for a in ks.allocs]
        xnumel = _compile_expr(ks.xnumel)
        rnumel = _compile_expr(ks.rnumel) if ks.rnumel is not None else None
        size_args = [_compile_expr(s) for s in ks.size_args]
        args_idx = ks.args

        def run(values: list, env: dict) -> None:
            for v, shape, stride, dtype, device, reuse in allocs:
                if reuse is not None:  # planned reuse: the dead buffer's tensor moves over
                    values[v], values[reuse] = values[reuse], None
                else:
                    values[v] = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                                    dtype=dtype, device=device)
            xn = _eval(xnumel, env)
            if xn == 0:
                return
            args = [values[i] for i in args_idx] + [_eval(c, env) for c in size_args]
            if rnumel is None:
                xblock = min(ks.xblock_max, _pow2(xn))
                fn[(-(-xn // xblock),)](*args, xn, XBLOCK=xblock, num_warps=ks.num_warps)
            else:
                rn = _eval(rnumel, env)
                rblock = _pow2(rn) if ks.rblock_max is None else min(_pow2(rn), ks.rblock_max)
                xblock = max(1, min(_pow2(xn), ks.rblock_budget // rblock))
                fn[(-(-xn // xblock),)](*args, xn, rn, XBLOCK=xblock, RBLOCK=rblock, num_warps=ks.num_warps)

        run.step = ks
        return run

    @staticmethod
    def _attention_runner(s: dict, fn, combine, kv_write=None):
        """Streaming attention: grid (query tiles, batch × heads, key splits); strides read at run
        time. Few query tiles on a large cache split the keys (flash-decoding) and a second kernel
        combines the chunks by their log-sum-exp. With a fused cache write (``s["cache"]``) the new
        rows are rotated and stored by the attention kernel's prologue when there is one query
        tile (decode), by one write kernel before it otherwise (prefill); the step's value is then
        (out, k cache, v cache), updated in place when the graph writes the caches back."""
        shape = [_compile_expr(e) for e in s["shape"]]
        stride = [_compile_expr(e) for e in s["stride"]]
        blocks = dict(s["blocks"])
        num_warps = blocks.pop("num_warps")
        sm_count = blocks.pop("sm_count")
        interpret = blocks.pop("interpret")
        flags = dict(CAUSAL=bool(s["causal"]), WINDOW=s["window"] > 0, SOFTCAP=s["softcap"] > 0)
        qi, ki, vi, mi, oi = s["q"], s["k"], s["v"], s["mask"], s["out"]
        cache = s.get("cache")

        def run(values: list, env: dict) -> None:
            q, k, v = values[qi], values[ki], values[vi]
            out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                      dtype=q.dtype, device=q.device)
            b, h, sq, d = q.shape
            sk = k.shape[2]
            mask = values[mi] if mi is not None else None
            m = mask.expand(b, h, sq, sk) if mask is not None else q
            m_strides = m.stride() if mask is not None else (0, 0, 0, 0)
            groups = h // k.shape[1]
            # few queries per KV head (decode): one program takes the whole group of query heads,
            # so each K/V tile is read once per KV head
            g = groups if groups > 1 and sq * groups <= blocks["BLOCK_M"] else 1
            block_m = min(blocks["BLOCK_M"], max(16, _pow2(g * sq)))
            q_tiles = -(-(g * sq) // block_m)
            if cache is not None:
                if not cache["inplace"]:  # the graph still reads the old caches: update copies
                    k, v = k.clone(), v.clone()
                new = _new_rows(values, cache, b, sq, d)
                # decode: the attention kernel's prologue writes the few new rows (each program of
                # a KV head repeats that small write); more rows: one write kernel first
                prologue = q_tiles == 1 and sq <= 16
                if not prologue:
                    kn, vn, pos, c, sn = new["tensors"]
                    kv_write[(-(-sq // blocks["BLOCK_N"]), b * k.shape[1])](
                        k, v, kn, vn, pos, c, sn, *k.stride(), *v.stride(), *kn.stride(), *vn.stride(),
                        *new["cos_strides"], k.shape[1], sq, sk, d, new["rope_dims"], ROPE_K=cache["rope_k"],
                        BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"], num_warps=num_warps)
                values[oi] = (out, k, v)
                extra = new["tensors"] + new["strides"]
                rope_dims = new["rope_dims"]
                cache_flags = dict(ROPE_Q=cache["rope_q"], ROPE_K=cache["rope_k"], WRITE_KV=prologue)
            else:
                values[oi] = out
                extra = (q,) * 5 + (0,) * 11
                rope_dims = 0
                cache_flags = dict(ROPE_Q=False, ROPE_K=False, WRITE_KV=False)
            splits = attention_splits(sm_count, b * (h // g) * q_tiles, sk, blocks["BLOCK_N"], interpret=interpret)
            if splits > 1:
                po = torch.empty(b * h * splits * sq, blocks["BLOCK_D"], dtype=torch.float32, device=q.device)
                pl = torch.empty(b * h * splits * sq, dtype=torch.float32, device=q.device)
            else:
                po = pl = q
            kw = dict(blocks, BLOCK_M=block_m)
            fn[(q_tiles, b * (h // g), splits)](
                q, k, v, m, out, po, pl, *extra[:5], *q.stride(), *k.stride(), *v.stride(), *m_strides,
                *out.stride(), *extra[5:], h, groups, g, sq, sk, d, sq, rope_dims, float(s["scale"]),
                float(s["softcap"]), int(s["window"]), splits, HAS_MASK=mask is not None,
                MASK_BOOL=mask is not None and mask.dtype == torch.bool, SPLIT=splits > 1,
                num_warps=num_warps, **flags, **cache_flags, **kw)
            if splits > 1:
                combine_m = min(blocks["BLOCK_M"], max(16, _pow2(sq)))
                combine[(-(-sq // combine_m), b * h)](po, pl, out, *out.stride(), h, sq, d, splits, BLOCK_M=combine_m,
                                          BLOCK_D=blocks["BLOCK_D"], BLOCK_S=_pow2(splits), num_warps=num_warps)

        run.step = s
        return run

    @staticmethod
    def _varlen_runner(s: dict, fn):
        """Packed variable-length attention: per-row key ranges from cu_seqlens, tiles of
        consecutive rows scheduled longest-work-first."""
        shape = [_compile_expr(e) for e in s["shape"]]
        stride = [_compile_expr(e) for e in s["stride"]]
        blocks = {k: v for k, v in s["blocks"].items() if k not in ("num_warps", "sm_count", "interpret")}
        num_warps = s["blocks"]["num_warps"]
        qi, ki, vi, ci, oi = s["q"], s["k"], s["v"], s["cu_seqlens"], s["out"]
        causal = bool(s["causal"])

        def run(values: list, env: dict) -> None:
            q, k, v, cu = values[qi], values[ki], values[vi], values[ci]
            out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                      dtype=q.dtype, device=q.device)
            values[oi] = out
            t, h, d = q.shape
            if t == 0:
                return
            cu = cu.to(device=q.device, dtype=torch.int64)
            lengths = cu[1:] - cu[:-1]
            seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
            rows = torch.arange(t, device=q.device)
            row_lo = cu[:-1][seq].to(torch.int32)
            row_hi = (rows + 1 if causal else cu[1:][seq]).to(torch.int32)
            bm = blocks["BLOCK_M"]
            n_tiles = -(-t // bm)
            pad = n_tiles * bm - t
            lo_t = torch.nn.functional.pad(row_lo, (0, pad), value=t).view(n_tiles, bm).amin(1)
            hi_t = torch.nn.functional.pad(row_hi, (0, pad), value=0).view(n_tiles, bm).amax(1)
            tiles = torch.argsort(hi_t - lo_t, descending=True).to(torch.int32)  # longest work first
            fn[(n_tiles, h)](q, k, v, out, row_lo, row_hi, tiles, *q.stride(), *k.stride(), *v.stride(),
                             *out.stride(), h, h // k.shape[1], t, d, float(s["scale"]), num_warps=num_warps,
                             **blocks)

        run.step = s
        return run

    @staticmethod
    def _extern_runner(es: ExternStep):
        op = resolve_op(es.op)
        args = decode_arg(es.args)
        kwargs = {k: decode_arg(v) for k, v in es.kwargs.items()}
        out = es.out

        def run(values: list, env: dict) -> None:
            values[out] = op(*_resolve(args, values, env), **_resolve(kwargs, values, env))

        run.step = es
        return run

    def bind(self, flat_inputs: list) -> dict:
        env: dict[str, int] = {}
        for sym, pos, dim in self.bindings:
            x = flat_inputs[pos]
            env[sym] = int(x) if dim is None else x.shape[dim]
        return env

    def __call__(self, flat_inputs: list) -> list:
        values: list = [None] * self.n_values
        for slot, x in zip(self.inputs, flat_inputs):
            values[slot] = x
        env = self.bind(flat_inputs)
        frees = self.frees
        for i, step in enumerate(self.steps):
            step(values, env)
            for v in frees[i]:
                values[v] = None
        return [_resolve(o, values, env) for o in self.outputs]


def _new_rows(values: list, cache: dict, b: int, s_new: int, d: int) -> dict:
    """A fused cache write's new K/V rows, positions and RoPE tables as kernel arguments: cos and
    sin viewed as [B, S_new, rotary dims] with one set of strides (copied when theirs differ)."""
    kn, vn = values[cache["k_new"]], values[cache["v_new"]]
    pos = values[cache["positions"]]
    pos = pos if pos.stride(0) == 1 else pos.contiguous()
    if cache["cos"] is None:
        c = sn = kn
        cos_strides, rope_dims = (0, 0, 0), 0
    else:
        c = values[cache["cos"]].expand(b, 1, s_new, -1)[:, 0]
        sn = values[cache["sin"]].expand(b, 1, s_new, -1)[:, 0]
        if c.stride() != sn.stride():
            c, sn = c.contiguous(), sn.contiguous()
        cos_strides, rope_dims = c.stride(), c.shape[-1]
    return {"tensors": (kn, vn, pos, c, sn), "cos_strides": cos_strides, "rope_dims": rope_dims,
            "strides": (*kn.stride(), *vn.stride(), *cos_strides)}


def attention_splits(sm_count: int, programs: int, sk: int, block_n: int, interpret: bool = False) -> int:
    """How many key chunks: enough for ~2 programs per SM when (batch × heads × query tiles)
    programs cannot fill the GPU, each chunk at least 4 key tiles. ``TURBOFX_ATTENTION_SPLITS``
    forces a number (tests use it to check that results do not depend on it)."""
    import os

    forced = os.environ.get("TURBOFX_ATTENTION_SPLITS")
    if forced:
        return max(1, min(int(forced), -(-sk // block_n)))
    if interpret or programs >= sm_count or sk < 8 * block_n:
        return 1
    return max(1, min(-(-2 * sm_count // programs), sk // (4 * block_n), 128))


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
