"""Runtime values of a Program's plain-data templates: size expressions, value references,
dtypes and other argument tags, and ATen ops by name."""
from __future__ import annotations

import operator
from typing import Callable

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                   "channels_last": torch.channels_last}
_LAYOUTS = {"strided": torch.strided}


def _compile_expr(src: str):
    return compile(src, "<turbofx-size>", "eval")


def _eval(code, env: dict) -> int:
    return eval(code, {"max": max, "min": min}, env)


# ---------------------------------------------------------------- argument templates

class _Ref:
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


class _Expr:
    __slots__ = ("code",)

    def __init__(self, src: str) -> None:
        self.code = _compile_expr(src)


def decode_arg(x):
    """JSON template -> runtime template (refs and compiled size expressions)."""
    if isinstance(x, list):
        return [decode_arg(a) for a in x]
    if isinstance(x, dict):
        (k, v), = x.items()
        if k == "$v":
            return _Ref(v)
        if k == "$e":
            return _Expr(v)
        if k == "$dtype":
            return _DTYPES[v]
        if k == "$device":
            return torch.device(v)
        if k == "$mf":
            return _MEMORY_FORMATS[v]
        if k == "$layout":
            return _LAYOUTS[v]
        if k == "$float":
            return float(v)
        if k == "$tuple":
            return tuple(decode_arg(a) for a in v)
        if k == "$kw":
            return {kk: decode_arg(vv) for kk, vv in v.items()}
        raise ValueError(f"unknown argument tag {k}")
    return x


def _resolve(x, values: list, env: dict):
    if isinstance(x, _Ref):
        return values[x.i]
    if isinstance(x, _Expr):
        return _eval(x.code, env)
    if isinstance(x, list):
        return [_resolve(a, values, env) for a in x]
    if isinstance(x, tuple):
        return tuple(_resolve(a, values, env) for a in x)
    if isinstance(x, dict):
        return {k: _resolve(v, values, env) for k, v in x.items()}
    return x


def resolve_op(name: str) -> Callable:
    if name == "getitem":
        return operator.getitem
    ns, rest = name.split("::", 1)
    packet, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload or "default")


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
