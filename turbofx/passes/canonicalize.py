"""canonicalize: assertions, no-op views and copies, constant shape math, CSE, dead code.

Invariant: the graph computes the same values; no output becomes an alias of an input.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from turbofx.codegen.indexing import same_shape, shape_of, val
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal

aten = torch.ops.aten

_ASSERTS = {
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default, aten._assert_async.msg,
}
_SYM_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
            torch.sym_int, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _is_noop(n: fx.Node) -> bool:
    """A view or copy that returns its input unchanged (same shape, strides, dtype)."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    src, out = val(n.args[0]), val(n)
    if src is None or out is None:
        return False
    same_layout = (same_shape(shape_of(n.args[0]), shape_of(n)) and src.dtype == out.dtype
                   and src.device == out.device
                   and tuple(map(str, src.stride())) == tuple(map(str, out.stride())))
    if not same_layout:
        return False
    t = n.target
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.alias.default):
        return True
    if t is aten.slice.Tensor:
        return True  # same shape means the slice selects everything
    if t is aten.permute.default:
        return list(n.args[1]) == list(range(len(n.args[1])))
    if t is aten.clone.default:  # same layout: a copy of equal values (eval-mode dropout leaves one)
        return True
    if t is aten._to_copy.default:
        return set(n.kwargs) <= {"dtype", "layout", "device", "memory_format"}
    return False


def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("canonicalize")
    g = gm.graph
    outputs = set(next(n for n in g.nodes if n.op == "output").all_input_nodes)
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target in _ASSERTS:
            rec.matched.append(f"drop assertion {n.name}")
            g.erase_node(n)
            continue
        v = n.meta.get("val")
        if n.target in _SYM_OPS and isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool):
            concrete = v if isinstance(v, int) else (v.node.expr if v.node.expr.is_Integer else None)
            if concrete is not None:
                n.replace_all_uses_with(int(concrete))
                rec.matched.append(f"fold {n.name} = {int(concrete)}")
                continue
        if n.target in (aten.split.Tensor, aten.split_with_sizes.default) and _split_to_slices(g, n):
            rec.matched.append(f"split {n.name} into slices")
            continue
        if _is_noop(n):
            src = n.args[0]
            # copies/aliases feeding an output stay, so no output aliases an input
            if n in outputs and src.op == "placeholder":
                rec.refuse(n, Refusal("output-aliases-input", "no-op feeds an output directly from an input"))
                continue
            n.replace_all_uses_with(src)
            rec.matched.append(f"no-op {n.target} {n.name}")
    # common subexpressions: same pure op on the same arguments
    seen: dict[tuple, fx.Node] = {}
    for n in list(g.nodes):
        if n.op != "call_function" or n.is_impure() or not n.users:
            continue
        try:
            key = (n.target, _hashable(n.args), _hashable(n.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            n.replace_all_uses_with(seen[key])
            rec.matched.append(f"cse {n.name} -> {seen[key].name}")
        else:
            seen[key] = n
    removed = _dce(g)
    if removed:
        rec.matched.append(f"dead code: {removed} nodes")
    return rec


def _split_to_slices(g: fx.Graph, n: fx.Node) -> bool:
    """``getitem(split(x, ...), i)`` -> ``slice(x, dim, start, end)``: a view a load (or a GEMM
    epilogue reading a matmul's halves) can see through. Static sizes only."""
    import operator

    x = n.args[0]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    xv = val(x)
    if xv is None or not isinstance(xv.shape[dim], int):
        return False
    total = xv.shape[dim]
    if n.target is aten.split.Tensor:
        size = n.args[1]
        if not isinstance(size, int) or size <= 0:
            return False
        sizes = [min(size, total - s) for s in range(0, total, size)] or [0]
    else:
        sizes = list(n.args[1])
        if not all(isinstance(k, int) for k in sizes):
            return False
    if not all(u.target is operator.getitem for u in n.users):
        return False
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for u in list(n.users):
        i = u.args[1]
        with g.inserting_before(u):
            sl = g.call_function(aten.slice.Tensor, (x, dim % xv.dim(), starts[i], starts[i] + sizes[i]))
        sl.meta = dict(u.meta)
        u.replace_all_uses_with(sl)
        g.erase_node(u)
    g.erase_node(n)
    return True


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, (bool, int, float)):
        return (type(x).__name__, "nan" if x != x else x)  # 1, 1.0 and True differ in dtype
    return x


def _dce(g: fx.Graph) -> int:
    before = len(g.nodes)
    g.eliminate_dead_code()
    return before - len(g.nodes)
