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
from turbofx.codegen.indexing import val
from turbofx.passes.manager import PassContext, PassRecord

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


def _refusal(q, k, v, mask, dropout) -> str | None:
    if dropout not in (0, 0.0):
        return f"dropout_p={dropout} (inference attention only)"
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        return "q, k, v are not [B, H, S, D]"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] != k.shape[-1]:
        return "head dims of q, k, v differ"
    if isinstance(q.shape[-1], int) and q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if mask is not None and (mask.dim() > 4 or mask.dtype not in (torch.bool, q.dtype, torch.float32)):
        return f"mask of rank {mask.dim()} / dtype {mask.dtype}"
    return None


def attention(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("attention")
    g = gm.graph
    for n in list(g.nodes):
        if n.target is not aten.scaled_dot_product_attention.default:
            continue
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        a = dict(zip(names, n.args))
        a.update(n.kwargs)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        why = _refusal(val(q), val(k), val(v), val(mask) if mask is not None else None, a.get("dropout_p", 0.0))
        if why:
            rec.refused.append((n.name, why))
            continue
        k_base, gk = _shared_kv(k)
        v_base, gv = _shared_kv(v)
        if gk != gv:
            k_base, v_base, gk = k, v, 1
        scale = a.get("scale") or 1.0 / math.sqrt(val(q).shape[-1])
        with g.inserting_before(n):
            new = g.call_function(torch.ops.turbofx.attention.default,
                                  (q, k_base, v_base, mask, float(scale), bool(a.get("is_causal", False)), 0, 0.0))
        new.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(new)
        g.erase_node(n)
        rec.matched.append(f"{n.name}: scale {scale:.4g}, causal {bool(a.get('is_causal', False))}, "
                           f"mask {'none' if mask is None else val(mask).dtype}, kv groups {gk}")
    g.eliminate_dead_code()
    return rec
