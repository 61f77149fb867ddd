"""The torch.compile door: Dynamo -> AOTAutograd (inference) -> the same pipeline as export.

Registered as ``backend="turbofx"`` through the ``torch_dynamo_backends`` entry point (and on
``import turbofx``). Accepts the ``mode=`` / ``options=`` keywords torch and HF ``generate`` pass.
"""
from __future__ import annotations

import logging
import time
import weakref

log = logging.getLogger("turbofx.backend")

stats = {"graphs": 0, "calls": 0}
_reports: list = []


def reports_of(compiled) -> list:
    """Reports of the graphs compiled through the torch.compile door for ``compiled`` (an
    OptimizedModule or the module it wraps): matched by the parameter/buffer tensors the graphs
    took as inputs (by identity, through weak references: a freed model's memory reused by a new
    one must not lend it the old reports)."""
    import torch

    module = getattr(compiled, "_orig_mod", compiled)
    if not isinstance(module, torch.nn.Module):
        return []
    mine = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    return [r for r in _reports if any(id(t) in mine for t in (ref() for ref in r.inputs) if t is not None)]


def _is_static(t) -> bool:
    """Weights and tensors marked with a static address (HF's StaticCache does) are used in place."""
    import torch

    if isinstance(t, torch.nn.Parameter):
        return True
    try:
        from torch._dynamo.utils import get_static_address_type

        return get_static_address_type(t) is not None
    except Exception:
        return False


def _state_names(gm) -> list[str | None]:
    """Per Dynamo graph input: the module path of the parameter or buffer it is (from Dynamo's
    source, ``L['self']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``layers.0.weight``), or None for anything else."""
    import re

    names = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        source = getattr(n.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        text = name() if callable(name) else name  # a method in older torch, a property in newer
        text = text if isinstance(text, str) else ""
        parts = re.findall(r"\._(modules|parameters|buffers)\['([^']+)'\]", text)
        names.append(".".join(p for _, p in parts) if parts and parts[-1][0] != "modules" else None)
    return names


def _freeze_weights(captured, example_inputs: list, names: list) -> dict:
    """With quantization on, the model's parameters (call inputs at this door) become module state
    the quantize pass may replace: each placeholder fed by an ``nn.Parameter`` gets the kind
    "frozen" and its tensor as state. Returns {state key: (argument position, tensor, version)}:
    what each call must still pass unchanged (``_FrozenWeights`` checks it)."""
    import torch

    users = [s for s in captured.inputs if s.kind == "user"]
    if len(users) != len(example_inputs) or len(names) != len(example_inputs):
        return {}  # AOTAutograd changed the inputs: which is a parameter is not known
    frozen = {}
    for i, (spec, t) in enumerate(zip(users, example_inputs)):
        if isinstance(t, torch.nn.Parameter):
            spec.kind, spec.target = "frozen", names[i] or f"arg{i}"  # the module path: filters read it
            captured.state[spec.target] = t
            frozen[spec.target] = (i, t, t._version)
    return frozen


class _FrozenWeights:
    """Runs a program built over frozen (quantized) weights: its graph inputs are the call's
    arguments where it still reads them, and the quantized state in place of the weights it
    replaced. Each call checks those weights are the same tensors, unmodified: a program holds
    their quantized values, so a changed weight would be silently ignored otherwise."""

    def __init__(self, program, captured, arg_of: dict, weights: dict):
        self.program = program
        self.weights = {k: v for k, v in weights.items() if not any(s.target == k for s in captured.inputs)}
        self.plan = [("arg", arg_of[s.name]) if s.name in arg_of else ("state", captured.state[s.target])
                     for s in captured.inputs]

    def __call__(self, args: list):
        from turbofx.errors import TurbofxError

        for key, (i, t, version) in self.weights.items():
            if args[i] is not t or t._version != version:
                raise TurbofxError(f"a weight turbofx quantized when compiling ({key}) was changed "
                                   "or replaced since: its quantized copy would be used instead. Recompile after "
                                   "changing weights (torch._dynamo.reset(), then call the model again)")
        return self.program([args[x] if kind == "arg" else x for kind, x in self.plan])


def turbofx_backend(gm, example_inputs, mode: str | None = None, options: dict | None = None, **kwargs):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from turbofx.compiler.capture import capture_aot_graph, decomposition_table, keep_attention_whole
    from turbofx.compiler.driver import Options, build
    from turbofx.passes.attention import attention

    import torch

    opts = Options.make(mode=mode, **dict(options or {}), **kwargs)
    names = _state_names(gm) if opts.quantize is not None else []  # only quantization freezes weights
    input_refs = [weakref.ref(t) for t in example_inputs if isinstance(t, torch.Tensor)]
    static = [_is_static(t) for t in example_inputs]
    graphs = opts.cudagraphs if opts.cudagraphs is not None else mode == "reduce-overhead"

    def forward_compiler(fx_graph, inputs):
        from turbofx.errors import TurbofxError, TurbofxInternalError

        t0 = time.perf_counter()
        try:
            captured = capture_aot_graph(fx_graph, inputs)
            weights = _freeze_weights(captured, example_inputs, names) if opts.quantize is not None else {}
            arg_of = {s.name: i for i, s in enumerate(captured.inputs) if s.kind in ("user", "frozen")}
            constants = [captured.state[s.target] for s in captured.inputs if s.kind == "constant"]
            program, report, _, target = build(captured, opts, time.perf_counter() - t0)
        except TurbofxError:
            raise
        except Exception as e:  # Dynamo already traced the user's code: a failure here is ours
            log.debug("internal error while compiling a graph", exc_info=True)
            raise TurbofxInternalError("compiling a torch.compile graph failed", e) from e
        report.inputs = input_refs
        _reports.append(report)
        stats["graphs"] += 1
        step = program
        if weights:  # quantized weights: the program's inputs are the call's, minus them, plus their state
            step = _FrozenWeights(program, captured, arg_of, weights)
        if graphs and not target.interpret and not weights:
            if len(inputs) == len(static):  # AOT kept Dynamo's inputs one for one
                from turbofx.runtime.graphs import GraphRunner

                step = GraphRunner(program, static + [True] * len(constants), report.runtime_notes)
            else:
                report.runtime_notes.append("graph replay off: AOTAutograd changed the inputs, so the static "
                                            "ones (weights, caches) cannot be told apart")

        def run(*args):
            stats["calls"] += 1
            if weights:
                return step(list(args))
            return step(list(args) + constants)  # lifted constants follow AOT's inputs

        return make_boxed_func(run)

    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    if training:
        # turbofx's programs are inference-only for now: a training call runs the ATen graphs
        # AOTAutograd makes, without turbofx's decomposition table: torch's core ATen table, which
        # it extends, gives a tiny llama wrong gradients in a joint graph (loss right; seen with
        # torch 2.13 and no turbofx code in the loop). explain says so.
        def aten_compiler(fx_graph, inputs):
            from turbofx.compiler.driver import Report

            report = Report(target="ATen (training graph)", inputs=input_refs, runtime_notes=[
                "training graph (inputs require grad): runs as AOTAutograd's ATen graph; turbofx compiles "
                "inference graphs only (call under torch.no_grad() for turbofx kernels)"])
            _reports.append(report)
            return make_boxed_func(fx_graph.forward)

        log.info("training graph (inputs require grad): running AOTAutograd's ATen graphs, not turbofx programs")
        return aot_autograd(fw_compiler=aten_compiler, bw_compiler=aten_compiler)(gm, example_inputs)
    if attention in opts.passes():
        keep_attention_whole(gm)
    return aot_autograd(fw_compiler=forward_compiler, decompositions=decomposition_table(),
                        keep_inference_input_mutations=True)(gm, example_inputs)
