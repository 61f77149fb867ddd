"""turbofx's own graph ops (``torch.ops.turbofx.*``), with reference implementations.

``attention`` carries the semantics the attention pass recognised, so codegen sees intent:
softmax(scale * q kᵀ [softcapped] + mask) v over ``q [B, H, Sq, D]``, ``k, v [B, Hkv, Sk, D]``
(H a multiple of Hkv: grouped-query attention without materialising repeated heads), an
optional mask broadcastable to ``[B, H, Sq, Sk]`` (bool: True keeps; float: added), causal
(query i sees keys ≤ i + Sk − Sq) and a sliding ``window`` (0: none). A fully masked row gives
zeros, never NaN. ``cached_attention`` is the same with the step's prologue folded in: RoPE
on the new queries/keys and the write of the new K/V rows into a static cache. The references run
when no kernel is generated (and in tests).
"""
from __future__ import annotations

import functools
import math

import torch


@torch.library.custom_op("turbofx::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              causal: bool, window: int, softcap: float) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, causal, window, softcap)


@attention.register_fake
def _(q, k, v, mask, scale, causal, window, softcap):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def attention_reference(q, k, v, mask, scale, causal, window, softcap, compute_dtype=torch.float32):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    s = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[-2], k.shape[-2]
    keep = allowed(sq, sk, causal, window, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.to(compute_dtype)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p / torch.where(denom == 0, torch.ones_like(denom), denom), v.to(compute_dtype))
    return out.to(q.dtype)


def allowed(sq: int, sk: int, causal: bool, window: int, device) -> torch.Tensor:
    """[Sq, Sk] bool: which keys each query may see (causal offset Sk − Sq, sliding window)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (j <= i)
    if window > 0:
        keep = keep & (j > i - window)
    return keep


@torch.library.custom_op("turbofx::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
         is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """``scaled_dot_product_attention`` as one opaque op. AOTAutograd would otherwise decompose it
    (math form, or a device-specific flash/efficient kernel chosen at trace time); the torch.compile
    door wraps it so the attention pass sees it whole, as the export door does."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@sdpa.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("turbofx::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, mask: torch.Tensor | None, scale: float, causal: bool, window: int,
                     softcap: float, rope_q: bool, rope_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder step's attention with its prologue: RoPE on the new queries and keys (when
    ``rope_q``/``rope_k``; ``cos``/``sin`` broadcast to ``[B, 1, S_new, D]``), the new keys and
    values written into the caches at ``positions`` (dim 2), then ``attention`` over the updated
    caches. Functional: returns (out, updated k cache, updated v cache); the runtime updates the
    caches in place when the graph writes them back anyway."""
    return cached_attention_reference(q, k_new, v_new, k_cache, v_cache, positions, cos, sin, mask, scale, causal,
                                      window, softcap, rope_q, rope_k)


@cached_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, positions, cos, sin, mask, scale, causal, window, softcap, rope_q, rope_k):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],)), torch.empty_like(k_cache), torch.empty_like(v_cache)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split form, x·cos + rotate_half(x)·sin, over the first
    ``cos.shape[-1]`` dims (partial rotary: the rest pass through)."""
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    rotated = torch.cat((-xr[..., rd // 2:], xr[..., :rd // 2]), dim=-1)
    return torch.cat(((xr * cos + rotated * sin).to(x.dtype), rest), dim=-1)


def cached_attention_reference(q, k_new, v_new, k_cache, v_cache, positions, cos, sin, mask, scale, causal, window,
                               softcap, rope_q, rope_k, compute_dtype=torch.float32):
    if rope_q:
        q = rope_reference(q, cos, sin)
    if rope_k:
        k_new = rope_reference(k_new, cos, sin)
    k_cache = k_cache.index_copy(2, positions, k_new.to(k_cache.dtype))
    v_cache = v_cache.index_copy(2, positions, v_new.to(v_cache.dtype))
    out = attention_reference(q, k_cache, v_cache, mask, scale, causal, window, softcap, compute_dtype)
    return out, k_cache, v_cache


@torch.library.custom_op("turbofx::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                     causal: bool) -> torch.Tensor:
    """Attention over a packed batch: q [T, H, D], k/v [T, Hkv, D]; sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1] and attends only to itself (no padding anywhere)."""
    return varlen_reference(q, k, v, cu_seqlens, scale, causal)


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, scale, causal):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def varlen_reference(q, k, v, cu_seqlens, scale, causal, compute_dtype=torch.float32):
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, S, D]
            out[a:b] = attention_reference(*seq, None, scale, causal, 0, 0.0, compute_dtype)[0].transpose(0, 1)
    return out


@torch.library.custom_op("turbofx::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    query_start: torch.Tensor, seq_lens: torch.Tensor, scale: float, window: int,
                    softcap: float) -> torch.Tensor:
    """Causal attention of a packed batch over a paged KV cache (the serving engine's step).

    q [T, H, D]: the step's query rows, sequence s owning rows query_start[s]:query_start[s+1]
    (rows past query_start[-1] are padding and give zeros). k_cache/v_cache [num_pages, page_size,
    Hkv, D]; key j of sequence s lives in page block_table[s, j // page_size] at row
    j % page_size. seq_lens[s] keys exist after this step's write, so the n query rows of s sit at
    positions seq_lens[s] - n .. seq_lens[s] - 1 and each sees keys 0..its position (window > 0:
    only the last ``window`` of them). softcap > 0: scores are softcap·tanh(s/softcap)."""
    return paged_attention_reference(q, k_cache, v_cache, block_table, query_start, seq_lens, scale, window, softcap)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, query_start, seq_lens, scale, window, softcap):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))


def paged_attention_reference(q, k_cache, v_cache, block_table, query_start, seq_lens, scale, window, softcap,
                              compute_dtype=torch.float32):
    out = torch.zeros(q.shape[:-1] + (v_cache.shape[-1],), dtype=q.dtype, device=q.device)
    page = k_cache.shape[1]
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        n, keys = b - a, lens[s]
        if n <= 0 or keys <= 0:
            continue
        pages = block_table[s, :-(-keys // page)].long()
        k = k_cache[pages].flatten(0, 1)[:keys]  # [keys, Hkv, D]
        v = v_cache[pages].flatten(0, 1)[:keys]
        seq = [t.transpose(0, 1)[None] for t in (q[a:b], k, v)]  # [1, heads, rows, D]
        out[a:b] = attention_reference(*seq, None, scale, True, window, softcap, compute_dtype)[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------- autograd
# turbofx's programs are inference-only, but a training graph may still reach these ops (a model
# or a test calling them, a graph AOTAutograd differentiates). Their backward recomputes the
# differentiable reference under autograd and takes its vector-Jacobian product: right gradients
# at the cost of one more forward, never a silent "no grad_fn".

def _register_recompute_backward(op, reference) -> None:
    def setup_context(ctx, inputs, output):
        tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs]
        ctx.save_for_backward(*tensors)
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        args, wrt = [], []
        for i, (t, other) in enumerate(zip(saved, ctx.others)):
            if t is not None and ctx.needs_input_grad[i] and t.dtype.is_floating_point:
                t = t.detach().requires_grad_(True)
                wrt.append((i, t))
            args.append(t if t is not None else other)
        if not wrt:
            return tuple(None for _ in saved)
        with torch.enable_grad():
            out = reference(*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wrt], [g for _, g in pairs],
                                    allow_unused=True)
        result = [None] * len(saved)
        for (i, _), g in zip(wrt, found):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


_register_recompute_backward(attention, attention_reference)
_register_recompute_backward(sdpa, lambda q, k, v, m, p, c, s, g: torch.nn.functional.scaled_dot_product_attention(
    q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s, enable_gqa=g))
_register_recompute_backward(cached_attention, cached_attention_reference)
_register_recompute_backward(varlen_attention, varlen_reference)
_register_recompute_backward(paged_attention, paged_attention_reference)


# ---------------------------------------------------------------- gemm
# One matmul with the work the GEMM family fuses around it (casts and an RMSNorm before it; bias,
# activation, SwiGLU, residual add and output cast after it), as one op so codegen sees intent.
# The spec travels as canonical JSON text: the op's schema stays fixed while the spec grows.

def gemm_spec_text(spec) -> str:
    """Canonical JSON text of a ``GemmSpec`` (dtypes by name; nested records as objects)."""
    import dataclasses
    import json

    def enc(v):
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if dataclasses.is_dataclass(v):
            return {"$" + type(v).__name__: {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        return v

    return json.dumps(enc(spec), sort_keys=True, separators=(",", ":"))


def gemm_spec_of(text: str):
    """The ``GemmSpec`` a ``gemm_spec_text`` describes."""
    return _spec_of(text)


@functools.lru_cache(maxsize=None)
def _spec_of(text: str):
    import json

    from turbofx.codegen import gemm as g

    records = {"GemmSpec": g.GemmSpec, "RmsNorm": g.RmsNorm, "WeightQuant": g.WeightQuant}  # all a spec holds

    def dec(v):
        if isinstance(v, dict):
            (k, inner), = v.items()
            if k == "$dtype":
                dtype = getattr(torch, inner, None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"turbofx::gemm spec names an unknown dtype {inner!r}")
                return dtype
            if k[1:] not in records:
                raise ValueError(f"turbofx::gemm spec names an unknown record {k[1:]!r}")
            return records[k[1:]](**{f: dec(x) for f, x in inner.items()})
        return v

    return dec(json.loads(text))


def gemm_out_shape(a_shape, b_shape, spec) -> tuple:
    n = b_shape[-2] if spec.b_layout == "nk" else b_shape[-1]
    return (*a_shape[:-1], n // 2 if spec.swiglu else n)


@torch.library.custom_op("turbofx::gemm", mutates_args=())
def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
         norm_weight: torch.Tensor | None, b_scale: torch.Tensor | None, b_min: torch.Tensor | None,
         spec: str) -> torch.Tensor:
    """``epilogue(prologue(a) @ b)`` as the ``GemmSpec`` in ``spec`` says: a [*, K], its leading
    dims the rows (batched: [Bt, M, K]); b [N, K] (``b_layout="nk"``, an nn.Linear weight) or [K, N]; bias [N];
    residual like the output; norm_weight [K] (RMSNorm prologue); a quantized b (the spec's
    ``WeightQuant``) is q with its b_scale / b_min. The reference is eager's semantics, rounding
    included."""
    return _gemm_reference(a, b, bias, residual, norm_weight, b_scale, b_min, spec)


@gemm.register_fake
def _(a, b, bias, residual, norm_weight, b_scale, b_min, spec):
    s = gemm_spec_of(spec)
    return a.new_empty(gemm_out_shape(a.shape, b.shape, s), dtype=s.out_type)


def _gemm_reference(a, b, bias, residual, norm_weight, b_scale, b_min, spec):
    """The op's semantics: unbatched, A's leading dims are rows ([*, K] -> [*, N])."""
    from turbofx.codegen.gemm import gemm_reference

    s = gemm_spec_of(spec)
    out_shape = gemm_out_shape(a.shape, b.shape, s)
    if not s.batched:  # explicit row count: -1 is ambiguous when K or N is 0
        rows = math.prod(a.shape[:-1])
        a = a.reshape(rows, a.shape[-1])
        residual = residual.reshape(rows, residual.shape[-1]) if residual is not None else None
    out = gemm_reference(a, b, s, bias=bias, residual=residual, norm_weight=norm_weight, b_scale=b_scale, b_min=b_min)
    return out.reshape(out_shape)


_register_recompute_backward(gemm, _gemm_reference)


# ---------------------------------------------------------------- quantization
# The quantize pass writes quantized weights as ``dequant_weight(q, scale, min)`` feeding the
# matmul (and W8A8 / FP8-dynamic activations as ``quantize_rows(x)``): the graph then still says
# what it computes, eagerly, while the matmul pass folds both into the GEMM's prologue so no
# dequantized copy is ever made. ``spec`` is canonical JSON of a ``QuantText``.

def quant_text(fmt, dtype: torch.dtype, k: int) -> str:
    """The spec text of ``dequant_weight``: the WeightQuant, the output dtype, K (uint4 packs it)."""
    import json

    return json.dumps({"fmt": json.loads(gemm_spec_text(fmt)), "dtype": str(dtype).removeprefix("torch."), "k": k},
                      sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=None)
def quant_of(text: str):
    """(WeightQuant, dtype, K) of a ``quant_text``."""
    import json

    d = json.loads(text)
    fmt = _spec_of(json.dumps(d["fmt"]))
    dtype = getattr(torch, d["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"turbofx::dequant_weight spec names an unknown dtype {d['dtype']!r}")
    return fmt, dtype, int(d["k"])


@torch.library.custom_op("turbofx::dequant_weight", mutates_args=())
def dequant_weight(q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None, spec: str) -> torch.Tensor:
    """A quantized [N, K] weight dequantized (``WeightQuant``'s formula in fp32, rounded to the
    spec's dtype). The matmul pass folds it into a GEMM's prologue; run alone, it makes the copy."""
    from turbofx.codegen.gemm import dequantize_weight

    fmt, dtype, k = quant_of(spec)
    return dequantize_weight(q, fmt, scale, min, k, torch.float32).to(dtype)


@dequant_weight.register_fake
def _(q, scale, min, spec):
    fmt, dtype, k = quant_of(spec)
    return q.new_empty((q.shape[0], k), dtype=dtype)


@torch.library.custom_op("turbofx::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, act: str) -> torch.Tensor:
    """x fake-quantized per row over its last dim (dynamic int8 / fp8: ``gemm.quantize_rows``'s
    q times its row scale, in x's dtype): what a W8A8 / FP8-dynamic matmul sees of its input."""
    from turbofx.codegen.gemm import quantize_rows as quantize

    q, scale = quantize(x, act, torch.float32)
    return (q * scale[..., None]).to(x.dtype)


@quantize_rows.register_fake
def _(x, act):
    return torch.empty_like(x)


@torch.library.custom_op("turbofx::dequant_rows", mutates_args=())
def dequant_rows(q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None, ids: torch.Tensor,
                 spec: str) -> torch.Tensor:
    """``embedding(dequant_weight(q, scale, min), ids)`` without the whole table: the rows of q,
    scale and min that ``ids`` names are gathered, then dequantized ([*ids.shape, K])."""
    from turbofx.codegen.gemm import dequantize_weight

    fmt, dtype, k = quant_of(spec)
    flat = ids.reshape(-1)
    rows = dequantize_weight(q[flat], fmt, scale[flat], min[flat] if min is not None else None, k, torch.float32)
    return rows.to(dtype).reshape(*ids.shape, k)


@dequant_rows.register_fake
def _(q, scale, min, ids, spec):
    fmt, dtype, k = quant_of(spec)
    return q.new_empty((*ids.shape, k), dtype=dtype)
