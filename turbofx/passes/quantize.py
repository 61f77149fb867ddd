"""quantize: the weights of linear layers become quantized state, read through ``dequant_weight``.

Pattern: ``mm(A, t(W))`` / ``addmm(b, A, t(W))`` (``nn.Linear``, also after the layout pass joined
siblings), W a 2-D float state tensor (``ctx.state``) that the config's filter accepts; with
``embeddings=True`` also ``embedding(W, ids)`` (a token table, and a LM head tied to it).

Rewrite: W is quantized once, at compile time (``ctx.quant``: a ``turbofx.quant`` config, or the
weight's own GGUF blocks for ``GGUFNative``), into new state tensors q / scale / min, and the graph
reads ``t(dequant_weight(q, scale, min))`` where it read ``t(W)``; W's placeholder is dropped, so the
program holds no full-precision copy. An embedding lookup becomes ``dequant_rows(q, scale, min,
ids)``: only the gathered rows are dequantized. With dynamic activation quantization (W8A8, FP8 dynamic) A
becomes ``quantize_rows(A)``. The matmul pass then folds both into the GEMM's prologue (the kernels
read q directly); a matmul it does not take runs the ops' references (correct, and slower: the
report says so).

Invariant: the graph computes what an eager model whose weights are the dequantized ones computes
(for W8A8 / FP8 dynamic: with its activations fake-quantized per row), so the ops' references are
the eager semantics of the quantized model. Each quantized weight takes one unit of fuel.
Quantizing the same tensor again (generate compiles prefill and decode) reuses the first
result: same values, memory held once. Refusal codes: see ``REFUSALS``.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from turbofx.passes.layout import linear_of
from turbofx.passes.manager import PassContext, PassRecord
from turbofx.refusal import Refusal

aten = torch.ops.aten

REFUSALS = {
    "weights-are-inputs": "the weight is a call input, not module state: it may change between calls",
    "not-state": "the weight is computed in the graph, not read from module state",
    "filtered": "the quantization config's filter leaves this layer in full precision",
    "lm-head": "the output projection (its result is the graph's output) stays in full precision by default",
    "weight-shared": "the weight is read elsewhere too (e.g. an embedding tied to the LM head)",
    "not-float": "the weight is not a 2-D float tensor",
    "no-native-blocks": "GGUF-native quantization: this weight has no GGUF blocks kept (dequantized on load)",
    "quantize-failed": "the weight could not be quantized",
}


@dataclass(frozen=True)
class QuantizedLayer:
    """One weight the pass quantized: its state key, the source layers, the scheme, bytes."""

    key: str
    layers: tuple[str, ...]
    scheme: str
    shape: tuple[int, int]
    full_bytes: int
    quantized_bytes: int

    def describe(self) -> str:
        return (f"quantize: {'+'.join(self.layers)} [{self.shape[0]}, {self.shape[1]}] -> {self.scheme} "
                f"({self.full_bytes / 1e6:.2f} MB -> {self.quantized_bytes / 1e6:.2f} MB)")


def layer_names(key: str, layouts: list) -> tuple[str, ...]:
    """The linear layers (module paths) a weight's state key stands for: the layout pass's sources
    for a joined weight, else the key without its ``.weight``."""
    joined = next((w for w in layouts if w.name == key), None)
    keys = joined.sources if joined is not None else [key]
    return tuple(k.removesuffix(".weight") for k in keys)


def _reaches_output(n: fx.Node) -> bool:
    """Whether n's value is returned (through views and casts only): the model's output projection."""
    seen, todo = set(), [n]
    while todo:
        x = todo.pop()
        for u in x.users:
            if u.op == "output":
                return True
            if u in seen or u.op != "call_function":
                continue
            if u.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                            aten._to_copy.default, aten.slice.Tensor):
                seen.add(u)
                todo.append(u)
    return False


@dataclass
class _Weight:
    """A weight node and the uses the pass can rewrite: linear layers (matmul, A, transpose) and
    embedding lookups (``aten.embedding(W, ids)``)."""

    node: fx.Node
    linears: list = field(default_factory=list)
    embeddings: list = field(default_factory=list)


def _is_embedding(n: fx.Node) -> bool:
    # padding_idx, scale_grad_by_freq and sparse shape only gradients: a lookup is a row gather
    return n.op == "call_function" and n.target is aten.embedding.default and isinstance(n.args[0], fx.Node)


def _weights(gm: fx.GraphModule) -> list[_Weight]:
    found: dict[fx.Node, _Weight] = {}
    for n in gm.graph.nodes:
        lin = linear_of(n)  # the layout pass's pattern: mm(A, t(W)) / addmm(b, A, t(W))
        if lin is not None:
            found.setdefault(lin.weight, _Weight(lin.weight)).linears.append((n, lin.a, lin.transpose))
        elif _is_embedding(n):
            found.setdefault(n.args[0], _Weight(n.args[0])).embeddings.append(n)
    return list(found.values())


def _refusal(w: _Weight, ctx: PassContext) -> tuple[str, str] | None:
    """Why this weight stays in full precision (code, detail), or None."""
    st, cfg = ctx.state, ctx.quant
    if st.is_call_input(w.node):
        return "weights-are-inputs", ""
    t = st.value(w.node)
    if t is None:
        return "not-state", ""
    if t.dim() != 2 or not t.dtype.is_floating_point or t.dtype == torch.float64:
        return "not-float", f"{t.dtype} {tuple(t.shape)}"
    rewritable = {bt for _, _, bt in w.linears if len(bt.users) == 1} | set(w.embeddings if cfg.embeddings else ())
    if set(w.node.users) != rewritable:
        return "weight-shared", ""
    names = layer_names(st.key(w.node), ctx.layouts)
    if cfg.embeddings and cfg.filter is None:
        return None  # everything: the embedding tables and the LM head too
    rejected = [name for name in names if not cfg.applies_to(name)]
    if rejected:
        return "filtered", ", ".join(rejected)
    if cfg.filter is None and any(_reaches_output(mm) for mm, _, _ in w.linears):
        return "lm-head", ""
    return None


def quantize(gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
    from turbofx.errors import QuantizationError

    rec = PassRecord("quantize")
    if ctx.quant is None:
        return rec
    st = ctx.state
    replaced: set[int] = set()  # storages of the weights the program no longer reads
    for w in _weights(gm):
        if not w.linears and not ctx.quant.embeddings:
            continue  # an embedding table: kept unless the config asks for embeddings
        where = w.linears[0][0] if w.linears else w.embeddings[0]  # the node a refusal is recorded on
        why = _refusal(w, ctx)
        if why is not None:
            code, detail = why
            rec.refuse(where, Refusal(code, REFUSALS[code] + (f" ({detail})" if detail else "")))
            continue
        key = st.key(w.node)
        try:
            qw = quantized(st.value(w.node), ctx.quant)
        except QuantizationError as e:
            code = "no-native-blocks" if _is_native(ctx.quant) else "quantize-failed"
            rec.refuse(where, Refusal(code, f"{key}: {e}"))
            continue
        if not ctx.fuel.take(f"quantize {key} ({ctx.quant.name})"):
            rec.refuse(where, ctx.fuel.refusal)
            continue
        full = st.value(w.node)
        ctx.quantized_sources.append((weakref.ref(full), full._version))  # an update later must not go unseen
        layer = QuantizedLayer(key, layer_names(key, ctx.layouts), _scheme(qw), tuple(qw.shape),
                               full.numel() * full.element_size(), qw.nbytes)
        _rewrite(gm, w, key, qw, ctx)
        ctx.quantized.append(layer)
        rec.matched.append(layer.describe() + (" (embedding too)" if w.embeddings else ""))
        if not w.node.users:
            replaced.add(full.untyped_storage().data_ptr())
            st.drop(w.node)
    _drop_aliases(gm, st, replaced)
    native = [r for r in rec.refused if r.code == "no-native-blocks"]
    if native and not rec.matched:
        raise QuantizationError(f"quantize='gguf': none of this model's {len(native)} linear weights has GGUF blocks "
                                "attached (turbofx.quant.native.attach_gguf, done by `turbofx demo --quantize gguf` "
                                "for a model loaded from a .gguf file); choose a scheme that quantizes (int8, int4)")
    return rec


quantize.pass_name = "quantize"
quantize.changes_values = True  # verify mode checks the graph still runs, not that results are unchanged


def _drop_aliases(gm: fx.GraphModule, st, replaced: set[int]) -> None:
    """Drop placeholders nothing reads that hold a replaced weight's memory: torch.export keeps one
    per name of a tied parameter (the token table under its own name, read by nothing, when the
    LM head's name is the one used), which would keep the full-precision table in the program."""
    for n in [n for n in gm.graph.nodes if n.op == "placeholder" and not n.users]:
        t = st.value(n)
        if t is not None and st.spec(n).kind == "parameter" and t.untyped_storage().data_ptr() in replaced:
            st.drop(n)


def _scheme(qw) -> str:
    f = qw.fmt
    return f.storage + (f"-g{f.group_size}" if f.group_size else "") + (f" x {f.act} activations" if f.act else "")


def _is_native(cfg) -> bool:
    from turbofx.quant import GGUFNative

    return isinstance(cfg, GGUFNative)


def _rewrite(gm: fx.GraphModule, w: _Weight, key: str, qw, ctx: PassContext) -> None:
    """W's state becomes q / scale / min; each linear reads ``t(dequant_weight(...))`` (its A
    ``quantize_rows(A)`` with dynamic activations), each embedding ``dequant_rows(..., ids)``."""
    from torch._guards import detect_fake_mode

    from turbofx.runtime import ops as tfx_ops

    st = ctx.state
    g = gm.graph
    dtype = w.node.meta["val"].dtype
    q = st.add(f"{key}.q", qw.q, like=w.node)
    s = st.add(f"{key}.scale", qw.scale, like=q)
    m = st.add(f"{key}.min", qw.min, like=s) if qw.min is not None else None
    text = tfx_ops.quant_text(qw.fmt, dtype, int(qw.shape[1]))
    mode = detect_fake_mode([w.node.meta.get("val")]) or nullcontext()
    stored = (q, s, m)
    fakes = tuple(x.meta["val"] if x is not None else None for x in stored)
    for mm, a, bt in w.linears:
        with g.inserting_before(bt):
            deq = g.call_function(torch.ops.turbofx.dequant_weight.default, (*stored, text))
        with mode:
            deq.meta["val"] = torch.ops.turbofx.dequant_weight.default(*fakes, text)
        bt.replace_input_with(w.node, deq)
        if qw.fmt.act is not None:
            with g.inserting_before(mm):
                fq = g.call_function(torch.ops.turbofx.quantize_rows.default, (a, qw.fmt.act))
            with mode:
                fq.meta["val"] = torch.ops.turbofx.quantize_rows.default(a.meta["val"], qw.fmt.act)
            mm.replace_input_with(a, fq)
    for emb in w.embeddings:
        ids = emb.args[1]
        with g.inserting_before(emb):
            rows = g.call_function(torch.ops.turbofx.dequant_rows.default, (*stored, ids, text))
        with mode:
            rows.meta["val"] = torch.ops.turbofx.dequant_rows.default(*fakes, ids.meta["val"], text)
        for k in ("stack_trace", "nn_module_stack"):
            if k in emb.meta:
                rows.meta[k] = emb.meta[k]
        emb.replace_all_uses_with(rows)
        g.erase_node(emb)


# ------------------------------------------------------------------ quantize once per tensor

_lock = threading.Lock()
_done: dict[tuple, Any] = {}  # (data_ptr, shape, stride, dtype, device, config) -> weakref to a QuantizedWeight


_FINGERPRINT_CHUNK = 1 << 20  # elements per step: bounds the int64 temporaries to ~3 x 8 MB


def _fingerprint(t: torch.Tensor, chunk: int = _FINGERPRINT_CHUNK) -> int:
    """A checksum of the tensor's exact bits (a reused address with other values never matches):
    sum of bits[i] * (i % 65521 + 1) in int64 (wrapping). Taken ``chunk`` elements at a time, since
    the int64 temporaries of one pass over the whole tensor would cost ~40 bytes per element
    (+680 MB of peak RSS for SmolLM2's 57 MB bf16 embedding); the wrapped sum is the same."""
    bits = t.detach().contiguous().view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk]
        idx = torch.arange(start, start + part.numel(), device=t.device, dtype=torch.int64).remainder_(65521).add_(1)
        total += (part.to(torch.int64).mul_(idx)).sum()
    return int(total)


def quantized(t: torch.Tensor, cfg):
    """``cfg.quantize(t)``, reusing an earlier result for the same tensor (same address, layout and
    bits) and config while that result is alive (held by a compiled program)."""
    import weakref

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device), repr(cfg))
        print_ = _fingerprint(t)
        with _lock:
            ref = _done.get(key)
            hit = ref() if ref is not None else None
            if hit is not None and getattr(hit, "_turbofx_fingerprint", None) == print_:
                return hit
        if _is_native(cfg):
            from turbofx.errors import QuantizationError
            from turbofx.quant.native import native_of

            qw = native_of(t)
            if qw is None:
                raise QuantizationError("no GGUF blocks are attached to this weight (turbofx.quant.native.attach_gguf)")
            qw = qw.to(t.device)
        else:
            qw = cfg.quantize(t.detach())
        qw._turbofx_fingerprint = print_
        with _lock:
            for k in [k for k, r in _done.items() if r() is None]:
                del _done[k]
            _done[key] = weakref.ref(qw)
        # the program's state holds qw's tensors; q holds qw, so the record lives as long as they do
        qw.q._turbofx_quantized = qw
        return qw
