"""Index arithmetic in sympy: shapes, strides, broadcasting and views as expressions.

Sizes are sympy expressions over the graph's size symbols (``s0``, ``s1`` ...). Per-dimension
indices are symbols too; a view chain is folded into a load by mapping indices backwards through
each view op. Dimension coalescing then collapses dims every access walks contiguously, so a
contiguous elementwise kernel indexes with the flat index alone (no div/mod).
"""
from __future__ import annotations

import math
from typing import Sequence

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten


class FloorDiv(sympy.Function):
    """Integer floor division of non-negative index expressions."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        return None


class ModIndex(sympy.Function):
    """``a % b`` for non-negative index expressions."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1 or a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) % int(b))
        return None


def to_expr(v) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(v, torch.SymInt):
        return sympy.sympify(v.node.expr)
    if isinstance(v, (int, bool)):
        return sympy.Integer(int(v))
    if isinstance(v, sympy.Expr):
        return v
    raise TypeError(f"not a size: {v!r}")


def val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape_of(node: fx.Node) -> tuple[sympy.Expr, ...]:
    return tuple(to_expr(s) for s in val(node).shape)


def strides_of(node: fx.Node) -> tuple[sympy.Expr, ...]:
    return tuple(to_expr(s) for s in val(node).stride())


def contiguous_strides(shape: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    strides, acc = [], sympy.Integer(1)
    for s in reversed(shape):
        strides.append(acc)
        acc = acc * s
    return strides[::-1]


def product(xs) -> sympy.Expr:
    return sympy.Mul(*xs) if xs else sympy.Integer(1)


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.expand(a - b) == 0


def same_shape(a: Sequence[sympy.Expr], b: Sequence[sympy.Expr]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def broadcast_index(idx: Sequence[sympy.Expr], shape: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """Indices of a broadcast operand (right-aligned; size-1 dims read element 0)."""
    offset = len(idx) - len(shape)
    return [sympy.Integer(0) if s == 1 else idx[offset + d] for d, s in enumerate(shape)]


# ---------------------------------------------------------------- views folded into loads

VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default, aten.t.default,
    aten.transpose.int,
}


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in VIEW_OPS


def _reshape_groups(src: Sequence[sympy.Expr], dst: Sequence[sympy.Expr]):
    """Pair up runs of dims with equal products: [(src_dims, dst_dims), ...] or None."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        ps = pd = sympy.Integer(1)
        if i == len(src) or j == len(dst):  # one side is done: the rest must be size-1 dims
            rest_src, rest_dst = list(range(i, len(src))), list(range(j, len(dst)))
            if not all(src[k] == 1 for k in rest_src) or not all(dst[k] == 1 for k in rest_dst):
                return None
            groups.append((rest_src, rest_dst))
            break
        while not (gi and gj and same(ps, pd)):
            grow_src = i < len(src) and (j >= len(dst) or not gi or _smaller(ps, pd))
            if grow_src:
                gi.append(i); ps = ps * src[i]; i += 1
            elif j < len(dst):
                gj.append(j); pd = pd * dst[j]; j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _smaller(a: sympy.Expr, b: sympy.Expr) -> bool:
    """a < b for positive size products (b a proper multiple of a when symbolic)."""
    r = sympy.simplify(b / a)
    if r.is_number:
        return bool(r > 1)
    return sympy.fraction(r)[1] == 1


def reshape_index(idx: Sequence[sympy.Expr], src: Sequence[sympy.Expr], dst: Sequence[sympy.Expr]):
    """Map indices into ``dst`` (the view) to indices into ``src`` (its input)."""
    if any(sympy.sympify(d) == 0 for d in list(src) + list(dst)):
        return [sympy.Integer(0)] * len(src)  # no elements: nothing is read (and 0 divides no product)
    groups = _reshape_groups(list(src), list(dst))
    if groups is None:
        return None
    out: list[sympy.Expr] = [sympy.Integer(0)] * len(src)
    for gi, gj in groups:
        if not gi or not gj:  # size-1 dims added or dropped: index 0 on the source side
            continue
        dst_strides = contiguous_strides([dst[j] for j in gj])
        flat = sum((idx[j] * st for j, st in zip(gj, dst_strides)), sympy.Integer(0))
        if len(gi) == 1:
            out[gi[0]] = flat
            continue
        src_strides = contiguous_strides([src[i] for i in gi])
        for k, (i, st) in enumerate(zip(gi, src_strides)):
            q = FloorDiv(flat, st)
            out[i] = q if k == 0 else ModIndex(q, src[i])
    return out


def view_input_index(node: fx.Node, idx: list[sympy.Expr]) -> list[sympy.Expr] | None:
    """Indices into ``node.args[0]`` that the view ``node`` reads at ``idx``; None if unknown."""
    src = node.args[0]
    src_shape = shape_of(src)
    dst_shape = shape_of(node)
    t = node.target
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return reshape_index(idx, src_shape, dst_shape)
    if t is aten.alias.default:
        return list(idx)
    if t is aten.permute.default:
        perm = [p % len(src_shape) for p in node.args[1]]
        out = [sympy.Integer(0)] * len(src_shape)
        for k, p in enumerate(perm):
            out[p] = idx[k]
        return out
    if t is aten.t.default:
        return list(reversed(idx))
    if t is aten.transpose.int:
        a, b = (d % len(src_shape) for d in node.args[1:3])
        out = list(idx)
        out[a], out[b] = idx[b], idx[a]
        return out
    if t is aten.expand.default:
        return broadcast_index(idx, src_shape)
    if t is aten.unsqueeze.default:
        d = node.args[1] % len(dst_shape)
        return [x for k, x in enumerate(idx) if k != d]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        removed = {d for d in range(len(src_shape)) if src_shape[d] == 1 and _squeezed(node, d, len(src_shape))}
        rest = iter(idx)
        return [sympy.Integer(0) if d in removed else next(rest) for d in range(len(src_shape))]
    if t is aten.slice.Tensor:
        dim = node.args[1] % len(src_shape) if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        if not isinstance(start, int) or not isinstance(step, int):
            return None
        if start < 0:
            if not src_shape[dim].is_Integer:
                return None
            start = max(0, start + int(src_shape[dim]))
        out = list(idx)
        out[dim] = start + step * idx[dim]
        return out
    if t is aten.select.int:
        dim = node.args[1] % len(src_shape)
        index = node.args[2]
        if not isinstance(index, int):
            return None
        if index < 0:
            if not src_shape[dim].is_Integer:
                return None
            index += int(src_shape[dim])
        return list(idx[:dim]) + [sympy.Integer(index)] + list(idx[dim:])
    return None


def _squeezed(node: fx.Node, d: int, ndim: int) -> bool:
    if node.target is aten.squeeze.default:
        return True
    dims = node.args[1] if node.target is aten.squeeze.dims else [node.args[1]]
    return d in [x % ndim for x in dims]


def fold_views(node: fx.Node, idx: list[sympy.Expr], foldable) -> tuple[fx.Node, list[sympy.Expr]]:
    """Walk back through view ops ``foldable`` accepts; return (base node, indices into it)."""
    while is_view(node) and foldable(node):
        mapped = view_input_index(node, idx)
        if mapped is None:
            break
        node, idx = node.args[0], mapped
    return node, idx


def offset(idx: Sequence[sympy.Expr], strides: Sequence[sympy.Expr]) -> sympy.Expr:
    return sympy.expand(sum((i * s for i, s in zip(idx, strides)), sympy.Integer(0)))


# ---------------------------------------------------------------- coalescing + delinearization

def linear_coeffs(expr: sympy.Expr, dims: Sequence[sympy.Symbol]):
    """{dim: coefficient} if ``expr`` is linear in the dim symbols (plus a constant), else None."""
    expr = sympy.expand(expr)
    coeffs = {}
    for d in dims:
        c = expr.coeff(d)
        if c.has(*dims):
            return None
        coeffs[d] = c
    rest = sympy.expand(expr - sum(c * d for d, c in coeffs.items()))
    if rest.has(*dims):
        return None
    return coeffs


def coalesce(dims: list[sympy.Symbol], sizes: list[sympy.Expr], accesses: list[sympy.Expr]):
    """Group adjacent dims that every access walks contiguously.

    Returns (groups, rewritten accesses, group symbols, group sizes): each access rewritten in
    terms of one symbol per group.
    """
    lin = [linear_coeffs(a, dims) for a in accesses]
    groups: list[list[int]] = []
    for k in range(len(dims)):
        if groups and all(
            c is not None and same(c[dims[groups[-1][-1]]], c[dims[k]] * sizes[k]) for c in lin
        ):
            groups[-1].append(k)
        else:
            groups.append([k])
    gsyms = [sympy.Symbol(f"g{n}", integer=True, nonnegative=True) for n in range(len(groups))]
    gsizes = [product([sizes[k] for k in g]) for g in groups]
    subs = {}
    for gsym, g in zip(gsyms, groups):
        if len(g) == 1:
            subs[dims[g[0]]] = gsym
    rewritten = []
    for a, c in zip(accesses, lin):
        if c is None:  # non-linear: only single-dim groups, plain substitution
            rewritten.append(a.xreplace(subs))
            continue
        const = sympy.expand(a - sum(c[d] * d for d in dims))
        new = const + sum((c[dims[g[-1]]] * gsym for gsym, g in zip(gsyms, groups)), sympy.Integer(0))
        rewritten.append(sympy.expand(new))
    return groups, rewritten, gsyms, gsizes


def delinearize(flat: sympy.Symbol, sizes: list[sympy.Expr]) -> list[sympy.Expr]:
    """Per-dim indices of a flat row-major index over ``sizes``."""
    if not sizes:
        return []
    strides = contiguous_strides(sizes)
    out = []
    for k, (s, st) in enumerate(zip(sizes, strides)):
        q = FloorDiv(flat, st)
        out.append(q if k == 0 else ModIndex(q, s))
    return out


# ---------------------------------------------------------------- printing

def pyexpr(e: sympy.Expr) -> str:
    """Python/Triton source for an integer index expression."""
    e = sympy.sympify(e)
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, FloorDiv):
        return f"({pyexpr(e.args[0])} // {pyexpr(e.args[1])})"
    if isinstance(e, ModIndex):
        return f"({pyexpr(e.args[0])} % {pyexpr(e.args[1])})"
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=sympy.default_sort_key)
        return "(" + " + ".join(pyexpr(t) for t in terms) + ")"
    if isinstance(e, sympy.Mul):
        num, den = sympy.fraction(e)
        if den != 1:
            return f"({pyexpr(num)} // {pyexpr(den)})"
        return "(" + " * ".join(pyexpr(t) for t in e.args) + ")"
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
        return "(" + " * ".join([pyexpr(e.base)] * int(e.exp)) + ")"
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(e.args[0])
        return f"({pyexpr(num)} // {pyexpr(den)})"
    if isinstance(e, sympy.Mod):
        return f"({pyexpr(e.args[0])} % {pyexpr(e.args[1])})"
    torch_fn = _print_torch_sympy(e)
    if torch_fn is not None:
        return torch_fn
    if isinstance(e, (sympy.Max, sympy.Min)):
        fn = "max" if isinstance(e, sympy.Max) else "min"
        return f"{fn}({', '.join(pyexpr(a) for a in e.args)})"
    raise NotImplementedError(f"cannot print index expression {e} ({type(e).__name__})")


def _print_torch_sympy(e: sympy.Expr) -> str | None:
    """torch's own integer sympy functions (symbolic sizes of a slice, ``(s + 1) // 2``, or a
    flatten of a symbolic dim carry them). Sizes and indices are non-negative, so Python's floor
    division and modulo agree with them."""
    import torch.utils._sympy.functions as tf

    name = type(e).__name__
    a = e.args
    if name in ("FloorDiv", "CleanDiv"):
        return f"({pyexpr(a[0])} // {pyexpr(a[1])})"
    if name == "CeilDiv":
        return f"(-(-{pyexpr(a[0])} // {pyexpr(a[1])}))"
    if name in ("PythonMod", "Mod"):
        return f"({pyexpr(a[0])} % {pyexpr(a[1])})"
    if name == "ModularIndexing":
        return f"(({pyexpr(a[0])} // {pyexpr(a[1])}) % {pyexpr(a[2])})"
    if name == "PowByNatural" and a[1].is_Integer:
        return "(" + " * ".join([pyexpr(a[0])] * int(a[1])) + ")" if int(a[1]) > 0 else "1"
    if isinstance(e, (getattr(tf, "Max", ()), getattr(tf, "Min", ()))):
        fn = "max" if "Max" in name else "min"
        return f"{fn}({', '.join(pyexpr(x) for x in a)})"
    return None


def free_size_symbols(exprs) -> set[str]:
    names: set[str] = set()
    for e in exprs:
        names |= {s.name for s in sympy.sympify(e).free_symbols}
    return names


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))
