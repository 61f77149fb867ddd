"""Lowering: FX graph + fusion regions -> Program data + kernel sources.

Regions become kernel launches; every other op becomes an extern ATen call (views are free
aliases; anything without a template is recorded with its reason). Units are scheduled in a
topological order of the region-contracted graph; buffer lifetimes are planned so a kernel
output reuses a dead buffer of the same shape, strides and dtype.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from turbofx.codegen import attention as attention_template
from turbofx.codegen import indexing as ix
from turbofx.codegen.kernel import KernelSpec, generate
from turbofx.codegen.region import Region
from turbofx.codegen.target import Target
from turbofx.errors import CodegenError
from turbofx.runtime import ops as _ops  # noqa: F401  (torch.ops.turbofx.*)

aten = torch.ops.aten
ATTENTION = torch.ops.turbofx.attention.default
VARLEN = torch.ops.turbofx.varlen_attention.default
CACHED = torch.ops.turbofx.cached_attention.default
_INPLACE = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}


def val_int(s) -> int:
    """A size's value: concrete, or its hint when symbolic (tile choice only)."""
    return s if isinstance(s, int) else s.node.hint


@dataclass
class KernelRecord:
    name: str
    kind: str  # pointwise | reduction | extern
    label: str = ""
    nodes: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class Lowered:
    program: dict
    sources: dict[str, str]
    kernels: list[KernelRecord]
    slots: dict[int, str] = field(default_factory=dict)  # value slot -> FX node name (verify="kernels")


def op_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._schema.name.split('::')[1]}.{target._overloadname}"
    raise CodegenError(f"cannot call {target!r} from a Program")


def _extern_reason(n: fx.Node, refusals: dict[str, str]) -> str:
    if ix.is_view(n):
        return "view (alias, no copy)"
    if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        return "matmul: vendor BLAS through ATen"
    if n.target is aten.embedding.default:
        return "embedding gather through ATen"
    if n.target is operator.getitem:
        return "tuple element"
    return refusals.get(n.name, "no kernel template")


def _writes_arg0(n: fx.Node) -> bool:
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or not t._schema.arguments:
        return False
    info = t._schema.arguments[0].alias_info
    return info is not None and info.is_write


def _is_scalar(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), (torch.SymInt, int)) and not isinstance(n.meta.get("val"), bool)


def _descendants(v: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(v.users)
    while stack:
        x = stack.pop()
        if x not in seen:
            seen.add(x)
            stack.extend(x.users)
    return seen


def _overwritten(w: fx.Node) -> list[fx.Node]:
    """The inputs an in-place step overwrites."""
    return [w.args[3], w.args[4]] if w.target is CACHED else [w.args[0]]


def _reinplaceable(g: fx.Graph, write_backs: dict[fx.Node, fx.Node], region_of: dict) -> set[fx.Node]:
    """Functional cache updates whose results are written back into the caches anyway: run them
    in place (no copy of the whole cache, no write-back copy). ``v = index_put(p, ...)`` written
    back into ``p``; ``cached_attention(..., Kc, Vc, ...)`` whose updated caches (results 1 and 2)
    are written back into ``Kc`` and ``Vc``. Safe when no other reader of an old cache depends on
    the update (those readers are ordered before it)."""
    updates: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {}  # writer -> [(updated value, cache)]
    for v, p in write_backs.items():
        if v.target in _INPLACE and v not in region_of:
            updates.setdefault(v, []).append((v, p))
        elif v.target is operator.getitem and v.args[0].target is CACHED and v.args[1] in (1, 2):
            updates.setdefault(v.args[0], []).append((v, p))
    out = set()
    for w, pairs in updates.items():
        caches = _overwritten(w)
        if sorted(id(p) for _, p in pairs) != sorted(id(c) for c in caches):
            continue  # only part of the update is written back
        if any(p.op != "placeholder" for p in caches) or len(set(caches)) != len(caches):
            continue
        if w.target is CACHED and any(p is not w.args[3 + (v.args[1] - 1)] for v, p in pairs):
            continue
        later = _descendants(w)
        if not any(u in later for p in caches for u in p.users if u is not w and not _writes_arg0(u)):
            out.add(w)
    return out


def _share_storage(storage_root: dict[int, int], value: int, bases: set[int]) -> None:
    """``value`` aliases the storage of ``bases`` (roots of input slots): conservatively keep every
    possible base alive together."""
    top = min(bases)
    if len(bases) > 1:
        for r in bases:
            storage_root[r] = top
    storage_root[value] = top


def _attention_args(n: fx.Node) -> tuple:
    """(q, k, v, mask, scale, causal, window, softcap) of an attention node; for a cached one, k
    and v are the caches (updated by the step before its attention reads them)."""
    if n.target is CACHED:
        q, _, _, k_cache, v_cache, _, _, _, *rest = n.args
        return (q, k_cache, v_cache, *rest[:5])
    return tuple(n.args)


def _write_backs(g: fx.Graph, output: fx.Node, mutated_outputs: dict[int, fx.Node]) -> dict[fx.Node, fx.Node]:
    """value -> the input it is written back into (export: mutation outputs; AOT: copy_ nodes)."""
    outs = _flat_outputs(output)
    wb = {outs[i]: p for i, p in mutated_outputs.items() if isinstance(outs[i], fx.Node)}
    for n in g.nodes:
        if n.target is aten.copy_.default and isinstance(n.args[1], fx.Node):
            wb[n.args[1]] = n.args[0]
    return wb


def lower(gm: fx.GraphModule, regions: list[Region], target: Target, refusals: dict[str, str],
          mutated_outputs: dict[int, fx.Node] | None = None) -> Lowered:
    """``mutated_outputs``: graph output position -> the placeholder it is written back into."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    output = next(n for n in g.nodes if n.op == "output")
    region_of = {m: r for r in regions for m in r.nodes}
    specs = {id(r): generate(r, target.key, target.persistent_rmax) for r in regions}

    # which nodes need a value: graph outputs, extern args, kernel inputs (closure backwards)
    needed: set[fx.Node] = set()
    # in-place writes (AOT's copy_ of a mutated input) are effects: needed though nothing reads them
    inplace = _reinplaceable(g, _write_backs(g, output, mutated_outputs or {}), region_of)
    writes = [n for n in g.nodes if n.op == "call_function" and (_writes_arg0(n) or n in inplace)]
    work = [a for a in output.all_input_nodes] + writes
    while work:
        n = work.pop()
        if n in needed or _is_scalar(n):
            continue
        needed.add(n)
        if n in region_of:
            work.extend(specs[id(region_of[n])].inputs)
        elif n.op == "call_function":
            work.extend(a for a in n.all_input_nodes)
    units: dict = {}
    for n in g.nodes:
        if n in needed and n.op == "call_function":
            units.setdefault(id(region_of[n]) if n in region_of else id(n), region_of.get(n, n))

    def unit_deps(u) -> list:
        ins = specs[id(u)].inputs if isinstance(u, Region) else [a for a in u.all_input_nodes if not _is_scalar(a)]
        return [id(region_of.get(a, a)) for a in ins if a.op == "call_function"]

    dag = nx.DiGraph()
    for k, u in units.items():
        dag.add_node(k)
        for d in unit_deps(u):
            if d != k:
                dag.add_edge(d, k)
    for w in writes:  # a write comes after every other reader of the tensor it overwrites
        after = _descendants(w)
        for reader in (r for t in _overwritten(w) for r in t.users):
            r = id(region_of.get(reader, reader))
            if reader is not w and reader not in after and r in units and r != id(w):
                dag.add_edge(r, id(w))
    first = {k: (min(order[m] for m in u.nodes) if isinstance(u, Region) else order[u]) for k, u in units.items()}
    schedule = [units[k] for k in nx.lexicographical_topological_sort(dag, key=lambda k: first[k])]

    # value slots
    slot: dict[fx.Node, int] = {}
    for p in placeholders:
        slot[p] = len(slot)
    for u in schedule:
        for n in (specs[id(u)].outputs if isinstance(u, Region) else [u]):
            slot[n] = len(slot)

    def template(a):
        if isinstance(a, fx.Node):
            if _is_scalar(a):
                return {"$e": ix.pyexpr(ix.to_expr(a.meta["val"]))}
            return {"$v": slot[a]}
        if isinstance(a, torch.dtype):
            return {"$dtype": str(a).removeprefix("torch.")}
        if isinstance(a, torch.device):
            return {"$device": str(a)}
        if isinstance(a, torch.memory_format):
            return {"$mf": str(a).removeprefix("torch.")}
        if isinstance(a, torch.layout):
            return {"$layout": str(a).removeprefix("torch.")}
        if isinstance(a, float) and not math.isfinite(a):
            return {"$float": str(a)}
        if isinstance(a, tuple):
            return {"$tuple": [template(x) for x in a]}
        if isinstance(a, list):
            return [template(x) for x in a]
        if isinstance(a, dict):
            return {"$kw": {k: template(v) for k, v in a.items()}}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        raise CodegenError(f"cannot serialise argument {a!r} ({type(a).__name__})")

    steps, records, sources = [], [], {}
    storage_root: dict[int, int] = {slot[p]: slot[p] for p in placeholders}
    kernel_outputs: set[int] = set()
    uses: dict[int, list[int]] = {}
    defined_at: dict[int, int] = {}

    def define(i: int, n: fx.Node, reads) -> None:
        """Step ``i`` defines ``n``'s value and reads ``reads`` (None and scalars skipped)."""
        defined_at[slot[n]] = i
        for a in reads:
            if a is not None and a in slot:
                uses.setdefault(slot[a], []).append(i)
    for i, u in enumerate(schedule):
        if isinstance(u, Region):
            spec: KernelSpec = specs[id(u)]
            sources[spec.name] = spec.source
            ins = [slot[a] for a in spec.inputs]
            outs = [slot[o] for o in spec.outputs]
            allocs = []
            for o in spec.outputs:
                v = o.meta["val"]
                allocs.append({
                    "value": slot[o], "shape": [ix.pyexpr(e) for e in ix.shape_of(o)],
                    "stride": [ix.pyexpr(e) for e in ix.strides_of(o)],
                    "dtype": str(v.dtype).removeprefix("torch."), "device": str(v.device), "reuse": None})
                storage_root[slot[o]] = slot[o]
                kernel_outputs.add(slot[o])
                defined_at[slot[o]] = i
            steps.append({
                "type": "kernel", "kernel": spec.name, "args": ins + outs, "allocs": allocs,
                "size_args": spec.size_args, "xnumel": ix.pyexpr(spec.xnumel),
                "rnumel": ix.pyexpr(spec.rnumel) if spec.rnumel is not None else None,
                "xblock_max": target.xblock_max, "rblock_budget": target.rblock_budget,
                "rblock_max": target.loop_rblock if spec.looped else None,
                "num_warps": target.num_warps(spec.kind == "reduction"), "kind": spec.kind,
                "nodes": [m.name for m in u.nodes],
            })
            for s_ in ins:
                uses.setdefault(s_, []).append(i)
            records.append(KernelRecord(spec.name, spec.kind, spec.label, [m.name for m in u.nodes]))
        elif u.target in (ATTENTION, CACHED):
            n = u
            q, k, v, mask, scale, causal, window, softcap = _attention_args(n)
            sources[attention_template.NAME] = attention_template.SOURCE
            sources[attention_template.COMBINE] = attention_template.SOURCE
            ov = n.meta["val"][0] if u.target is CACHED else n.meta["val"]
            step = {
                "type": "attention", "kernel": attention_template.NAME, "combine": attention_template.COMBINE,
                "q": slot[q], "k": slot[k], "v": slot[v],
                "mask": slot[mask] if mask is not None else None, "out": slot[n],
                "shape": [ix.pyexpr(ix.to_expr(e)) for e in ov.shape],
                "stride": [ix.pyexpr(ix.to_expr(e)) for e in ov.stride()],
                "scale": scale, "causal": causal, "window": window, "softcap": softcap,
                "blocks": attention_template.blocks(target, int(val_int(ov.shape[-1])), ov.element_size()),
                "node": n.name}
            reads = [q, k, v, mask]
            storage_root[slot[n]] = slot[n]
            if u.target is CACHED:
                _, k_new, v_new, k_cache, v_cache, pos, cos, sin, *_, rope_q, rope_k = n.args
                sources[attention_template.KV_WRITE] = attention_template.SOURCE
                step["cache"] = {
                    "k_new": slot[k_new], "v_new": slot[v_new], "positions": slot[pos],
                    "cos": slot[cos] if cos is not None else None, "sin": slot[sin] if sin is not None else None,
                    "rope_q": rope_q, "rope_k": rope_k, "inplace": n in inplace,
                    "kv_write": attention_template.KV_WRITE}
                reads += [k_new, v_new, pos, cos, sin]
                if n in inplace:  # the step's value holds the caches themselves
                    _share_storage(storage_root, slot[n], {storage_root[slot[k_cache]], storage_root[slot[v_cache]]})
            steps.append(step)
            define(i, n, reads)
            if u.target is ATTENTION:
                records.append(KernelRecord(attention_template.NAME, "attention", "attention", [n.name]))
            else:
                rope = "+rope" if rope_q or rope_k else ""
                where = "in place" if n in inplace else "into copies (the graph reads the old caches too)"
                records.append(KernelRecord(attention_template.NAME, "attention", f"attention{rope}+cache write",
                                            [n.name], f"new K/V rows written into the caches {where}"))
        elif u.target is VARLEN:
            n = u
            q, k, v, cu, scale, causal = n.args
            sources[attention_template.VARLEN] = attention_template.SOURCE
            ov = n.meta["val"]
            steps.append({
                "type": "varlen_attention", "kernel": attention_template.VARLEN, "q": slot[q], "k": slot[k],
                "v": slot[v], "cu_seqlens": slot[cu], "out": slot[n], "scale": scale, "causal": causal,
                "shape": [ix.pyexpr(e) for e in ix.shape_of(n)], "stride": [ix.pyexpr(e) for e in ix.strides_of(n)],
                "blocks": attention_template.blocks(target, int(val_int(ov.shape[-1])), ov.element_size()),
                "node": n.name})
            define(i, n, [q, k, v, cu])
            storage_root[slot[n]] = slot[n]
            records.append(KernelRecord(attention_template.VARLEN, "attention", "varlen_attention", [n.name]))
        else:
            n = u
            reason = _extern_reason(n, refusals)
            op = op_name(_INPLACE[n.target] if n in inplace else n.target)
            if n in inplace:
                reason = "cache update in place (its write-back is then free)"
            steps.append({"type": "extern", "op": op, "args": template(list(n.args)),
                          "kwargs": template(dict(n.kwargs))["$kw"], "out": slot[n], "node": n.name,
                          "reason": reason})
            define(i, n, n.all_input_nodes)
            # outputs of aliasing ops (views, getitem of tuples) share their inputs' storage
            aliasing = n.target is operator.getitem or n in inplace or (
                isinstance(n.target, torch._ops.OpOverload)
                and any(r.alias_info is not None for r in n.target._schema.returns))
            roots = {storage_root[slot[a]] for a in n.all_input_nodes if a in slot and slot[a] in storage_root}
            if aliasing and roots:
                _share_storage(storage_root, slot[n], roots)
            else:
                storage_root[slot[n]] = slot[n]
            records.append(KernelRecord(n.name, "extern", op, [n.name], reason))

    out_template = [template(a) for a in _flat_outputs(output)]
    forever = len(steps)
    last: dict[int, int] = {}
    for v, idxs in uses.items():
        last[v] = max(idxs)
    for o in _flat_outputs(output):
        if isinstance(o, fx.Node) and o in slot:
            last[slot[o]] = forever

    def root_of(v: int) -> int:
        while storage_root.get(v, v) != v:
            v = storage_root[v]
        return v

    root_last: dict[int, int] = {}
    for v in range(len(slot)):
        r = root_of(v)
        root_last[r] = max(root_last.get(r, -1), last.get(v, -1), defined_at.get(v, -1))

    # buffer reuse: a kernel output takes the tensor of a dead kernel output of the same layout
    donated: set[int] = set()
    pool: dict[tuple, list[int]] = {}
    dying: dict[int, list[int]] = {}
    for r, t in root_last.items():
        if r in kernel_outputs and t < forever:
            dying.setdefault(t, []).append(r)
    layout = {a["value"]: (tuple(a["shape"]), tuple(a["stride"]), a["dtype"], a["device"])
              for s in steps if s["type"] == "kernel" for a in s["allocs"]}
    for i, s in enumerate(steps):
        if s["type"] == "kernel":
            for a in s["allocs"]:
                cands = pool.get(layout[a["value"]])
                if cands:
                    a["reuse"] = cands.pop()
                    donated.add(a["reuse"])
        for r in dying.get(i, []):
            pool.setdefault(layout[r], []).append(r)

    frees: list[list[int]] = [[] for _ in steps]
    for v in range(len(placeholders), len(slot)):
        t = last.get(v, defined_at.get(v, -1))
        if 0 <= t < forever and v not in donated:
            frees[t].append(v)

    bindings, bound = [], set()
    for k, p in enumerate(placeholders):
        v = p.meta.get("val")
        if isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                e = ix.to_expr(s)
                if e.is_Symbol and e.name not in bound:
                    bindings.append([e.name, k, d]); bound.add(e.name)
        elif isinstance(v, torch.SymInt):
            e = ix.to_expr(v)
            if e.is_Symbol and e.name not in bound:
                bindings.append([e.name, k, None]); bound.add(e.name)
    program = {
        "n_values": len(slot), "inputs": [slot[p] for p in placeholders], "bindings": bindings,
        "steps": steps, "frees": frees, "outputs": out_template,
    }
    _check_symbols(program, bound)
    return Lowered(program, sources, records, {v: n.name for n, v in slot.items()})


def _flat_outputs(output: fx.Node) -> list:
    outs = output.args[0]
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _check_symbols(program: dict, bound: set[str]) -> None:
    import re

    text = repr(program["steps"]) + repr(program["outputs"])
    used = set(re.findall(r"\b([su]\d+)\b", text))
    missing = used - bound
    if missing:
        raise CodegenError(
            f"sizes {sorted(missing)} cannot be read from any input's shape (computed inside the graph: data-"
            "dependent, or left over after torch.export specialised an input dim of size 0 or 1); turbofx "
            "cannot run this graph yet: compile with dynamic=False, or with example sizes of at least 2")
