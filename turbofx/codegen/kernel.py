"""Region -> Triton source.

Pointwise regions iterate a flat index over ``full``; reduction regions iterate ``[rows, C]``
with a whole row per program (persistent reduction: every reduction of the region reads the
row from registers, so softmax and norms read their input once), or, for long or symbolic rows,
loop over RBLOCK tiles (one pass per reduction, softmax's max and sum in one online pass, a
last pass for the full-sized outputs). Values are emitted on demand per scope (kernel body or
loop body). Loads fold view chains into their index (sympy), dims every access walks
contiguously are coalesced, and symbolic sizes become integer kernel arguments.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from turbofx.codegen import family
from turbofx.codegen import indexing as ix
from turbofx.codegen.ops import POINTWISE, REDUCTIONS, TL_DTYPE, compute_dtype, literal, round_to_dtype
from turbofx.codegen.region import Region
from turbofx.runtime.exprs import _DTYPES, _compile_expr, _eval, pow2 as _pow2


@dataclass
class KernelSpec:
    """A generated kernel and how to call it: ``buffers`` are the graph nodes whose tensors are
    passed (inputs first, then outputs), ``size_args`` the size symbols passed as ints."""

    name: str
    kind: str
    label: str
    source: str
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    size_args: list[str]
    xnumel: sympy.Expr
    rnumel: sympy.Expr | None
    looped: bool = False  # the row is walked in RBLOCK tiles (RBLOCK then need not cover it)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def fresh(self) -> str:
        self.n += 1
        return f"tmp{self.n - 1}"

    def line(self, indent: int, code: str) -> None:
        self.lines.append(" " * indent + code)

    def tmp_at(self, indent: int, code: str) -> str:
        name = self.fresh()
        self.line(indent, f"{name} = {code}")
        return name


class _Scope:
    """Values computed at one nesting level (kernel body or a reduction loop over row tiles)."""

    def __init__(self, indent: int, parent: "_Scope | None" = None) -> None:
        self.indent = indent
        self.parent = parent
        self.values: dict = {}
        self.loaded: dict = {}

    def lookup(self, key, table: str):
        s = self
        while s is not None:
            got = getattr(s, table).get(key)
            if got is not None:
                return got
            s = s.parent
        return None


def _online_softmax_pair(n: fx.Node, region: Region):
    """(x, amax) when ``n`` is sum(exp(x - amax(x))) over the last dim: softmax's two reductions,
    computed in one online pass (running max, rescaled running sum)."""
    aten = torch.ops.aten
    if n.target is not aten.sum.dim_IntList:
        return None
    e = n.args[0]
    if e not in region.members or e.target is not aten.exp.default:
        return None
    d = e.args[0]
    if d not in region.members or d.target is not aten.sub.Tensor:
        return None
    x, mx = d.args
    if not isinstance(mx, fx.Node) or mx.target is not aten.amax.default or mx.args[0] is not x:
        return None
    return x, mx


def generate(region: Region, target_key: str, persistent_rmax: int = 1 << 30) -> KernelSpec:
    """Triton source for ``region``. A reduction whose row is longer than ``persistent_rmax`` (or
    symbolic) loops over the row in tiles, one pass per reduction, and writes in a last pass."""
    red = region.kind == "reduction"
    rows = list(region.rows)
    dims = [sympy.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(len(rows))]
    rsym = sympy.Symbol("rindex", integer=True, nonnegative=True)
    full_idx = dims + [rsym] if red else list(dims)

    # 1. every access as an offset over the per-dim index symbols
    bases: dict[fx.Node, str] = {}
    loads: dict[tuple, tuple] = {}  # (base, offset, is_row) -> (ptr, offset expr)
    node_access: dict[tuple[fx.Node, fx.Node], tuple] = {}  # (consumer, arg) -> load key

    def index_of(node: fx.Node) -> list[sympy.Expr]:
        return list(dims) if (red and region.is_row(node)) else full_idx

    cat_dims: dict[fx.Node, tuple[int, list]] = {}  # cat -> (dim, [(piece, start, end)])
    for n in region.nodes:
        pieces = _cat_pieces(n)
        if pieces:
            cat_dims[n] = pieces
            reads = [(("piece", k), a, (st, en)) for k, (a, st, en) in enumerate(pieces[1])]
        else:
            reads = [(a, a, None) for a in n.all_input_nodes]
        for slot, a, piece in reads:
            if a in region.members or not isinstance(a.meta.get("val"), torch.Tensor):
                continue
            # a reduction reads its input over the whole row; other nodes at their own index
            consumer_idx = list(full_idx if n.target in REDUCTIONS else index_of(n))
            if piece is not None:  # a cat piece is read at the cat index shifted back by its start
                consumer_idx[pieces[0]] = consumer_idx[pieces[0]] - piece[0]
            idx = ix.broadcast_index(consumer_idx, ix.shape_of(a))
            base, bidx = ix.fold_views(a, idx, lambda v: v not in region.members)
            off = ix.offset(bidx, ix.strides_of(base))
            # a read that does not move along the row (stride 0) loads once per row, unless the
            # row is empty: then the full-indexed read has no element at all (rmask must guard it)
            empty_row = red and region.full[-1].is_Integer and int(region.full[-1]) == 0
            is_row = red and rsym not in off.free_symbols and not (empty_row and rsym in consumer_idx)
            ptr = bases.setdefault(base, f"in{len(bases)}")
            key = (base, off, piece, n if piece else None)
            loads.setdefault(key, (ptr, off, is_row))
            node_access[(n, slot)] = key
    outputs = region.outputs()
    stores = []
    for k, o in enumerate(outputs):
        oidx = index_of(o)
        if red and region.is_row(o) and len(ix.shape_of(o)) == len(dims) + 1:
            oidx = dims + [sympy.Integer(0)]
        off = ix.offset(oidx, ix.strides_of(o))
        stores.append((f"out{k}", off, o))

    # 2. coalesce row dims across all accesses, then delinearize the flat program index
    cat_index = [full_idx[d] for d, _ in cat_dims.values()]  # masks test the cat dim's index
    accesses = [off for _, off, _ in loads.values()] + [off for _, off, _ in stores] + cat_index
    groups, rewritten, gsyms, gsizes = ix.coalesce(dims, rows, accesses)
    load_offsets = dict(zip(loads.keys(), rewritten[: len(loads)]))
    store_offsets = rewritten[len(loads): len(loads) + len(stores)]
    cat_exprs = dict(zip(cat_dims, rewritten[len(loads) + len(stores):]))
    xflat = sympy.Symbol("xindex", integer=True, nonnegative=True)
    group_exprs = ix.delinearize(xflat, gsizes)

    w = _Writer()
    xnumel = ix.product(rows)
    rnumel = region.full[-1] if red else None
    for gsym, ge in zip(gsyms, group_exprs):
        if any(gsym in off.free_symbols for off in rewritten):
            # a size-1 group is the constant 0: still a tensor (a cat over it tests it in a mask)
            w.lines.append(f"    {gsym.name} = {'xzero + ' if ge.is_Integer else ''}{ix.pyexpr(ge)}")
    fmask = "xmask & rmask" if red else "xmask"

    def load_code(key) -> str:
        ptr, _, is_row = loads[key]
        off = load_offsets[key]
        zero = "xzero" if (is_row or not red) else "fzero"
        mask = "xmask" if is_row else fmask
        if key[2] is not None:  # cat piece: only its span of the cat dim is loaded
            cidx = f"(xzero + {ix.pyexpr(cat_exprs[key[3]])})"  # a tensor even when the index is constant
            mask = f"{mask} & ({cidx} >= {ix.pyexpr(key[2][0])}) & ({cidx} < {ix.pyexpr(key[2][1])})"
        code = f"tl.load({ptr} + ({zero} + {ix.pyexpr(off)}), {mask}, other=0)"
        dt = key[0].meta["val"].dtype
        return f"{code}.to(tl.float32)" if dt in (torch.float16, torch.bfloat16) else code

    scalar_syms: set[str] = set()
    looped = red and not (rnumel.is_Integer and int(rnumel) <= persistent_rmax)
    outer = _Scope(4)

    def load_at(scope: _Scope, key) -> str:
        got = scope.lookup(key, "loaded")
        if got is None:
            got = scope.loaded[key] = w.tmp_at(scope.indent, load_code(key))
        return got

    def arg_code(scope: _Scope, n: fx.Node, a):
        if isinstance(a, fx.Node):
            if a in region.members:
                return need(scope, a)
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return load_at(scope, node_access[(n, a)])
            e = ix.to_expr(v)
            scalar_syms.update(s.name for s in e.free_symbols)
            return f"({ix.pyexpr(e)})"
        if isinstance(a, (list, tuple)):
            return [arg_code(scope, n, x) for x in a]
        if a is None:
            return "None"
        return literal(a)

    def need(scope: _Scope, n: fx.Node) -> str:
        got = scope.lookup(n, "values")
        if got is None:
            if looped and region.is_row(n) and scope.parent is not None:
                raise AssertionError(f"row value {n.name} needed inside a reduction loop (turbofx bug)")
            got = scope.values[n] = emit(scope, n)
        return got

    def emit(scope: _Scope, n: fx.Node) -> str:
        if n in cat_dims:  # select the piece whose span holds the index; others are masked loads
            cidx = f"(xzero + {ix.pyexpr(cat_exprs[n])})"
            spans = cat_dims[n][1]
            codes = [load_at(scope, node_access[(n, ("piece", k))]) for k in range(len(spans))]
            code = codes[-1]
            for (_, _, end), piece in zip(reversed(spans[:-1]), reversed(codes[:-1])):
                code = f"tl.where({cidx} < {ix.pyexpr(end)}, {piece}, {code})"
            return w.tmp_at(scope.indent, code)
        if ix.is_view(n):  # a row value re-viewed (trailing 1 added or dropped): same registers
            return need(scope, n.args[0])
        if n.target in REDUCTIONS:
            return reduce_looped(scope, n) if looped else reduce_persistent(scope, n)
        args = [arg_code(scope, n, a) for a in n.args]
        return w.tmp_at(scope.indent, round_to_dtype(n, POINTWISE[n.target](n, args, dict(n.kwargs))))

    def reduce_persistent(scope: _Scope, n: fx.Node) -> str:
        kind = REDUCTIONS[n.target]
        # accumulate in the result's type: eager sums int32/bool into int64
        x = f"tl.broadcast_to(({arg_code(scope, n, n.args[0])}).to({compute_dtype(n.meta['val'].dtype)}), [XBLOCK, RBLOCK])"
        if kind in ("sum", "mean"):
            code = f"tl.sum(tl.where(xmask & rmask, {x}, 0), 1)[:, None]"
            if kind == "mean":
                code = f"({code} / {ix.pyexpr(rnumel)})"
        else:
            fill = "float('-inf')" if kind == "max" else "float('inf')"
            code = _nan_row_extreme(w, scope.indent, kind, f"tl.where(xmask & rmask, {x}, {fill})")
        return w.tmp_at(scope.indent, round_to_dtype(n, f"({code}).to({compute_dtype(n.meta['val'].dtype)})"))

    def row_deps(nodes) -> list[fx.Node]:
        """Row values the full-valued computation of ``nodes`` reads (computed before a loop)."""
        deps, seen, stack = {}, set(), list(nodes)
        while stack:
            m = stack.pop()
            if m in seen or m not in region.members:
                continue
            seen.add(m)
            if region.is_row(m) and m not in nodes:
                deps[m] = None
                continue
            stack.extend(a for a in m.all_input_nodes if a in region.members)
        return sorted(deps, key=region.nodes.index)

    def open_loop(scope: _Scope) -> _Scope:
        w.line(scope.indent, "for roffset in range(0, rnumel, RBLOCK):")
        body = _Scope(scope.indent + 4, scope)
        w.line(body.indent, "rindex = roffset + tl.arange(0, RBLOCK)[None, :]")
        w.line(body.indent, "rmask = rindex < rnumel")
        w.line(body.indent, "fzero = xzero + rindex * 0")
        return body

    def reduce_looped(scope: _Scope, n: fx.Node) -> str:
        """One pass over the row in RBLOCK tiles; softmax's max and sum share one online pass."""
        kind = REDUCTIONS[n.target]
        partner = next((m for m in region.nodes if (_online_softmax_pair(m, region) or (None, None))[1] is n), None)
        if partner is not None and scope.lookup(partner, "values") is None:
            need(scope, partner)  # softmax's max: computed with its sum in one online pass
            return scope.values[n]
        pair = _online_softmax_pair(n, region)
        src = pair[0] if pair and scope.lookup(pair[1], "values") is None else n.args[0]
        if src is n.args[0]:
            pair = None
        for r in row_deps([src]):
            need(scope, r)
        dt = compute_dtype(n.meta["val"].dtype)
        if pair:
            m, sacc = w.fresh(), w.fresh()
            w.line(scope.indent, f"{m} = tl.full([XBLOCK, RBLOCK], float('-inf'), tl.float32)")
            w.line(scope.indent, f"{sacc} = tl.zeros([XBLOCK, RBLOCK], tl.float32)")
        else:
            acc = w.fresh()
            init = {"sum": "0.0", "mean": "0.0", "max": "float('-inf')", "min": "float('inf')"}[kind]
            w.line(scope.indent, f"{acc} = tl.full([XBLOCK, RBLOCK], {init}, {dt})")
        body = open_loop(scope)
        reader = pair[1] if pair else n  # the reduction whose input load indexes the full row
        x = f"tl.broadcast_to(({arg_code(body, reader, src)}).to({dt}), [XBLOCK, RBLOCK])"
        if pair:  # running per-lane max and rescaled sum of exp
            xv, mn = w.fresh(), w.fresh()
            w.line(body.indent, f"{xv} = tl.where(xmask & rmask, {x}, float('-inf'))")
            w.line(body.indent, f"{mn} = tl.maximum({m}, {xv}, propagate_nan=tl.PropagateNan.ALL)")
            w.line(body.indent, f"{sacc} = {sacc} * tl.exp(tl.where({mn} == float('-inf'), 0.0, {m} - {mn})) + "
                                f"tl.where({mn} == float('-inf'), 0.0, tl.exp({xv} - {mn}))")
            w.line(body.indent, f"{m} = {mn}")
            amax = pair[1]
            top = w.tmp_at(scope.indent, _nan_row_extreme(w, scope.indent, "max", m))
            scope.values[amax] = w.tmp_at(scope.indent, round_to_dtype(amax, f"({top}).to({compute_dtype(amax.meta['val'].dtype)})"))
            total = f"tl.sum(tl.where({m} == float('-inf'), 0.0, {sacc} * tl.exp({m} - {top})), 1)[:, None]"
            # a row that is all -inf: eager's exp(x - max) is exp(-inf - -inf) = NaN, so is its sum
            total = f"tl.where({top} == float('-inf'), float('nan'), {total})"
            return w.tmp_at(scope.indent, round_to_dtype(n, f"({total}).to({dt})"))
        if kind in ("sum", "mean"):
            w.line(body.indent, f"{acc} = {acc} + tl.where(xmask & rmask, {x}, 0)")
            code = f"tl.sum({acc}, 1)[:, None]"
            if kind == "mean":
                code = f"({code} / {ix.pyexpr(rnumel)})"
        else:
            fill = "float('-inf')" if kind == "max" else "float('inf')"
            w.line(body.indent, f"{acc} = tl.{kind}imum({acc}, tl.where(xmask & rmask, {x}, {fill}), "
                                f"propagate_nan=tl.PropagateNan.ALL)")
            code = _nan_row_extreme(w, scope.indent, kind, acc)
        return w.tmp_at(scope.indent, round_to_dtype(n, f"({code}).to({dt})"))

    def store(scope: _Scope, ptr: str, off, o: fx.Node) -> None:
        is_row = red and region.is_row(o)
        zero = "xzero" if (is_row or not red) else "fzero"
        v = need(scope, o)
        if red and not is_row:
            v = f"tl.broadcast_to({v}, [XBLOCK, RBLOCK])"
        w.line(scope.indent, f"tl.store({ptr} + ({zero} + {ix.pyexpr(off)}), ({v}).to({TL_DTYPE[o.meta['val'].dtype]}), "
                             f"{'xmask' if is_row else fmask})")

    full_stores = [(p_, off, o) for (p_, _, o), off in zip(stores, store_offsets) if not (red and region.is_row(o))]
    row_stores = [(p_, off, o) for (p_, _, o), off in zip(stores, store_offsets) if red and region.is_row(o)]
    if looped and full_stores:  # the last pass writes the full-sized outputs tile by tile
        for r in row_deps([o for _, _, o in full_stores]):
            need(outer, r)
        body = open_loop(outer)
        for p_, off, o in full_stores:
            store(body, p_, off, o)
    else:
        for p_, off, o in full_stores:
            store(outer, p_, off, o)
    for p_, off, o in row_stores:
        store(outer, p_, off, o)

    # 3. signature and prologue
    used = rewritten + group_exprs + [xnumel] + ([rnumel] if red else [])
    index_syms = {s.name for s in dims + gsyms + [rsym, xflat]}
    size_syms = sorted((ix.free_size_symbols(used) | scalar_syms) - index_syms)
    body = "\n".join(w.lines)
    ptrs = [p for p in bases.values()] + [p for p, _, _ in stores]
    params = ptrs + size_syms + ["xnumel"] + (["rnumel"] if red else []) + ["XBLOCK: tl.constexpr"]
    if red:
        params.append("RBLOCK: tl.constexpr")
    head = [
        "    xoffset = tl.program_id(0).to(tl.int64) * XBLOCK" if _needs_int64(region) else
        "    xoffset = tl.program_id(0) * XBLOCK",
    ]
    if red:
        head += [
            "    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]",
            "    xmask = xindex < xnumel",
            "    xzero = xindex * 0",
        ]
        if not looped:
            head += [
                "    rindex = tl.arange(0, RBLOCK)[None, :]",
                "    rmask = rindex < rnumel",
                "    fzero = xzero + rindex * 0",
            ]
    else:
        head += ["    xindex = xoffset + tl.arange(0, XBLOCK)", "    xmask = xindex < xnumel", "    xzero = xindex * 0"]
    digest = hashlib.sha256((body + str(params) + target_key).encode()).hexdigest()[:12]
    name = f"tfx_{region.label()}_{digest}"
    source = "\n".join(
        ["import triton", "import triton.language as tl", "", "", "@triton.jit",
         f"def {name}({', '.join(params)}):"] + head + w.lines
    ) + "\n"
    return KernelSpec(
        name=name, kind=region.kind, label=region.label(), source=source,
        inputs=list(bases.keys()), outputs=outputs, size_args=size_syms,
        xnumel=xnumel, rnumel=rnumel, looped=looped,
    )


def _nan_row_extreme(w: _Writer, indent: int, kind: str, tile: str) -> str:
    """The row max/min of ``tile`` ([XBLOCK, RBLOCK], masked lanes already filled with -inf/inf),
    NaN when the row holds a NaN, as torch.amax/amin. Triton's tl.max/tl.min drop NaN (on GPUs
    max.f32 returns the other operand), so NaN presence is reduced separately."""
    t = w.tmp_at(indent, tile)
    extreme = w.tmp_at(indent, f"tl.{kind}({t}, 1)[:, None]")
    has_nan = w.tmp_at(indent, f"tl.max(({t} != {t}).to(tl.int32), 1)[:, None]")
    return f"tl.where({has_nan} > 0, float('nan'), {extreme})"


def _cat_pieces(n: fx.Node):
    """For aten.cat: (dim, [(piece, start, end)]) over the non-empty pieces, else None."""
    if n.target is not torch.ops.aten.cat.default:
        return None
    ndim = len(ix.shape_of(n))
    d = (n.args[1] if len(n.args) > 1 else 0) % ndim
    spans, start = [], sympy.Integer(0)
    for p in n.args[0]:
        size = ix.shape_of(p)[d]
        if size != 0:
            spans.append((p, start, start + size))
        start = start + size
    return d, spans


def _needs_int64(region: Region) -> bool:
    """64-bit indices when an access could pass 2**31 elements (symbolic sizes assumed large)."""
    total = ix.product(region.full)
    for n in region.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            total = total + ix.product(ix.shape_of(n))
    return not total.is_Integer or int(total) >= 2**31


# ---------------------------------------------------------------- the family: lowering, launcher, cost
# Generated pointwise and row-reduction kernels (fusion regions), steps of type "kernel".

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


def kernel_launcher(ks: KernelStep, fn):
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

    return run



class PointwiseFamily(family.Family):
    """A fusion region as one generated kernel (pointwise, or persistent/looped row reduction)."""

    step_types = ("kernel",)

    def claims(self, unit) -> bool:
        return isinstance(unit, Region)

    def lower(self, u: Region, lc: family.LowerContext) -> dict:
        spec: KernelSpec = lc.specs[id(u)]
        lc.add_source(spec.name, spec.source)
        ins = [lc.slot[a] for a in spec.inputs]
        outs = [lc.slot[o] for o in spec.outputs]
        allocs = []
        for o in spec.outputs:
            v = o.meta["val"]
            allocs.append({
                "value": lc.slot[o], "shape": [ix.pyexpr(e) for e in ix.shape_of(o)],
                "stride": [ix.pyexpr(e) for e in ix.strides_of(o)],
                "dtype": str(v.dtype).removeprefix("torch."), "device": str(v.device), "reuse": None})
            lc.storage_root[lc.slot[o]] = lc.slot[o]
            lc.kernel_outputs.add(lc.slot[o])
            lc.defined_at[lc.slot[o]] = lc.index
        target = lc.target
        lc.read(ins)
        lc.records.append(family.KernelRecord(spec.name, spec.kind, spec.label, [m.name for m in u.nodes]))
        return {
            "type": "kernel", "kernel": spec.name, "args": ins + outs, "allocs": allocs,
            "size_args": spec.size_args, "xnumel": ix.pyexpr(spec.xnumel),
            "rnumel": ix.pyexpr(spec.rnumel) if spec.rnumel is not None else None,
            "xblock_max": target.xblock_max, "rblock_budget": target.rblock_budget,
            "rblock_max": target.loop_rblock if spec.looped else None,
            "num_warps": target.num_warps(spec.kind == "reduction"), "kind": spec.kind,
            "nodes": [m.name for m in u.nodes],
        }

    @staticmethod
    def step_of(s: dict) -> KernelStep:
        ks = KernelStep(**{k: v for k, v in s.items() if k != "type"})
        ks.allocs = [Alloc(**a) for a in s["allocs"]]
        return ks

    def runner(self, s: dict, kernels: dict):
        ks = self.step_of(s)
        return family.bind(kernel_launcher(ks, kernels[ks.kernel]), ks, self)

    def reads(self, ks: KernelStep) -> list[int]:
        return ks.args[: len(ks.args) - len(ks.allocs)]

    def writes(self, ks: KernelStep) -> list[int]:
        return [a.value for a in ks.allocs]

    def checkable(self, ks: KernelStep) -> bool:
        return True

    def cost(self, ks: KernelStep, values: list, env: dict, ledger):
        from turbofx.compiler.roofline import META, StepCost, _footprint

        for a in ks.allocs:
            if a.reuse is not None:
                values[a.value], values[a.reuse] = values[a.reuse], None
            else:
                values[a.value] = torch.empty_strided([_eval(_compile_expr(e), env) for e in a.shape],
                                                      [_eval(_compile_expr(e), env) for e in a.stride],
                                                      dtype=getattr(torch, a.dtype), device=META)
        ins = [values[i] for i in self.reads(ks)]
        outs = [values[a.value] for a in ks.allocs]
        xn = _eval(_compile_expr(ks.xnumel), env)
        rn = _eval(_compile_expr(ks.rnumel), env) if ks.rnumel is not None else 1
        return StepCost(ks.kernel, ks.kind, ledger.reads(ins), sum(map(_footprint, outs)), xn * rn, 1 if xn > 0 else 0)


family.register(PointwiseFamily())
