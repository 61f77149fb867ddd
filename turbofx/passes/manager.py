"""The pass manager: ordered, timed, linted, optionally verified and dumped passes.

A pass is a function ``(gm, ctx) -> PassRecord`` that rewrites ``gm`` in place and keeps the
graph contract (ATen IR, functional, every node has ``meta["val"]``, no output aliases an input).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from turbofx.errors import VerificationError

log = logging.getLogger("turbofx.passes")


@dataclass
class PassRecord:
    """What a pass did: what it matched, what it refused and why, how long it took."""

    name: str
    matched: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    seconds: float = 0.0

    def summary(self) -> str:
        return f"{self.name}: {len(self.matched)} matched, {len(self.refused)} refused, {self.seconds * 1e3:.1f} ms"


@dataclass
class PassContext:
    """State passes share: fusion regions, and example inputs for verify mode."""

    example_inputs: list[Any] | None = None
    regions: list = field(default_factory=list)


Pass = Callable[[fx.GraphModule, PassContext], PassRecord]


def pass_name(p: Pass) -> str:
    """The name a pass goes by in reports and in ``Options.disable``."""
    return getattr(p, "pass_name", p.__name__)


def lint(gm: fx.GraphModule, name: str) -> None:
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "placeholder") and "val" not in n.meta:
            raise AssertionError(f"after {name}: node {n.name} ({n.target}) has no meta['val']")


def _run_graph(gm: fx.GraphModule, inputs: list[Any]):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch.no_grad(), unset_fake_temporarily():  # Dynamo compiles under a fake mode
        return gm(*inputs)


def _compare(before, after, name: str) -> None:
    import torch.utils._pytree as pytree
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves(after)):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, equal_nan=True,
                                           msg=lambda m: f"pass {name} changed the graph's results: {m}")


class PassManager:
    def __init__(self, passes: list[Pass], verify: bool = False, dump_dir: str | None = None):
        self.passes = passes
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir else (Path(os.environ["TURBOFX_DUMP"]) if os.environ.get("TURBOFX_DUMP") else None)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        records = []
        self._dump(gm, 0, "captured")
        for i, p in enumerate(self.passes, 1):
            name = pass_name(p)
            reference = _run_graph(gm, ctx.example_inputs) if self.verify and ctx.example_inputs else None
            t0 = time.perf_counter()
            rec = p(gm, ctx)
            rec.seconds = time.perf_counter() - t0
            gm.recompile()
            lint(gm, name)
            if reference is not None:
                try:
                    _compare(reference, _run_graph(gm, ctx.example_inputs), name)
                except AssertionError as e:
                    raise VerificationError(str(e)) from e
            log.debug(rec.summary())
            records.append(rec)
            self._dump(gm, i, rec.name)
        return records

    def _dump(self, gm: fx.GraphModule, i: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{i:02d}_{name}.py").write_text(gm.print_readable(print_output=False))
