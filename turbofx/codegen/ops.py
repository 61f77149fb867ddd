"""Which ATen ops have kernel templates, and the Triton expression each one becomes.

Values inside a kernel are computed in fp32 when they are floating point (loads upcast, stores
downcast); explicit casts to a narrower float type round there, as eager does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from turbofx.refusal import Refusal

aten = torch.ops.aten

TL_DTYPE = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32",
    torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
    torch.float8_e4m3fn: "tl.float8e4nv", torch.float8_e4m3fnuz: "tl.float8e4b8",
}


def compute_dtype(dtype: torch.dtype) -> str:
    """The Triton type a value of ``dtype`` is held in inside a kernel."""
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "tl.float32"
    return TL_DTYPE[dtype]


def literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        if math.isnan(v):
            return "float('nan')"
        return repr(v)
    raise TypeError(f"unsupported constant {v!r}")


def _sigmoid(x: str) -> str:
    return f"(1.0 / (1.0 + tl.exp(-({x}))))"


def _tanh(x: str) -> str:
    """tanh from tl.exp (portable across CUDA, HIP and the interpreter: no libdevice). Near 0 a
    short odd series keeps the sign of -0 and avoids the cancellation of (1 - e) / (1 + e)."""
    a = f"tl.abs({x})"
    x2 = f"(({x}) * ({x}))"
    series = f"(({x}) * (1.0 + {x2} * (-0.3333333333333333 + {x2} * (0.13333333333333333 + {x2} * -0.05396825396825397))))"
    e = f"tl.exp(-2.0 * {a})"
    big = f"((1.0 - {e}) / (1.0 + {e}))"
    return f"tl.where({a} < 0.0625, {series}, tl.where(({x}) < 0, -{big}, {big}))"


def _pow_scalar(x: str, e) -> str | None:
    if isinstance(e, (int, float)) and float(e).is_integer() and 0 <= e <= 4:
        e = int(e)
        return "(" + " * ".join([f"({x})"] * e) + ")" if e else "1.0"
    table = {0.5: f"tl.sqrt({x})", -0.5: f"(1.0 / tl.sqrt({x}))", -1: f"(1.0 / ({x}))", -2: f"(1.0 / (({x}) * ({x})))"}
    return table.get(e)


def _gelu(x: str, approximate: str) -> str:
    if approximate == "tanh":
        inner = f"0.7978845608028654 * (({x}) + 0.044715 * ({x}) * ({x}) * ({x}))"
        return f"(0.5 * ({x}) * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * ({x}) * (1.0 + tl.erf(({x}) * 0.7071067811865476)))"


def _alpha(kw: dict) -> str:
    a = kw.get("alpha", 1)
    return "" if a == 1 else f"{literal(a)} * "


def _to_copy(node: fx.Node, a: list[str], kw: dict) -> str:
    dst = node.meta["val"].dtype
    if dst == torch.bool:
        return f"({a[0]} != 0)"
    if dst in (torch.float16, torch.bfloat16):
        return f"{a[0]}.to({TL_DTYPE[dst]}).to(tl.float32)"  # round to the narrow type, as eager
    return f"{a[0]}.to({compute_dtype(dst)})"


# ops whose result is exactly representable in their (narrow) input type: no rounding needed
_EXACT = {"where", "clone", "neg", "abs", "relu", "maximum", "minimum", "_to_copy", "copy", "cat"}


def round_to_dtype(node: fx.Node, code: str) -> str:
    """Round a value computed in fp32 to the node's fp16/bf16 type, as eager does after every op:
    eager ``(h * 1000) * 1000`` in fp16 overflows to inf in the middle, and so must a fused kernel."""
    v = node.meta.get("val")
    name = getattr(node.target, "__name__", "").split(".")[0]
    if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16) and name not in _EXACT:
        return f"({code}).to({TL_DTYPE[v.dtype]}).to(tl.float32)"
    return code


def _scalar_in(node: fx.Node, k: int, code: str) -> str:
    """A Python float compared with an fp16/bf16 tensor is first converted to the tensor's type in
    eager (``h == 0.1`` is true for ``h = tensor(0.1, dtype=float16)``)."""
    x, s = node.args[0], node.args[k]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if isinstance(s, float) and isinstance(xv, torch.Tensor) and xv.dtype in (torch.float16, torch.bfloat16):
        return literal(float(torch.tensor(s, dtype=xv.dtype)))
    return code


def _cmp(op: str) -> "Template":
    return lambda n, a, k: f"({a[0]} {op} {_scalar_in(n, 1, a[1])})"


def _add(n: fx.Node, a: list[str], k: dict) -> str:
    if n.meta["val"].dtype == torch.bool:  # bool + bool is logical or in torch (Triton's int1 wraps)
        return f"(({a[0]} != 0) | ({a[1]} != 0))"
    return f"({a[0]} + {_alpha(k)}{a[1]})"


# op -> (node, arg code, kwargs) -> Triton expression. kwargs hold constants only.
Template = Callable[[fx.Node, list, dict], "str | None"]
POINTWISE: dict = {
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: lambda n, a, k: f"({a[0]} - {_alpha(k)}{a[1]})",
    aten.sub.Scalar: lambda n, a, k: f"({a[0]} - {_alpha(k)}{a[1]})",
    aten.rsub.Scalar: lambda n, a, k: f"({a[1]} - {_alpha(k)}{a[0]})",
    aten.mul.Tensor: lambda n, a, k: f"({a[0]} * {a[1]})",
    aten.mul.Scalar: lambda n, a, k: f"({a[0]} * {a[1]})",
    aten.div.Tensor: lambda n, a, k: f"({a[0]} / {a[1]})",
    aten.div.Scalar: lambda n, a, k: f"({a[0]} / {a[1]})",
    aten.neg.default: lambda n, a, k: f"(-{a[0]})",
    aten.exp.default: lambda n, a, k: f"tl.exp({a[0]})",
    aten.log.default: lambda n, a, k: f"tl.log({a[0]})",
    aten.sqrt.default: lambda n, a, k: f"tl.sqrt({a[0]})",
    aten.rsqrt.default: lambda n, a, k: f"(1.0 / tl.sqrt({a[0]}))",
    aten.reciprocal.default: lambda n, a, k: f"(1.0 / {a[0]})",
    aten.abs.default: lambda n, a, k: f"tl.abs({a[0]})",
    aten.sin.default: lambda n, a, k: f"tl.sin({a[0]})",
    aten.cos.default: lambda n, a, k: f"tl.cos({a[0]})",
    aten.erf.default: lambda n, a, k: f"tl.erf({a[0]})",
    aten.sigmoid.default: lambda n, a, k: _sigmoid(a[0]),
    aten.tanh.default: lambda n, a, k: _tanh(a[0]),
    aten.relu.default: lambda n, a, k: _nan_aware("maximum", n, a[0], "0"),
    aten.silu.default: lambda n, a, k: f"({a[0]} * {_sigmoid(a[0])})",
    aten.gelu.default: lambda n, a, k: _gelu(a[0], k.get("approximate", n.args[1] if len(n.args) > 1 else "none")),
    aten.pow.Tensor_Scalar: lambda n, a, k: _pow_scalar(a[0], n.args[1]),
    aten.maximum.default: lambda n, a, k: _nan_aware("maximum", n, a[0], a[1]),
    aten.minimum.default: lambda n, a, k: _nan_aware("minimum", n, a[0], a[1]),
    aten.where.self: lambda n, a, k: f"tl.where({a[0]}, {a[1]}, {a[2]})",
    aten.eq.Tensor: lambda n, a, k: f"({a[0]} == {a[1]})",
    aten.eq.Scalar: _cmp("=="),
    aten.ne.Tensor: lambda n, a, k: f"({a[0]} != {a[1]})",
    aten.ne.Scalar: _cmp("!="),
    aten.lt.Tensor: lambda n, a, k: f"({a[0]} < {a[1]})",
    aten.lt.Scalar: _cmp("<"),
    aten.le.Tensor: lambda n, a, k: f"({a[0]} <= {a[1]})",
    aten.le.Scalar: _cmp("<="),
    aten.gt.Tensor: lambda n, a, k: f"({a[0]} > {a[1]})",
    aten.gt.Scalar: _cmp(">"),
    aten.ge.Tensor: lambda n, a, k: f"({a[0]} >= {a[1]})",
    aten.ge.Scalar: _cmp(">="),
    aten.logical_not.default: lambda n, a, k: f"({a[0]} == 0)",
    aten.logical_and.default: lambda n, a, k: f"(({a[0]} != 0) & ({a[1]} != 0))",
    aten.logical_or.default: lambda n, a, k: f"(({a[0]} != 0) | ({a[1]} != 0))",
    aten.bitwise_not.default: lambda n, a, k: f"({a[0]} == 0)" if n.meta["val"].dtype == torch.bool else f"(~{a[0]})",
    aten.bitwise_and.Tensor: lambda n, a, k: f"({a[0]} & {a[1]})",
    aten.bitwise_or.Tensor: lambda n, a, k: f"({a[0]} | {a[1]})",
    aten.clamp.default: lambda n, a, k: _clamp(n, a),
    aten._to_copy.default: _to_copy,
    aten.clone.default: lambda n, a, k: a[0],
    aten.copy.default: lambda n, a, k: _to_copy(n, [a[1]], k),  # functional copy_: src cast and broadcast
}


def _nan_aware(fn: str, node: fx.Node, x: str, y: str) -> str:
    """max/min that keep NaN, as torch does (Triton's default drops it)."""
    if node.meta["val"].dtype.is_floating_point:
        return f"tl.{fn}({x}, {y}, propagate_nan=tl.PropagateNan.ALL)"
    return f"tl.{fn}({x}, {y})"


def _clamp(node: fx.Node, a: list[str]) -> str:
    x = a[0]
    if len(a) > 1 and a[1] != "None":
        x = _nan_aware("maximum", node, x, a[1])
    if len(a) > 2 and a[2] != "None":
        x = _nan_aware("minimum", node, x, a[2])
    return x


REDUCTIONS = {
    aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "max", aten.amin.default: "min",
}


def _cat_refusal(node: fx.Node) -> Refusal | None:
    out = node.meta.get("val")
    pieces = node.args[0]
    if not isinstance(out, torch.Tensor) or out.dtype not in TL_DTYPE or out.dtype == torch.float64:
        return Refusal("dtype", f"cat of dtype {getattr(out, 'dtype', None)} (not generated)")
    for p in pieces:
        v = p.meta.get("val") if isinstance(p, fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype != out.dtype or v.dim() != out.dim():
            return Refusal("cat-mixed", "cat of mixed dtypes or ranks")
    return None


def pointwise_refusal(node: fx.Node) -> Refusal | None:
    """None if ``node`` has a pointwise template, else why not."""
    if node.target is aten.cat.default:
        return _cat_refusal(node)
    if node.target not in POINTWISE:
        return Refusal("no-template", f"no kernel template for {node.target}")
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return Refusal("not-tensor", "result is not a tensor")
    if v.dtype not in TL_DTYPE or v.dtype == torch.float64:
        return Refusal("dtype", f"dtype {v.dtype} is not generated (runs in ATen)")
    if node.target is aten._to_copy.default:
        src = node.args[0].meta.get("val")
        if set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
            return Refusal("copy-args", "copy with unusual arguments")
        if src is None or src.device != v.device:
            return Refusal("device-transfer", "device transfer")
    if node.target is aten.copy.default:
        src = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        if src is None or src.device != v.device or node.kwargs.get("non_blocking"):
            return Refusal("copy-source", "copy from another device or of a non-tensor")
    if node.target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.contiguous_format):
        return Refusal("memory-format", "clone to a non-contiguous memory format")
    if node.target is aten.pow.Tensor_Scalar and _pow_scalar("x", node.args[1]) is None:
        return Refusal("pow-exponent", f"pow with exponent {node.args[1]}")
    for a in node.args:
        if isinstance(a, fx.Node) and not isinstance(a.meta.get("val"), (torch.Tensor, torch.SymInt, torch.SymFloat)):
            return Refusal("argument-kind", "argument is not a tensor or a number")
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            if a.meta["val"].dtype not in TL_DTYPE or a.meta["val"].dtype == torch.float64:
                return Refusal("dtype", f"input dtype {a.meta['val'].dtype}")
    return None


def reduction_refusal(node: fx.Node) -> Refusal | None:
    """None if ``node`` is a single-axis reduction over the last dim we can generate."""
    if node.target not in REDUCTIONS:
        return Refusal("no-template", f"no kernel template for {node.target}")
    x = node.args[0].meta.get("val")
    out = node.meta.get("val")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return Refusal("scalar-reduction", "reduction of a scalar")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or len(dims) != 1 or dims[0] % x.dim() != x.dim() - 1:
        return Refusal("not-last-dim", "reduces other than exactly the last dim")
    if node.kwargs.get("dtype") not in (None, out.dtype) or out.dtype not in TL_DTYPE or out.dtype == torch.float64:
        return Refusal("dtype", f"reduction dtype {out.dtype}")
    if x.dtype not in TL_DTYPE or x.dtype == torch.float64:
        return Refusal("dtype", f"input dtype {x.dtype}")
    if REDUCTIONS[node.target] in ("max", "min") and not x.dtype.is_floating_point:
        return Refusal("integer-max-min", "integer max/min reduction")
    if x.shape[-1] == 1:
        return Refusal("size-1-dim", "reduction over a size-1 dim")
    return None
