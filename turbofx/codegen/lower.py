"""Lowering: FX graph + fusion regions -> Program data + kernel sources.

Units (fusion regions and the nodes outside them) are scheduled in a topological order of the
region-contracted graph; each unit is lowered to one step by the kernel family that claims it
(``turbofx.codegen.family``: generated pointwise/reduction kernels, attention, GEMM, and extern
ATen calls for the rest, each with its reason). Buffer lifetimes are planned so a kernel output
reuses a dead buffer of the same shape, strides and dtype.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from turbofx.codegen import family
from turbofx.codegen import indexing as ix
from turbofx.codegen.family import KernelRecord, LowerContext
from turbofx.codegen.kernel import generate
from turbofx.codegen.region import Region
from turbofx.codegen.target import Target
from turbofx.errors import CodegenError
from turbofx.passes.reinplace import INPLACE_KEY, descendants as _descendants, overwritten as _overwritten, \
    writes_arg0 as _writes_arg0

aten = torch.ops.aten
__all__ = ["KernelRecord", "Lowered", "lower", "val_int"]


def val_int(s) -> int:
    """A size's value: concrete, or its hint when symbolic (tile choice only)."""
    return s if isinstance(s, int) else s.node.hint


@dataclass
class Lowered:
    program: dict
    sources: dict[str, str]
    kernels: list[KernelRecord]
    slots: dict[int, str] = field(default_factory=dict)  # value slot -> FX node name (verify="kernels")


def _is_scalar(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), (torch.SymInt, int)) and not isinstance(n.meta.get("val"), bool)


def lower(gm: fx.GraphModule, regions: list[Region], target: Target, refusals: dict[str, str],
          as_aten: frozenset[str] = frozenset()) -> Lowered:
    """``as_aten``: nodes to run as ATen calls (their op's reference) whatever family would take them
    (``verify="kernels"`` replaces kernels that disagree with eager)."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    output = next(n for n in g.nodes if n.op == "output")
    region_of = {m: r for r in regions for m in r.nodes}
    specs = {id(r): generate(r, target.key, target.persistent_rmax) for r in regions}

    # which nodes need a value: graph outputs, extern args, kernel inputs (closure backwards)
    needed: set[fx.Node] = set()
    # in-place writes (AOT's copy_ of a mutated input) are effects: needed though nothing reads them
    inplace = {n for n in g.nodes if n.meta.get(INPLACE_KEY)}  # chosen by the reinplace pass
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

    lc = LowerContext(target=target, slot=slot, template=template, inplace=inplace, refusals=refusals, specs=specs,
                      storage_root={slot[p]: slot[p] for p in placeholders})
    steps = []
    for i, u in enumerate(schedule):
        lc.index = i
        fam = family.extern_family() if isinstance(u, fx.Node) and u.name in as_aten else family.for_unit(u)
        steps.append(fam.lower(u, lc))
    records, sources = lc.records, lc.sources
    storage_root, kernel_outputs, uses, defined_at = lc.storage_root, lc.kernel_outputs, lc.uses, lc.defined_at

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
