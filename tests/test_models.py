"""End-to-end: tiny random-weight HF models compiled by turbofx equal eager PyTorch.

Every model is batch 2, seq 8, compared in fp32 at rtol=atol=1e-3. Kernels run in Triton's
interpreter when there is no GPU, so shapes stay tiny.
"""
from __future__ import annotations

import copy

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

import turbofx
import turbofx.compiler.backend as backend
from turbofx.compiler import driver
from turbofx.compiler.models import TINY_CONFIGS, example_inputs, make_tiny_model

from tests.helpers import assert_model_close

aten = torch.ops.aten

MODELS = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "bert"]
NORM_LABEL = {"llama": "rmsnorm", "qwen2": "rmsnorm", "qwen3": "rmsnorm", "mistral": "rmsnorm",
              "phi3": "rmsnorm", "gpt2": "layernorm", "bert": "layernorm"}
BATCH, SEQ = 2, 8
RTOL = ATOL = 1e-3


def _layers_and_hidden(name: str) -> tuple[int, int]:
    cfg = TINY_CONFIGS[name]()
    return cfg.num_hidden_layers, cfg.hidden_size


def _eager(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


@dataclass
class Compiled:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    ref: object
    compiled: torch.nn.Module
    graph: fx.Graph  # the graph turbofx lowered (after its passes), for naming nodes in the report


def _compile_with_graph(model, args, kwargs, **options):
    """turbofx.compile, also handing back the graph it lowered (the report names its nodes)."""
    seen = []
    real_build = driver.build

    def spy(captured, opts, *a, **kw):
        out = real_build(captured, opts, *a, **kw)
        seen.append(captured.gm.graph)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "build", spy)
        compiled = turbofx.compile(model, args, kwargs, **options)
    assert len(seen) == 1
    return compiled, seen[0]


@pytest.fixture(scope="module", params=MODELS)
def tiny(request) -> Compiled:
    name = request.param
    model = make_tiny_model(name)
    args, kwargs = example_inputs(name, batch=BATCH, seq=SEQ)
    ref = _eager(model, args, kwargs)
    compiled, graph = _compile_with_graph(model, args, kwargs)
    return Compiled(name, model, args, kwargs, ref, compiled, graph)


# ------------------------------------------------------------------ (a) turbofx.compile == eager

def test_compile_matches_eager(tiny: Compiled):
    out = tiny.compiled(*tiny.args, **tiny.kwargs)
    assert_model_close(tiny.ref, out, rtol=RTOL, atol=ATOL)
    # a second call (buffers reused from a planned pool) gives the same result
    again = tiny.compiled(*tiny.args, **tiny.kwargs)
    assert_model_close(tiny.ref, again, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ (c) explain: generated kernels

def _residual_adds(graph: fx.Graph, hidden_shape: tuple[int, ...]) -> list[str]:
    """Adds of two tensors giving a hidden-state-shaped float result (residuals, embedding sums)."""
    names = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not aten.add.Tensor:
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != hidden_shape or not v.dtype.is_floating_point:
            continue
        # both operands are [batch, seq, hidden]-like (not a bias or an eps)
        if all(isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
               and a.meta["val"].dim() == len(hidden_shape) for a in n.args[:2]):
            names.append(n.name)
    return names


def _gemms_with(report, part: str) -> list:
    return [k for k in report.kernels if k.kind == "gemm" and part in k.label.split("+")]


def test_explain_norm_kernels(tiny: Compiled):
    layers, _ = _layers_and_hidden(tiny.name)
    report = turbofx.explain(tiny.compiled)
    label = NORM_LABEL[tiny.name]
    norms = [k for k in report.kernels if k.label == label]
    assert all(k.kind == "reduction" for k in norms), [(k.name, k.kind) for k in norms]
    # every layer has two norms, plus the final (decoders) or embedding (bert) one: each a kernel
    # of its own or computed in the prologue of the matmuls it feeds
    fused = {n for k in _gemms_with(report, label) for n in k.nodes if n.startswith("mean")}
    assert len(norms) + len(fused) >= 2 * layers + 1, f"{len(norms)} {label} kernels, {len(fused)} fused:\n{report}"
    # nothing of a norm is left to ATen
    left = [k.label for k in report.fallbacks if any(op in k.label for op in ("::mean.", "::rsqrt.", "::var"))]
    assert not left, f"norm ops left to ATen: {left}"


def test_explain_activation_kernels(tiny: Compiled):
    layers, _ = _layers_and_hidden(tiny.name)
    report = turbofx.explain(tiny.compiled)
    acts = [k for k in report.generated if k.label == "activation"]
    in_gemm = [k for k in report.kernels if k.kind == "gemm"
               and set(k.label.split("+")) & {"silu", "relu", "gelu_tanh", "silu-glu", "gelu_tanh-glu"}]
    assert len(acts) + len(in_gemm) >= layers, f"{len(acts)} activation kernels for {layers} MLPs:\n{report}"
    assert all(k.kind == "pointwise" for k in acts)
    ops = {n.rstrip("_0123456789") for k in acts + in_gemm for n in k.nodes}
    assert ops & {"gelu", "sigmoid", "silu", "tanh", "erf"}, ops


def test_explain_residual_adds_are_generated(tiny: Compiled):
    layers, hidden = _layers_and_hidden(tiny.name)
    report = turbofx.explain(tiny.compiled)
    residual = _residual_adds(tiny.graph, (BATCH, SEQ, hidden))
    where = {n: k for k in report.kernels for n in k.nodes}
    for name in residual:
        assert name in where, f"{name} appears in no report record"
        k = where[name]
        assert k.kind != "extern", f"residual add {name} runs in ATen: {k.reason}"
        assert k.kind in ("pointwise", "reduction")
    # each residual is fused: into the epilogue of the matmul producing it, or into the norm it feeds
    in_gemm = _gemms_with(report, "residual")
    in_norm = [n for n in residual if where[n].label == NORM_LABEL[tiny.name]]
    assert len(in_norm) + len(in_gemm) >= 2 * layers, {n: (where[n].kind, where[n].label) for n in residual}


def test_explain_report_text(tiny: Compiled):
    report = turbofx.explain(tiny.compiled)
    text = str(report)
    assert "generated kernels" in text
    assert "gemm/" in text
    # matmuls are generated (GEMM family): none is left to ATen
    assert report.counts().get("gemm", 0) >= 1
    assert not [k for k in report.fallbacks if "::mm." in k.label or "::addmm." in k.label or "::bmm." in k.label]
    assert all(k.reason for k in report.kernels if k.kind == "extern")


# ------------------------------------------------------------------ (b) torch.compile backend

@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_backend(name):
    torch._dynamo.reset()
    model = make_tiny_model(name)
    args, kwargs = example_inputs(name, batch=BATCH, seq=SEQ)
    ref = _eager(model, args, kwargs)
    graphs0, calls0 = backend.stats["graphs"], backend.stats["calls"]
    compiled = torch.compile(model, backend="turbofx")
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    assert backend.stats["graphs"] > graphs0, "the turbofx backend compiled no graph"
    assert backend.stats["calls"] > calls0
    assert_model_close(ref, out, rtol=RTOL, atol=ATOL)
    report = turbofx.explain(compiled)
    norm = NORM_LABEL[name]  # a kernel of its own, or the prologue of the matmuls it feeds
    assert any((k.label == norm and k.kind == "reduction") or (k.kind == "gemm" and norm in k.label.split("+"))
               for k in report.generated), str(report)
    # same inputs again: no recompilation, same result
    graphs1 = backend.stats["graphs"]
    with torch.no_grad():
        again = compiled(*args, **kwargs)
    assert backend.stats["graphs"] == graphs1
    assert_model_close(ref, again, rtol=RTOL, atol=ATOL)
    torch._dynamo.reset()


# ------------------------------------------------------------------ llama variants

def test_llama_fp16():
    model = make_tiny_model("llama", dtype=torch.float16)
    args, kwargs = example_inputs("llama", batch=BATCH, seq=SEQ)
    ref16 = _eager(model, args, kwargs)
    compiled = turbofx.compile(model, args, kwargs)
    out = compiled(*args, **kwargs)
    assert out.logits.dtype == torch.float16
    assert_model_close(ref16, out, rtol=1e-2, atol=1e-2)
    # the kernels compute in fp32: the result is also close to the same fp16 weights run in fp32 (a
    # fresh fp32 model is not the same weights on every transformers version: 5.17 initialises differently)
    ref32 = _eager(copy.deepcopy(model).float(), args, kwargs)
    torch.testing.assert_close(out.logits.float(), ref32.logits, rtol=1e-2, atol=1e-2)
    assert out.logits.isfinite().all()
    assert any("rmsnorm" in k.label.split("+") for k in turbofx.explain(compiled).generated)  # in the GEMMs


def test_llama_eager_attention_softmax_kernel():
    """Eager attention's softmax is generated: inside the attention kernel by default, and as a
    softmax reduction kernel with the attention pass switched off."""
    model = make_tiny_model("llama", attn_implementation="eager")
    args, kwargs = example_inputs("llama", batch=BATCH, seq=SEQ)
    ref = _eager(model, args, kwargs)
    layers, _ = _layers_and_hidden("llama")
    default = turbofx.compile(model, args, kwargs)
    assert_model_close(ref, default(*args, **kwargs), rtol=RTOL, atol=ATOL)
    assert sum(k.kind == "attention" for k in turbofx.explain(default).kernels) == layers
    compiled = turbofx.compile(model, args, kwargs, attention=False)
    assert_model_close(ref, compiled(*args, **kwargs), rtol=RTOL, atol=ATOL)
    report = turbofx.explain(compiled)
    softmax = [k for k in report.kernels if k.label == "softmax"]
    assert len(softmax) == layers, str(report)
    assert all(k.kind == "reduction" for k in softmax)
    assert not any("_softmax" in k.label or "amax" in k.label for k in report.fallbacks)


def test_llama_dynamic_seq():
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", batch=BATCH, seq=SEQ)
    compiled = turbofx.compile(model, args, kwargs, dynamic=True)
    for seq in (8, 5, 11):
        a, kw = example_inputs("llama", batch=BATCH, seq=seq, seed=seq)
        ref = _eager(model, a, kw)
        out = compiled(*a, **kw)
        assert out.logits.shape == (BATCH, seq, TINY_CONFIGS["llama"]().vocab_size)
        assert_model_close(ref, out, rtol=RTOL, atol=ATOL)
