"""Named argument views of turbofx's ops (turbofx/runtime/op_args.py): every schema argument reads
back by name whatever the call's mix of positionals and keywords, defaults fill omitted ones,
``call_args`` rebuilds an equivalent call, and a node of another op is a clear OpArgsError."""
import dataclasses

import pytest
import torch
import torch.fx as fx

from turbofx.errors import OpArgsError, TurbofxError
from turbofx.runtime.op_args import (AttentionArgs, CachedAttentionArgs, SdpaArgs, VarlenAttentionArgs, op_args,
                                     view)

VIEWS = [AttentionArgs, CachedAttentionArgs, VarlenAttentionArgs, SdpaArgs]
OPS = [(cls, name) for cls in VIEWS for name in cls.OPS]


def _op(name):
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


def _distinct_values(g: fx.Graph, schema) -> dict:
    """One value per argument that no other argument has: a placeholder for each tensor, a
    distinct number for each scalar (bools cannot all differ: they alternate)."""
    values = {}
    for i, a in enumerate(schema.arguments):
        t = str(a.type)
        if "Tensor" in t:
            values[a.name] = g.placeholder(a.name)
        elif t.startswith("bool"):
            values[a.name] = bool(i % 2)
        elif t.startswith("int"):
            values[a.name] = 100 + i
        else:
            values[a.name] = 0.5 + i
    return values


@pytest.mark.parametrize("cls,name", OPS, ids=[name for _, name in OPS])
@pytest.mark.parametrize("keywords", ["none", "trailing", "all"])
def test_every_argument_round_trips_by_name(cls, name, keywords):
    op = _op(name)
    schema = op._schema
    g = fx.Graph()
    values = _distinct_values(g, schema)
    params = list(schema.arguments)
    split = {"none": len(params), "trailing": len(params) // 2, "all": 0}[keywords]
    args = tuple(values[p.name] for p in params[:split] if not p.kwarg_only)
    kwargs = {p.name: values[p.name] for p in params if p.name not in {q.name for q in params[:len(args)]}}
    node = g.call_function(op, args, kwargs)

    a = op_args(node)
    assert type(a) is cls and cls.of(node) == a
    for p in params:  # each argument under its own name (the view's name when it renames one)
        assert getattr(a, cls.RENAMED.get(p.name, p.name)) is values[p.name], p.name
    new_args, new_kwargs = a.call_args(op)
    assert cls.bind(op, new_args, new_kwargs) == a
    assert len(new_args) == sum(not p.kwarg_only for p in params)
    assert set(new_kwargs) == {p.name for p in params if p.kwarg_only}


def test_omitted_arguments_take_schema_defaults():
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    a = op_args(g.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, v), {"is_causal": True}))
    assert (a.q, a.k, a.v, a.attn_mask, a.dropout_p, a.is_causal, a.scale, a.enable_gqa) == \
        (q, k, v, None, 0.0, True, None, False)


def test_built_nodes_and_derived_views():
    g = fx.Graph()
    t = {n: g.placeholder(n) for n in ("q", "k_new", "v_new", "k_cache", "v_cache", "positions")}
    c = CachedAttentionArgs(**t, cos=None, sin=None, mask=None, scale=0.25, causal=True, window=3, softcap=0.0,
                            rope_q=False, rope_k=False)
    node = c.call_function(g)
    assert node.target is torch.ops.turbofx.cached_attention.default and op_args(node) == c
    att = c.attention()  # what it attends over: the updated caches
    assert (att.k, att.v, att.scale, att.causal, att.window) == (t["k_cache"], t["v_cache"], 0.25, True, 3)
    assert op_args(att.call_function(g)) == att
    assert dataclasses.replace(c, window=0).window == 0 and c.window == 3  # frozen: replace, never mutate


def test_unknown_op_is_a_clear_error():
    g = fx.Graph()
    x = g.placeholder("x")
    add = g.call_function(torch.ops.aten.add.Tensor, (x, x))
    with pytest.raises(OpArgsError, match=r"no argument view for node add.*aten::add.*turbofx::attention"):
        op_args(add)
    with pytest.raises(OpArgsError, match="no argument view"):
        op_args(x)
    with pytest.raises(OpArgsError, match=r"AttentionArgs reads turbofx::attention nodes.*aten::add"):
        AttentionArgs.of(add)
    assert issubclass(OpArgsError, TurbofxError)


def test_calls_that_do_not_fit_the_schema_are_refused():
    op = torch.ops.turbofx.varlen_attention.default
    with pytest.raises(OpArgsError, match="missing its argument causal"):
        VarlenAttentionArgs.bind(op, (1, 2, 3, 4, 0.5), {})
    with pytest.raises(OpArgsError, match="no argument bogus"):
        VarlenAttentionArgs.bind(op, (1, 2, 3, 4, 0.5, True), {"bogus": 1})
    with pytest.raises(OpArgsError, match="twice"):
        VarlenAttentionArgs.bind(op, (1, 2, 3, 4, 0.5, True), {"q": 1})
    with pytest.raises(OpArgsError, match="positional"):  # ATen's scale is keyword-only
        SdpaArgs.bind(torch.ops.aten.scaled_dot_product_attention.default, (1, 2, 3, None, 0.0, False, 0.5), {})


def test_a_view_whose_fields_drift_from_the_schema_fails_at_registration():
    @dataclasses.dataclass(frozen=True)
    class Stale(AttentionArgs):  # one field too many: the schema has no such argument
        extra: int = 0

    with pytest.raises(AssertionError, match="Stale has fields"):
        view(Stale)
