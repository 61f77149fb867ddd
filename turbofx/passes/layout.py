"""layout: sibling matmuls over one input become one matmul over their concatenated weights.

Pattern (what ``nn.Linear`` captures to): ``mm(A, t(W))`` or ``addmm(b, A, t(W))``, the transpose
an ``aten.permute(W, [1, 0])`` or ``aten.t(W)``, W a 2-D state tensor ``[N_i, K]`` (``ctx.state``)
and b a 1-D one. Siblings read the same A: the same node, or the same base node through views to
the same shape (each Linear views the hidden state itself). The Q/K/V projections of an attention
layer and the gate/up projections of a gated MLP are such siblings.

Rewrite: the weights are concatenated once, at compile time, along N into one new state tensor
``W' [sum N_i, K]`` (the biases likewise), the graph computes one ``mm``/``addmm`` over ``t(W')``
and each original output becomes ``slice(out, 1, a_i, b_i)`` (a view, no copy). Siblings keep
their graph order, so a gate/up pair becomes ``[gate; up]``. The originals' placeholders are
dropped; ``meta["val"]`` of the new nodes and of the later nodes whose layout changes (views of the
slices) are recomputed under the graph's fake mode.

Memory: the module keeps working eagerly and nothing is held twice. When the weights are the
module's own tensors, each is re-pointed at its rows of W' (``w.data = W'[a:b]``), so the model,
its in-place updates (``load_state_dict``, optimizers) and the compiled program share one copy.
Weights already laid out adjacently in one tensor (a second compile of the same model:
generate's prefill and decode) are joined as a view of it, with no copy. A weight whose memory is
shared with some other tensor is refused (``shared-storage``): re-pointing it would break that
sharing, copying it would hold it twice. Replacing a parameter's ``.data`` after compiling is
not seen by the program (in-place updates are).

Invariant: the graph computes the same values (each output column is the same dot product over
K; only the matmul kernel's rounding may differ); every state placeholder the graph keeps is in
``CapturedGraph.inputs``/``state`` (``ctx.state`` keeps them consistent). Each concatenation
takes one unit of fuel. Refusal texts start with a stable code (see ``REFUSALS``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx

from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal

aten = torch.ops.aten

REFUSALS = {
    "weights-are-inputs": "the weight is a call input (the torch.compile door): it may change between calls, "
                          "so it cannot be concatenated at compile time",
    "not-state": "the weight is computed in the graph, not read from module state",
    "not-2d": "the weight is not a 2-D [N, K] tensor",
    "weight-shared": "the weight or its transpose is read elsewhere too (e.g. tied weights)",
    "bias-not-state": "the bias is not a 1-D state tensor read only by this matmul",
    "dtype-differs": "the siblings' weights (or biases) have different dtypes",
    "device-differs": "the siblings' weights are on different devices",
    "k-differs": "the siblings' weights have different K",
    "mixed-bias": "some siblings have a bias and others not",
    "shared-storage": "a weight shares its memory with another tensor and is not laid out next to its siblings",
    "layout-view": "a later view of an output cannot read the strided slice of the joined output",
    "output-layout": "an output (or a view of it) is returned by the graph: the caller would get a strided "
                     "view where eager returns a contiguous tensor",
}

@dataclass(frozen=True)
class Joined:
    """State recipe (``ModuleState.add``): the state tensors ``keys`` joined along dim 0 by ``_join``
    (which re-points them at their rows), so the compile cache rebuilds a joined weight from the live
    module exactly as a cold compile does."""

    keys: tuple[str, ...]


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TRANSPOSES = (aten.permute.default, aten.t.default)


@dataclass
class WeightLayout:
    """One concatenation: ``name`` (new state key) holds ``sources`` stacked along ``dim`` (0: output
    features N), ``sizes`` rows each; the matmul output is split along its dim 1 at the same sizes."""

    name: str
    sources: list[str]
    sizes: list[int]
    shape: list[int]  # [N, K] of the joined weight
    dtype: str
    dim: int = 0
    bias: str | None = None  # state key of the joined bias
    bias_sources: list[str] = field(default_factory=list)
    copied: bool = True  # False: the weights were adjacent already and are joined as a view

    def describe(self) -> str:
        n, k = self.shape
        return f"layout: {_short(self.sources)} -> 1 weight [{n}, {k}]" + (" + bias" if self.bias else "")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Sibling:
    node: fx.Node  # the mm / addmm
    a: fx.Node
    transpose: fx.Node
    weight: Any  # the transposed node (a placeholder when state)
    bias: Any = None


def _short(keys: list[str]) -> str:
    """'a.q_proj.weight', 'a.k_proj.weight' -> 'a.q_proj.weight+k_proj' (first key whole, then the part
    that differs)."""
    prefix, suffix = _common_parts(keys)
    return "+".join([keys[0]] + [k[len(prefix):len(k) - len(suffix)] for k in keys[1:]])


def _common_parts(keys: list[str]) -> tuple[str, str]:
    """The longest common dotted prefix and suffix of the keys (whole components only)."""
    parts = [k.split(".") for k in keys]
    n = min(len(p) for p in parts)
    i = 0
    while i < n - 1 and all(p[i] == parts[0][i] for p in parts):
        i += 1
    j = 0
    while j < n - 1 - i and all(p[-1 - j] == parts[0][-1 - j] for p in parts):
        j += 1
    prefix = ".".join(parts[0][:i]) + ("." if i else "")
    suffix = ("." if j else "") + ".".join(parts[0][len(parts[0]) - j:])
    return prefix, suffix


def _joined_name(keys: list[str], taken: set[str]) -> str:
    """'x.q_proj.weight', 'x.k_proj.weight' -> 'x.q_proj+k_proj.weight' (unique among ``taken``)."""
    prefix, suffix = _common_parts(keys)
    name = prefix + "+".join(k[len(prefix):len(k) - len(suffix)] for k in keys) + suffix
    base, i = name, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    return name


def linear_of(n: fx.Node) -> _Sibling | None:
    """``n`` as mm(A, t(W)) / addmm(b, A, t(W)) with default scaling; None otherwise."""
    if n.op != "call_function":
        return None
    if n.target is aten.mm.default and len(n.args) == 2 and not n.kwargs:
        bias, a, bt = None, *n.args
    elif n.target is aten.addmm.default and len(n.args) == 3 and all(
            n.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")) and set(n.kwargs) <= {"beta", "alpha"}:
        bias, a, bt = n.args
    else:
        return None
    if not (isinstance(a, fx.Node) and isinstance(bt, fx.Node) and bt.op == "call_function"
            and bt.target in _TRANSPOSES and isinstance(bt.args[0], fx.Node)):
        return None
    if bt.target is aten.permute.default and list(bt.args[1]) != [1, 0]:
        return None
    return _Sibling(n, a, bt, bt.args[0], bias)


def _input_key(a: fx.Node) -> tuple:
    """What identifies the A operand: its base through views, and the shape/strides it is read at."""
    base = a
    while base.op == "call_function" and base.target in _VIEWS and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    v = a.meta.get("val")
    shape = tuple(str(d) for d in v.shape) if isinstance(v, torch.Tensor) else None
    stride = tuple(str(d) for d in v.stride()) if isinstance(v, torch.Tensor) else None
    return base, shape, stride


def _refuse_member(s: _Sibling, ctx: PassContext) -> str | None:
    """Why this sibling cannot be joined (a refusal code + detail), or None."""
    w = s.weight
    if ctx.state.is_call_input(w) or ctx.state.is_frozen(w):
        return "weights-are-inputs"
    if ctx.state.value(w) is None:
        return "not-state"
    t = ctx.state.value(w)
    if t.dim() != 2:
        return "not-2d"
    if len(w.users) != 1 or len(s.transpose.users) != 1:
        return "weight-shared"
    if s.bias is not None:
        b = ctx.state.value(s.bias) if isinstance(s.bias, fx.Node) else None
        if b is None or b.dim() != 1 or len(s.bias.users) != 1 or b.shape[0] != t.shape[0]:
            return "bias-not-state"
    return None


def _refuse_group(group: list[_Sibling], ctx: PassContext) -> str | None:
    ws = [ctx.state.value(s.weight) for s in group]
    if len({w.dtype for w in ws}) > 1:
        return "dtype-differs"
    if len({w.device for w in ws}) > 1:
        return "device-differs"
    if len({w.shape[1] for w in ws}) > 1:
        return "k-differs"
    if len({s.bias is None for s in group}) > 1:
        return "mixed-bias"
    if group[0].bias is not None and len({ctx.state.value(s.bias).dtype for s in group} | {ws[0].dtype}) > 1:
        return "dtype-differs"
    if _adjacent(ws) is None and not all(_sole_owner(w) for w in ws):
        return "shared-storage"
    if group[0].bias is not None:
        bs = [ctx.state.value(s.bias) for s in group]
        if _adjacent(bs) is None and not all(_sole_owner(b) for b in bs):
            return "shared-storage"
    return None


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _adjacent(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors' concatenation along dim 0 as a view, when they already lie one after another in
    one storage (contiguous, same dtype), e.g. re-pointed by an earlier compile; else None."""
    first = ts[0]
    if not all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in ts):
        return None
    if len({_storage_id(t) for t in ts}) != 1:
        return None
    offset = first.storage_offset()
    for t in ts:
        if t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in ts)
    shape = (rows, *first.shape[1:])
    stride = tuple(first.stride()) if first.dim() > 1 else (1,)
    return first.detach().as_strided(shape, stride, first.storage_offset())


def _sole_owner(t: torch.Tensor) -> bool:
    """Whether ``t`` alone holds its memory (no other tensor views or aliases it), so re-pointing it
    at the joined weight changes nothing anyone else sees."""
    storage = t.untyped_storage()
    if t.storage_offset() != 0 or storage.nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # held by ``t`` and by the ``storage`` object just made; more means another tensor shares it
    return use_count is None or use_count(storage._cdata) <= 2


def _join(ts: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the tensors joined along dim 0, copied?). A copy re-points each tensor at its rows of it,
    so that memory is held once and the module keeps reading (and updating) the same values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # The joined tensor requires grad when a source did, so that a compiled call under grad mode still
    # connects its outputs to the inference-only guard (CompiledModule) as it did for the parameters.
    grad = any(t.requires_grad for t in ts)
    from turbofx.quant.native import join_native

    with torch.no_grad(), unset_fake_temporarily():
        view = _adjacent(ts)
        if view is not None:
            join_native(ts, view)  # GGUF blocks the weights came with are joined with them
            return view.requires_grad_(grad), False
        joined = torch.cat([t.detach() for t in ts], dim=0)
        join_native(ts, joined)
        start = 0
        for t in ts:
            t.data = joined[start:start + t.shape[0]]
            start += t.shape[0]
        return joined.requires_grad_(grad), True


def _same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.device == b.device and tuple(map(str, a.shape)) == tuple(map(str, b.shape))
                and tuple(map(str, a.stride())) == tuple(map(str, b.stride()))
                and str(a.storage_offset()) == str(b.storage_offset()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def _run_fake(mode, target, args, kwargs=None):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), mode:
        return target(*args, **(kwargs or {}))


def _downstream_vals(gm: fx.GraphModule, replaced: dict[fx.Node, Any], mode) -> dict[fx.Node, Any]:
    """New ``meta["val"]`` for the nodes after ``replaced`` (node -> the value it now has) whose
    layout changes (views of the slices, strided instead of contiguous). Raises if an op refuses
    its new input (e.g. a view that flattens the strided slice)."""
    env = dict(replaced)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in replaced or not any(a in env for a in n.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env.get(a, a.meta.get("val")))
        out = _run_fake(mode, n.target, args, kwargs)
        if not _same_layout(out, n.meta.get("val")):
            env[n] = out
    return {n: v for n, v in env.items() if n not in replaced}


def layout(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("layout")
    groups: dict[tuple, list[_Sibling]] = {}
    for n in gm.graph.nodes:
        s = linear_of(n)
        if s is not None:
            groups.setdefault(_input_key(s.a), []).append(s)
    for members in groups.values():
        if len(members) < 2:
            continue
        # refusals are keyed by the sibling group ("mm+mm_1"): no node is named so, and a layout refusal
        # is no reason for lowering to give one node (lowering looks reasons up by node name)
        names = "+".join(s.node.name for s in members)
        ok, refused = [], {}
        for s in members:
            code = _refuse_member(s, ctx)
            if code is None:
                ok.append(s)
            else:
                refused.setdefault(code, []).append(s.node.name)
        for code, which in refused.items():
            rec.refuse(names, Refusal(code, f"{', '.join(which)}: {REFUSALS[code]}"))
        if len(ok) < 2:
            continue
        code = _refuse_group(ok, ctx)
        if code is not None:
            rec.refuse(names, Refusal(code, REFUSALS[code]))
            continue
        _join_group(gm, ok, ctx, rec)
    return rec


layout.pass_name = "layout"


def _join_group(gm: fx.GraphModule, group: list[_Sibling], ctx: PassContext, rec: PassRecord) -> None:
    from torch._guards import detect_fake_mode

    st = ctx.state
    names = "+".join(s.node.name for s in group)
    w_keys = [st.key(s.weight) for s in group]
    b_keys = [st.key(s.bias) for s in group] if group[0].bias is not None else []
    sizes = [int(st.value(s.weight).shape[0]) for s in group]
    mode = detect_fake_mode([s.node.meta.get("val") for s in group])
    if mode is None:
        rec.refuse(names, Refusal("layout-view", "the graph carries no fake values to recompute layouts from"))
        return
    # Dry run on fake values first: a refusal must leave the graph, the state and the module untouched.
    w_fake = _run_fake(mode, torch.cat, ([s.weight.meta["val"] for s in group], 0))
    a_val = group[0].a.meta["val"]
    if group[0].bias is not None:
        b_fake = _run_fake(mode, torch.cat, ([s.bias.meta["val"] for s in group], 0))
        out_fake = _run_fake(mode, aten.addmm.default, (b_fake, a_val, _run_fake(mode, aten.permute.default, (w_fake, [1, 0]))))
    else:
        out_fake = _run_fake(mode, aten.mm.default, (a_val, _run_fake(mode, aten.permute.default, (w_fake, [1, 0]))))
    bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    slice_vals = [_run_fake(mode, aten.slice.Tensor, (out_fake, 1, a, b)) for a, b in bounds]
    try:
        later = _downstream_vals(gm, {s.node: v for s, v in zip(group, slice_vals)}, mode)
    except Exception as e:  # an op that cannot take the strided slice: keep the separate matmuls
        rec.refuse(names, Refusal("layout-view", f"{REFUSALS['layout-view']} ({type(e).__name__}: {str(e)[:200]})"))
        return
    returned = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    if any(n in later or any(n is s.node for s in group) for n in returned):
        rec.refuse(names, Refusal("output-layout", REFUSALS["output-layout"]))
        return
    name = _joined_name(w_keys, st.keys())
    if not ctx.fuel.take(f"layout: join {names} into {name}"):
        rec.refuse(names, ctx.fuel.refusal)
        return

    weight, copied = _join([st.value(s.weight) for s in group])
    g = gm.graph
    w_node = st.add(name, weight, like=group[0].weight, recipe=Joined(tuple(w_keys)))
    b_node, b_name = None, None
    if b_keys:
        b_name = _joined_name(b_keys, st.keys())
        bias, _ = _join([st.value(s.bias) for s in group])
        b_node = st.add(b_name, bias, like=group[0].bias, recipe=Joined(tuple(b_keys)))
    with g.inserting_before(group[0].node):
        wt = g.call_function(aten.permute.default, (w_node, [1, 0]))
        wt.meta["val"] = _run_fake(mode, aten.permute.default, (w_node.meta["val"], [1, 0]))
        if b_node is None:
            fused = g.call_function(aten.mm.default, (group[0].a, wt))
            fused.meta["val"] = _run_fake(mode, aten.mm.default, (a_val, wt.meta["val"]))
        else:
            fused = g.call_function(aten.addmm.default, (b_node, group[0].a, wt))
            fused.meta["val"] = _run_fake(mode, aten.addmm.default, (b_node.meta["val"], a_val, wt.meta["val"]))
        slices = []
        for (a, b), v in zip(bounds, slice_vals):
            sl = g.call_function(aten.slice.Tensor, (fused, 1, a, b))
            sl.meta["val"] = _run_fake(mode, aten.slice.Tensor, (fused.meta["val"], 1, a, b))
            slices.append(sl)
    for s, sl in zip(group, slices):
        s.node.replace_all_uses_with(sl)
        for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if k in s.node.meta and k not in fused.meta:
                fused.meta[k] = s.node.meta[k]
        g.erase_node(s.node)
        g.erase_node(s.transpose)
        st.drop(s.weight)
        if s.bias is not None:
            st.drop(s.bias)
        _erase_unused_views(g, s.a)
    for n, v in later.items():
        n.meta["val"] = v
    shape = [int(d) for d in weight.shape]
    ctx.layouts.append(WeightLayout(name, w_keys, sizes, shape, str(weight.dtype).removeprefix("torch."),
                                    bias=b_name, bias_sources=b_keys, copied=copied))
    rec.matched.append(f"{ctx.layouts[-1].describe()} ({names}{'' if copied else '; adjacent already, no copy'})")


def _erase_unused_views(g: fx.Graph, a: fx.Node) -> None:
    """A sibling's own view of the input, now read by nothing (and the views it was made from)."""
    while a.op == "call_function" and a.target in _VIEWS and not a.users:
        src = a.args[0]
        g.erase_node(a)
        if not isinstance(src, fx.Node):
            break
        a = src

