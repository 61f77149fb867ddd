"""Named views of the arguments of turbofx's own ops (and of SDPA, which the attention pass reads).

Code that reads a ``torch.ops.turbofx.*`` node by position (``n.args[3]``) silently reads the wrong
argument once the op's schema gains or reorders one. A view binds a node's ``args`` and ``kwargs``
to the op's schema argument names (``target._schema.arguments``; omitted arguments take their
schema defaults), so ``CachedAttentionArgs.of(node).k_cache`` is the ``k_cache`` argument whatever
its position, and ``view.call_args()`` gives back ``(args, kwargs)`` in schema order to build a
node. Each view's fields are checked against the live schemas when this module is imported: a
schema change without its view fails at import, not with a wrong argument later.

Views hold whatever the call holds: ``fx.Node``s and constants for a graph node, values for
``bind(op, args, kwargs)``. ``op_args(node)`` picks the view by the node's op; an op without one
is an ``OpArgsError``. A new op: a frozen dataclass subclass of ``OpArgs`` with one field per
schema argument, in schema order, decorated with ``@view``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

import turbofx.runtime.ops  # noqa: F401  (registers torch.ops.turbofx.*)
from turbofx.errors import OpArgsError

Arg = Any  # an fx.Node or a constant in a graph; the value itself when bound from a call

_VIEWS: dict[str, type[OpArgs]] = {}  # schema name ("turbofx::attention") -> its view


def _overload(target) -> torch._ops.OpOverload | None:
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.default
    return target if isinstance(target, torch._ops.OpOverload) else None


def _resolve(schema_name: str) -> torch._ops.OpOverload:
    namespace, name = schema_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


@dataclass(frozen=True)
class OpArgs:
    """Base of the views: one field per schema argument, in schema order."""

    OPS: ClassVar[tuple[str, ...]] = ()  # schema names this view reads; the first is the one it builds
    RENAMED: ClassVar[dict[str, str]] = {}  # schema argument name -> field name, where they differ

    @classmethod
    def of(cls, node: fx.Node):
        """The view of ``node``'s arguments; an ``OpArgsError`` if ``node`` is not a call of one of ``OPS``."""
        op = _overload(node.target) if node.op == "call_function" else None
        if op is None or op._schema.name not in cls.OPS:
            got = op._schema.name if op is not None else f"{node.op} {node.target}"
            raise OpArgsError(f"{cls.__name__} reads {' / '.join(cls.OPS)} nodes, but node {node.name} is {got}")
        return cls.bind(op, node.args, node.kwargs, where=f"node {node.name}")

    @classmethod
    def bind(cls, op, args: tuple | list, kwargs: dict, where: str = "call"):
        """Bind a call of ``op`` as Python does: positionals first, then keywords, then schema defaults."""
        op = _overload(op)
        schema = op._schema
        params = list(schema.arguments)
        positional = [p for p in params if not p.kwarg_only]
        if len(args) > len(positional):
            raise OpArgsError(f"{where}: {schema.name} takes {len(positional)} positional arguments, got {len(args)}")
        names = {p.name for p in params}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OpArgsError(f"{where}: {schema.name} has no argument {', '.join(unknown)} "
                              f"(its arguments: {', '.join(p.name for p in params)})")
        values: dict[str, Arg] = {}
        for p, a in zip(positional, args):
            if p.name in kwargs:
                raise OpArgsError(f"{where}: {schema.name} got argument {p.name} twice (position and keyword)")
            values[p.name] = a
        for p in params:
            if p.name in values:
                continue
            if p.name in kwargs:
                values[p.name] = kwargs[p.name]
            elif p.has_default_value():
                values[p.name] = p.default_value
            else:
                raise OpArgsError(f"{where}: {schema.name} is missing its argument {p.name}")
        return cls(**{cls.RENAMED.get(k, k): v for k, v in values.items()})

    @classmethod
    def op(cls) -> torch._ops.OpOverload:
        """The op this view builds (the first of ``OPS``)."""
        return _resolve(cls.OPS[0])

    def call_args(self, op=None) -> tuple[tuple, dict]:
        """(args, kwargs) calling ``op`` (default: ``self.op()``) with these arguments, in schema order."""
        schema = _overload(op or self.op())._schema
        args, kwargs = [], {}
        for p in schema.arguments:
            v = getattr(self, self.RENAMED.get(p.name, p.name))
            if p.kwarg_only:
                kwargs[p.name] = v
            else:
                args.append(v)
        return tuple(args), kwargs

    def call_function(self, g: fx.Graph) -> fx.Node:
        """A new node of ``g`` calling ``self.op()`` with these arguments (at g's insertion point)."""
        args, kwargs = self.call_args()
        return g.call_function(self.op(), args, kwargs)


def _check_fields(cls: type[OpArgs]) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    for name in cls.OPS:
        schema = _resolve(name)._schema
        want = [cls.RENAMED.get(a.name, a.name) for a in schema.arguments]
        if fields != want:
            raise AssertionError(f"turbofx bug: {cls.__name__} has fields {fields} but {name}'s schema has "
                                 f"arguments {want}: update the view in turbofx/runtime/op_args.py")


def view(cls: type[OpArgs]) -> type[OpArgs]:
    """Register ``cls`` as the view of its ``OPS`` after checking its fields against their schemas."""
    _check_fields(cls)
    for name in cls.OPS:
        if name in _VIEWS:
            raise AssertionError(f"turbofx bug: {name} has two argument views ({_VIEWS[name].__name__}, {cls.__name__})")
        _VIEWS[name] = cls
    return cls


def op_args(node: fx.Node) -> OpArgs:
    """The named view of ``node``'s arguments, chosen by its op."""
    op = _overload(node.target) if node.op == "call_function" else None
    cls = _VIEWS.get(op._schema.name) if op is not None else None
    if cls is None:
        what = op._schema.name if op is not None else f"a {node.op} of {node.target}"
        raise OpArgsError(f"no argument view for node {node.name} ({what}); views exist for "
                          f"{', '.join(sorted(_VIEWS))}")
    return cls.of(node)


@view
@dataclass(frozen=True)
class AttentionArgs(OpArgs):
    """``turbofx::attention``: softmax(scale · q kᵀ [softcapped] + mask) v."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::attention",)
    q: Arg
    k: Arg
    v: Arg
    mask: Arg  # None, bool (True keeps) or additive
    scale: float
    causal: bool  # bottom-right aligned (a KV cache's convention)
    window: int  # 0: none
    softcap: float  # 0.0: none


@view
@dataclass(frozen=True)
class CachedAttentionArgs(OpArgs):
    """``turbofx::cached_attention``: RoPE on the new rows, their write into the caches, attention."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::cached_attention",)
    q: Arg
    k_new: Arg
    v_new: Arg
    k_cache: Arg
    v_cache: Arg
    positions: Arg  # 1-D, the cache rows (dim 2) the new rows go to
    cos: Arg
    sin: Arg
    mask: Arg
    scale: float
    causal: bool
    window: int
    softcap: float
    rope_q: bool
    rope_k: bool

    def attention(self) -> AttentionArgs:
        """The attention it computes, over the updated caches."""
        return AttentionArgs(self.q, self.k_cache, self.v_cache, self.mask, self.scale, self.causal, self.window,
                             self.softcap)


@view
@dataclass(frozen=True)
class VarlenAttentionArgs(OpArgs):
    """``turbofx::varlen_attention``: packed sequences, rows cu_seqlens[i]:cu_seqlens[i+1]."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::varlen_attention",)
    q: Arg
    k: Arg
    v: Arg
    cu_seqlens: Arg
    scale: float
    causal: bool


@view
@dataclass(frozen=True)
class PagedAttentionArgs(OpArgs):
    """``turbofx::paged_attention``: a packed step over a paged KV cache (see runtime/ops.py)."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::paged_attention",)
    q: Arg
    k_cache: Arg
    v_cache: Arg
    block_table: Arg
    query_start: Arg
    seq_lens: Arg
    scale: float
    window: int
    softcap: float


@view
@dataclass(frozen=True)
class SdpaArgs(OpArgs):
    """``turbofx::sdpa`` and ATen's ``scaled_dot_product_attention`` (same arguments; ATen names
    q, k, v ``query``, ``key``, ``value`` and makes ``scale`` and ``enable_gqa`` keyword-only)."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::sdpa", "aten::scaled_dot_product_attention")
    RENAMED: ClassVar[dict[str, str]] = {"query": "q", "key": "k", "value": "v"}
    q: Arg
    k: Arg
    v: Arg
    attn_mask: Arg
    dropout_p: float
    is_causal: bool  # top-left aligned when Sq != Sk
    scale: float | None
    enable_gqa: bool


@view
@dataclass(frozen=True)
class GemmArgs(OpArgs):
    """``turbofx::gemm``: epilogue(prologue(a) @ b) as the GemmSpec text in ``spec`` says."""

    OPS: ClassVar[tuple[str, ...]] = ("turbofx::gemm",)
    a: Arg  # [*, K] (batched: [Bt, M, K]); with an RMSNorm prologue, the norm's input
    b: Arg  # [N, K] (b_layout "nk") or [K, N]
    bias: Arg
    residual: Arg
    norm_weight: Arg
    b_scale: Arg  # a quantized b's scales (the spec's WeightQuant), else None
    b_min: Arg
    spec: str  # canonical JSON of the GemmSpec (turbofx.runtime.ops.gemm_spec_text)
