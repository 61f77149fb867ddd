"""verify="kernels": every generated kernel checked against the ATen ops it covers.

After lowering, the graph is run eagerly once on the example inputs (every node's value kept).
Each kernel step is then run alone on copies of the values its region reads, and its outputs
are compared with the values of the FX nodes it replaces. A region whose kernel disagrees is
dissolved by the driver (its nodes are lowered as extern ATen calls) and recorded in the Report.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from turbofx.errors import VerificationError
from turbofx.passes.manager import run_reference
from turbofx.codegen.kernel import KernelStep, kernel_launcher
from turbofx.runtime.program import Program

log = logging.getLogger("turbofx.verify")

# (rtol, atol) by dtype: a fused kernel rounds once where ATen rounds after every op
_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-7, 1e-7), torch.float16: (1e-2, 1e-2),
              torch.bfloat16: (5e-2, 5e-2)}


@dataclass
class KernelMismatch:
    """A generated kernel that disagreed with ATen on the example inputs (and was replaced)."""

    kernel: str  # the kernel's name, e.g. tfx_softmax_0123abcd
    kind: str  # pointwise | reduction | attention
    nodes: list[str] = field(default_factory=list)  # the FX nodes its region covers
    output: str = ""  # the node whose value disagreed first
    max_abs_error: float = 0.0

    def __str__(self) -> str:
        nodes = ", ".join(self.nodes[:6]) + (f", ... ({len(self.nodes)} nodes)" if len(self.nodes) > 6 else "")
        return (f"{self.kind} kernel {self.kernel} over [{nodes}] disagreed with ATen at {self.output} "
                f"(max abs error {self.max_abs_error:.3g})")


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| (NaN where both are NaN counts as equal; NaN on one side is inf)."""
    if got.shape != want.shape:
        return float("inf")
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    both_nan = g.isnan() & w.isnan()
    diff = (g - w).abs().masked_fill(both_nan, 0.0)
    diff = torch.where(g.isnan() ^ w.isnan(), torch.full_like(diff, float("inf")), diff)
    inf_same = (g == w)  # equal infinities subtract to NaN
    diff = diff.masked_fill(inf_same, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def agrees(got, want) -> tuple[bool, float]:
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return True, 0.0
    err = max_abs_error(got, want)
    if not want.dtype.is_floating_point:
        return err == 0.0, err
    rtol, atol = _TOLERANCE.get(want.dtype, (1e-4, 1e-4))
    ok = got.shape == want.shape and torch.allclose(got.detach().to(want.dtype), want.detach(), rtol=rtol,
                                                    atol=atol, equal_nan=True)
    return ok, err


def _fresh(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def check_kernels(gm: fx.GraphModule, program: Program, slots: dict[int, str], example_inputs: list,
                  kernels: dict) -> list[KernelMismatch]:
    """Run each generated kernel of ``program`` alone against the eager values of its nodes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch.no_grad(), unset_fake_temporarily():
        _, env = run_reference(gm, example_inputs, keep_values=True)
        ref = {n.name: v for n, v in env.items()}
        sizes = program.bind(example_inputs)
        bad = []
        for run in program.steps:
            step, fam = run.step, run.family
            if isinstance(step, KernelStep):
                found = _check_kernel(step, kernels[step.kernel], program.n_values, slots, ref, sizes)
            elif isinstance(step, dict) and step.get("type") == "attention":
                found = _check_attention(run, step, program.n_values, slots, ref, sizes)
            elif fam.checkable(step):
                found = _check_step(run, step, program.n_values, slots, ref, sizes)
            else:
                continue
            if found is not None:
                log.warning("verify=kernels: %s", found)
                bad.append(found)
        return bad


def _check_kernel(ks: KernelStep, fn, n_values: int, slots, ref, sizes) -> KernelMismatch | None:
    alone = dataclasses.replace(ks, allocs=[dataclasses.replace(a, reuse=None) for a in ks.allocs])
    runner = kernel_launcher(alone, fn)  # no buffer reuse: nothing else ran before it
    values: list = [None] * n_values
    outs = [a.value for a in ks.allocs]
    for s in ks.args[: len(ks.args) - len(outs)]:
        values[s] = _fresh(ref[slots[s]])
    runner(values, sizes)
    return _first_disagreement(ks.kernel, ks.kind, ks.nodes, [(slots[s], values[s]) for s in outs], ref)


def _check_step(run, s, n_values: int, slots, ref, sizes) -> KernelMismatch | None:
    """A step of any checkable family run alone on the eager values of what it reads."""
    values: list = [None] * n_values
    for i in run.family.reads(s):
        values[i] = _fresh(ref[slots[i]])
    run(values, sizes)
    kind = s.get("type", "kernel") if isinstance(s, dict) else type(s).__name__
    name = s.get("kernels", [s.get("kernel", kind)])[0] if isinstance(s, dict) else kind
    return _first_disagreement(name, kind, [s.get("node", "")] if isinstance(s, dict) else [],
                               [(slots[w], values[w]) for w in run.family.writes(s)], ref)


def _check_attention(run, s: dict, n_values: int, slots, ref, sizes) -> KernelMismatch | None:
    values: list = [None] * n_values
    reads = [s["q"], s["k"], s["v"], s["mask"]]
    if s.get("cache"):
        c = s["cache"]
        reads += [c["k_new"], c["v_new"], c["positions"], c["cos"], c["sin"]]
    for i in reads:
        if i is not None:
            values[i] = _fresh(ref[slots[i]])
    run(values, sizes)
    name = slots[s["out"]]
    got, want = values[s["out"]], ref[name]
    pairs = list(zip([name] * 3, got, want)) if isinstance(got, tuple) else [(name, got, want)]
    for node, g, w in pairs:
        ok, err = agrees(g, w)
        if not ok:
            m = KernelMismatch(s["kernel"], "attention", [s["node"]], node, err)
            raise VerificationError(f"verify=kernels: {m}; an attention kernel cannot be replaced by ATen ops: "
                                    "compile with attention=False to work around it, and report this as a "
                                    "turbofx bug")
    return None


def _first_disagreement(kernel: str, kind: str, nodes: list[str], outs: list, ref) -> KernelMismatch | None:
    worst = None
    for name, got in outs:
        ok, err = agrees(got, ref[name])
        if not ok and (worst is None or err > worst.max_abs_error):
            worst = KernelMismatch(kernel, kind, list(nodes), name, err)
    return worst
