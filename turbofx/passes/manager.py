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
from turbofx.refusal import Refusal, Refused
from turbofx.passes.state import ModuleState

log = logging.getLogger("turbofx.passes")


@dataclass
class PassRecord:
    """What a pass did: what it matched, what it refused and why, how long it took."""

    name: str
    matched: list[str] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    seconds: float = 0.0

    def refuse(self, node: fx.Node | str, refusal: Refusal) -> None:
        """Record that ``node`` was not rewritten (or not taken), and why."""
        if not isinstance(refusal, Refusal):
            raise TypeError(f"pass {self.name}: a refusal must be a turbofx.refusal.Refusal, got {refusal!r}")
        self.refused.append(Refused(node.name if isinstance(node, fx.Node) else node, refusal))

    def refusal_counts(self) -> dict[str, int]:
        """How many refusals of each code, most frequent first."""
        counts: dict[str, int] = {}
        for r in self.refused:
            counts[r.code] = counts.get(r.code, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        codes = ", ".join(f"{n} {c}" for c, n in self.refusal_counts().items())
        return (f"{self.name}: {len(self.matched)} matched, {len(self.refused)} refused"
                f"{f' ({codes})' if codes else ''}, {self.seconds * 1e3:.1f} ms")


@dataclass
class Rewrite:
    """One rewrite a pass made, numbered in the order the passes made them (1-based)."""

    index: int
    pass_name: str
    what: str

    def __str__(self) -> str:
        return f"rewrite {self.index}: {self.pass_name}: {self.what}"


@dataclass
class Fuel:
    """The rewrite budget (LLVM's opt-bisect, Thunder's fuel): each rewrite takes one unit; once
    ``limit`` units are taken, passes stop rewriting. With a limit of N the compiled program is the
    one made by the first N rewrites only, so a miscompile can be bisected to one rewrite."""

    limit: int | None = None  # None: no budget
    taken: list[Rewrite] = field(default_factory=list)
    exhausted: bool = False  # some rewrite was refused for want of fuel
    current_pass: str = ""

    def take(self, what: str) -> bool:
        """May the current pass make this rewrite? Records it when so."""
        if self.limit is not None and len(self.taken) >= self.limit:
            self.exhausted = True
            return False
        self.taken.append(Rewrite(len(self.taken) + 1, self.current_pass, what))
        return True

    @property
    def refusal(self) -> Refusal:
        return Refusal("rewrite-budget", f"rewrite budget spent (max_rewrites={self.limit})")


@dataclass
class PassContext:
    """State passes share: fusion regions, example inputs for verify mode, the rewrite budget, the
    module state the graph reads (``state``: read and replace parameters/buffers only through it)
    and the weight layouts chosen (``layouts``: ``passes.layout.WeightLayout`` records)."""

    example_inputs: list[Any] | None = None
    regions: list = field(default_factory=list)
    mutated_outputs: dict[int, fx.Node] = field(default_factory=dict)  # output position -> input it is written into
    fuel: Fuel = field(default_factory=Fuel)
    state: ModuleState = field(default_factory=ModuleState)
    layouts: list = field(default_factory=list)
    quant: Any = None  # the turbofx.quant config the quantize pass applies (None: no quantization)
    quantized: list = field(default_factory=list)  # passes.quantize.QuantizedLayer: weights it quantized
    quantized_sources: list = field(default_factory=list)  # (weakref to a quantized weight, its _version)


Pass = Callable[[fx.GraphModule, PassContext], PassRecord]


def pass_name(p: Pass) -> str:
    """The name a pass goes by in reports and in ``Options.disable``."""
    return getattr(p, "pass_name", p.__name__)


def lint(gm: fx.GraphModule, name: str) -> None:
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "placeholder") and "val" not in n.meta:
            raise AssertionError(f"after {name}: node {n.name} ({n.target}) has no meta['val']")


def _as_promised(x, promised):
    """``x`` with the strides the graph promised (``meta["val"]``) when they differ."""
    if isinstance(x, (tuple, list)) and isinstance(promised, (tuple, list)):
        return type(x)(_as_promised(a, b) for a, b in zip(x, promised))
    if not isinstance(x, torch.Tensor) or not isinstance(promised, torch.Tensor) or x.dim() != promised.dim():
        return x
    stride = [s if isinstance(s, int) else s.node.hint for s in promised.stride()]
    if list(x.stride()) == stride or x.numel() <= 1:
        return x
    y = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)
    return y.copy_(x)


class ReferenceRun(fx.Interpreter):
    """The graph run eagerly, node by node, keeping every node's value (``self.env``).

    turbofx's own ops (``torch.ops.turbofx.*``) run their reference implementations, which return
    contiguous tensors, while the graph promises the layout of the nodes they replaced (the
    kernels write that one) and later views rely on it: their results are given that layout."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "turbofx":
            out = _as_promised(out, n.meta.get("val"))
        return out


def fresh_copies(inputs: list[Any]) -> list[Any]:
    """Copies of the example inputs: a graph that writes its inputs (caches, counters) in place
    must not change them between the runs that are compared (nor the model's own buffers)."""
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


def run_reference(gm: fx.GraphModule, inputs: list[Any], keep_values: bool = False):
    """Outputs of ``gm`` run eagerly on copies of ``inputs`` (and every node's value when asked)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch.no_grad(), unset_fake_temporarily():  # Dynamo compiles under a fake mode
        r = ReferenceRun(gm)
        out = r.run(*fresh_copies(inputs))
        return (out, r.env) if keep_values else out


def _run_graph(gm: fx.GraphModule, inputs: list[Any]):
    return run_reference(gm, inputs)


def _compare(before, after, name: str) -> None:
    import torch.utils._pytree as pytree
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves(after)):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, equal_nan=True,
                                           msg=lambda m: f"pass {name} changed the graph's results: {m}")


class PassManager:
    def __init__(self, passes: list[Pass], verify: bool = False, dump_dir: str | None = None, progress=None):
        self.passes = passes
        self.verify = verify
        self.progress = progress  # called with each pass's name before it runs
        self.dump_dir = Path(dump_dir) if dump_dir else (Path(os.environ["TURBOFX_DUMP"]) if os.environ.get("TURBOFX_DUMP") else None)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        records = []
        self._dump(gm, 0, "captured")
        for i, p in enumerate(self.passes, 1):
            name = pass_name(p)
            if self.progress is not None:
                self.progress(name)
            ctx.fuel.current_pass = name
            try:
                reference = _run_graph(gm, ctx.example_inputs) if self.verify and ctx.example_inputs else None
            except Exception as e:
                raise VerificationError(
                    f"verify: the graph could not be run eagerly before pass {name} ({type(e).__name__}: {e}); "
                    "compile without verify=True, or report this as a turbofx bug") from e
            t0 = time.perf_counter()
            rec = p(gm, ctx)
            rec.seconds = time.perf_counter() - t0
            gm.recompile()
            lint(gm, name)
            if reference is not None and getattr(p, "changes_values", False):
                # a pass that changes results by design (quantization): it must still run, and the
                # passes after it are compared against its results
                reference = None
                try:
                    _run_graph(gm, ctx.example_inputs)
                except Exception as e:
                    raise VerificationError(
                        f"pass {name} broke the graph: it no longer runs eagerly ({type(e).__name__}: {e}); "
                        f"compile with disable=({name!r},) to work around it, and report this as a turbofx bug") from e
            if reference is not None:
                try:
                    after = _run_graph(gm, ctx.example_inputs)
                except Exception as e:
                    raise VerificationError(
                        f"pass {name} broke the graph: it no longer runs eagerly ({type(e).__name__}: {e}); "
                        f"compile with disable=({name!r},) to work around it, and report this as a turbofx bug") from e
                try:
                    _compare(reference, after, name)
                except AssertionError as e:
                    raise VerificationError(f"{e}; compile with disable=({name!r},) to work around it, and report "
                                            "this as a turbofx bug") from e
            log.debug(rec.summary())
            records.append(rec)
            self._dump(gm, i, rec.name)
        return records

    def _dump(self, gm: fx.GraphModule, i: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{i:02d}_{name}.py").write_text(gm.print_readable(print_output=False))
