"""Shape guards: the conditions on input sizes under which a captured program is valid.

torch.export with dynamic sizes records them as range constraints (``s0 in [2, inf]``, from
0/1 specialisation and from branches on sizes such as ``if x.shape[1] > 4``), as dims that are
expressions of other inputs' sizes (``2*s1``), as one symbol shared by several dims (two inputs
that must agree), and as runtime assertions. A call outside them would run a program traced
for other sizes (wrong branch, wrong broadcasting), so every call is checked.

Plain data (JSON-serialisable): expressions are stored as Python source over symbol names and
compiled once; a symbol is bound from the first input dim that is exactly that symbol
(``bindings``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sympy


@dataclass
class RangeGuard:
    expr: str  # Python source over the bound symbols
    text: str  # for people, e.g. "2*s1"
    lo: int
    hi: int | None  # None: unbounded


@dataclass
class AssertGuard:
    expr: str
    text: str


@dataclass
class ShapeGuards:
    """What save/load must carry besides ``expected`` (whose symbolic dims bind the symbols)."""

    ranges: list[RangeGuard] = field(default_factory=list)
    asserts: list[AssertGuard] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> "ShapeGuards":
        if not d:
            return cls()
        return cls([RangeGuard(**r) for r in d["ranges"]], [AssertGuard(**a) for a in d["asserts"]])


def _src(e) -> str:
    """Python source for an integer or boolean size expression (torch's sympy functions included)."""
    e = sympy.sympify(e)
    name = type(e).__name__
    if e is sympy.true or e is sympy.false:
        return str(bool(e))
    if isinstance(e, sympy.Integer):
        return str(int(e))
    if isinstance(e, sympy.Symbol):
        return e.name
    if isinstance(e, sympy.Rational):
        return f"({e.p} / {e.q})"
    rel = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">="}
    for cls, op in rel.items():
        if isinstance(e, cls):
            return f"({_src(e.lhs)} {op} {_src(e.rhs)})"
    if isinstance(e, sympy.And):
        return "(" + " and ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Or):
        return "(" + " or ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Not):
        return f"(not {_src(e.args[0])})"
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        return "(" + " * ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) >= 0:
        return f"({_src(e.base)} ** {int(e.exp)})"
    if name == "FloorDiv":
        return f"({_src(e.args[0])} // {_src(e.args[1])})"
    if name in ("Mod", "PythonMod", "ModIndex"):
        return f"({_src(e.args[0])} % {_src(e.args[1])})"
    if isinstance(e, (sympy.Max, sympy.Min)) or name in ("Max", "Min"):
        return f"{name.lower()}({', '.join(_src(a) for a in e.args)})"
    raise NotImplementedError(f"cannot print size expression {e} ({name})")


def source(e) -> str:
    """Python source for ``e``, or (for expressions the printer does not know) ``sympy:`` and its
    srepr, evaluated through sympy at run time (slow, but never an unchecked guard)."""
    try:
        return _src(e)
    except NotImplementedError:
        return "sympy:" + sympy.srepr(e)


class Evaluator:
    """Compiled guard expressions, evaluated over a symbol environment."""

    def __init__(self) -> None:
        self._codes: dict[str, object] = {}

    def __call__(self, src: str, env: dict[str, int]):
        code = self._codes.get(src)
        if code is None:
            code = self._codes[src] = src if src.startswith("sympy:") else compile(src, "<turbofx-guard>", "eval")
        if isinstance(code, str):
            import torch.utils._sympy.functions as fns

            e = sympy.sympify(code.removeprefix("sympy:"), locals=vars(fns))
            return e.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()}).subs(
                {sympy.Symbol(k): v for k, v in env.items()})
        return eval(code, {"max": max, "min": min}, env)


def bindings(shapes: list[list | None]) -> list[tuple[str, int, int]]:
    """(symbol, flat input, dim) for the first dim of ``expected`` shapes that is a bare symbol."""
    out, seen = [], set()
    for k, shape in enumerate(shapes):
        for d, s in enumerate(shape or []):
            if isinstance(s, str) and s.isidentifier() and s not in seen:
                out.append((s, k, d))
                seen.add(s)
    return out


def _bound(v) -> int | None:
    """A ValueRanges bound as an int (None for +-infinity)."""
    try:
        return int(v)
    except Exception:  # int_oo, sympy oo
        return None


def build(shapes: list[list | None], ranges: dict, asserts: list) -> tuple[list[list | None], ShapeGuards]:
    """``shapes``: per flat user input, its dims as ints or sympy expressions (None: not a tensor).
    ``ranges``: sympy expression -> (lo, hi) from torch.export; ``asserts``: sympy booleans.
    Returns the shapes with symbolic dims as Python source, and the guards over them. Guards on
    symbols no input binds (data-dependent sizes) are left to the program."""
    guards = ShapeGuards()
    bound: set[str] = set()
    for shape in shapes:
        for s in shape or []:
            if isinstance(s, sympy.Symbol):
                bound.add(s.name)
    out = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        out.append([int(s) if sympy.sympify(s).is_Integer else
                    (source(s) if {x.name for x in sympy.sympify(s).free_symbols} <= bound else None) for s in shape])
    for e, (lo, hi) in ranges.items():
        e = sympy.sympify(e)
        if e.free_symbols and {x.name for x in e.free_symbols} <= bound:
            lo_i, hi_i = _bound(lo), _bound(hi)
            guards.ranges.append(RangeGuard(source(e), str(e), lo_i if lo_i is not None else 0, hi_i))
    for e in asserts:
        e = sympy.sympify(e)
        if e.free_symbols and {x.name for x in e.free_symbols} <= bound:
            guards.asserts.append(AssertGuard(source(e), str(e)))
    return out, guards
