"""A roofline profile of a compiled Program: bytes, FLOPs and launches per step, from shapes.

``profile(compiled, *args)`` runs the Program once on *meta* copies of its inputs (the weights,
caches and user inputs as shapes only): kernel and attention steps allocate their outputs from the
Program's own shape expressions, extern ATen calls run their meta kernels. Every step therefore
sees the exact tensors (shapes, strides, dtypes) of a real call with these inputs, without running a
kernel, so the profile of a 1B-parameter decode step costs milliseconds on any machine.

Per step: bytes read (the elements each input addresses: a broadcast stride-0 dim is read once),
bytes written, FLOPs (matmuls 2·M·N·K, attention 4·B·H·Sq·Sk·D over the whole key range — the mask
is data, not shape, so the visible range is unknown here — and ~1 per element otherwise) and
launches. Per program: totals, the *ideal* traffic (every state tensor — weights and KV cache — read
once, at most the bytes the program reads of it; activations negligible) and their ratio.

``predict(cost, gpu)`` is a model, not a measurement: Σ max(bytes/bandwidth, flops/peak) + launches ×
per-launch cost, for a GPU of ``GPUS``. ``measure_steps`` times each step with CUDA events on a GPU
(never asserted; skipped without CUDA) to put next to the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from turbofx.errors import TurbofxError

META = torch.device("meta")


@dataclass(frozen=True)
class StepCost:
    """One Program step. ``kind``: pointwise | reduction | attention | gemm | matmul (an extern one) |
    extern | alias (a view or tuple element: no launch, no traffic)."""

    name: str
    kind: str
    bytes_read: int
    bytes_written: int
    flops: int
    launches: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class ProgramCost:
    steps: list[StepCost]
    totals: StepCost
    ideal_bytes: int  # state tensors (weights, KV cache) read once; activations negligible
    ratio: float  # (bytes read + written) / ideal; 1.0 is the memory roofline of this call

    def counts(self) -> dict[str, int]:
        """Steps that do work (aliases excluded), by kind."""
        out: dict[str, int] = {}
        for s in self.steps:
            if s.kind != "alias":
                out[s.kind] = out.get(s.kind, 0) + 1
        return dict(sorted(out.items()))

    def summary(self, gpus: list["GpuSpec"] | None = None) -> str:
        """A few lines for ``explain``: traffic vs ideal and the modelled time per GPU."""
        t = self.totals
        lines = [f"roofline (model, from shapes): {sum(self.counts().values())} steps "
                 f"({', '.join(f'{n} {k}' for k, n in self.counts().items())}), {t.launches} launches",
                 f"  traffic {_mb(t.bytes_read)} read + {_mb(t.bytes_written)} written; ideal {_mb(self.ideal_bytes)} "
                 f"(weights + KV cache read once) -> "
                 + (f"{self.ratio:.2f}x ideal" if self.ideal_bytes else "no state tensors, no ideal")
                 + f"; {t.flops / 1e9:.3f} GFLOP"]
        for gpu in gpus if gpus is not None else GPUS.values():
            lines.append(f"  predicted on {gpu.name} (model, not measured): {predict(self, gpu) * 1e3:.3f} ms "
                         f"(ideal {self.ideal_bytes / gpu.hbm_bytes_per_s * 1e3:.3f} ms)")
        return "\n".join(lines)

    def table(self, gpu: "GpuSpec | None" = None, measured: list[float] | None = None) -> str:
        """One line per working step: bytes, FLOPs, modelled time on ``gpu`` and, when given, the
        measured time of the same step (``measure_steps``)."""
        gpu = gpu or GPUS["H100"]
        if measured is not None and len(measured) != len(self.steps):
            raise TurbofxError(f"measured holds {len(measured)} times for a program of {len(self.steps)} steps; "
                               "pass measure_steps(...) of the same compiled module")
        head = f"{'#':>4} {'kind':10s} {'step':34s} {'read':>10s} {'written':>10s} {'MFLOP':>10s} {'model us':>9s}"
        lines = [head + (f" {'measured us':>11s}" if measured else "")]
        for i, s in enumerate(self.steps):
            if s.kind == "alias":
                continue
            row = (f"{i:4d} {s.kind:10s} {s.name[:34]:34s} {_mb(s.bytes_read):>10s} {_mb(s.bytes_written):>10s} "
                   f"{s.flops / 1e6:10.3f} {step_time(s, gpu) * 1e6:9.2f}")
            lines.append(row + (f" {measured[i] * 1e6:11.2f}" if measured else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float
    matmul_flops_per_s: float  # bf16 dense (no sparsity)
    per_launch_s: float  # one kernel inside a CUDA/HIP graph: an assumption, not a spec-sheet number


# Public spec-sheet numbers (dense BF16 tensor throughput, i.e. half the "with sparsity" figure):
#   H100 SXM5: 3.35 TB/s HBM3, 989 TFLOPS   (NVIDIA H100 Tensor Core GPU datasheet)
#   H200 SXM:  4.8 TB/s HBM3e, 989 TFLOPS   (NVIDIA H200 datasheet; same compute as H100 SXM)
#   B200:      8 TB/s HBM3e, 2.25 PFLOPS    (NVIDIA DGX/HGX B200 datasheet: 4.5 PF sparse per GPU)
#   MI300X:    5.3 TB/s HBM3, 1307 TFLOPS   (AMD Instinct MI300X datasheet: 2615 TF with sparsity)
# Per-launch cost: consecutive kernels replayed from a CUDA graph start ~2-4 us apart; we assume
# 3 us on NVIDIA parts and 4 us on MI300X (HIP graphs). Neither is measured here.
GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("H100", 3.35e12, 989e12, 3e-6),
    GpuSpec("H200", 4.8e12, 989e12, 3e-6),
    GpuSpec("B200", 8.0e12, 2250e12, 3e-6),
    GpuSpec("MI300X", 5.3e12, 1307e12, 4e-6),
)}


def step_time(s: StepCost, gpu: GpuSpec) -> float:
    if s.launches == 0 and s.bytes == 0 and s.flops == 0:
        return 0.0
    return max(s.bytes / gpu.hbm_bytes_per_s, s.flops / gpu.matmul_flops_per_s) + s.launches * gpu.per_launch_s


def predict(cost: ProgramCost, gpu: GpuSpec | str) -> float:
    """Modelled seconds for one call (a model, not a measurement): each step is bound by memory or
    by matmul throughput, plus its launches."""
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise TurbofxError(f"unknown GPU {gpu!r} for the roofline model; known: {sorted(GPUS)}")
        gpu = GPUS[gpu]
    return sum(step_time(s, gpu) for s in cost.steps)


# ---------------------------------------------------------------- the shape-only run

def _footprint(t) -> int:
    """Bytes a tensor view addresses: a stride-0 (broadcast) dim is read once."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def meta_output(step: dict, env: dict, dtype: torch.dtype) -> torch.Tensor:
    """A step's output as a meta tensor, from the shape and stride expressions the step holds."""
    from turbofx.runtime.exprs import _compile_expr, _eval

    return torch.empty_strided([_eval(_compile_expr(e), env) for e in step["shape"]],
                               [_eval(_compile_expr(e), env) for e in step["stride"]], dtype=dtype, device=META)


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=META)
    return x


class _Ledger:
    """Bytes the program reads of each state tensor (by storage root), for the ideal."""

    def __init__(self, state: list[torch.Tensor]):
        self.size = {id(t): _footprint(t) for t in state}
        self.read = {id(t): 0 for t in state}

    def reads(self, tensors, nbytes: int | None = None) -> int:
        total = 0
        for t in tensors:
            b = _footprint(t) if nbytes is None else nbytes
            total += b
            r = id(_root(t))
            if r in self.read:
                self.read[r] += b
        return total

    def ideal(self) -> int:
        return sum(min(self.size[k], self.read[k]) for k in self.size)


def _step_record(run):
    s = getattr(run, "step", None)
    if s is None:
        raise TurbofxError("turbofx bug: a Program step carries no description (run.step); please report it")
    return s


def program_cost(program, graph_inputs: list, state: list[bool]) -> ProgramCost:
    """The cost of one call of ``program`` with ``graph_inputs`` (real or meta tensors; only their
    shapes, strides and dtypes are used). ``state[i]``: graph input i is a weight or buffer."""
    inputs = [_meta(x) for x in graph_inputs]
    ledger = _Ledger([x for x, s in zip(inputs, state) if s and isinstance(x, torch.Tensor)])
    values: list = [None] * program.n_values
    for slot, x in zip(program.inputs, inputs):
        values[slot] = x
    env = program.bind(inputs)
    steps = []
    for i, run in enumerate(program.steps):
        s = _step_record(run)
        steps.append(run.family.cost(s, values, env, ledger))
        for v in program.frees[i]:
            values[v] = None
    totals = StepCost("total", "total", sum(s.bytes_read for s in steps), sum(s.bytes_written for s in steps),
                      sum(s.flops for s in steps), sum(s.launches for s in steps))
    ideal = ledger.ideal()
    return ProgramCost(steps, totals, ideal, totals.bytes / ideal if ideal else math.inf)


def _graph_inputs(compiled, args: tuple, kwargs: dict) -> tuple[list, list[bool]]:
    from turbofx.runtime.module import CompiledModule

    if not isinstance(compiled, CompiledModule):
        raise TurbofxError(f"roofline.profile needs a module from turbofx.compile or turbofx.load, got "
                           f"{type(compiled).__name__}")
    if compiled._in_spec is not None:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != compiled._in_spec:
            from turbofx.errors import InputMismatchError

            raise InputMismatchError(f"inputs are structured differently from the example: expected "
                                     f"{compiled._in_spec}, got {spec}")
    else:
        flat = list(args)
    flat = compiled._check(flat)
    graph_inputs = [flat[k] if kind == "user" else compiled._state[k] for kind, k in compiled._plan]
    return graph_inputs, [kind == "state" for kind, _ in compiled._plan]


def profile(compiled, *args, **kwargs) -> ProgramCost:
    """The roofline cost of one call ``compiled(*args, **kwargs)`` (nothing is run: shapes only)."""
    graph_inputs, state = _graph_inputs(compiled, args, kwargs)
    return program_cost(compiled._program, graph_inputs, state)


def measure_steps(compiled, *args, iters: int = 10, **kwargs) -> list[float] | None:
    """Median seconds of each Program step over ``iters`` calls, timed with CUDA events around
    each step (eager launches: includes host overhead a CUDA graph would hide). None without CUDA."""
    if not torch.cuda.is_available():
        return None
    graph_inputs, _ = _graph_inputs(compiled, args, kwargs)
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in graph_inputs):
        return None
    program = compiled._program
    samples: list[list[float]] = [[] for _ in program.steps]
    for it in range(iters + 1):  # the first call warms up (JIT, allocator)
        values: list = [None] * program.n_values
        for slot, x in zip(program.inputs, graph_inputs):
            values[slot] = x
        env = program.bind(graph_inputs)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(program.steps) + 1)]
        events[0].record()
        for i, run in enumerate(program.steps):
            run(values, env)
            events[i + 1].record()
            for v in program.frees[i]:
                values[v] = None
        torch.cuda.synchronize()
        if it:
            for i in range(len(program.steps)):
                samples[i].append(events[i].elapsed_time(events[i + 1]) / 1e3)
    return [sorted(s)[len(s) // 2] for s in samples]


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.2f} kB"
