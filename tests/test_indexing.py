"""Unit tests of turbofx's sympy index arithmetic (turbofx.codegen.indexing)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from turbofx.codegen import indexing as ix


def syms(*names):
    return [sympy.Symbol(n, integer=True, nonnegative=True) for n in names]


def ints(xs):
    return [sympy.Integer(x) for x in xs]


def evaluate(e, env: dict) -> int:
    """Numeric value of an index expression (FloorDiv/ModIndex evaluate once their args are ints)."""
    v = sympy.sympify(e).subs(env)
    assert v.is_Integer, f"{e} did not evaluate to an integer under {env}: {v}"
    return int(v)


def has_div_mod(e) -> bool:
    e = sympy.sympify(e)
    return bool(e.atoms(ix.FloorDiv) or e.atoms(ix.ModIndex) or e.atoms(sympy.floor) or e.atoms(sympy.Mod))


# ------------------------------------------------------------------ reshape_index

def test_reshape_split_one_dim():
    i0, i1 = syms("i0", "i1")
    out = ix.reshape_index([i0, i1], ints([6]), ints([2, 3]))
    assert len(out) == 1
    assert sympy.expand(out[0] - (3 * i0 + i1)) == 0
    assert not has_div_mod(out[0])


def test_reshape_merge_two_dims():
    (j,) = syms("j")
    out = ix.reshape_index([j], ints([2, 3]), ints([6]))
    assert out[0] == ix.FloorDiv(j, 3)
    assert out[1] == ix.ModIndex(j, 3)
    for v in range(6):
        assert [evaluate(o, {j: v}) for o in out] == [v // 3, v % 3]


def test_reshape_identity_dims_map_straight_through():
    i0, i1, i2 = syms("i0", "i1", "i2")
    out = ix.reshape_index([i0, i1, i2], ints([4, 2, 3]), ints([4, 2, 3]))
    assert out == [i0, i1, i2]


@pytest.mark.parametrize("src,dst", [
    ([6], [2, 3]), ([2, 3], [6]), ([2, 3, 4], [6, 4]), ([2, 3, 4], [2, 12]), ([4, 6], [2, 12]),
    ([4, 6], [3, 8]), ([2, 6], [3, 4]), ([24], [2, 3, 4]), ([2, 3, 4], [4, 3, 2]), ([1, 4], [4]),
    ([4], [1, 4]), ([4, 1, 6], [4, 6]), ([4, 6], [4, 1, 6]), ([2, 1, 3], [3, 2]),
    pytest.param([1, 6], [6, 1], id="move-1-to-the-end"),
    pytest.param([4, 6, 1], [4, 6], id="drop-trailing-1"),
    pytest.param([4, 6], [4, 6, 1], id="add-trailing-1"),
])
def test_reshape_index_matches_torch(src, dst):
    """Every view element maps back to the source element torch's reshape puts there."""
    idx = syms(*[f"i{k}" for k in range(len(dst))])
    out = ix.reshape_index(idx, ints(src), ints(dst))
    assert out is not None, f"reshape {src} -> {dst} not understood"
    assert len(out) == len(src)
    numbering = torch.arange(int(np.prod(src))).reshape(src)
    view = numbering.reshape(dst)
    for point in itertools.product(*[range(d) for d in dst]):
        env = dict(zip(idx, point))
        mapped = tuple(evaluate(o, env) for o in out)
        assert all(0 <= m < s for m, s in zip(mapped, src)), (point, mapped)
        assert numbering[mapped].item() == view[point].item(), (point, mapped)


def test_reshape_symbolic_split():
    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    i0, i1 = syms("i0", "i1")
    out = ix.reshape_index([i0, i1], [s0 * s1], [s0, s1])
    assert sympy.expand(out[0] - (s1 * i0 + i1)) == 0


def test_reshape_incompatible_sizes_is_refused():
    (i0,) = syms("i0")
    assert ix.reshape_index([i0], ints([6]), ints([7])) is None


# ------------------------------------------------------------------ views on real FX nodes

VIEWS = {
    "permute": (lambda x: x.permute(2, 0, 1), (2, 3, 4)),
    "transpose": (lambda x: x.transpose(0, 2), (2, 3, 4)),
    "t": (lambda x: x.t(), (3, 5)),
    "expand": (lambda x: x.expand(3, 2, 4), (2, 1)),
    "unsqueeze": (lambda x: x.unsqueeze(1), (3, 4)),
    "squeeze_dim": (lambda x: x.squeeze(1), (3, 1, 4)),
    "squeeze_all": (lambda x: x.squeeze(), (1, 3, 1, 4)),
    "slice_step": (lambda x: x[:, 1::2], (3, 8)),
    "slice_negative_start": (lambda x: x[:, -3:], (3, 8)),
    "select": (lambda x: x[1], (3, 4)),
    "select_negative": (lambda x: x[:, -1], (3, 4)),
    "view_merge": (lambda x: x.view(6, 4), (2, 3, 4)),
    "view_split": (lambda x: x.view(2, 3, 4), (6, 4)),
    "chain": (lambda x: x.permute(2, 0, 1)[1:, ::2].unsqueeze(0).expand(2, -1, -1, -1), (2, 3, 4)),
    "transpose_then_slice": (lambda x: x.t().unsqueeze(0)[..., 1:], (3, 4)),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_fold_views_matches_torch(name):
    fn, shape = VIEWS[name]
    x = torch.arange(int(np.prod(shape))).reshape(shape)
    gm = make_fx(fn, tracing_mode="fake")(torch.empty(shape, dtype=torch.int64))
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out_node = out_node[0] if isinstance(out_node, (tuple, list)) else out_node
    view = fn(x)
    dst_shape = ix.shape_of(out_node)
    assert [int(s) for s in dst_shape] == list(view.shape)
    idx = syms(*[f"i{k}" for k in range(len(dst_shape))])
    base, bidx = ix.fold_views(out_node, list(idx), lambda v: True)
    assert base.op == "placeholder", f"stopped folding at {base.target}"
    assert len(bidx) == len(shape)
    for point in itertools.product(*[range(d) for d in view.shape]):
        env = dict(zip(idx, point))
        mapped = tuple(evaluate(b, env) for b in bidx)
        assert x[mapped].item() == view[point].item(), (point, mapped)
    # the flat offset into the (contiguous) base agrees too
    off = ix.offset(bidx, ix.strides_of(base))
    for point in itertools.product(*[range(d) for d in view.shape]):
        assert x.flatten()[evaluate(off, dict(zip(idx, point)))].item() == view[point].item()


# ------------------------------------------------------------------ coalesce + delinearize

def test_coalesce_contiguous_access_is_one_group_without_div_mod():
    dims = syms("i0", "i1", "i2")
    sizes = ints([2, 3, 4])
    access = ix.offset(dims, ix.contiguous_strides(sizes))
    groups, rewritten, gsyms, gsizes = ix.coalesce(dims, sizes, [access, access])
    assert groups == [[0, 1, 2]]
    assert gsizes == [24]
    assert rewritten == [gsyms[0], gsyms[0]]
    (per_group,) = ix.delinearize(sympy.Symbol("xindex", integer=True, nonnegative=True), gsizes)
    assert per_group.is_Symbol  # the flat index itself
    assert "//" not in ix.pyexpr(per_group) and "%" not in ix.pyexpr(per_group)


def test_coalesce_with_broadcast_operand():
    dims = syms("i0", "i1", "i2")
    sizes = ints([2, 3, 4])
    full = ix.offset(dims, ix.contiguous_strides(sizes))
    bias = dims[2]  # a [4] operand broadcast over [2, 3, 4]
    groups, (rf, rb), gsyms, gsizes = ix.coalesce(dims, sizes, [full, bias])
    assert groups == [[0, 1], [2]]
    assert gsizes == [6, 4]
    assert sympy.expand(rf - (4 * gsyms[0] + gsyms[1])) == 0
    assert rb == gsyms[1]


def test_coalesce_keeps_transposed_dims_apart():
    dims = syms("i0", "i1")
    sizes = ints([3, 5])
    groups, _, _, _ = ix.coalesce(dims, sizes, [5 * dims[0] + dims[1], dims[0] + 3 * dims[1]])
    assert groups == [[0], [1]]


def test_coalesce_symbolic_sizes():
    dims = syms("i0", "i1")
    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    groups, rewritten, gsyms, gsizes = ix.coalesce(dims, [s0, s1], [s1 * dims[0] + dims[1]])
    assert groups == [[0, 1]]
    assert sympy.expand(gsizes[0] - s0 * s1) == 0
    assert rewritten == [gsyms[0]]


def test_coalesce_rewrite_preserves_offsets():
    dims = syms("i0", "i1", "i2")
    sizes = ints([2, 3, 4])
    accesses = [12 * dims[0] + 4 * dims[1] + dims[2] + 5, 4 * dims[1] + dims[2], dims[0]]
    groups, rewritten, gsyms, gsizes = ix.coalesce(dims, sizes, accesses)
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    per_group = ix.delinearize(x, gsizes)
    for flat, point in enumerate(itertools.product(range(2), range(3), range(4))):
        env_g = {g: evaluate(e, {x: flat}) for g, e in zip(gsyms, per_group)}
        for a, r in zip(accesses, rewritten):
            assert evaluate(r, env_g) == evaluate(a, dict(zip(dims, point)))


def test_linear_coeffs():
    i0, i1 = syms("i0", "i1")
    assert ix.linear_coeffs(3 * i0 + 7 * i1 + 2, [i0, i1]) == {i0: 3, i1: 7}
    assert ix.linear_coeffs(ix.FloorDiv(i0, 3) + i1, [i0, i1]) is None
    assert ix.linear_coeffs(i0 * i1, [i0, i1]) is None


@pytest.mark.parametrize("sizes", [[2, 3, 4], [5], [1, 7], [3, 1, 2]])
def test_delinearize_matches_unravel_index(sizes):
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    per_dim = ix.delinearize(x, ints(sizes))
    assert len(per_dim) == len(sizes)
    for flat in range(int(np.prod(sizes))):
        assert tuple(evaluate(e, {x: flat}) for e in per_dim) == np.unravel_index(flat, sizes)


def test_delinearize_empty():
    assert ix.delinearize(sympy.Symbol("x"), []) == []


# ------------------------------------------------------------------ printing

def _check_print(e, env):
    src = ix.pyexpr(e)
    got = eval(src, {"max": max, "min": min}, {k.name: v for k, v in env.items()})
    assert got == evaluate(e, env), (src, env)
    return src


def test_pyexpr_basic_forms():
    x, y = syms("x", "y")
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    assert ix.pyexpr(sympy.Integer(7)) == "7"
    assert ix.pyexpr(sympy.Integer(-3)) == "-3"
    assert ix.pyexpr(x) == "x"
    assert ix.pyexpr(ix.FloorDiv(x, 4)) == "(x // 4)"
    assert ix.pyexpr(ix.ModIndex(x, 4)) == "(x % 4)"
    for env in [{x: 0, y: 0, s0: 1}, {x: 13, y: 5, s0: 6}, {x: 100, y: 7, s0: 9}]:
        for e in [3 * x + y + 2, x * s0 + y, ix.FloorDiv(x, s0), ix.ModIndex(ix.FloorDiv(x, 3), s0),
                  s0 ** 2 + x, sympy.Max(x, s0) + 1, sympy.Min(x, y), s0 * 8 / 2, x - y * 2]:
            _check_print(e, env)


def test_pyexpr_rational_size_is_integer_division():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    src = ix.pyexpr(s0 / 2)
    assert "//" in src and "/ " not in src.replace("//", "")
    assert eval(src, {}, {"s0": 8}) == 4


def test_pyexpr_rejects_unknown():
    with pytest.raises(NotImplementedError):
        ix.pyexpr(sympy.sin(sympy.Symbol("x")))


# ------------------------------------------------------------------ small helpers

def test_contiguous_strides_and_product():
    assert ix.contiguous_strides(ints([2, 3, 4])) == [12, 4, 1]
    assert ix.contiguous_strides([]) == []
    assert ix.product(ints([2, 3, 4])) == 24
    assert ix.product([]) == 1


def test_broadcast_index():
    i0, i1, i2 = syms("i0", "i1", "i2")
    assert ix.broadcast_index([i0, i1, i2], ints([3, 1])) == [i1, 0]
    assert ix.broadcast_index([i0, i1, i2], ints([4])) == [i2]
    assert ix.broadcast_index([i0, i1], ints([])) == []


def test_same_and_next_pow2():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    assert ix.same(2 * s0 + 2, 2 * (s0 + 1))
    assert not ix.same(s0, s0 + 1)
    assert [ix.next_pow2(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]


def test_to_expr():
    assert ix.to_expr(5) == 5
    assert ix.to_expr(True) == 1
    with pytest.raises(TypeError):
        ix.to_expr("5")
