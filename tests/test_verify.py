"""Verification that finds the culprit: verify=True on a real model, verify="kernels" replacing a
wrong kernel, the rewrite budget, and bisect naming the rewrite that miscompiles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import turbofx
from turbofx.codegen import ops as codegen_ops
from turbofx.compiler.models import example_inputs, make_tiny_model
from turbofx.errors import TurbofxError, VerificationError
from turbofx.passes import attention as attention_pass

aten = torch.ops.aten


class _Chain(torch.nn.Module):
    """exp -> cumsum -> sigmoid -> cumsum -> tanh: three one-op regions split by extern ops
    (cumsum has no template)."""

    def forward(self, x):
        return torch.tanh(torch.cumsum(torch.sigmoid(torch.cumsum(torch.exp(x), -1)), -1))


class _TwoAttentions(torch.nn.Module):
    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(a, k, v) * 2


def _x():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _qkv():
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(1, 2, 4, 16, generator=g) for _ in range(3))


@pytest.fixture
def wrong_sigmoid(monkeypatch):
    """A deliberately wrong kernel template: sigmoid generated as 1 - sigmoid."""
    right = codegen_ops.POINTWISE[aten.sigmoid.default]
    monkeypatch.setitem(codegen_ops.POINTWISE, aten.sigmoid.default, lambda n, a, k: f"(1.0 - {right(n, a, k)})")


def test_verify_true_runs_on_tiny_llama():
    """It crashed after the attention pass: turbofx::attention's reference returned a contiguous
    tensor where the graph promised SDPA's layout, and the next view failed."""
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", batch=1, seq=8)
    compiled = turbofx.compile(model, args, kwargs, verify=True)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
    torch.testing.assert_close(compiled(*args, **kwargs).logits, ref, rtol=1e-3, atol=1e-3)
    assert any(p.name == "attention" and p.matched for p in turbofx.explain(compiled).passes)


def test_verify_names_the_pass_that_changes_results(monkeypatch):
    real = attention_pass._replace

    def wrong_scale(g, n, q, k, v, mask, scale, *rest):
        return real(g, n, q, k, v, mask, scale * 3, *rest)

    monkeypatch.setattr(attention_pass, "_replace", wrong_scale)
    with pytest.raises(VerificationError, match="pass attention") as info:
        turbofx.compile(_TwoAttentions(), _qkv(), verify=True)
    assert "disable=" in str(info.value)


def test_verify_leaves_example_inputs_and_buffers_alone():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(3))

        def forward(self, x):
            self.n.add_(1)
            return x + self.n

    m = Counter()
    x = torch.ones(3)
    compiled = turbofx.compile(m, (x,), verify="all")
    assert torch.equal(m.n, torch.zeros(3))  # the verify runs wrote copies, not the model's buffer
    torch.testing.assert_close(compiled(x), torch.full((3,), 2.0))


def _checked_report(model, x):
    """The report of ``model`` compiled with verify="kernels", after checking that without it the
    (injected) wrong kernel really gives a wrong result and that with it the result is eager's."""
    with torch.no_grad():
        ref = model(x)
    plain = turbofx.compile(model, (x,))
    assert not torch.allclose(plain(x), ref, atol=1e-3)  # the injected kernel is wrong indeed
    checked = turbofx.compile(model, (x,), verify="kernels")
    torch.testing.assert_close(checked(x), ref, rtol=1e-4, atol=1e-4)
    return turbofx.explain(checked)


def test_verify_kernels_replaces_a_wrong_kernel(wrong_sigmoid):
    rep = _checked_report(_Chain(), _x())
    (m,) = rep.kernel_mismatches
    assert m.kind == "pointwise" and any("sigmoid" in n for n in m.nodes) and m.max_abs_error > 0.1
    assert not any("sigmoid" in k.label for k in rep.generated)
    text = str(rep)
    assert "verify=kernels" in text and m.kernel in text and "sigmoid" in text
    sig = [k for k in rep.fallbacks if "sigmoid" in k.label]
    assert sig and "disagreed with ATen" in sig[0].reason
    assert rep.refusal_of(sig[0].nodes[0]).code == "kernel-mismatch"
    assert len(rep.generated) == 2  # exp and tanh kept their (right) kernels


def test_verify_kernels_keeps_right_kernels():
    model, x = _Chain(), _x()
    rep = turbofx.explain(turbofx.compile(model, (x,), verify="kernels"))
    assert rep.kernel_mismatches == [] and len(rep.generated) == 3


def test_rewrite_budget_limits_and_records_rewrites():
    model, x = _Chain(), _x()
    full = turbofx.explain(turbofx.compile(model, (x,)))
    assert [r.pass_name for r in full.rewrites] == ["fusion"] * 3 and full.rewrite_budget is None
    one = turbofx.compile(model, (x,), max_rewrites=1)
    rep = turbofx.explain(one)
    assert len(rep.rewrites) == 1 and rep.budget_exhausted and len(rep.generated) == 1
    assert "max_rewrites=1" in str(rep)
    fusion = next(p for p in rep.passes if p.name == "fusion")
    assert fusion.refusal_counts().get("rewrite-budget") == 2, fusion.refused  # the two regions it did not make
    assert sum(r.code == "rewrite-budget" for r in rep.refusals.values()) == 2
    with torch.no_grad():
        torch.testing.assert_close(one(x), model(x), rtol=1e-4, atol=1e-4)


def test_rewrite_budget_from_environment(monkeypatch):
    monkeypatch.setenv("TURBOFX_MAX_REWRITES", "0")
    rep = turbofx.explain(turbofx.compile(_Chain(), (_x(),)))
    assert rep.rewrites == [] and rep.generated == [] and rep.rewrite_budget == 0
    monkeypatch.setenv("TURBOFX_MAX_REWRITES", "many")
    with pytest.raises(TurbofxError, match="TURBOFX_MAX_REWRITES"):
        turbofx.compile(_Chain(), (_x(),))


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_max_rewrites(bad):
    with pytest.raises(TurbofxError, match="max_rewrites"):
        turbofx.compile(_Chain(), (_x(),), max_rewrites=bad)


@pytest.mark.parametrize("bad", ["kernel", "yes", 1])
def test_bad_verify_mode(bad):
    with pytest.raises(TurbofxError, match="verify"):
        turbofx.compile(_Chain(), (_x(),), verify=bad)


def test_bisect_finds_the_wrong_kernel_region(wrong_sigmoid):
    res = turbofx.bisect(_Chain(), (_x(),))
    assert res.verdict == "rewrite" and res.total_rewrites == 3
    assert res.culprit.pass_name == "fusion" and "sigmoid" in res.culprit.what and res.culprit.index == 2
    assert "culprit" in str(res) and "sigmoid" in str(res)


def test_bisect_finds_the_wrong_attention_rewrite(monkeypatch):
    """A miscompiling rewrite (the second attention match gets a wrong scale) is named exactly."""
    real = attention_pass._replace

    def wrong_second(g, n, q, k, v, mask, scale, *rest):
        return real(g, n, q, k, v, mask, scale * (3 if n.name.endswith("_1") else 1), *rest)

    monkeypatch.setattr(attention_pass, "_replace", wrong_second)
    res = turbofx.bisect(_TwoAttentions(), _qkv())
    assert res.verdict == "rewrite", res
    assert res.culprit.pass_name == "attention" and res.culprit.what.startswith("scaled_dot_product_attention_1")
    assert res.culprit.index == 2


def test_bisect_when_nothing_is_wrong():
    res = turbofx.bisect(_Chain(), (_x(),))
    assert res.verdict == "agrees" and res.culprit is None and "no miscompile" in str(res)


def test_bisect_refuses_a_budget():
    with pytest.raises(TurbofxError, match="max_rewrites"):
        turbofx.bisect(_Chain(), (_x(),), max_rewrites=3)


def test_verify_kernels_replaces_a_wrong_gemm(monkeypatch):
    """A GEMM kernel that disagrees with eager runs as its op's reference (ATen matmul) instead."""
    from turbofx.codegen import family
    from turbofx.codegen.gemm import GemmFamily

    real = GemmFamily.runner

    def wrong(self, s, kernels):
        run = real(self, s, kernels)

        def off_by_one(values, env):
            run(values, env)
            values[s["out"]].add_(1.0)

        return family.bind(off_by_one, s, self)

    monkeypatch.setattr(GemmFamily, "runner", wrong)
    rep = _checked_report(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.SiLU()).eval(), _x())
    (m,) = rep.kernel_mismatches
    assert m.kind == "gemm" and m.max_abs_error > 0.5
    assert not [k for k in rep.kernels if k.kind == "gemm"]
    (fallback,) = [k for k in rep.fallbacks if k.label == "turbofx::gemm.default"]
    assert rep.refusal_of(fallback.nodes[0]).code == "kernel-mismatch"
