"""The matmul pass: matmuls and the work around them become GEMM-family kernels (turbofx::gemm),
matched by semantics; what the template cannot do stays extern with a refusal code. Every compiled
module is compared with eager. Shapes are tiny: the interpreter runs every kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import turbofx

from tests.helpers import Fn

torch.manual_seed(0)


def _compile(module, *args, **options):
    module = module.eval()
    with torch.no_grad():
        cm = turbofx.compile(module, args, **options)
        ref = module(*args)
        out = cm(*args)
    return cm, ref, out, turbofx.explain(cm)


def _gemms(report) -> list:
    return [k for k in report.kernels if k.kind == "gemm"]


def _matmul_refusals(report) -> list:
    rec = next(p for p in report.passes if p.name == "matmul")
    return [r.refusal.code for r in rec.refused]


class Mlp(torch.nn.Module):
    def __init__(self, act, bias=True, residual=True):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=False)
        self.act, self.residual = act, residual

    def forward(self, x):
        y = self.down(self.act(self.up(x)))
        return x + y if self.residual else y


@pytest.mark.parametrize("act,label", [
    (F.silu, "silu"), (F.relu, "relu"), (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh")])
def test_linear_bias_activation_and_residual_fuse(act, label):
    cm, ref, out, report = _compile(Mlp(act), torch.randn(2, 3, 24))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    labels = sorted(k.label for k in _gemms(report))
    assert labels == sorted([f"matmul+bias+{label}", "matmul+residual"]), report
    assert report.counts() == {"gemm": 2}, report.counts()  # nothing else runs


def test_swiglu_from_one_weight_and_split_halves():
    class GatedMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(16, 2 * 20, bias=False)
            self.down = torch.nn.Linear(20, 16, bias=False)

        def forward(self, x):
            g, u = self.gate_up(x).chunk(2, -1)
            return self.down(F.silu(g) * u)

    cm, ref, out, report = _compile(GatedMlp(), torch.randn(1, 5, 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sorted(k.label for k in _gemms(report)) == ["matmul", "matmul+silu-glu"], report


def test_fp16_linear_with_fp32_logits_cast():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(32, 48, bias=False)

        def forward(self, x):
            return self.lm_head(x).float()

    m = Head().half()
    x = torch.randn(2, 4, 32).half()
    cm, ref, out, report = _compile(m, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    (g,) = _gemms(report)
    assert report.counts() == {"gemm": 1}, report  # the cast is the GEMM's store


def test_bmm_is_a_batched_gemm():
    class Bmm(torch.nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b) + 1.0

    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 9)
    cm, ref, out, report = _compile(Bmm(), a, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(_gemms(report)) == 1 and not [k for k in report.fallbacks if "bmm" in k.label], report


def test_integer_and_strided_matmuls_stay_extern_with_codes():
    class IntMm(torch.nn.Module):
        def forward(self, a, b):
            return torch.mm(a, b)

    cm, ref, out, report = _compile(IntMm(), torch.randint(-3, 3, (4, 5)), torch.randint(-3, 3, (5, 6)))
    assert torch.equal(out, ref)
    assert _matmul_refusals(report) == ["dtype"] and not _gemms(report)

    class Strided(torch.nn.Module):
        def forward(self, a, b):
            return torch.mm(a[:, ::2], b[::2, ::3])

    cm, ref, out, report = _compile(Strided(), torch.randn(4, 10), torch.randn(10, 9))
    torch.testing.assert_close(out, ref)
    assert "strides" in _matmul_refusals(report), report


def test_dynamic_rows():
    m = Mlp(F.silu)
    x = torch.randn(2, 6, 24)
    cm, ref, out, report = _compile(m, x, dynamic=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(_gemms(report)) == 2
    x2 = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(cm(x2), m(x2), rtol=1e-5, atol=1e-5)


def test_rewrite_budget_keeps_matmuls_extern():
    cm, ref, out, report = _compile(Mlp(F.silu), torch.randn(2, 3, 24), max_rewrites=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not _gemms(report)
    assert "rewrite-budget" in _matmul_refusals(report)


def test_disable_the_pass():
    cm, ref, out, report = _compile(Mlp(F.silu), torch.randn(2, 3, 24), disable=("matmul",))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not _gemms(report) and any("::addmm." in k.label for k in report.fallbacks)


def test_matmul_with_a_second_reader_of_its_result_keeps_the_chain_short():
    class TwoReaders(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.lin(x)
            return F.silu(y), y * 2  # y itself is needed: silu cannot be absorbed

    cm, ref, out, report = _compile(TwoReaders(), torch.randn(3, 8))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [k.label for k in _gemms(report)] == ["matmul+bias"], report


def test_verify_passes_accepts_the_rewrite():
    cm, ref, out, report = _compile(Mlp(F.silu), torch.randn(2, 3, 24), verify=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (0, 4, 3), (3, 0, 5), (1, 7, 1), (17, 9, 33)])
def test_edge_sizes_equal_eager(m, k, n):
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    cm, ref, out, report = _compile(Fn(lambda a, b, c: torch.addmm(c, a, b)), a, b, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.shape == (m, n)


def test_transposed_and_sliced_operands_and_special_values():
    a = torch.randn(6, 10)
    b = torch.randn(12, 6)
    a[1, 2], a[3, 4], b[5, 1] = float("nan"), float("inf"), float("-inf")

    def f(a, b):
        return torch.mm(a.t(), b.t()[:, 2:9]), torch.mm(a[:, :5].t(), b[:6, 2:8])

    cm, ref, out, report = _compile(Fn(f), a, b)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert len(_gemms(report)) == 2, report


def test_alpha_beta_addmm_stays_extern_with_its_code():
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5)
    cm, ref, out, report = _compile(Fn(lambda a, b, c: torch.addmm(c, a, b, beta=0.5, alpha=2.0)), a, b, c)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _matmul_refusals(report) == ["alpha-beta"] and not _gemms(report)


def test_one_weight_used_twice_and_3d_matmul():
    w = torch.nn.Linear(8, 8, bias=False)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            return self.w(torch.relu(self.w(x))) + x @ self.w.weight

    cm, ref, out, report = _compile(Twice(), torch.randn(2, 3, 8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(_gemms(report)) == 3 and not [k for k in report.fallbacks if "mm" in k.label], report


def test_rmsnorm_prologue_in_fp16_equals_eager():
    class NormLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.rand(32) + 0.5)
            self.lin = torch.nn.Linear(32, 24, bias=False)

        def forward(self, x):
            x32 = x.float()
            h = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            return self.lin(self.g * h)

    m = NormLinear().half()
    x = torch.randn(3, 5, 32).half()
    cm, ref, out, report = _compile(m, x)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert [k.label for k in _gemms(report)] == ["rmsnorm+matmul"] and report.counts() == {"gemm": 1}, report


def test_an_input_strided_unlike_the_example_still_gives_the_right_answer():
    m = torch.nn.Linear(6, 4).eval()
    cm, ref, out, report = _compile(m, torch.randn(5, 6))
    x = torch.randn(6, 10)[:, ::2].t()  # [5, 6], neither row- nor column-major
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)


def test_spec_text_round_trips_and_refuses_unknown_records():
    from turbofx.codegen.gemm import GemmSpec, RmsNorm
    from turbofx.runtime.ops import gemm_spec_of, gemm_spec_text

    spec = GemmSpec(dtype=torch.float16, a_dtype=torch.float32, activation="silu", swiglu=True, residual=True,
                    norm=RmsNorm(1e-6, torch.float16, torch.float16, 1.0), eager_rounding=True)
    assert gemm_spec_of(gemm_spec_text(spec)) == spec
    with pytest.raises(ValueError, match="unknown record"):
        gemm_spec_of('{"$Target":{"backend":"cuda"}}')
    with pytest.raises(ValueError, match="unknown dtype"):
        gemm_spec_of('{"$GemmSpec":{"dtype":{"$dtype":"manual_seed"}}}')
