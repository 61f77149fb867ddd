"""The layout pass (sibling matmuls over one input -> one matmul over joined weights) and the
PassContext state API it uses (``ModuleState``)."""
from __future__ import annotations

import json

import pytest
import torch

import turbofx
from turbofx.compiler.models import example_inputs, make_tiny_model
from turbofx.errors import ArtifactError


def _matmuls(compiled) -> dict[str, int]:
    """Projections of a compiled module (GEMM kernels or extern mm/addmm): how many, how many with a bias."""
    out = {"matmuls": 0, "with_bias": 0}
    for k in turbofx.explain(compiled).kernels:
        if any(n.startswith("bmm") for n in k.nodes):
            continue  # not a projection (transformers 5.17's rotary embedding is a K=1 bmm)
        gemm = k.kind == "gemm"
        if gemm or (k.kind == "extern" and k.label in ("aten::mm.default", "aten::addmm.default")):
            out["matmuls"] += 1
            out["with_bias"] += ("bias" in k.label.split("+")) if gemm else k.label == "aten::addmm.default"
    return out


def _layout_record(compiled):
    return next(p for p in turbofx.explain(compiled).passes if p.name == "layout")


def _storages(*tensor_lists) -> dict[int, int]:
    """Unique storages (id -> bytes) over the given tensors: what is resident."""
    seen = {}
    for ts in tensor_lists:
        for t in ts:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return seen


def _logits(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


@pytest.fixture(scope="module")
def llama_compiled():
    """A tiny llama (2 layers), its eager logits before compiling, and the compiled module."""
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", seq=4)
    ref = _logits(model, args, kwargs)
    model_bytes = sum(_storages(model.parameters(), model.buffers()).values())
    compiled = turbofx.compile(model, args, kwargs)
    return model, args, kwargs, ref, model_bytes, compiled


def test_llama_qkv_and_gate_up_become_one_matmul_each(llama_compiled):
    model, args, kwargs, ref, _, compiled = llama_compiled
    layers = model.config.num_hidden_layers
    # per layer: qkv, o, gate+up, down (was q, k, v, o, gate, up, down); plus lm_head
    assert _matmuls(compiled) == {"matmuls": 4 * layers + 1, "with_bias": 0}
    torch.testing.assert_close(_logits(compiled, args, kwargs), ref, rtol=1e-4, atol=1e-5)

    rep = turbofx.explain(compiled)
    by_name = {w.name: w for w in rep.layouts}
    qkv = by_name["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"]
    assert qkv.sources == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    heads, kv_heads, head_dim, hidden = 4, 2, 8, model.config.hidden_size
    assert qkv.sizes == [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim] and qkv.dim == 0
    gate_up = by_name["model.layers.0.mlp.gate_proj+up_proj.weight"]
    assert gate_up.sizes == [model.config.intermediate_size] * 2
    assert len(rep.layouts) == 2 * layers
    assert "layout: model.layers.0.self_attn.q_proj.weight+k_proj+v_proj -> 1 weight [64, 32]" in str(rep)
    assert _layout_record(compiled).refused == []

    # state holds the joined weights only; gate is the first half of [gate; up] (SwiGLU reads it so)
    state = compiled._state
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in state)
    mlp = model.model.layers[0].mlp
    assert torch.equal(state[gate_up.name][:64], mlp.gate_proj.weight)
    assert torch.equal(state[gate_up.name][64:], mlp.up_proj.weight)
    assert state[qkv.name].shape == (sum(qkv.sizes), hidden)
    assert compiled._program.d["layouts"][0]["name"] == rep.layouts[0].name


def test_eager_model_shares_the_joined_weights(llama_compiled):
    """The parameters are views of the joined tensors: the model still runs eagerly, and model +
    compiled state hold the weights once (resident bytes unchanged by compiling)."""
    model, args, kwargs, ref, model_bytes, compiled = llama_compiled
    assert torch.equal(_logits(model, args, kwargs), ref)
    attn = model.model.layers[1].self_attn
    joined = compiled._state["model.layers.1.self_attn.q_proj+k_proj+v_proj.weight"]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
    assert attn.k_proj.weight.storage_offset() == attn.q_proj.weight.numel()
    assert isinstance(attn.k_proj.weight, torch.nn.Parameter) and attn.k_proj.weight.requires_grad
    assert joined.requires_grad  # so a grad-mode call still meets the inference-only guard
    resident = sum(_storages(model.parameters(), model.buffers(), compiled._state.values()).values())
    assert resident == model_bytes


def test_load_state_dict_after_compile_is_seen(llama_compiled):
    """In-place updates of the parameters (load_state_dict) write the joined tensors the program
    reads: the compiled output follows the new weights, without recompiling."""
    model, args, kwargs, ref, _, compiled = llama_compiled
    other = make_tiny_model("llama", seed=7)
    try:
        model.load_state_dict(other.state_dict())
        new = _logits(other, args, kwargs)
        assert not torch.allclose(new, ref)
        torch.testing.assert_close(_logits(compiled, args, kwargs), new, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_logits(model, args, kwargs), new, rtol=0, atol=0)
    finally:
        model.load_state_dict(make_tiny_model("llama").state_dict())
    torch.testing.assert_close(_logits(compiled, args, kwargs), ref, rtol=1e-4, atol=1e-5)


def test_qwen2_biased_qkv_is_one_addmm_and_verifies():
    model = make_tiny_model("qwen2")
    args, kwargs = example_inputs("qwen2", seq=4)
    ref = _logits(model, args, kwargs)
    compiled = turbofx.compile(model, args, kwargs, verify=True)  # the pass keeps the graph's values
    layers = model.config.num_hidden_layers
    assert _matmuls(compiled) == {"matmuls": 4 * layers + 1, "with_bias": layers}
    qkv = next(w for w in turbofx.explain(compiled).layouts if w.bias)
    assert qkv.bias == "model.layers.0.self_attn.q_proj+k_proj+v_proj.bias"
    assert compiled._state[qkv.bias].shape == (sum(qkv.sizes),)
    torch.testing.assert_close(_logits(compiled, args, kwargs), ref, rtol=1e-4, atol=1e-5)


class _Siblings(torch.nn.Module):
    """Sibling linears the pass must refuse: mixed bias, a weight tied to a linear elsewhere, and a
    pair whose weights are views of one tensor in the wrong order; plus a pair laid out adjacently
    in one tensor already (joined as a view, no copy)."""

    def __init__(self):
        super().__init__()
        self.biased, self.plain = torch.nn.Linear(8, 16), torch.nn.Linear(8, 8, bias=False)
        self.tied_a, self.tied_b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        self.tied_b.weight = self.tied_a.weight  # as lm_head shares the embedding
        self.lone = torch.nn.Linear(8, 4, bias=False)
        big = torch.randn(16, 8)
        self.crossed_a, self.crossed_b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        self.crossed_a.weight, self.crossed_b.weight = torch.nn.Parameter(big[8:]), torch.nn.Parameter(big[:8])
        flat = torch.randn(16, 8)
        self.adj_a, self.adj_b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        self.adj_a.weight, self.adj_b.weight = torch.nn.Parameter(flat[:8]), torch.nn.Parameter(flat[8:])

    def forward(self, x):
        y, z, w = x.sin(), x.cos(), x.tanh()
        return (self.biased(x).sum(-1) + self.plain(x).sum(-1) + self.tied_a(y).sum(-1) + self.lone(y).sum(-1)
                + self.tied_b(x.exp()).sum(-1) + self.crossed_a(z).sum(-1) + self.crossed_b(z).sum(-1)
                + self.adj_a(w).sum(-1) + self.adj_b(w).sum(-1))


def test_refusals_carry_their_code_and_results_stay_equal():
    model = _Siblings().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    crossed = model.crossed_a.weight.data_ptr()
    compiled = turbofx.compile(model, (x,))
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)
    codes = sorted(r.code for r in _layout_record(compiled).refused)
    assert codes == ["mixed-bias", "shared-storage", "weight-shared"]
    (joined,) = turbofx.explain(compiled).layouts  # the adjacent pair only, as a view of its tensor
    assert joined.sources == ["adj_a.weight", "adj_b.weight"] and not joined.copied
    assert compiled._state[joined.name].data_ptr() == model.adj_a.weight.data_ptr()
    assert model.crossed_a.weight.data_ptr() == crossed  # refused: left where it was
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_outputs_returned_directly_keep_their_layout():
    """Siblings whose outputs the graph returns are not joined: the caller would get strided views
    (``.view(-1)`` on them fails) where eager returns contiguous tensors."""
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x), self.b(x)

    model, x = TwoHeads().eval(), torch.randn(3, 8)
    compiled = turbofx.compile(model, (x,))
    (why,) = [str(r.refusal) for r in _layout_record(compiled).refused]
    assert why.startswith("output-layout")
    out = compiled(x)
    assert all(o.is_contiguous() for o in out)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_torch_compile_door_is_refused_with_its_code():
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", seq=4)
    ref = _logits(model, args, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbofx")
    torch.testing.assert_close(_logits(compiled, args, kwargs), ref, rtol=1e-4, atol=1e-5)
    rep = turbofx.explain(compiled)
    refused = [r.code for p in rep.passes if p.name == "layout" for r in p.refused]
    assert refused and all(code == "weights-are-inputs" for code in refused)
    assert rep.layouts == []
    torch._dynamo.reset()


def test_artifact_stores_only_the_joined_weights(tmp_path):
    from safetensors import safe_open

    from turbofx.compiler.artifact import FORMAT, seal

    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", seq=4)
    ref = _logits(model, args, kwargs)
    out = turbofx.export(model, args, kwargs, output_dir=tmp_path / "art")
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" in keys
    originals = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert not keys & originals and "model.layers.0.self_attn.o_proj.weight" in keys
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == FORMAT >= 4 and len(meta["layouts"]) == 4
    loaded = turbofx.load(out)
    torch.testing.assert_close(loaded(*args, **kwargs).logits, ref, rtol=1e-4, atol=1e-5)
    assert [w.name for w in turbofx.explain(loaded).layouts] == [w["name"] for w in meta["layouts"]]

    meta["format"] = 3  # written by a turbofx whose programs read q, k, v separately
    (out / "meta.json").write_text(seal(meta))
    with pytest.raises(ArtifactError, match="format 3.*re-export"):
        turbofx.load(out)


def test_fuel_and_disable_keep_the_separate_matmuls():
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", seq=4)
    off = turbofx.compile(model, args, kwargs, disable=("layout",))
    assert _matmuls(off) == {"matmuls": 7 * model.config.num_hidden_layers + 1, "with_bias": 0}
    one = turbofx.compile(model, args, kwargs, max_rewrites=1)
    assert len(turbofx.explain(one).layouts) == 1
    assert any(r.code == "rewrite-budget" for r in _layout_record(one).refused)
    torch.testing.assert_close(_logits(one, args, kwargs), _logits(model, args, kwargs), rtol=1e-4, atol=1e-5)


def test_module_state_keeps_graph_inputs_and_state_consistent():
    from turbofx.compiler.capture import capture_module
    from turbofx.passes.state import ModuleState

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    c = capture_module(lin, (x,), {})
    examples = [c.state[s.target] if s.kind != "user" else x for s in c.inputs]
    st = ModuleState(c, examples)
    weight, bias, user = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    assert st.value(weight) is lin.weight and st.key(bias) == "bias"
    assert st.value(user) is None and st.is_call_input(user)
    assert ModuleState().value(weight) is None and not ModuleState().known

    new = st.add("bias2", torch.zeros(3), like=bias)
    placeholders = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    assert [s.name for s in c.inputs] == [p.name for p in placeholders] and placeholders[2] is new
    assert c.state["bias2"] is examples[2] and new.meta["val"].shape == (3,)
    with pytest.raises(ValueError, match="still read"):
        bias.replace_all_uses_with(new)
        st.drop(new)
    st.drop(bias)  # nothing reads it now
    assert "bias" not in c.state and [s.target for s in c.inputs if s.kind != "user"] == ["weight", "bias2"]
    assert len(examples) == len(c.inputs) == 3
    with pytest.raises(ValueError, match="not a state placeholder"):
        st.add("w", torch.zeros(1), like=user)
