"""Kernel families: every kind of Program step as one unit, found through one registry.

A family (pointwise/reduction kernels, attention, varlen attention, GEMM, extern ATen calls) owns
everything about its kind of step, so a new family plugs in without touching lowering, the
Program, the roofline or verification:

- ``claims(unit)``: does it lower this scheduled unit (a fusion ``Region`` or an FX node)?
- ``lower(unit, lc)``: the step as plain data (a JSON-able dict with ``"type"``; what a Program and
  an artifact hold), registering its kernel sources, the values it reads and defines, their storage
  and its report record through the ``LowerContext``;
- ``runner(step, kernels)``: the launcher, the only code that knows the kernels' arguments, grid
  and per-shape configs; it returns ``run(values, env)`` with ``run.step`` (the step's record)
  and ``run.family``;
- ``cost(record, values, env, ledger)``: bytes, FLOPs and launches from shapes (the roofline);
- ``reads(record)`` / ``writes(record)``: the value slots, so ``verify="kernels"`` can run a step
  alone on eager values.

A family's step says *what* is computed (region, spec, tiling) in terms independent of Triton
syntax; only its template and launcher are Triton, so a second code generator (a native CPU one)
can sit beside them. Families are tried in registration order; extern (ATen) claims any node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx as fx


@dataclass
class KernelRecord:
    """A step as reports show it."""

    name: str
    kind: str  # pointwise | reduction | attention | gemm | extern
    label: str = ""
    nodes: list[str] = field(default_factory=list)
    reason: str = ""


class Family:
    """One kind of Program step (see the module docstring)."""

    step_types: ClassVar[tuple[str, ...]] = ()
    fallback: ClassVar[bool] = False  # claims whatever no other family does (tried last)

    def claims(self, unit) -> bool:
        raise NotImplementedError

    def lower(self, unit, lc: "LowerContext") -> dict:
        raise NotImplementedError

    def runner(self, step: dict, kernels: dict[str, Callable]) -> Callable:
        raise NotImplementedError

    def cost(self, record, values: list, env: dict, ledger):
        raise NotImplementedError

    def reads(self, record) -> list[int]:
        return []

    def writes(self, record) -> list[int]:
        return []

    def checkable(self, record) -> bool:
        """Can verify="kernels" run this step alone and compare it with eager?"""
        return False


_FAMILIES: list[Family] = []
_loaded = False


def register(family: Family) -> Family:
    _FAMILIES.append(family)
    return family


def _families() -> list[Family]:
    """Every family, the fallback (extern: it claims any node) last, whatever the import order."""
    global _loaded
    if not _loaded:
        # importing a family's module registers it
        from turbofx.codegen import attention, extern, gemm, kernel, paged_attention  # noqa: F401
        _loaded = True
        _FAMILIES.sort(key=lambda f: f.fallback)
    return _FAMILIES


def for_unit(unit) -> Family:
    for f in _families():
        if f.claims(unit):
            return f
    raise AssertionError(f"turbofx bug: no kernel family lowers {unit!r} (please report it)")


def for_step(step_type: str) -> Family:
    for f in _families():
        if step_type in f.step_types:
            return f
    raise ValueError(f"a Program step of unknown type {step_type!r} (written by a newer turbofx? re-export)")


def extern_family() -> Family:
    """The family that runs a node as its ATen op."""
    return next(f for f in _families() if f.fallback)


def bind(run: Callable, record, family: Family) -> Callable:
    run.step = record
    run.family = family
    return run


@dataclass
class LowerContext:
    """What lowering shares with the families while it walks the schedule."""

    target: Any
    slot: dict[fx.Node, int]
    template: Callable[[Any], Any]  # an FX argument -> its JSON template (value refs, size exprs)
    inplace: set[fx.Node]  # functional updates lowering runs in place
    refusals: dict[str, str]  # node name -> why no pass rewrote it
    specs: dict[int, Any]  # id(region) -> its generated KernelSpec
    index: int = 0  # the step being lowered
    sources: dict[str, str] = field(default_factory=dict)
    records: list = field(default_factory=list)
    storage_root: dict[int, int] = field(default_factory=dict)
    kernel_outputs: set[int] = field(default_factory=set)
    uses: dict[int, list[int]] = field(default_factory=dict)
    defined_at: dict[int, int] = field(default_factory=dict)

    def add_source(self, name: str, source: str) -> None:
        self.sources[name] = source

    def read(self, slots) -> None:
        for s in slots:
            self.uses.setdefault(s, []).append(self.index)

    def define(self, n: fx.Node, reads) -> None:
        """This step defines ``n``'s value (own storage) and reads ``reads`` (None, scalars skipped)."""
        self.defined_at[self.slot[n]] = self.index
        self.read(self.slot[a] for a in reads if a is not None and a in self.slot)
        self.storage_root[self.slot[n]] = self.slot[n]

    def share_storage(self, value: int, bases: set[int]) -> None:
        """``value`` aliases the storage of ``bases`` (roots of input slots): conservatively keep
        every possible base alive together."""
        top = min(bases)
        if len(bases) > 1:
            for r in bases:
                self.storage_root[r] = top
        self.storage_root[value] = top
