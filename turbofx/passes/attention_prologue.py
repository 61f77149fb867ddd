"""attention_prologue: fold a decoder step's KV-cache write and RoPE into its attention node.

A step written the usual way — ``q = rope(q_raw)``, ``k = rope(k_raw)``, ``K = index_put(Kc, [.., .., pos], k)``,
``V = index_put(Vc, [.., .., pos], v)``, ``attention(q, K, V, ...)`` — becomes one
``turbofx::cached_attention(q_raw, k_raw, v, Kc, Vc, pos, cos, sin, ...)`` node whose results are
(attention out, K, V). The kernel then applies RoPE while loading the new rows, writes them into
the cache and reads the cache once: no separate rope, index_put or cache-update launches.

Matched by semantics: the cache update is ``index_put``/``index_copy`` along the sequence dim (2)
of ``[B, Hkv, S, D]`` with one 1-D position tensor shared by K and V, and the new rows are the
query rows; RoPE is the half-split form ``x·cos + rotate_half(x)·sin`` with cos/sin broadcast
over heads. A step without RoPE (learned positions) still fuses its cache write.
Invariant: same values and layouts (the node's results carry the replaced nodes' ``meta["val"]``);
every attention node over a cache update that is not fused is recorded with the reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import turbofx.runtime.ops  # noqa: F401  (registers torch.ops.turbofx.*)
from turbofx.codegen.indexing import same, to_expr, val
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal
from turbofx.runtime.op_args import AttentionArgs, CachedAttentionArgs

aten = torch.ops.aten
ATTENTION = torch.ops.turbofx.attention.default
_INT_MAX = 2**63 - 1


def _cache_write(x: fx.Node):
    """(cache, positions, new rows) when x = cache with rows ``positions`` of dim 2 replaced."""
    if x.target is aten.index_put.default:
        cache, indices, rows = x.args[:3]
        accumulate = x.args[3] if len(x.args) > 3 else x.kwargs.get("accumulate", False)
        if accumulate or len(indices) != 3 or indices[0] is not None or indices[1] is not None:
            return None
        pos = indices[2]
    elif x.target is aten.index_copy.default:
        cache, dim, pos, rows = x.args
        if dim % 4 != 2:
            return None
    else:
        return None
    c, p, r = val(cache), val(pos), val(rows)
    if c is None or p is None or r is None or c.dim() != 4 or p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
        return None
    if r.dim() != 4 or r.dtype != c.dtype or not all(_eq(r.shape[i], c.shape[i]) for i in (0, 1, 3)):
        return None  # a broadcast write: not one row per position
    return cache, pos, rows


def _eq(a, b) -> bool:
    """Sizes equal for every value of their symbols (no guard on a hint)."""
    return same(to_expr(a), to_expr(b))


def _half(x: fx.Node, d: int, first: bool) -> fx.Node | None:
    """y when x = y[..., :d] (first) or y[..., d:] (not first)."""
    if x.target is not aten.slice.Tensor or len(x.args) < 4:
        return None
    y, dim, start, end = x.args[:4]
    if len(x.args) > 4 and x.args[4] != 1 or val(y) is None or dim % val(y).dim() != val(y).dim() - 1:
        return None
    full = val(y).shape[-1]
    ok = (start == 0 and end == d) if first else (start == d and end in (full, _INT_MAX))
    return y if ok else None


def _rotated(r: fx.Node) -> fx.Node | None:
    """x when r = rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])."""
    if r.target is not aten.cat.default or len(r.args[0]) != 2 or val(r) is None:
        return None
    if (r.args[1] if len(r.args) > 1 else 0) % val(r).dim() != val(r).dim() - 1:
        return None
    neg, first = r.args[0]
    d = val(r).shape[-1]
    if not isinstance(d, int) or d % 2 or neg.target is not aten.neg.default:
        return None
    x = _half(first, d // 2, True)
    return x if x is not None and _half(neg.args[0], d // 2, False) is x else None


def _per_position(t: fx.Node, x: fx.Node) -> bool:
    """cos/sin: [B or 1, 1, S, D], one row per position shared by every head."""
    c, v = val(t), val(x)
    return (c is not None and c.dim() == 4 and _eq(c.shape[1], 1) and (_eq(c.shape[0], 1) or _eq(c.shape[0], v.shape[0]))
            and _eq(c.shape[2], v.shape[2]) and _eq(c.shape[3], v.shape[3]) and c.dtype.is_floating_point)


def _rope(y: fx.Node):
    """(x, cos, sin) when y is x rotated over its first cos.shape[-1] dims: x·cos + rotate_half(x)·sin,
    or, partial rotary, cat(that over x[..., :r], x[..., r:])."""
    if y.target is aten.cat.default and len(y.args[0]) == 2 and val(y) is not None \
            and (y.args[1] if len(y.args) > 1 else 0) % val(y).dim() == val(y).dim() - 1:
        turned, rest = y.args[0]
        found = _full_rope(turned)
        if found is None:
            return None
        x_rot, cos, sin = found
        r = val(x_rot).shape[-1]
        x = _half(rest, r, False)
        if x is None or not (x_rot is x or _half(x_rot, r, True) is x):
            return None
        return x, cos, sin
    return _full_rope(y)


def _full_rope(y: fx.Node):
    """(x, cos, sin) when y = x·cos + rotate_half(x)·sin."""
    if y.target is not aten.add.Tensor or not all(isinstance(a, fx.Node) for a in y.args[:2]):
        return None
    for plain, turned in (y.args[:2], y.args[1::-1]):
        if plain.target is not aten.mul.Tensor or turned.target is not aten.mul.Tensor:
            continue
        for x, cos in (plain.args, plain.args[::-1]):
            for r, sin in (turned.args, turned.args[::-1]):
                if not (isinstance(x, fx.Node) and isinstance(r, fx.Node) and isinstance(cos, fx.Node)
                        and isinstance(sin, fx.Node)):
                    continue
                if _rotated(r) is x and _per_position(cos, x) and _per_position(sin, x):
                    return x, cos, sin
    return None


def attention_prologue(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("attention_prologue")
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in list(g.nodes):
        if n.target is not ATTENTION:
            continue
        a = AttentionArgs.of(n)
        q, k, v = a.q, a.k, a.v
        kw, vw = _cache_write(k), _cache_write(v)
        if kw is None and vw is None:
            continue
        why = _refusal(n, q, k, v, kw, vw, order)
        if why:
            rec.refuse(n, why.within("cache write not fused"))
            continue
        if not ctx.fuel.take(f"{n.name}: cache write and rope fused -> turbofx::cached_attention"):
            rec.refuse(n, ctx.fuel.refusal)
            continue
        (k_cache, pos, k_new), (v_cache, _, v_new) = kw, vw
        rq, rk = _rope(q), _rope(k_new)
        if rq is not None and rk is not None and rq[1:] != rk[1:]:
            rk = None  # q and k rotated by different tables: keep k's rotation in the graph
        cos, sin = (rq or rk or (None, None, None))[1:]
        q_in = rq[0] if rq else q
        k_in = rk[0] if rk else k_new
        with g.inserting_before(n):
            fused = CachedAttentionArgs(q=q_in, k_new=k_in, v_new=v_new, k_cache=k_cache, v_cache=v_cache,
                                        positions=pos, cos=cos, sin=sin, mask=a.mask, scale=a.scale,
                                        causal=a.causal, window=a.window, softcap=a.softcap,
                                        rope_q=rq is not None, rope_k=rk is not None).call_function(g)
            fused.meta["val"] = (val(n), val(k), val(v))
            parts = [g.call_function(operator.getitem, (fused, i)) for i in range(3)]
        for part, old in zip(parts, (n, k, v)):
            part.meta["val"] = val(old)
            old.replace_all_uses_with(part)
        for old in (n, k, v):
            g.erase_node(old)
        rec.matched.append(f"{n.name}: cache write at {pos.name} fused; rope q {'yes' if rq else 'no'}, "
                           f"rope k {'yes' if rk else 'no'}")
    g.eliminate_dead_code()
    return rec


def _refusal(n: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, kw, vw, order: dict) -> Refusal | None:
    if kw is None or vw is None:
        return Refusal("one-sided-cache-write", "only one of k, v is a cache update")
    if kw[1] is not vw[1]:
        return Refusal("positions-differ", "k and v are written at different positions")
    if not _eq(val(kw[2]).shape[2], val(q).shape[2]):
        return Refusal("rows-not-queries", "the new rows are not the query rows")
    early = [u.name for x in (k, v) for u in x.users if u is not n and order[u] < order[n]]
    if early:
        return Refusal("cache-read-early", f"the updated cache is read before the attention ({', '.join(early)})")
    return None
