"""attention: scaled_dot_product_attention -> one ``turbofx::attention`` node carrying the
semantics (scale, causal, window, softcap, mask, grouped-query heads).

Grouped-query attention written as HF's ``repeat_kv`` (unsqueeze → expand → clone → view) is
read through: the node takes the shared KV heads and the kernel indexes them, so the repeated
copy disappears. Invariant: the replacement produces the same values with the same layout
(``meta["val"]`` is the replaced node's); refused candidates are recorded with the reason.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import turbofx.runtime.ops  # noqa: F401  (registers torch.ops.turbofx.attention)
from turbofx.codegen.indexing import same, to_expr, val
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal
from turbofx.runtime.op_args import AttentionArgs, SdpaArgs

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _shared_kv(x: fx.Node) -> tuple[fx.Node, int]:
    """(KV tensor, groups) when ``x`` is KV heads repeated by unsqueeze/expand/clone/view."""
    if x.target not in _RESHAPES:
        return x, 1
    inner = x.args[0]
    if inner.target is aten.clone.default:
        inner = inner.args[0]
    if inner.target is not aten.expand.default or inner.args[0].target is not aten.unsqueeze.default:
        return x, 1
    unsq = inner.args[0]
    base = unsq.args[0]
    b, e = val(base), val(inner)
    if b is None or e is None or b.dim() != 4 or e.dim() != 5 or unsq.args[1] % 5 != 2:
        return x, 1
    if list(e.shape[:2]) != list(b.shape[:2]) or list(e.shape[3:]) != list(b.shape[2:]):
        return x, 1
    return base, int(e.shape[2])


def _refusal(q, k, v, mask, dropout) -> Refusal | None:
    if dropout not in (0, 0.0):
        return Refusal("dropout", f"dropout_p={dropout} (inference attention only)")
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        return Refusal("rank", "q, k, v are not [B, H, S, D]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return Refusal("dtype", f"dtypes {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[-1] != v.shape[-1] or q.shape[-1] != k.shape[-1]:
        return Refusal("head-dims-differ", "head dims of q, k, v differ")
    if isinstance(q.shape[-1], int) and q.shape[-1] > 256:
        return Refusal("head-dim-too-large", f"head dim {q.shape[-1]} > 256")
    if mask is not None and (mask.dim() > 4 or mask.dtype not in (torch.bool, q.dtype, torch.float32)):
        return Refusal("mask", f"mask of rank {mask.dim()} / dtype {mask.dtype}")
    return None


def _skip_copies(x: fx.Node) -> fx.Node:
    """Read through value-preserving copies (contiguous clones) that make a view legal."""
    while x.target is aten.clone.default:
        x = x.args[0]
    return x


def _unbatch(x: fx.Node) -> fx.Node | None:
    """The 4-D tensor behind bmm's operand view([B*H, S, D]) <- [expand] <- X[B, H, S, D]."""
    if x.target not in _RESHAPES:
        return None
    inner = _skip_copies(x.args[0])
    if inner.target is aten.expand.default:
        if list(val(inner.args[0]).shape) != list(val(inner).shape):
            return None  # a real broadcast: not a plain batch of heads
        inner = _skip_copies(inner.args[0])
    t = val(inner)
    return inner if t is not None and t.dim() == 4 else None


def _softmax_input(p: fx.Node) -> fx.Node | None:
    """x when p is softmax(x, -1) written as exp(x - amax(x)) / sum(exp(...)) (casts allowed)."""
    while p.target in (aten.clone.default, aten._to_copy.default):
        p = p.args[0]
    if p.target is not aten.div.Tensor:
        return None
    e, s = p.args
    if not (isinstance(s, fx.Node) and s.target is aten.sum.dim_IntList and s.args[0] is e):
        return None
    if e.target is not aten.exp.default or e.args[0].target is not aten.sub.Tensor:
        return None
    x, mx = e.args[0].args
    if not (isinstance(mx, fx.Node) and mx.target is aten.amax.default and mx.args[0] is x):
        return None
    return x


def _scores(x: fx.Node):
    """Peel mask, scale and softcap off the scores: (q, k, scale, mask, softcap) or None."""
    mask, scale, softcap = None, 1.0, 0.0
    while x.target is aten._to_copy.default:
        x = x.args[0]
    if x.target is aten.add.Tensor and isinstance(x.args[1], fx.Node) and val(x.args[1]) is not None:
        x, mask = x.args
    if x.target is aten.mul.Tensor and x.args[1].__class__ is float and isinstance(x.args[0], fx.Node) \
            and x.args[0].target is aten.tanh.default:  # softcap * tanh(s / softcap)
        softcap = x.args[1]
        inner = x.args[0].args[0]
        if inner.target is aten.div.Tensor and inner.args[1] == softcap:
            x = inner.args[0]
        elif inner.target is aten.mul.Tensor and isinstance(inner.args[1], float) and abs(inner.args[1] * softcap - 1) < 1e-6:
            x = inner.args[0]
        else:
            return None
    while x.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        scale = scale * x.args[1] if x.target is aten.mul.Tensor else scale / x.args[1]
        x = x.args[0]
    if x.target not in _RESHAPES or x.args[0].target is not aten.bmm.default:
        return None
    q, kt = (_unbatch(a) for a in x.args[0].args)
    if q is None or kt is None or kt.target is not aten.permute.default or list(kt.args[1]) != [0, 1, 3, 2]:
        return None
    return q, kt.args[0], scale, mask, softcap


def _match_decomposed(n: fx.Node):
    """view(bmm(softmax(scores), V)) -> (q, k, v, scale, mask, softcap) or None."""
    if n.target not in _RESHAPES or n.args[0].target is not aten.bmm.default or val(n) is None or val(n).dim() != 4:
        return None
    p, v = (_unbatch(a) for a in n.args[0].args)
    if p is None or v is None:
        return None
    x = _softmax_input(p)
    found = _scores(x) if x is not None else None
    if found is None:
        return None
    q, k, scale, mask, softcap = found
    return q, k, v, scale, mask, softcap


def attention(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("attention")
    g = gm.graph
    for n in list(g.nodes):
        found = _match_decomposed(n) if n.target in _RESHAPES else None
        if found is not None:
            q, k, v, scale, mask, softcap = found
            why = _refusal(val(q), val(k), val(v), val(mask) if mask is not None else None, 0.0)
            if why:
                rec.refuse(n, why.within("decomposed attention"))
                continue
            if not ctx.fuel.take(f"{n.name} (matmul-softmax-matmul) -> turbofx::attention"):
                rec.refuse(n, ctx.fuel.refusal)
                continue
            _replace(g, n, q, k, v, mask, scale, False, softcap, rec, "matmul-softmax-matmul")
            continue
        if n.target not in (aten.scaled_dot_product_attention.default, torch.ops.turbofx.sdpa.default):
            continue
        a = SdpaArgs.of(n)
        q, k, v, mask = a.q, a.k, a.v, a.attn_mask
        why = _refusal(val(q), val(k), val(v), val(mask) if mask is not None else None, a.dropout_p)
        if why:
            rec.refuse(n, why)
            continue
        causal = bool(a.is_causal)
        if causal and not same(to_expr(val(q).shape[-2]), to_expr(val(k).shape[-2])):
            rec.refuse(n, Refusal("causal-top-left", "is_causal with Sq != Sk: SDPA aligns the causal mask "
                                                     "top-left, the kernel bottom-right (a KV cache's convention)"))
            continue
        scale = a.scale or 1.0 / math.sqrt(val(q).shape[-1])
        if not ctx.fuel.take(f"{n.name} (sdpa) -> turbofx::attention"):
            rec.refuse(n, ctx.fuel.refusal)
            continue
        _replace(g, n, q, k, v, mask, scale, causal, 0.0, rec, "sdpa")
    g.eliminate_dead_code()
    return rec


def _replace(g: fx.Graph, n: fx.Node, q, k, v, mask, scale: float, causal: bool, softcap: float,
             rec: PassRecord, form: str) -> None:
    k_base, gk = _shared_kv(k)
    v_base, gv = _shared_kv(v)
    if gk != gv:
        k_base, v_base, gk = k, v, 1
    with g.inserting_before(n):
        new = AttentionArgs(q=q, k=k_base, v=v_base, mask=mask, scale=float(scale), causal=causal, window=0,
                            softcap=float(softcap)).call_function(g)
    new.meta["val"] = n.meta["val"]
    n.replace_all_uses_with(new)
    g.erase_node(n)
    rec.matched.append(f"{n.name} ({form}): scale {scale:.4g}, causal {causal}, softcap {softcap:g}, "
                       f"mask {'none' if mask is None else val(mask).dtype}, kv groups {gk}")
