"""reinplace: functional cache updates whose results are written back into the caches anyway run
in place (no copy of the whole cache, no write-back copy). Runs last: an update fused into a
kernel is not a separate write.

``v = index_put(p, ...)`` / ``index_copy`` written back into the input ``p`` (also through
reshaping views of ``p`` and of ``v``: the serving engine's paged cache is written through its
flattened ``[pages * page_size, heads, dim]`` view); ``cached_attention(...,
Kc, Vc, ...)`` whose updated caches (results 1 and 2) are written back into ``Kc`` and ``Vc``.
Safe when no other reader of an old cache depends on the update (lowering orders those readers
before it).

Invariant: the graph is unchanged; the chosen updates carry ``meta["turbofx_inplace"] = True``,
which lowering honours (the step writes into its input; the write-back is then free).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from turbofx.passes.manager import PassContext, PassRecord
from turbofx.runtime.op_args import CachedAttentionArgs

aten = torch.ops.aten
CACHED = torch.ops.turbofx.cached_attention.default
INPLACE = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}
INPLACE_KEY = "turbofx_inplace"


def flat_outputs(output: fx.Node) -> list:
    outs = output.args[0]
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def writes_arg0(n: fx.Node) -> bool:
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or not t._schema.arguments:
        return False
    info = t._schema.arguments[0].alias_info
    return info is not None and info.is_write


def descendants(v: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(v.users)
    while stack:
        x = stack.pop()
        if x not in seen:
            seen.add(x)
            stack.extend(x.users)
    return seen


def overwritten(w: fx.Node) -> list[fx.Node]:
    """The inputs an in-place step overwrites."""
    if w.target is CACHED:
        c = CachedAttentionArgs.of(w)
        return [c.k_cache, c.v_cache]
    return [w.args[0]]


VIEWS = (aten.view.default, aten._unsafe_view.default)


def through_views(n):
    """The tensor ``n`` is a reshaping view of (itself if it is none): a view of a placeholder or of
    an update's result shares its memory, so writing through it writes the whole tensor."""
    while isinstance(n, fx.Node) and n.target in VIEWS:
        n = n.args[0]
    return n


def reinplaceable(g: fx.Graph, write_backs: dict[fx.Node, fx.Node], region_of: dict) -> set[fx.Node]:
    """Functional cache updates whose results are written back into the caches anyway: run them
    in place (no copy of the whole cache, no write-back copy). ``v = index_put(p, ...)`` written
    back into ``p``; ``cached_attention(..., Kc, Vc, ...)`` whose updated caches (results 1 and 2)
    are written back into ``Kc`` and ``Vc``. Safe when no other reader of an old cache depends on
    the update (those readers are ordered before it)."""
    updates: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {}  # writer -> [(updated value, cache)]
    for v, p in write_backs.items():
        u = through_views(v)  # a paged cache is updated through a flattened view of it
        if u.target in INPLACE and u not in region_of:
            updates.setdefault(u, []).append((v, p))
        elif v.target is operator.getitem and v.args[0].target is CACHED and v.args[1] in (1, 2):
            updates.setdefault(v.args[0], []).append((v, p))
    out = set()
    for w, pairs in updates.items():
        caches = [through_views(c) for c in overwritten(w)]
        if sorted(id(p) for _, p in pairs) != sorted(id(c) for c in caches):
            continue  # only part of the update is written back
        if any(p.op != "placeholder" for p in caches) or len(set(caches)) != len(caches):
            continue
        if w.target is CACHED and any(p is not overwritten(w)[v.args[1] - 1] for v, p in pairs):
            continue
        later = descendants(w)
        if not any(u in later for p in caches for u in p.users if u is not w and not writes_arg0(u)):
            out.add(w)
    return out


def write_backs(g: fx.Graph, output: fx.Node, mutated_outputs: dict[int, fx.Node]) -> dict[fx.Node, fx.Node]:
    """value -> the input it is written back into (export: mutation outputs; AOT: copy_ nodes)."""
    outs = flat_outputs(output)
    wb = {outs[i]: p for i, p in mutated_outputs.items() if isinstance(outs[i], fx.Node)}
    for n in g.nodes:
        if n.target is aten.copy_.default and isinstance(n.args[1], fx.Node):
            wb[n.args[1]] = n.args[0]
    return wb



def reinplace(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("reinplace")
    g = gm.graph
    output = next(n for n in g.nodes if n.op == "output")
    region_of = {m: r for r in ctx.regions for m in r.nodes}
    for n in g.nodes:
        n.meta.pop(INPLACE_KEY, None)
    for w in sorted(reinplaceable(g, write_backs(g, output, ctx.mutated_outputs), region_of),
                    key=list(g.nodes).index):
        if not ctx.fuel.take(f"run {w.name} ({w.target}) in place"):
            rec.refuse(w, ctx.fuel.refusal)
            continue
        w.meta[INPLACE_KEY] = True
        rec.matched.append(f"{w.name}: in place into {', '.join(p.name for p in overwritten(w))}")
    return rec


reinplace.pass_name = "reinplace"
