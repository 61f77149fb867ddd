"""fusion: partition pointwise chains and last-dim reductions (with their prologues and
epilogues) into regions, each one generated kernel.

Invariant: the graph is unchanged; ``ctx.regions`` lists disjoint regions, and contracting every
region to one node leaves the graph acyclic (checked with networkx before the pass returns).
Every call_function node left outside a region is recorded with the reason.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from turbofx.codegen.indexing import is_view, same_shape, shape_of, val
from turbofx.codegen.ops import pointwise_refusal, reduction_refusal
from turbofx.codegen.region import Region
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal

aten = torch.ops.aten
_FREE = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _role(n: fx.Node) -> tuple[str | None, Refusal | None]:
    if is_view(n):
        return "view", None
    why = pointwise_refusal(n)
    if why is None:
        return "pointwise", None
    rwhy = reduction_refusal(n)
    if rwhy is None:
        return "reduction", None
    return None, why if n.target not in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default) else rwhy


def _fits(region: Region, n: fx.Node, role: str) -> Refusal | None:
    """None if ``n`` can join ``region``, else why not."""
    ins = [a for a in n.all_input_nodes if a in region.members]
    if role == "view":
        if region.kind != "reduction" or not region.is_row(n) or not all(region.is_row(a) for a in ins):
            return Refusal("region-view", "view of a value computed in the region")
        return None
    if role == "reduction":
        x = n.args[0]
        if region.kind == "pointwise":
            return None if same_shape(shape_of(x), region.full) else Refusal("shape-differs",
                                                                             "reduction input shape differs")
        return None if region.is_full(x) else Refusal("domain-differs", "reduction over a different domain")
    # pointwise
    if n.target is aten.cat.default and ins:
        return Refusal("cat-of-region-value",
                       "cat of a value computed in the region (pieces are loaded, not recomputed)")
    if region.is_full(n):
        rows1 = region.rows + (1,)
        ok = all(region.is_full(a) or (region.kind == "reduction" and same_shape(shape_of(a), rows1)) for a in ins)
        return None if ok else Refusal("row-broadcast", "broadcast of a row value without its trailing dim")
    if region.is_row(n):
        return None if all(region.is_row(a) for a in ins) else Refusal("row-from-full", "row value from a full value")
    return Refusal("shape-differs", "shape differs from the region's domain")


class _Partition:
    def __init__(self, g: fx.Graph, fuel=None) -> None:
        self.fuel = fuel  # the rewrite budget: each new region takes one unit
        self.order = {n: i for i, n in enumerate(g.nodes)}
        self.region_of: dict[fx.Node, Region] = {}
        self.regions: list[Region] = []

    def _span_max(self, unit) -> int:
        return max(self.order[m] for m in unit.nodes) if isinstance(unit, Region) else self.order[unit]

    def reaches(self, region: Region, starts) -> bool:
        """Is there a path region -> (outside) -> any of ``starts``? Walks back over contracted
        regions, pruned by graph order."""
        lo = min(self.order[m] for m in region.nodes)
        stack = [a for a in starts if a not in region.members]
        seen: set = set()
        while stack:
            x = stack.pop()
            unit = self.region_of.get(x, x)
            if unit is region:
                return True
            if id(unit) in seen or self._span_max(unit) < lo:
                continue
            seen.add(id(unit))
            members = unit.nodes if isinstance(unit, Region) else [unit]
            for m in members:
                stack.extend(a for a in m.all_input_nodes if self.order[a] >= lo or a in region.members)
        return False

    def creates_cycle(self, region: Region, n: fx.Node) -> bool:
        return self.reaches(region, n.all_input_nodes)

    def merge_refusal(self, r: Region, q: Region) -> Refusal | None:
        """Why regions ``r`` and ``q`` cannot be one kernel (None: they can)."""
        if not same_shape(q.full, r.full):
            return Refusal("domain-differs", f"region {q.id} not merged into {r.id}: domains differ")
        both = r.members | q.members
        outside_r = [a for m in r.nodes for a in m.all_input_nodes if a not in both]
        outside_q = [a for m in q.nodes for a in m.all_input_nodes if a not in both]
        if self.reaches(q, outside_r) or self.reaches(r, outside_q):
            return Refusal("would-cycle", f"region {q.id} not merged into {r.id}: would create a cycle")
        # Every edge between the two must be one the merged kernel can compute: e.g. a row value
        # [R] read by a full node [R, C] broadcasts along C, not along the rows, when R == C (the
        # shapes coincide, the semantics do not), so it must stay a loaded input.
        merged = Region(r.id, "reduction" if "reduction" in (r.kind, q.kind) else r.kind, r.full, members=both)
        for m in r.nodes + q.nodes:
            own = r.members if m in r.members else q.members
            if any(a in both and a not in own for a in m.all_input_nodes):
                why = _fits(merged, m, _role(m)[0])
                if why is not None:
                    return why.within(f"region {q.id} not merged into {r.id}: at {m.name}")
        return None

    def merge(self, r: Region, q: Region) -> None:
        """Region ``q``'s nodes join ``r`` (``merge_refusal`` said they can)."""
        if q.kind == "reduction":
            r.kind = "reduction"
        for m in q.nodes:
            r.members.add(m)
            self.region_of[m] = r
        r.nodes = sorted(r.nodes + q.nodes, key=self.order.__getitem__)
        q.nodes, q.members = [], set()

    def try_merge(self, r: Region, q: Region, rec: PassRecord) -> None:
        """Merge producer region ``q`` into ``r`` (both feed one node) when one kernel can hold both."""
        if not same_shape(q.full, r.full):
            return
        why = self.merge_refusal(r, q)
        if why is not None:
            rec.refuse(q.nodes[-1], why)
            return
        self.merge(r, q)

    def new_region(self, n: fx.Node, role: str) -> Region:
        if role == "reduction":
            r = Region(len(self.regions), "reduction", shape_of(n.args[0]))
        else:
            r = Region(len(self.regions), "pointwise", shape_of(n))
        self.regions.append(r)
        return r

    def place(self, n: fx.Node, role: str, rec: PassRecord) -> None:
        producers = sorted({self.region_of[a] for a in n.all_input_nodes if a in self.region_of},
                           key=lambda r: -max(self.order[m] for m in r.nodes))
        for r in producers:
            why = _fits(r, n, role)
            if why is None and self.creates_cycle(r, n):
                why = Refusal("would-cycle", "would create a cycle between kernels")
            if why is None:
                if role == "reduction" and r.kind == "pointwise":
                    r.kind = "reduction"
                r.add(n)
                self.region_of[n] = r
                for q in producers:  # the other producers of n may fit in the same kernel
                    if q is not r and q.nodes and n.target is not aten.cat.default:
                        self.try_merge(r, q, rec)
                return
            rec.refuse(n, why.within(f"not fused into region {r.id}"))
        if role == "view":
            return
        if self.fuel is not None and not self.fuel.take(f"new {role} region at {n.name} ({n.target})"):
            rec.refuse(n, self.fuel.refusal)
            return
        r = self.new_region(n, role)
        r.add(n)
        self.region_of[n] = r


def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("fusion")
    part = _Partition(gm.graph, ctx.fuel)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in _FREE or val(n) is None:
            continue
        if getattr(n.target, "namespace", None) == "turbofx":
            continue  # attention, GEMM: their own kernel families lower them (not a refusal)
        role, why = _role(n)
        if role is None:
            rec.refuse(n, why)
            continue
        part.place(n, role, rec)
    _horizontal(part, rec)
    regions = [r for r in part.regions if r.nodes]
    for i, r in enumerate(regions):
        r.id = i
        rec.matched.append(f"region {i} ({r.kind}/{r.label()}): {', '.join(m.name for m in r.nodes)}")
    _check_acyclic(gm.graph, part.region_of)
    ctx.regions = regions
    return rec


HORIZONTAL_MAX = 4096  # elements: a kernel this small costs its launch, not its work


def _horizontal(part: _Partition, rec: PassRecord) -> None:
    """Independent small pointwise regions over one domain become one kernel (one launch instead
    of many): e.g. every decoder layer's KV-cache length counter and cache positions (HF's static
    cache keeps them per layer: two [1]-element kernels a layer). A pair merges only when neither
    reaches the other through the graph (``try_merge``), so no kernel waits for a later one."""
    groups: dict[tuple, list[Region]] = {}
    for r in part.regions:
        if r.nodes and r.kind == "pointwise" and all(d.is_Integer for d in r.full):
            numel = 1
            for d in r.full:
                numel *= int(d)
            if numel <= HORIZONTAL_MAX:
                groups.setdefault(tuple(str(d) for d in r.full), []).append(r)
    for rs in groups.values():
        head = rs[0]
        for q in rs[1:]:
            if part.merge_refusal(head, q) is not None:
                continue  # e.g. one reads the other: stays its own kernel (not a refusal of anything asked)
            if part.fuel is not None and not part.fuel.take(f"horizontal merge of region {q.id} into {head.id}"):
                return
            part.merge(head, q)


def _check_acyclic(g: fx.Graph, region_of: dict) -> None:
    dag = nx.DiGraph()
    for n in g.nodes:
        u = id(region_of.get(n, n))
        dag.add_node(u)
        for a in n.all_input_nodes:
            v = id(region_of.get(a, a))
            if v != u:
                dag.add_edge(v, u)
    if not nx.is_directed_acyclic_graph(dag):
        raise AssertionError("fusion created a cycle between kernels (turbofx bug)")


fuse.pass_name = "fusion"
