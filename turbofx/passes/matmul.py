"""matmul: each matmul, with the work around it the GEMM family fuses, becomes one ``turbofx::gemm``.

Matched by semantics on the ATen graph (``mm``, ``addmm``, ``bmm``; ``nn.Linear`` arrives as a
view to 2-D, ``mm``/``addmm`` with a transposed weight, a view back):

- B: a transpose of a 2-D weight is read as that weight in ``[N, K]`` layout (K-contiguous rows:
  what the GEMV wants), anything else as ``[K, N]``;
- prologue: an RMSNorm producing A (``w * (x * rsqrt(mean(x², -1) + eps))`` with the casts eager
  makes, gemma's ``1 + w`` too) is computed inside the GEMM from ``x`` (``RmsNorm`` in the spec);
- B quantized (the quantize pass's ``dequant_weight(q, scale, min)`` under the transpose): the GEMM
  reads q, scale and min and dequantizes in its prologue (``GemmSpec.weight``); for W8A8 / FP8
  dynamic, A's ``quantize_rows`` is folded too (the GEMM quantizes A's rows as it loads them);
- epilogue, in this order: bias (addmm, or an add of a [N] vector), activation (silu, relu,
  gelu-tanh; silu also in its decomposed form), or SwiGLU ``act(gate) * up`` when gate and up
  are the two halves of one matmul's output (the layout pass concatenates them), residual add of
  a tensor of the output's shape, and a cast of the result (``logits.float()``).

Invariant: the graph computes the same values. Every fused step rounds where eager rounds
(``eager_rounding``), so the op's reference, which the runtime uses when no kernel runs, is the
eager computation. Each intermediate a fused op absorbs has no other reader (else it stays, and
the chain stops there). Matmuls the template cannot do stay as they are, with a refusal code.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from turbofx.codegen import gemm as gemm_family
from turbofx.codegen.indexing import shape_of, val
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal
from turbofx.runtime import ops as tfx_ops

aten = torch.ops.aten
GEMM_OP = torch.ops.turbofx.gemm.default
DEQUANT_WEIGHT = torch.ops.turbofx.dequant_weight.default
QUANTIZE_ROWS = torch.ops.turbofx.quantize_rows.default
_MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)


def _is_cast(n, dtype=None) -> bool:
    """A pure dtype cast (``_to_copy`` with only ``dtype``, or ``.to(dtype)``)."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    if n.target is aten._to_copy.default:
        kw = n.kwargs
        src = val(n.args[0])
        if set(kw) - {"dtype", "memory_format", "layout", "device"} or "dtype" not in kw:
            return False
        if kw.get("memory_format") not in (None, torch.preserve_format) or kw.get("layout") not in (None, torch.strided):
            return False
        if kw.get("device") is not None and (src is None or torch.device(kw["device"]) != src.device):
            return False  # a device transfer, not a cast (type_as spells out the same device)
    elif n.target is not aten.to.dtype:
        return False
    return dtype is None or val(n).dtype == dtype


def _is_reshape(n: fx.Node) -> bool:
    """A view that regroups the leading dims and keeps the last one (what a Linear does to [B, S, K])."""
    if n.op != "call_function" or n.target not in _VIEWS:
        return False
    src, out = val(n.args[0]), val(n)
    return src is not None and out is not None and src.dim() >= 1 and out.dim() >= 1 and \
        str(src.shape[-1]) == str(out.shape[-1])


def _strip_reshapes(n: fx.Node) -> fx.Node:
    while isinstance(n, fx.Node) and _is_reshape(n):
        n = n.args[0]
    return n


def _sole_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _fake_mode(*vals):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


@dataclass
class _Match:
    """One matmul and what fuses with it."""

    mm: fx.Node
    a: fx.Node  # the A operand (2-D or 3-D batched)
    b: fx.Node  # B as stored: [N, K] ("nk") or [K, N] ("kn")
    b_layout: str
    batched: bool
    bias: fx.Node | None = None
    bias_in_matmul: bool = False  # addmm: eager rounds matmul + bias once
    residual: fx.Node | None = None
    norm_x: fx.Node | None = None  # RMSNorm prologue: its input (A is computed from it)
    norm_weight: fx.Node | None = None
    norm: object = None  # gemm.RmsNorm
    norm_nodes: list[fx.Node] = field(default_factory=list)
    activation: str | None = None
    swiglu: bool = False
    out_dtype: torch.dtype | None = None
    weight: object = None  # gemm.WeightQuant: B is a quantized weight (q, b_scale, b_min), dequantized in the prologue
    b_scale: fx.Node | None = None
    b_min: fx.Node | None = None
    last: fx.Node | None = None  # the last absorbed node: its users read the gemm's result
    absorbed: list[fx.Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _operands(mm: fx.Node):
    """(a, b, bias, batched) of a matmul node."""
    if mm.target is aten.addmm.default:
        bias, a, b = mm.args[:3]
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return None
        return a, b, bias, False
    a, b = mm.args[:2]
    return a, b, None, mm.target is aten.bmm.default


def _weight_view(b: fx.Node, batched: bool):
    """(stored B, layout): a transposed 2-D weight is read in its own [N, K] layout."""
    if not batched and b.op == "call_function" and b.target in _TRANSPOSES and val(b.args[0]).dim() == 2:
        if b.target is aten.permute.default and [d % 2 for d in b.args[1]] != [1, 0]:
            return b, "kn"  # the identity permutation (canonicalize drops it anyway)
        return b.args[0], "nk"
    return b, "kn"


# ---------------------------------------------------------------- prologue: RMSNorm


def _match_rmsnorm(y: fx.Node):
    """(x, weight, RmsNorm, nodes) when ``y`` is an RMSNorm of ``x`` over its last dim, else None.
    Eager's forms: w * cast(x32 * rsqrt(mean(x32², -1, keepdim) + eps)) [cast], x32 = cast(x)."""
    nodes = []
    out_dtype = None
    if _is_cast(y):
        nodes.append(y)
        out_dtype = val(y).dtype
        y = y.args[0]
    if y.op != "call_function" or y.target is not aten.mul.Tensor or len(y.args) != 2:
        return None
    nodes.append(y)
    if out_dtype is None:
        out_dtype = val(y).dtype
    k = shape_of(y)[-1]
    for w, normed in (y.args, y.args[::-1]):
        if not isinstance(w, fx.Node) or not isinstance(normed, fx.Node) or val(w) is None:
            continue
        if val(w).dim() != 1 or str(shape_of(w)[0]) != str(k):
            continue
        inner = _match_normed(normed)
        if inner is None:
            continue
        x, eps, mid_dtype, inner_nodes = inner
        offset = 0.0
        if w.op == "call_function" and w.target is aten.add.Tensor and isinstance(w.args[1], (int, float)) \
                and isinstance(w.args[0], fx.Node) and len(w.users) == 1 and not w.kwargs:
            offset, w = float(w.args[1]), w.args[0]  # gemma: (1 + w)
        norm = gemm_family.RmsNorm(eps=eps, mid_dtype=mid_dtype, out_dtype=out_dtype, weight_offset=offset)
        return x, w, norm, nodes + inner_nodes
    return None


def _match_normed(n: fx.Node):
    """(x, eps, mid dtype, nodes) for ``[cast](x32 * rsqrt(mean(x32 ** 2, -1, keepdim) + eps))``."""
    nodes, mid = [], None
    if _is_cast(n):
        nodes.append(n)
        mid, n = val(n).dtype, n.args[0]
    if n.op != "call_function" or n.target is not aten.mul.Tensor or len(n.args) != 2:
        return None
    nodes.append(n)
    for x32, rs in (n.args, n.args[::-1]):
        if not isinstance(rs, fx.Node) or rs.target is not aten.rsqrt.default:
            continue
        s = rs.args[0]
        if s.target is not aten.add.Tensor or not isinstance(s.args[1], (int, float)) or s.kwargs:
            continue
        eps, mean = float(s.args[1]), s.args[0]
        if not isinstance(mean, fx.Node) or mean.target is not aten.mean.dim:
            continue
        dims = list(mean.args[1]) if len(mean.args) > 1 and mean.args[1] is not None else None
        keep = (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        ndim = val(mean.args[0]).dim()
        if dims is None or len(dims) != 1 or dims[0] % ndim != ndim - 1 or not keep or mean.kwargs.get("dtype"):
            continue
        sq = mean.args[0]
        if not (sq.target is aten.pow.Tensor_Scalar and sq.args[0] is x32 and sq.args[1] == 2) and \
                not (sq.target is aten.mul.Tensor and sq.args[0] is x32 and sq.args[1] is x32):
            continue
        if val(x32).dtype != torch.float32:
            continue
        x = x32.args[0] if _is_cast(x32, torch.float32) else x32
        return x, eps, mid, nodes + [rs, s, mean, sq] + ([x32] if x is not x32 else [])
    return None


# ---------------------------------------------------------------- epilogue


def _match_activation(x: fx.Node):
    """(kind, last node, nodes) when x's sole reader starts an activation of x, else None."""
    u = _sole_user(x)
    if u is not None and u.op == "call_function":
        if u.target is aten.silu.default:
            return "silu", u, [u]
        if u.target is aten.relu.default:
            return "relu", u, [u]
        if u.target is aten.gelu.default and u.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh", u, [u]
    # silu decomposed: [x32 = cast(x)]; s = sigmoid(x32); m = x32 * s; [cast back]
    x32, nodes = x, []
    if u is not None and _is_cast(u, torch.float32):
        x32, nodes = u, [u]
    users = list(x32.users)
    sig = next((m for m in users if m.target is aten.sigmoid.default), None)
    if sig is None or len(users) != 2 or len(sig.users) != 1:
        return None
    mul = next(iter(sig.users))
    if mul.target is not aten.mul.Tensor or set(mul.args) != {x32, sig} or mul not in users:
        return None
    nodes += [sig, mul]
    last = mul
    back = _sole_user(mul)
    if back is not None and _is_cast(back, val(x).dtype) and val(mul).dtype != val(x).dtype:
        nodes.append(back)
        last = back
    return "silu", last, nodes


def _last_dim_slice(n: fx.Node):
    """(start, end) when n is a unit-step slice of its input's last dim, else None."""
    if n.target is not aten.slice.Tensor:
        return None
    src = val(n.args[0])
    dim = n.args[1] if len(n.args) > 1 else 0
    if dim % src.dim() != src.dim() - 1 or (len(n.args) > 4 and n.args[4] != 1):
        return None
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else src.shape[-1]
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    size = src.shape[-1]
    end = min(end, size) if isinstance(size, int) else end
    return start, end


def _through_reshapes(n: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow sole-reader reshapes forward: (last node, the reshapes)."""
    chain = []
    while True:
        u = _sole_user(n)
        if u is None or not _is_reshape(u) or u.args[0] is not n:
            return n, chain
        chain.append(u)
        n = u


def _match_swiglu(cur: fx.Node):
    """(activation, product node, nodes) when cur's two readers are its halves and their
    product is act(gate) * up, else None."""
    users = list(cur.users)
    if len(users) != 2:
        return None
    spans = {u: _last_dim_slice(u) for u in users}
    if any(s is None for s in spans.values()):
        return None
    n = val(cur).shape[-1]
    if not isinstance(n, int) or n % 2:
        return None
    half = n // 2
    gate = next((u for u, s in spans.items() if s == (0, half)), None)
    up = next((u for u, s in spans.items() if s == (half, n)), None)
    if gate is None or up is None:
        return None
    g_end, g_views = _through_reshapes(gate)
    act = _match_activation(g_end)
    if act is None:
        return None
    kind, a_last, a_nodes = act
    u_end, u_views = _through_reshapes(up)
    prod = _sole_user(a_last)
    if prod is None or prod.target is not aten.mul.Tensor or set(prod.args) != {a_last, u_end}:
        return None
    if _sole_user(u_end) is not prod or val(prod).dtype != val(cur).dtype:
        return None
    return kind, prod, [gate, up, *g_views, *u_views, *a_nodes, prod]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return [str(s) for s in val(a).shape] == [str(s) for s in val(b).shape]


def match(mm: fx.Node, fuse: bool = True) -> _Match | Refusal:
    """What fuses with ``mm`` (nothing when not ``fuse``), or why the template does not do it."""
    ops = _operands(mm)
    if ops is None:
        return Refusal("alpha-beta", "addmm with alpha or beta other than 1")
    a, b, bias, batched = ops
    dt = val(mm).dtype
    for what, t in (("A", a), ("B", b), ("output", mm)):
        if val(t).dtype not in gemm_family.FLOATS or val(t).dtype != dt:
            return Refusal("dtype", f"{what} is {val(t).dtype} (the template does fp16, bf16 and fp32 matmuls "
                                    "of one dtype)")
    stored_b, layout = _weight_view(b, batched)
    m = _Match(mm=mm, a=a, b=stored_b, b_layout=layout, batched=batched, last=mm)
    if layout == "nk" and stored_b.target is DEQUANT_WEIGHT:  # the quantize pass's weight: q read directly
        q, scale, mins, text = stored_b.args
        m.weight, _, _ = tfx_ops.quant_of(text)
        m.b, m.b_scale, m.b_min = q, scale, mins
        if m.weight.act is not None:
            if a.op != "call_function" or a.target is not QUANTIZE_ROWS or a.args[1] != m.weight.act:
                return Refusal("act-quant", "a W8A8 / FP8-dynamic weight whose activations are not quantized rows")
            m.a = a.args[0]  # the GEMM quantizes A's rows as it loads them
    if bias is not None:
        if val(bias).dim() != 1 or val(bias).dtype != dt:
            return Refusal("bias-shape", "addmm's bias is not one [N] vector of the matmul's dtype")
        m.bias, m.bias_in_matmul = bias, True
    if fuse and not batched and (m.weight is None or m.weight.act is None):  # A's rows are quantized, not normed
        _match_prologue(m)
    if fuse:
        _match_epilogue(m)
    return m


def _match_prologue(m: _Match) -> None:
    base = _strip_reshapes(m.a)
    if base is m.a and base.op != "call_function":
        return
    found = _match_rmsnorm(base)
    if found is None:
        return
    x, w, norm, nodes = found
    if val(x).dtype not in gemm_family.FLOATS or val(w).dtype not in gemm_family.FLOATS:
        return
    if not _viewable(x, tuple(val(m.a).shape[:-1]) + (val(x).shape[-1],)):
        m.notes.append(f"rmsnorm of {x.name} not fused: its input cannot be viewed as A (strides)")
        return
    m.norm_x, m.norm_weight, m.norm, m.norm_nodes = x, w, norm, nodes


def _match_epilogue(m: _Match) -> None:
    """Absorb readers of the result while each is the sole reader and the template's order holds:
    bias, activation (or SwiGLU), residual, cast."""
    stage = 1 if m.bias is not None else 0  # 0 bias, 1 activation, 2 residual, 3 cast
    cur = m.mm
    dt = val(m.mm).dtype
    while True:
        end, views = _through_reshapes(cur)
        if stage <= 1:
            sw = _match_swiglu(end)
            if sw is not None:
                m.activation, m.swiglu = sw[0], True
                m.absorbed += views + sw[2]
                cur, stage = sw[1], 2
                continue
            act = _match_activation(end)
            if act is not None and val(act[1]).dtype == dt:
                m.activation = act[0]
                m.absorbed += views + act[2]
                cur, stage = act[1], 2
                continue
        u = _sole_user(end)
        if u is None or u.op != "call_function":
            break
        if u.target is aten.add.Tensor and len(u.args) == 2 and not u.kwargs and val(u).dtype == dt:
            other = u.args[1] if u.args[0] is end else u.args[0]
            if isinstance(other, fx.Node) and val(other).dtype == dt:
                if stage == 0 and val(other).dim() == 1 and _same_shape(u, end):
                    m.bias = other
                    m.absorbed += views + [u]
                    cur, stage = u, 1
                    continue
                if stage <= 2 and _same_shape(other, end) and _same_shape(u, end) and \
                        _viewable(other, _out_shape(m)):
                    m.residual = other
                    m.absorbed += views + [u]
                    cur, stage = u, 3
                    continue
        if stage <= 3 and _is_cast(u) and val(u).dtype in gemm_family.FLOATS and val(u).dtype != dt:
            m.out_dtype = val(u).dtype
            m.absorbed += views + [u]
            cur = u
            break
        break
    m.last = cur


def _out_shape(m: _Match) -> tuple:
    """The gemm's result shape: the matmul's, with SwiGLU's halved N."""
    shape = tuple(val(m.mm).shape)
    return shape[:-1] + (shape[-1] // 2,) if m.swiglu else shape


def _viewable(t: fx.Node, shape) -> bool:
    """Can ``t`` be viewed as ``shape`` (no copy)?"""
    try:
        with _fake_mode(val(t)) or nullcontext():
            val(t).view(shape)
        return True
    except Exception:  # noqa: BLE001  (a view the strides do not allow)
        return False


# ---------------------------------------------------------------- rewrite


def _spec(m: _Match) -> gemm_family.GemmSpec:
    dt = val(m.mm).dtype
    a_dtype = val(m.norm_x).dtype if m.norm is not None else val(m.a).dtype
    return gemm_family.GemmSpec(
        dtype=dt, a_dtype=a_dtype if a_dtype != dt else None, out_dtype=m.out_dtype, b_layout=m.b_layout,
        has_bias=m.bias is not None, activation=m.activation, swiglu=m.swiglu, residual=m.residual is not None,
        batched=m.batched, norm=m.norm, eager_rounding=True, bias_in_matmul=m.bias_in_matmul,
        b_dtype=m.weight.dtype if m.weight is not None else None, weight=m.weight)


def _shape_key(node: fx.Node) -> list[str]:
    return [str(d) for d in val(node).shape]


def _operand_like(node: fx.Node, leading: list[str]) -> fx.Node | None:
    """``node`` or the tensor it reshapes, whichever has these leading dims (the gemm takes
    [*, K] and gives [*, N]: no reshape nodes with symbolic sizes are needed)."""
    while True:
        if _shape_key(node)[:-1] == leading:
            return node
        if not _is_reshape(node):
            return None
        node = node.args[0]


def _plan_rewrite(m: _Match) -> tuple[fx.Node | tuple, fx.Node | None] | Refusal:
    """(A, residual) shaped like the result's leading dims, or why the rewrite cannot be made."""
    leading = _shape_key(m.last)[:-1]
    a = _operand_like(m.norm_x if m.norm is not None else m.a, leading)
    if a is None and m.norm is None and not m.batched:
        # A's own leading dims: end the chain where the value still has them
        return Refusal("reshape", "the result is reshaped to dims A does not have")
    if a is None and _is_reshape(m.a) and _viewable(m.norm_x, val(m.a).shape) and \
            _shape_key(m.a)[:-1] == leading:
        a = ("view", m.norm_x, m.a.args[1])  # x viewed as A is (A views the norm's output so)
    if a is None:
        return Refusal("reshape", "the normalised input's dims differ from the result's")
    residual = None
    if m.residual is not None:
        residual = _operand_like(m.residual, leading)
        if residual is None:
            return Refusal("reshape", "the residual's dims differ from the result's")
    return a, residual


def _rewrite(gm: fx.GraphModule, m: _Match, a: fx.Node, residual: fx.Node | None) -> fx.Node:
    g = gm.graph
    spec = _spec(m)
    text = tfx_ops.gemm_spec_text(spec)
    if isinstance(a, tuple):  # a view of the norm's input, with the shape arguments A's own view took
        _, x, shape = a
        with g.inserting_before(m.last):
            a = g.call_function(aten.view.default, (x, shape))
        with _fake_mode(val(x)) or nullcontext():
            a.meta["val"] = val(x).view(val(m.a).shape)
    with g.inserting_before(m.last):
        node = g.call_function(GEMM_OP, (a, m.b, m.bias, residual, m.norm_weight, m.b_scale, m.b_min, text))
    # the graph nodes this one computes, for reports (they leave the graph)
    node.meta["turbofx_fused"] = [m.mm.name] + [n.name for n in m.absorbed] + [n.name for n in m.norm_nodes]
    with _fake_mode(val(a), val(m.b)) or nullcontext():
        node.meta["val"] = tfx_ops.gemm(val(a), val(m.b), val(m.bias), val(residual), val(m.norm_weight),
                                        val(m.b_scale), val(m.b_min), text)
    m.last.replace_all_uses_with(node)
    for n in reversed([m.mm] + m.absorbed):
        if not n.users:
            g.erase_node(n)
    return node


def _dead_code(g: fx.Graph) -> None:
    """Drop nodes no one reads that only computed a value (the norms a gemm now recomputes, the
    dequantized weights and quantized rows it now reads from q and A)."""
    for n in reversed(list(g.nodes)):
        if n.op == "call_function" and not n.users and isinstance(n.target, torch._ops.OpOverload) \
                and not n.target._schema.is_mutable and n.target.namespace in ("aten", "turbofx"):
            g.erase_node(n)


def matmul(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    rec = PassRecord("matmul")
    for mm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _MATMULS]:
        found = match(mm)
        if isinstance(found, Refusal):
            rec.refuse(mm, found)
            continue
        refusal = gemm_family.gemm_refusal(_spec(found), val(found.a), val(found.b))
        if refusal is not None:
            rec.refuse(mm, refusal)
            continue
        plan = _plan_rewrite(found)
        if isinstance(plan, Refusal) and found.absorbed:  # retry with the matmul alone
            found = match(mm, fuse=False)
            plan = _plan_rewrite(found)
        if isinstance(plan, Refusal):
            rec.refuse(mm, plan)
            continue
        what = [mm.name] + [n.name for n in found.absorbed]
        if not ctx.fuel.take(f"gemm {', '.join(what)}"):
            rec.refuse(mm, ctx.fuel.refusal)
            continue
        node = _rewrite(gm, found, *plan)
        fused = [f for f, on in (("rmsnorm", found.norm), ("bias", found.bias), ("swiglu", found.swiglu),
                                 (found.activation, found.activation and not found.swiglu),
                                 ("residual", found.residual), ("cast", found.out_dtype)) if on]
        rec.matched.append(f"{node.name}: {mm.name} ({found.b_layout})" + (f" + {' + '.join(fused)}" if fused else "")
                           + "".join(f"; {note}" for note in found.notes))
    _dead_code(gm.graph)
    return rec


matmul.pass_name = "matmul"
