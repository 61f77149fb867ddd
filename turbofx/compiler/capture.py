"""Capture: nn.Module (torch.export) or Dynamo graph (AOTAutograd) -> one ATen FX graph form.

Both doors produce a :class:`CapturedGraph`: an ATen-level, functional ``fx.GraphModule`` whose
nodes carry FakeTensor ``meta["val"]``, plus a signature saying which placeholder is a parameter,
a buffer, a constant or a user input, and which outputs are buffer mutations. Everything after
capture (passes, codegen, runtime) sees only this form.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from turbofx.errors import CaptureError, OpArgsError

log = logging.getLogger("turbofx.capture")
aten = torch.ops.aten


@dataclass
class InputSpec:
    kind: str  # "user" | "parameter" | "buffer" | "constant" | "frozen" (a call input held as state: backend.py)
    name: str  # placeholder name
    target: str | None = None  # state-dict key for parameters/buffers/constants


@dataclass
class OutputSpec:
    kind: str  # "user" | "buffer_mutation" | "input_mutation"
    target: str | None = None  # mutated buffer key or user-input placeholder name


@dataclass
class CapturedGraph:
    gm: fx.GraphModule
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    in_spec: Any = None  # pytree spec of (args, kwargs); None for the Dynamo door
    out_spec: Any = None
    example_user_inputs: list[Any] = field(default_factory=list)  # flat, for input checks
    user_input_names: list[str] = field(default_factory=list)  # readable names for errors
    # torch.export's shape guards (the export door; Dynamo guards its own graphs): size
    # expression -> (lo, hi) bounds, and the runtime assertions over sizes in the graph
    ranges: dict = field(default_factory=dict)
    asserts: list = field(default_factory=list)
    # state key a pass added -> how to rebuild it from the live module (e.g. layout.Joined), for the
    # compile cache; a key added without a recipe makes the program uncacheable
    recipes: dict[str, Any] = field(default_factory=dict)


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    """var_mean as mean + sum of squares, so fusion sees two ordinary row reductions."""
    correction = 1 if correction is None else correction
    dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    n = 1
    for d in dims:
        n = n * x.shape[d]
    mean = aten.mean.dim(x, dims, True)
    centered = aten.sub.Tensor(x, mean)
    var = aten.div.Tensor(aten.sum.dim_IntList(aten.mul.Tensor(centered, centered), dims, keepdim), n - correction)
    if not keepdim:
        mean = aten.squeeze.dims(mean, dims)
    return var, mean


def decomposition_table() -> dict:
    """Core ATen decompositions, minus SDPA (kept whole for the attention pass), plus softmax and
    layer norm split into reductions the fusion pass can fuse."""
    from torch._decomp import core_aten_decompositions, decomposition_table as full

    table = dict(core_aten_decompositions())
    table.pop(aten.scaled_dot_product_attention.default, None)
    for op in (aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default):
        if op in full:
            table[op] = full[op]
    table[aten.var_mean.correction] = _var_mean
    return table


def _dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Every dim of every user tensor is AUTO: export keeps what the model allows symbolic."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example inputs do not match {type(module).__name__}.forward: {e}") from e
    auto = torch.export.Dim.AUTO

    def spec(v):  # size-1 dims stay static (export would specialise them anyway, with a warning)
        return {d: auto for d in range(v.dim()) if v.shape[d] != 1} if isinstance(v, torch.Tensor) else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _standard_layout(t):
    """A user tensor as the program sees it: contiguous strides. A tensor with no elements counts as
    contiguous whatever its strides, and export would then trace those strides as new symbols that
    no input size binds: give it standard strides too."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if t.stride() != _contiguous_strides(t.shape) else t
    return t if t.is_contiguous() else t.contiguous()


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool = False) -> CapturedGraph:
    """torch.export (non-strict) -> run_decompositions -> CapturedGraph.

    User tensors are captured as contiguous (kernels index them with contiguous strides);
    CompiledModule makes a non-contiguous argument contiguous before the call."""
    args, kwargs = pytree.tree_map(_standard_layout, (args, kwargs))
    dyn = _dynamic_shapes(module, args, kwargs) if dynamic else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
            ep = torch.export.export(module, args, kwargs, dynamic_shapes=dyn, strict=False)
            ep = ep.run_decompositions(decomposition_table())
    except Exception as e:  # export failures are user-facing: say what to try
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {str(e)[:2000]}\n"
            "Try example inputs that match how the model is called, pass use_cache=False for HF "
            "models, or use torch.compile(model, backend='turbofx') which tolerates graph breaks."
        ) from e
    from torch.export.graph_signature import InputKind, OutputKind

    kinds = {
        InputKind.USER_INPUT: "user",
        InputKind.PARAMETER: "parameter",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
    }
    inputs = []
    for s in ep.graph_signature.input_specs:
        if s.kind not in kinds:
            raise CaptureError(f"unsupported graph input kind {s.kind} ({s.arg}); turbofx handles tensors and scalars")
        inputs.append(InputSpec(kinds[s.kind], s.arg.name, s.target))
    outputs = []
    for s in ep.graph_signature.output_specs:
        if s.kind == OutputKind.USER_OUTPUT:
            outputs.append(OutputSpec("user"))
        elif s.kind == OutputKind.BUFFER_MUTATION:
            outputs.append(OutputSpec("buffer_mutation", s.target))
        elif s.kind == OutputKind.USER_INPUT_MUTATION:
            outputs.append(OutputSpec("input_mutation", s.target))
        else:
            raise CaptureError(f"unsupported graph output kind {s.kind}")
    state = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    flat_user, _ = pytree.tree_flatten((args, kwargs))
    paths, _ = pytree.tree_flatten_with_path((args, kwargs))
    params = list(inspect.signature(module.forward).parameters)
    names = [_path_name(p, params) for p, _ in paths]
    return CapturedGraph(
        gm=ep.graph_module, inputs=inputs, outputs=outputs, state=state,
        in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec,
        example_user_inputs=flat_user, user_input_names=names,
        ranges={e: (vr.lower, vr.upper) for e, vr in ep.range_constraints.items()},
        asserts=_size_assertions(ep.graph_module),
    )


def _size_assertions(gm: fx.GraphModule) -> list:
    """The conditions of the graph's ``_assert_scalar`` nodes (canonicalize drops the nodes: the
    runtime checks them on the input sizes instead, before any kernel runs)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten._assert_scalar.default and isinstance(n.args[0], fx.Node):
            v = n.args[0].meta.get("val")
            if isinstance(v, torch.SymBool):
                out.append(v.node.expr)
    return out


def _path_name(path, params: list[str]) -> str:
    """Key path into (args, kwargs) -> the forward() parameter it feeds, e.g. 'input_ids' or
    'past[0]'."""
    if len(path) < 2:
        return pytree.keystr(path)
    group, first, rest = path[0].idx, path[1], pytree.keystr(path[2:])
    if group == 0:
        i = first.idx
        name = params[i] if i < len(params) else f"args[{i}]"
    else:
        name = first.key
    return f"{name}{rest}"


def keep_attention_whole(gm: fx.GraphModule) -> int:
    """Dynamo graph: route ``scaled_dot_product_attention`` calls through ``turbofx::sdpa`` so that
    AOTAutograd keeps them whole (it decomposes SDPA otherwise). Calls whose flags are not plain
    constants are left alone. Returns how many were rewritten."""
    import torch.nn.functional as F

    from turbofx.runtime.op_args import SdpaArgs

    targets = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in targets:
            continue
        try:  # F.scaled_dot_product_attention takes ATen's arguments (names, keyword-only ones, defaults)
            a = SdpaArgs.bind(torch.ops.aten.scaled_dot_product_attention.default, n.args, n.kwargs)
        except OpArgsError:
            continue  # a call torch itself would reject: leave it to torch
        if not (isinstance(a.dropout_p, (int, float)) and isinstance(a.is_causal, bool)
                and isinstance(a.enable_gqa, bool) and (a.scale is None or isinstance(a.scale, (int, float)))):
            continue
        a = replace(a, dropout_p=float(a.dropout_p), scale=None if a.scale is None else float(a.scale))
        n.target = SdpaArgs.op()
        n.args, n.kwargs = a.call_args()
        count += 1
    if count:
        gm.recompile()
    return count


def capture_aot_graph(gm: fx.GraphModule, example_inputs: list) -> CapturedGraph:
    """An AOTAutograd graph: every placeholder is a (flat) user input; tensor constants the graph
    reads through ``get_attr`` (e.g. ``torch.tensor([1., 2.])`` inside ``forward``) are lifted into
    trailing constant inputs, so that lowering and the Program see only placeholders."""
    constants = _lift_constants(gm, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [InputSpec("user", n.name) for n in placeholders[:len(placeholders) - len(constants)]]
    inputs += [InputSpec("constant", n.name, key) for n, key in zip(placeholders[len(inputs):], constants)]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outputs = [OutputSpec("user") for _ in (outs if isinstance(outs, (list, tuple)) else [outs])]
    return CapturedGraph(
        gm=gm, inputs=inputs, outputs=outputs, state=constants, example_user_inputs=list(example_inputs),
        user_input_names=[s.name for s in inputs if s.kind == "user"],
    )


def _lift_constants(gm: fx.GraphModule, example_inputs: list) -> dict[str, torch.Tensor]:
    """Replace each ``get_attr`` of a tensor by a new placeholder after the others (its FakeTensor
    ``meta["val"]`` made in the graph's fake mode). Returns attribute name -> tensor, in order."""
    gets = [n for n in gm.graph.nodes if n.op == "get_attr"]
    if not gets:
        return {}
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals + list(example_inputs) if isinstance(v, torch.Tensor)]) or FakeTensorMode()
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1:] or [next(iter(gm.graph.nodes))]
    constants: dict[str, torch.Tensor] = {}
    lifted: dict[str, fx.Node] = {}
    anchor = last[0]
    for n in gets:
        if n.target not in lifted:
            value = gm
            for part in n.target.split("."):
                value = getattr(value, part, None)
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"the graph reads {n.target} ({type(value).__name__}), which turbofx cannot run: "
                                   "only tensor constants are supported (a turbofx bug: please report it)")
            where = gm.graph.inserting_after(anchor) if anchor.op == "placeholder" else gm.graph.inserting_before(anchor)
            with where:
                anchor = lifted[n.target] = gm.graph.placeholder(f"const_{n.name}")
            anchor.meta["val"] = mode.from_tensor(value, static_shapes=True)
            constants[n.target] = value
        n.replace_all_uses_with(lifted[n.target])
        gm.graph.erase_node(n)
    gm.recompile()
    return constants
