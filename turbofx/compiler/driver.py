"""The public driver: compile, explain. Capture -> passes -> lowering -> Program -> CompiledModule."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from turbofx.codegen import cache
from turbofx.compiler import compile_cache
from turbofx.codegen.lower import KernelRecord, lower
from turbofx.codegen.target import detect
from turbofx.compiler.capture import CapturedGraph, capture_module
from turbofx.compiler.progress import Progress
from turbofx.compiler.verify import KernelMismatch, check_kernels
from turbofx.errors import TurbofxError, TurbofxInternalError
from turbofx.passes.attention import attention
from turbofx.passes.attention_prologue import attention_prologue
from turbofx.passes.canonicalize import canonicalize
from turbofx.passes.fusion import fuse
from turbofx.passes.layout import layout
from turbofx.passes.manager import Fuel, PassContext, PassManager, PassRecord, Rewrite, pass_name
from turbofx.passes.matmul import matmul
from turbofx.passes.quantize import quantize
from turbofx.passes.reinplace import reinplace
from turbofx.passes.state import ModuleState
from turbofx.refusal import Refusal
from turbofx.runtime.guards import ShapeGuards, build as build_guards
from turbofx.runtime.module import CompiledModule
from turbofx.runtime.program import Program

log = logging.getLogger("turbofx.compiler")
if os.environ.get("TURBOFX_LOG"):
    logging.basicConfig()
    logging.getLogger("turbofx").setLevel(os.environ["TURBOFX_LOG"].upper())


PASSES = [canonicalize, layout, quantize, attention, attention_prologue, matmul, fuse, reinplace]  # in order
VERIFY_MODES = (False, True, "passes", "kernels", "all")  # True is "passes"


@dataclass
class Options:
    """Compile options. Unknown keywords are refused (a typo must not be silently ignored)."""

    target: str | None = None  # cuda | hip | cpu-interpret; None detects
    dynamic: bool = False  # symbolic sizes for every input dim that the model allows
    # True/"passes": run the graph before and after each pass and compare (VerificationError names
    # the pass); "kernels": check each generated kernel against ATen, replace those that disagree;
    # "all": both
    verify: bool | str = False
    max_rewrites: int | None = None  # rewrite budget (bisecting a miscompile); env TURBOFX_MAX_REWRITES
    dump_dir: str | None = None  # write each stage's graph and each kernel's source
    mode: str | None = None  # accepted from torch.compile / HF generate; recorded
    cudagraphs: bool | None = None  # replay through CUDA/HIP graphs; None: on for GPU targets
    attention: bool = True  # recognise attention and generate streaming kernels for it
    disable: tuple = ()  # pass names to skip (e.g. "attention_prologue"), to isolate a pass's effect
    # weight quantization: a turbofx.quant config or its name ("int8", "int4", "int4-g64", "w8a8", "fp8",
    # "fp8-dynamic", "gguf"); None keeps the weights as they are
    quantize: Any = None
    # reuse a program compiled before, in any process, for the same model and inputs (compile_cache.py);
    # env TURBOFX_COMPILE_CACHE=0 turns it off too
    compile_cache: bool = True

    @classmethod
    def make(cls, **kw) -> "Options":
        known = set(cls.__dataclass_fields__)
        unknown = set(kw) - known
        if unknown:
            raise TurbofxError(f"unknown turbofx option(s) {sorted(unknown)}; known: {sorted(known)}")
        opts = cls(**kw)
        opts.disable = (opts.disable,) if isinstance(opts.disable, str) else tuple(opts.disable)
        names = [pass_name(p) for p in PASSES]
        if set(opts.disable) - set(names):
            raise TurbofxError(f"disable={list(opts.disable)}: unknown pass name(s); the passes are {names}")
        if not any(opts.verify is m or (isinstance(m, str) and opts.verify == m) for m in VERIFY_MODES):
            raise TurbofxError(f"verify={opts.verify!r}: expected one of False, True, 'passes', 'kernels', 'all'")
        if opts.max_rewrites is None and os.environ.get("TURBOFX_MAX_REWRITES", "").strip():
            env = os.environ["TURBOFX_MAX_REWRITES"].strip()
            if not env.isdigit():
                raise TurbofxError(f"TURBOFX_MAX_REWRITES={env!r}: expected a whole number >= 0 (or unset it)")
            opts.max_rewrites = int(env)
        from turbofx.quant import parse

        opts.quantize = parse(opts.quantize)
        if opts.max_rewrites is not None and (isinstance(opts.max_rewrites, bool) or not isinstance(
                opts.max_rewrites, int) or opts.max_rewrites < 0):
            raise TurbofxError(f"max_rewrites={opts.max_rewrites!r}: expected a whole number >= 0, or None "
                               "for no budget")
        return opts

    @property
    def verify_passes(self) -> bool:
        return self.verify is True or self.verify in ("passes", "all")

    @property
    def verify_kernels(self) -> bool:
        return self.verify in ("kernels", "all")

    def passes(self) -> list:
        off = set(self.disable) | ({"attention", "attention_prologue"} if not self.attention else set())
        return [p for p in PASSES if pass_name(p) not in off]


@dataclass
class Report:
    """What the compiler did: kernels by kind, each fallback with its reason, pass records, timings."""

    target: str
    kernels: list[KernelRecord] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    runtime_notes: list[str] = field(default_factory=list)  # e.g. graph captures and why not
    inputs: list = field(default_factory=list)  # torch.compile door: weakrefs to the tensors the graph took
    rewrites: list[Rewrite] = field(default_factory=list)  # every rewrite the passes made, in order
    rewrite_budget: int | None = None  # max_rewrites in force
    budget_exhausted: bool = False  # some rewrite was refused for want of budget
    kernel_mismatches: list[KernelMismatch] = field(default_factory=list)  # verify="kernels" replacements
    refusals: dict[str, Refusal] = field(default_factory=dict)  # node name -> the last refusal recorded for it
    roofline: Any = None  # roofline.ProgramCost of one call, when explain() was given that call's inputs
    layouts: list = field(default_factory=list)  # passes.layout.WeightLayout: weights joined into one
    quantization: Any = None  # the turbofx.quant config applied (None: none)
    quantized: list = field(default_factory=list)  # passes.quantize.QuantizedLayer: weights quantized
    quant_notes: list = field(default_factory=list)  # e.g. GGUF tensors dequantized on load, and why
    quantized_sources: list = field(default_factory=list)  # (weakref, _version) of the weights quantized
    cache: Any = None  # compile_cache.CacheRecord: hit, miss or skipped (and why); None: not asked

    def refusal_of(self, node: str) -> Refusal | None:
        """Why a pass (or verify=kernels) did not take this node: the last refusal recorded for it;
        None when nothing refused it (an extern step's reason then comes from lowering itself)."""
        return self.refusals.get(node)

    @property
    def generated(self) -> list[KernelRecord]:
        return [k for k in self.kernels if k.kind != "extern"]

    @property
    def steps(self) -> list[KernelRecord]:
        """Kernels and extern calls that do work (views and tuple elements are free aliases)."""
        return [k for k in self.kernels if not (k.kind == "extern" and k.reason.startswith(("view", "tuple")))]

    @property
    def fallbacks(self) -> list[KernelRecord]:
        return [k for k in self.steps if k.kind == "extern"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.steps:
            out[k.kind] = out.get(k.kind, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"turbofx report — target {self.target}"]
        t = self.stage_seconds
        lines.append("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
        lines.append("  steps:  " + ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items())))
        labels: dict[str, int] = {}
        for k in self.generated:
            labels[f"{k.kind}/{k.label}"] = labels.get(f"{k.kind}/{k.label}", 0) + 1
        lines.append("  generated kernels: " + ", ".join(f"{n}× {l}" for l, n in sorted(labels.items())))
        reasons: dict[tuple[str, str], int] = {}
        for k in self.fallbacks:
            reasons[(k.label, k.reason)] = reasons.get((k.label, k.reason), 0) + 1
        if reasons:
            lines.append("  extern ATen calls (why not generated):")
            for (op, why), n in sorted(reasons.items(), key=lambda x: -x[1]):
                lines.append(f"    {n:4d}× {op}: {why}")
        if self.passes or self.cache is None or not self.cache.passes:
            lines.append("  passes: " + "; ".join(p.summary() for p in self.passes))
        else:  # a cache hit ran no passes: what the cold compile's did
            lines.append("  passes (cold compile): " + self.cache.passes)
        if self.cache is not None:
            lines.append(f"  {self.cache}")
        for w in self.layouts[:4]:
            lines.append(f"  {w.describe()}")
        if len(self.layouts) > 4:
            lines.append(f"  (+{len(self.layouts) - 4} more layouts: Report.layouts)")
        if self.quantization is not None:
            lines.append("  " + quantization_summary(self))
            lines += [f"    {note}" for note in self.quant_notes]
        if self.rewrite_budget is not None:
            spent = ", budget spent: later rewrites skipped" if self.budget_exhausted else ""
            lines.append(f"  rewrites: {len(self.rewrites)} made of max_rewrites={self.rewrite_budget}{spent}")
        for m in self.kernel_mismatches:
            lines.append(f"  verify=kernels: {m}; replaced by its ATen ops")
        for note in self.runtime_notes[-5:]:
            lines.append(f"  runtime: {note}")
        if self.roofline is not None:
            lines += ["  " + line for line in self.roofline.summary().splitlines()]
        return "\n".join(lines)


def build(captured: CapturedGraph, opts: Options, capture_seconds: float = 0.0, progress: Progress | None = None):
    """Passes + lowering + kernel loading for a captured graph -> (Program, Report, Lowered, Target)."""
    progress = progress or Progress("compiling")
    target = detect(_device_of(captured), opts.target)
    report = Report(target=target.describe(), stage_seconds={"capture": capture_seconds})
    t0 = time.perf_counter()
    flat_example = None
    if opts.verify:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            flat_example = _graph_example_inputs(captured)
    ctx = PassContext(example_inputs=flat_example, fuel=Fuel(opts.max_rewrites),
                      mutated_outputs=_mutated_outputs(captured), state=ModuleState(captured, flat_example),
                      quant=opts.quantize)
    if opts.quantize is not None:
        check_quantization(opts.quantize, target)
    log.info("passes over %d graph nodes", len(captured.gm.graph.nodes))
    pm = PassManager(opts.passes(), verify=opts.verify_passes, dump_dir=opts.dump_dir,
                     progress=lambda name: progress.stage(f"pass {name}"))
    report.passes = pm.run(captured.gm, ctx)
    report.rewrites, report.rewrite_budget, report.budget_exhausted = ctx.fuel.taken, ctx.fuel.limit, ctx.fuel.exhausted
    t1 = time.perf_counter()
    refusals: dict[str, Refusal] = {r.node: r.refusal for rec in report.passes for r in rec.refused}
    regions = list(ctx.regions)
    lowered, kernels = _lower_and_load(captured, regions, target, refusals, progress)
    log.info("generated %d kernel sources (%d fused regions) for %s", len(set(lowered.sources.values())),
             len(regions), target.describe())
    if opts.verify_kernels:
        progress.stage("verify kernels")
        report.kernel_mismatches = check_kernels(captured.gm, Program(lowered.program, kernels), lowered.slots,
                                                 flat_example, kernels)
        if report.kernel_mismatches:  # dissolve: the disagreeing regions' nodes run as ATen calls
            bad = {name for m in report.kernel_mismatches for name in m.nodes}
            for m in report.kernel_mismatches:
                why = Refusal("kernel-mismatch", f"verify=kernels: kernel {m.kernel} disagreed with ATen "
                                                 f"(max abs error {m.max_abs_error:.3g})")
                refusals.update({name: why for name in m.nodes})
            regions = [r for r in regions if not any(x.name in bad for x in r.nodes)]
            lowered, kernels = _lower_and_load(captured, regions, target, refusals, progress, frozenset(bad))
    report.refusals = refusals
    lowered.program["target"] = {"backend": target.backend, "arch": target.arch}
    lowered.program["layouts"] = [w.to_json() for w in ctx.layouts]  # weights the layout pass joined
    report.layouts = list(ctx.layouts)
    report.quantization, report.quantized = opts.quantize, list(ctx.quantized)
    report.quantized_sources = list(ctx.quantized_sources)
    from turbofx.quant import GGUFNative

    if isinstance(opts.quantize, GGUFNative):  # what the GGUF files left dequantized on load
        from turbofx.quant.native import notes

        report.quant_notes = notes()
    if opts.quantize is not None:
        lowered.program["quantization"] = {"config": opts.quantize.to_json(),
                                           "layers": [asdict(q) for q in ctx.quantized]}
    program = Program(lowered.program, kernels)
    program.sources = lowered.sources
    report.kernels = lowered.kernels
    report.stage_seconds.update(passes=t1 - t0, codegen=time.perf_counter() - t1)
    _dump_kernels(opts, lowered.sources)
    return program, report, lowered, target


def check_quantization(cfg, target) -> None:
    """Refuse a scheme the target cannot run, before any work (FP8 needs sm89+ / gfx942)."""
    from turbofx.codegen.gemm import quant_refusal
    from turbofx.errors import QuantizationError

    fmt = cfg.fmt
    why = quant_refusal(fmt, target) if fmt is not None else None
    if why is not None:
        hint = " (AMD MI300: quantize='fp8-fnuz')" if target.arch == "gfx942" else ""
        raise QuantizationError(f"quantize={cfg.name!r}: {why.detail}{hint}")


def quantization_summary(report: "Report") -> str:
    """One line: the scheme, how many linear weights it took, bytes before and after, and why the
    others were left (refusal codes)."""
    q = report.quantized
    full = sum(x.full_bytes for x in q)
    small = sum(x.quantized_bytes for x in q)
    rec = next((p for p in report.passes if p.name == "quantize"), None)
    left = ", ".join(f"{n} {c}" for c, n in rec.refusal_counts().items()) if rec is not None else ""
    ratio = f" ({small / full:.2f}x)" if full else ""
    return (f"quantization {report.quantization.name}: {len(q)} weights, {full / 1e6:.1f} MB -> {small / 1e6:.1f} MB"
            f"{ratio}" + (f"; kept in full precision: {left}" if left else ""))


def _lower_and_load(captured: CapturedGraph, regions: list, target, refusals: dict[str, Refusal], progress: Progress,
                    as_aten: frozenset = frozenset()):
    progress.stage("lowering")
    reasons = {name: str(r) for name, r in refusals.items()}  # lowering records extern reasons as text
    lowered = lower(captured.gm, regions, target, reasons, as_aten)
    kernels = {}
    for name, src in lowered.sources.items():
        progress.stage(f"codegen {name}")
        kernels[name] = cache.load(name, src, target)
    return lowered, kernels


def _mutated_outputs(captured: CapturedGraph) -> dict:
    """Graph output position -> the placeholder it is written back into (buffer / input mutations)."""
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    by_target = {spec.target: p for spec, p in zip(captured.inputs, placeholders) if spec.target is not None}
    by_name = {p.name: p for p in placeholders}
    found = {i: by_target.get(o.target) or by_name.get(o.target) for i, o in enumerate(captured.outputs)
             if o.kind != "user"}
    return {i: p for i, p in found.items() if p is not None}


def _device_of(c: CapturedGraph) -> torch.device | None:
    for t in list(c.example_user_inputs) + list(c.state.values()):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            return t.device
    return None


def _first_device(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first real tensor among the inputs, parameters and buffers."""
    import torch.utils._pytree as pytree

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tensors += list(module.parameters()) + list(module.buffers())
    return next((t.device for t in tensors if t.device.type != "meta"), None)


def _dump_kernels(opts: Options, sources: dict[str, str]) -> None:
    d = opts.dump_dir or os.environ.get("TURBOFX_DUMP")
    if not d:
        return
    kdir = os.path.join(d, "kernels")
    os.makedirs(kdir, exist_ok=True)
    for name, src in sources.items():
        with open(os.path.join(kdir, f"{name}.py"), "w") as f:
            f.write(src)


def _graph_example_inputs(c: CapturedGraph) -> list:
    users = iter(c.example_user_inputs)  # one per call input, frozen weights too (backend.py)
    out = []
    for s in c.inputs:
        if s.kind in ("user", "frozen"):
            x = next(users)
            out.append(_real(x) if s.kind == "user" else c.state[s.target])
        else:
            out.append(c.state[s.target])
    return out


def _real(x):
    """A real random stand-in for a fake (Dynamo) example input; real inputs pass through."""
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(x, torch.SymInt):
        return x.node.hint
    if not isinstance(x, torch.Tensor) or not is_fake(x):
        return x
    shape = [s.node.hint if isinstance(s, torch.SymInt) else s for s in x.shape]
    g = torch.Generator().manual_seed(0)
    if x.dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(device=x.device, dtype=x.dtype)
    if x.dtype == torch.bool:
        return torch.rand(shape, generator=g).lt(0.5).to(x.device)
    return torch.randint(0, 2, shape, generator=g).to(device=x.device, dtype=x.dtype)


def input_plan(c: CapturedGraph) -> tuple[list, list, ShapeGuards]:
    """(plan, expected, guards) for CompiledModule from a captured graph. A symbolic dim of
    ``expected`` is the Python source of its size expression over the bound symbols."""
    from turbofx.codegen.indexing import to_expr

    plan, k = [], 0
    placeholders = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    user_vals = []
    for s, p in zip(c.inputs, placeholders):
        if s.kind == "user":
            plan.append(["user", k]); k += 1
            user_vals.append(p.meta.get("val"))
        else:
            plan.append(["state", s.target])
    shapes = [[to_expr(d) for d in (v.shape if isinstance(v, torch.Tensor) else ex.shape)]
              if isinstance(ex, torch.Tensor) else None for ex, v in zip(c.example_user_inputs, user_vals)]
    shapes, guards = build_guards(shapes, c.ranges, c.asserts)
    expected = []
    for ex, shape in zip(c.example_user_inputs, shapes):
        if isinstance(ex, torch.Tensor):
            expected.append({"kind": "tensor", "shape": shape, "dtype": ex.dtype, "device": ex.device})
        else:
            expected.append({"kind": "value", "value": ex})
    return plan, expected, guards


def mutation_plan(c: CapturedGraph) -> dict[int, list]:
    user_pos = {s.name: i for i, s in enumerate([s for s in c.inputs if s.kind == "user"])}
    out = {}
    for i, o in enumerate(c.outputs):
        if o.kind == "buffer_mutation":
            out[i] = ["state", o.target]
        elif o.kind == "input_mutation":
            out[i] = ["user", user_pos[o.target]]
    return out


def make_module(c: CapturedGraph, program: Program, report: Report) -> CompiledModule:
    plan, expected, guards = input_plan(c)
    muts = mutation_plan(c)
    return CompiledModule(program, c.state, plan, expected, c.user_input_names, c.in_spec, c.out_spec,
                          muts, len(c.outputs) - len(muts), report, guards=guards)


def compile(module: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None,
            target: str | None = None, **options) -> CompiledModule:
    """Compile ``module`` for calls like ``module(*example_args, **example_kwargs)``."""
    opts = Options.make(target=target, **options)
    if not isinstance(module, torch.nn.Module):
        raise TurbofxError(f"turbofx.compile takes a torch.nn.Module, not a {type(module).__name__}; wrap a "
                           "function in an nn.Module whose forward calls it")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TurbofxError(f"example_kwargs must be a dict of keyword inputs, not a {type(example_kwargs).__name__}")
    example_kwargs = dict(example_kwargs or {})
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    detected = detect(_first_device(module, example_args, example_kwargs), opts.target)  # a bad target fails before capture
    t_cache = time.perf_counter()
    key, record = None, compile_cache.CacheRecord("skipped", compile_cache.skip_reason(opts) or "")
    if not record.reason:
        try:
            key = compile_cache.key_of(module, example_args, example_kwargs, opts, detected.describe())
        except compile_cache.Uncacheable as e:
            record.reason = f"not cacheable: {e}"
        except Exception as e:  # the cache must never stop a compile: compile uncached, say why
            log.debug("compile cache key failed", exc_info=True)
            record.reason = f"not cacheable: {type(e).__name__} while computing the key"
    if key is not None:
        record.key = key[:12]
        hit, info = compile_cache.lookup(key, module)
        if hit is not None:
            record.status, record.passes = "hit", info
            record.seconds = time.perf_counter() - t_cache
            hit.turbofx_report.cache = record
            hit.turbofx_report.stage_seconds = {"cache": record.seconds}
            log.info("compiled %s: from the compile cache (%s)", type(module).__name__, key[:12])
            if opts.cudagraphs or (opts.cudagraphs is None and not detected.interpret):
                hit.enable_graphs(hit.turbofx_report.runtime_notes)
            return hit
        record.status, record.reason = "miss", info
    record.seconds = time.perf_counter() - t_cache
    with Progress(f"compiling {type(module).__name__}") as progress:
        try:
            t0 = time.perf_counter()
            log.info("capturing %s with torch.export%s", type(module).__name__,
                     " (dynamic sizes)" if opts.dynamic else "")
            progress.stage("capture")
            with torch.no_grad():
                captured = capture_module(module, example_args, example_kwargs, dynamic=opts.dynamic)
            origin = compile_cache.origins(module, captured.state) if key is not None else {}
            program, report, _, target = build(captured, opts, time.perf_counter() - t0, progress)
        except TurbofxError:
            raise  # says what was wrong already
        except Exception as e:  # capture wraps the model's own failures: anything else is ours
            log.debug("internal error while compiling", exc_info=True)
            raise TurbofxInternalError(f"compiling {type(module).__name__} failed", e) from e
    log.info("compiled %s: %s", type(module).__name__, report.counts())
    compiled = make_module(captured, program, report)
    if key is not None:  # stored before graphs are enabled: an entry holds the plain program
        t_store = time.perf_counter()
        why = compile_cache.store(key, module, captured, origin, compiled, report)
        record.seconds += time.perf_counter() - t_store
        if why:
            record.status, record.reason = "skipped", f"not stored: {why}"
    report.cache = record
    if opts.cudagraphs or (opts.cudagraphs is None and not target.interpret):
        compiled.enable_graphs(report.runtime_notes)
    return compiled


def explain(compiled, *args, **kwargs) -> Report:
    """The report of a compiled module (``turbofx.compile``, ``turbofx.load`` or the backend).
    Given the inputs of a call (``explain(cm, ids)``), it adds that call's roofline profile: bytes,
    FLOPs and launches per step from shapes, the ideal traffic, and a modelled time per GPU."""
    if args or kwargs:
        from turbofx.compiler.roofline import profile

        rep = _report_of(compiled)
        rep.roofline = profile(compiled, *args, **kwargs)
        return rep
    return _report_of(compiled)


def _report_of(compiled) -> Report:
    rep = getattr(compiled, "turbofx_report", None)
    if rep is None:
        from turbofx.compiler.backend import reports_of

        reps = reports_of(compiled)
        if len(reps) == 1:
            return reps[0]
        if reps:  # graph breaks or recompiles: one report over every graph of this module
            merged = Report(target=reps[0].target)
            for r in reps:
                merged.kernels += r.kernels
                merged.passes += r.passes
                merged.rewrites += r.rewrites
                merged.kernel_mismatches += r.kernel_mismatches
                merged.layouts += r.layouts
                for k, v in r.stage_seconds.items():
                    merged.stage_seconds[k] = merged.stage_seconds.get(k, 0.0) + v
            return merged
        raise TurbofxError("this object was not compiled by turbofx (nothing to explain)")
    return rep
