"""Quantization through the compiler (passes/quantize.py + the GEMM family's quantized variants):
a compiled quantized model equals the eager model whose weights are the same quantized numbers,
dequantized (``turbofx.quant.reference.dequantized_model``), through every door. Models and inputs
live on ``DEVICE``: the GPU on a GPU machine (scripts/gpu_check.sh runs this file there), else the
CPU interpreter."""
from __future__ import annotations

import json

import pytest
import torch

import turbofx
from turbofx.compiler.models import example_inputs, make_tiny_model
from turbofx.errors import QuantizationError, TurbofxError
from turbofx.quant import Int4WeightOnly, Int8WeightOnly, parse
from turbofx.quant.reference import dequantized_model
from tests.helpers import kernel_device

DEVICE = kernel_device()

SCHEMES = ["int8", "int4-g32", "w8a8", "fp8", "fp8-dynamic"]


@pytest.fixture(scope="module")
def llama():
    return _on_device("llama")


def _on_device(name: str):
    model = make_tiny_model(name).to(DEVICE)
    (ids,), kwargs = example_inputs(name, seq=5)
    return model, (ids.to(DEVICE),), kwargs


def _reference(model, scheme, report):
    return dequantized_model(model, parse(scheme), [name for q in report.quantized for name in q.layers])


def _logits(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compiled_quantized_model_equals_eager_dequantized_model(llama, scheme):
    model, args, kwargs = llama
    cm = turbofx.compile(model, args, kwargs, quantize=scheme)
    rep = turbofx.explain(cm)
    layers = model.config.num_hidden_layers
    assert len(rep.quantized) == 4 * layers  # qkv, o, gate+up, down per layer (the layout pass joins siblings)
    out = _logits(cm, args, kwargs)
    ref = _logits(_reference(model, scheme, rep), args, kwargs)
    full = _logits(model, args, kwargs)
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6
    assert (out - full).abs().max().item() > 0  # the weights really are quantized
    gemms = [k for k in rep.generated if k.kind == "gemm"]
    assert sum(k.label.startswith(("matmul[", "rmsnorm+matmul[")) for k in gemms) == 4 * layers
    # dequantization happens in the GEMM prologue: no op that makes a dequantized copy remains
    assert not [k for k in rep.fallbacks if "dequant_weight" in k.label or "quantize_rows" in k.label]
    assert f"quantization {parse(scheme).name}: {4 * layers} weights" in str(rep)


def test_lm_head_and_filter(llama):
    model, args, kwargs = llama
    rep = turbofx.explain(turbofx.compile(model, args, kwargs, quantize="int8"))
    rec = next(p for p in rep.passes if p.name == "quantize")
    assert [r.code for r in rec.refused] == ["filtered"] and "lm_head" in rec.refused[0].refusal.detail
    only_mlp = Int8WeightOnly(filter=lambda name: ".mlp." in name)
    rep = turbofx.explain(turbofx.compile(model, args, kwargs, quantize=only_mlp))
    assert rep.quantized and all(".mlp." in name for q in rep.quantized for name in q.layers)


def test_state_holds_quantized_weights_only(llama):
    model, args, kwargs = llama
    full = turbofx.compile(model, args, kwargs).state_bytes()
    int8 = turbofx.compile(model, args, kwargs, quantize="int8")
    int4 = turbofx.compile(model, args, kwargs, quantize="int4-g32")
    quantized = sum(q.full_bytes for q in turbofx.explain(int8).quantized)
    saved8 = sum(q.full_bytes - q.quantized_bytes for q in turbofx.explain(int8).quantized)
    assert full - int8.state_bytes() == saved8  # the fp32 weights left the program's state
    assert int4.state_bytes() < int8.state_bytes() < full
    assert sum(q.quantized_bytes for q in turbofx.explain(int4).quantized) < 0.2 * quantized


def test_quantizing_twice_shares_one_copy(llama):
    model, args, kwargs = llama
    a = turbofx.compile(model, args, kwargs, quantize="int4-g32")
    b = turbofx.compile(model, args, kwargs, quantize="int4-g32")
    qa = {k: t.data_ptr() for k, t in a._state.items() if k.endswith(".q")}
    qb = {k: t.data_ptr() for k, t in b._state.items() if k.endswith(".q")}
    assert qa and qa == qb


def test_generate_quantized_equals_eager_dequantized_greedy(llama):
    model = llama[0]
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    res = turbofx.generate(model, ids, 5, quantize="int4-g32")
    rep = res.reports["decode"]
    ref = turbofx.generate(_reference(model, "int4-g32", rep), ids, 5, compile=False)
    assert res.new_tokens.tolist() == ref.new_tokens.tolist()
    assert len(rep.quantized) == 4 * model.config.num_hidden_layers


def test_torch_compile_door_quantizes_and_guards_the_weights(llama):
    model, args, kwargs = llama
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbofx", options={"quantize": "int8"})
    out = _logits(compiled, args, kwargs)
    rep = turbofx.explain(compiled)
    # weights are call inputs at this door: quantized one by one (no layout join), the LM head kept
    assert sorted(q.layers[0] for q in rep.quantized) == sorted(
        name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head")
    ref = _logits(_reference(model, "int8", rep), args, kwargs)
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.mul_(2.0)  # an in-place update the quantized program cannot see
    try:
        with pytest.raises(TurbofxError, match="quantized when compiling"):
            _logits(compiled, args, kwargs)
    finally:
        with torch.no_grad():
            w.div_(2.0)
        torch._dynamo.reset()


def test_artifact_stores_quantized_weights(llama, tmp_path):
    model, args, kwargs = llama
    path = turbofx.export(model, args, kwargs, output_dir=tmp_path / "int4", quantize=Int4WeightOnly(group_size=32))
    loaded = turbofx.load(path)
    assert turbofx.explain(loaded).quantization.name == "int4-g32"
    assert len(turbofx.explain(loaded).quantized) == 4 * model.config.num_hidden_layers
    ref = _logits(_reference(model, "int4-g32", turbofx.explain(loaded)), args, kwargs)
    assert (_logits(loaded, args, kwargs) - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6
    full = turbofx.export(model, args, kwargs, output_dir=tmp_path / "fp32")
    size = {p: (p / "weights.safetensors").stat().st_size for p in (path, full)}
    assert size[path] < size[full]


def test_bad_quantization_requests_are_clear_errors(llama):
    model, args, kwargs = llama
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        turbofx.compile(model, args, kwargs, quantize="int3")
    with pytest.raises(QuantizationError, match="has GGUF blocks attached"):  # not loaded from a GGUF file
        turbofx.compile(model, args, kwargs, quantize="gguf")
    with pytest.raises(QuantizationError, match="filter returned"):
        turbofx.compile(model, args, kwargs, quantize=Int8WeightOnly(filter=lambda name: 1))


def test_fp8_is_refused_on_a_gpu_without_it():
    from turbofx.codegen.target import Target
    from turbofx.compiler.driver import check_quantization

    ampere = Target(device=None, backend="cuda", arch="sm80", warp_size=32, sm_count=108)
    with pytest.raises(QuantizationError, match="compute capability 8.9"):
        check_quantization(parse("fp8"), ampere)
    check_quantization(parse("int4"), ampere)  # int8 / int4 run everywhere
    hopper = Target(device=None, backend="cuda", arch="sm90", warp_size=32, sm_count=132)
    check_quantization(parse("fp8-dynamic"), hopper)
    mi300 = Target(device=None, backend="hip", arch="gfx942", warp_size=64, sm_count=304)
    with pytest.raises(QuantizationError, match="fp8-fnuz"):
        check_quantization(parse("fp8"), mi300)
    check_quantization(parse("fp8-fnuz"), mi300)


@pytest.mark.parametrize("name, scheme", [("llama", "int4-g32+emb"), ("gemma", "w8a8+emb")])
def test_embeddings_and_lm_head_quantized_on_request(name, scheme):
    # gemma ties its LM head to the token table: one quantized tensor serves the lookup and the matmul
    model, args, kwargs = _on_device(name)
    cm = turbofx.compile(model, args, kwargs, quantize=scheme)
    rep = turbofx.explain(cm)
    tied = model.config.tie_word_embeddings
    assert len(rep.quantized) == 4 * model.config.num_hidden_layers + (1 if tied else 2)  # + table (+ LM head)
    assert "lm_head.weight" in [q.key for q in rep.quantized]  # torch.export names a tied table by its LM head
    assert not [r for p in rep.passes if p.name == "quantize" for r in p.refused]
    assert [k.label for k in rep.fallbacks].count("turbofx::dequant_rows.default") == 1  # only the rows it reads
    ref = _logits(_reference(model, scheme, rep), args, kwargs)
    out = _logits(cm, args, kwargs)
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6
    no_tables = turbofx.compile(model, args, kwargs, quantize=scheme.removesuffix("+emb")).state_bytes()
    assert cm.state_bytes() < no_tables  # the full-precision table left the program's state


def test_verify_modes_accept_quantization(llama):
    # verify="all": the passes after quantize are compared against its (quantized) results, and every
    # generated kernel, quantized GEMMs included, against its op's reference
    model, args, kwargs = llama
    cm = turbofx.compile(model, args, kwargs, quantize="w8a8", verify="all")
    rep = turbofx.explain(cm)
    assert not rep.kernel_mismatches and len(rep.quantized) == 4 * model.config.num_hidden_layers
    ref = _logits(_reference(model, "w8a8", rep), args, kwargs)
    assert (_logits(cm, args, kwargs) - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-6


def test_quantize_once_cache_never_serves_other_values():
    # same address, shape and dtype but new values (an in-place update, or freed memory reused by
    # another model): the cache must not hand back the old quantized weights
    from turbofx.passes.quantize import quantized

    cfg = parse("int8")
    w = torch.randn(16, 32)
    first = quantized(w, cfg)
    assert quantized(w, cfg) is first  # same tensor, same bits: reused
    with torch.no_grad():
        w[3, 5] += 1.0
    second = quantized(w, cfg)
    assert second is not first and not torch.equal(second.q, first.q)


def test_demo_with_quantize_compares_against_the_same_quantized_weights(capsys):
    from turbofx.compiler import cli

    assert cli.main(["demo", "llama", "--quantize", "int4-g32", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "same tokens as eager greedy with the same int4-g32 weights (dequantized): True" in out
    assert "quantization int4-g32: 8 weights" in out


def test_generation_artifact_keeps_the_quantized_weights(llama, tmp_path):
    # prefill and decode programs share one set of quantized tensors (prefill reads decode's)
    from turbofx.compiler.generation import export_generation, load_generation

    model = llama[0]
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    export_generation(model, ids, tmp_path / "gen", max_cache_len=64, quantize="int4-g32")
    res = load_generation(tmp_path / "gen").generate(ids, 4)
    live = turbofx.generate(model, ids, 4, quantize="int4-g32")
    assert res.new_tokens.tolist() == live.new_tokens.tolist()
    meta = json.loads((tmp_path / "gen" / "decode" / "meta.json").read_text())
    assert meta["quantization"]["config"]["scheme"] == "int4" and len(meta["quantization"]["layers"]) == 8


def test_weight_updates_after_quantizing_are_never_silently_ignored(llama):
    # the program holds quantized copies: compile-door calls refuse, generate recompiles
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", seq=5)
    cm = turbofx.compile(model, args, kwargs, quantize="int8")
    _logits(cm, args, kwargs)
    ids = args[0][:, :4]
    turbofx.generate(model, ids, 3, quantize="int8")  # compiles (and caches) quantized programs
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"].mul_(-3.0)  # one layer of a joined QKV weight
    state["model.layers.1.mlp.down_proj.weight"].mul_(5.0)
    model.load_state_dict(state)
    with pytest.raises(TurbofxError, match="were changed since"):
        _logits(cm, args, kwargs)
    after = turbofx.generate(model, ids, 3, quantize="int8")
    ref = turbofx.generate(_reference(model, "int8", after.reports["decode"]), ids, 3, compile=False)
    assert after.new_tokens.tolist() == ref.new_tokens.tolist()
