"""Small functional graphs compiled with turbofx.compile: numerics vs eager and kernel kinds."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import turbofx

FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=1e-3, atol=1e-3)


def logits(*shape, dtype=torch.float32):
    """Random logits whose first column is very negative (a masked position): eager softmax is
    exact; a softmax that subtracts a wrong row max overflows."""
    x = torch.randn(*shape) * 4
    x[..., 0] = -1000.0
    return x.to(dtype)


class Fn(torch.nn.Module):
    """Wraps a function of tensors (plus optional parameters) as a module to compile."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))

    def forward(self, *xs):
        return self.fn(self, *xs)


def run(module, *inputs, tol=FP32, **options):
    """Compile ``module`` for ``inputs``, check it against eager, return (output, report)."""
    with torch.no_grad():
        ref = module(*inputs)
    compiled = turbofx.compile(module, tuple(inputs), **options)
    out = compiled(*inputs)
    assert type(out) is type(ref)
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, o.dtype, r.shape, r.dtype)
        torch.testing.assert_close(o, r, **tol)
    return out, turbofx.explain(compiled)


def ops_of(k) -> set[str]:
    return {n.rstrip("_0123456789") for n in k.nodes}


def generated(report, kind=None, label=None):
    return [k for k in report.generated if (kind is None or k.kind == kind) and (label is None or k.label == label)]


# ------------------------------------------------------------------ pointwise

def test_pointwise_broadcast_chain():
    m = Fn(lambda s, x: x * s.w + s.b, w=torch.randn(8), b=torch.randn(4, 1))
    _, rep = run(m, torch.randn(4, 8))
    ks = generated(rep, "pointwise")
    assert len(ks) == 1, str(rep)  # mul and add fused into one kernel
    assert {"mul", "add"} <= ops_of(ks[0])
    assert not rep.fallbacks, str(rep)


def test_buffer_copy_is_a_generated_pointwise_op():
    """``buf.copy_(x[0])`` (HF's cache length counters) is a functional copy in the graph: it fuses
    with its consumers instead of running as an ATen call, and the buffer is still updated."""
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("length", torch.zeros((), dtype=torch.int64))

        def forward(self, positions, x):  # as StaticCache layers keep their length
            self.length.copy_(positions[0])
            slots = torch.arange(4) + self.length
            self.length.add_(4)
            return x * slots

    m = Counter()
    positions, x = torch.tensor([5, 6]), torch.randn(4)
    compiled = turbofx.compile(m, (positions, x))
    torch.testing.assert_close(compiled(positions, x), x * torch.arange(5, 9))
    assert int(m.length) == 9
    report = turbofx.explain(compiled)
    assert not any("copy" in k.label for k in report.fallbacks), [k.label for k in report.fallbacks]


def test_pointwise_three_way_broadcast():
    m = Fn(lambda s, x, y: (x + y) * s.w - 1.5, w=torch.randn(1, 3, 1))
    _, rep = run(m, torch.randn(2, 1, 5), torch.randn(2, 3, 5))
    assert len(generated(rep, "pointwise")) == 1, str(rep)


def test_permuted_input_in_graph():
    m = Fn(lambda s, x: x.transpose(0, 1) * 2 + 1)
    out, rep = run(m, torch.randn(4, 6))
    assert out.shape == (6, 4)
    assert len(generated(rep, "pointwise")) == 1, str(rep)
    # the transpose is folded into the kernel's load: no copy through ATen
    assert not rep.fallbacks, str(rep)


def test_non_contiguous_argument():
    m = Fn(lambda s, x: x * 2 + 1)
    compiled = turbofx.compile(m, (torch.randn(6, 4),))
    x = torch.randn(4, 6).t()  # same shape as the example, but transposed strides
    assert not x.is_contiguous()
    torch.testing.assert_close(compiled(x), x * 2 + 1, **FP32)


def test_permute_3d_and_reshape():
    m = Fn(lambda s, x: (x.permute(2, 0, 1).reshape(4, 6) + 1.0).sin())
    run(m, torch.randn(2, 3, 4))


def test_slice_and_select_views():
    m = Fn(lambda s, x: x[:, 1::2] * x[:, -1:] + x[1, ::2])
    run(m, torch.randn(3, 8))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    m = Fn(lambda s, x: F.gelu(x, approximate=approximate))
    _, rep = run(m, torch.randn(4, 16) * 3)
    assert generated(rep, "pointwise", "activation"), str(rep)


def test_silu():
    _, rep = run(Fn(lambda s, x: F.silu(x)), torch.randn(4, 16) * 3)
    assert generated(rep, "pointwise", "activation"), str(rep)


def test_tanh_including_large_inputs():
    x = torch.cat([torch.randn(32) * 3, torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])])
    out, rep = run(Fn(lambda s, x: torch.tanh(x)), x)
    assert generated(rep, "pointwise", "activation"), str(rep)
    assert out.isfinite().all()


def test_sigmoid_relu_and_friends():
    def f(s, x):
        return torch.sigmoid(x) + torch.relu(x) * x.abs().sqrt() - torch.exp(-x.abs()) + x.clamp(-0.5, 0.5)

    _, rep = run(Fn(f), torch.randn(5, 7))
    # (how many kernels depends on how sibling producers are merged; all must be generated)
    assert generated(rep, "pointwise") and not rep.fallbacks, str(rep)
    assert all(k.kind == "pointwise" for k in rep.generated)


def test_pointwise_chain_is_one_kernel():
    m = Fn(lambda s, x: torch.sigmoid((x * 2 + 1).abs().sqrt() - 0.5).clamp(0.1, 0.9) * x)
    _, rep = run(m, torch.randn(5, 7))
    assert len(rep.generated) == 1 and rep.generated[0].kind == "pointwise", str(rep)
@pytest.mark.parametrize("op", ["relu", "maximum", "clamp"])
def test_nan_propagates(op):
    fn = {"relu": lambda s, x: torch.relu(x * 1.0),
          "maximum": lambda s, x: torch.maximum(x * 1.0, torch.zeros_like(x)),
          "clamp": lambda s, x: (x * 1.0).clamp(-1.0, 1.0)}[op]
    x = torch.randn(8)
    x[::3] = float("nan")
    with torch.no_grad():
        ref = Fn(fn)(x)
    assert ref.isnan().sum() == 3
    compiled = turbofx.compile(Fn(fn), (x,))
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_where():
    m = Fn(lambda s, x, y: torch.where(x > 0, x, y * 2))
    _, rep = run(m, torch.randn(4, 8), torch.randn(4, 8))
    assert generated(rep, "pointwise"), str(rep)


def test_masked_fill():
    m = Fn(lambda s, x, mask: x.masked_fill(mask, float("-inf")) + 1)
    x = torch.randn(3, 6)
    mask = torch.rand(3, 6) > 0.5
    out, rep = run(m, x, mask)
    assert (out[mask] == float("-inf")).all()
    assert generated(rep, "pointwise"), str(rep)


def test_integer_ops():
    m = Fn(lambda s, x, y: (x * 3 + y - 7) * (x > y).to(torch.int64))
    x = torch.randint(-50, 50, (4, 6))
    y = torch.randint(-50, 50, (4, 6))
    out, rep = run(m, x, y, tol=dict(rtol=0, atol=0))
    assert out.dtype == torch.int64
    assert generated(rep, "pointwise"), str(rep)


def test_int32_ops():
    m = Fn(lambda s, x: (x * 5 - 3) & 0xFF)
    x = torch.randint(-1000, 1000, (16,), dtype=torch.int32)
    out, rep = run(m, x, tol=dict(rtol=0, atol=0))
    assert out.dtype == torch.int32


def test_bool_ops():
    m = Fn(lambda s, x, y: ((x > 0) & ~(y > 0)) | (x == y))
    x = torch.randint(-2, 3, (5, 5)).float()
    y = torch.randint(-2, 3, (5, 5)).float()
    out, _ = run(m, x, y, tol=dict(rtol=0, atol=0))
    assert out.dtype == torch.bool


def test_fp16_round_trip_rounds_like_eager():
    m = Fn(lambda s, x: x.to(torch.float16).to(torch.float32) * 1.0 + 0.0)
    x = torch.randn(64) * 1000 + torch.rand(64) * 1e-2  # not representable in fp16
    out, rep = run(m, x, tol=dict(rtol=0, atol=0))  # bit-exact rounding
    assert not torch.equal(out, x)  # rounding happened
    assert out.dtype == torch.float32
    assert generated(rep, "pointwise"), str(rep)


def test_fp16_pointwise():
    m = Fn(lambda s, x, y: x * y + x)
    x = torch.randn(4, 8, dtype=torch.float16)
    y = torch.randn(4, 8, dtype=torch.float16)
    run(m, x, y, tol=FP16)


def test_fp16_to_float_cast_out():
    m = Fn(lambda s, x: (x.float() * 3.0).half())
    run(m, torch.randn(4, 8, dtype=torch.float16), tol=FP16)


# ------------------------------------------------------------------ reductions

DTYPES = [pytest.param(torch.float32, FP32, id="fp32"), pytest.param(torch.float16, FP16, id="fp16")]


@pytest.mark.parametrize("dtype,tol", [
    # fp32: amax reads the graph input directly (the bug); fp16: the kernel first upcasts in-kernel
    pytest.param(torch.float32, FP32, id="fp32"),
    pytest.param(torch.float16, FP16, id="fp16"),
])
def test_softmax(dtype, tol):
    out, rep = run(Fn(lambda s, x: torch.softmax(x, -1)), logits(3, 5, 7, dtype=dtype), tol=tol)
    assert len(generated(rep, "reduction", "softmax")) == 1, str(rep)
    torch.testing.assert_close(out.float().sum(-1), torch.ones(3, 5), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_softmax_with_prologue(dtype, tol):
    """Attention-style softmax(scale * x + mask): the reduction's input is computed in-kernel."""
    mask = torch.zeros(5, 7)
    mask[:, 4:] = float("-inf")
    m = Fn(lambda s, x: torch.softmax(x * 0.5 + s.mask, -1), mask=mask.to(dtype))
    out, rep = run(m, logits(3, 5, 7, dtype=dtype), tol=tol)
    ks = generated(rep, "reduction", "softmax")
    assert len(ks) == 1, str(rep)
    assert {"mul", "add", "amax", "exp", "sum"} <= ops_of(ks[0])
    assert (out[..., 4:] == 0).all()
    torch.testing.assert_close(out.float().sum(-1), torch.ones(3, 5), rtol=1e-3, atol=1e-3)
def test_log_softmax():
    _, rep = run(Fn(lambda s, x: torch.log_softmax(x, -1)), logits(3, 5, 7))
    assert generated(rep, "reduction", "log_softmax"), str(rep)


def test_log_softmax_with_prologue():
    _, rep = run(Fn(lambda s, x: torch.log_softmax(x / 2, -1)), logits(3, 5, 7))
    assert generated(rep, "reduction", "log_softmax"), str(rep)


def _layer_norm(dim):
    ln = torch.nn.LayerNorm(dim)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln.eval()
def test_layer_norm():
    _, rep = run(_layer_norm(8), torch.randn(2, 3, 8) * 2 + 1)
    ks = generated(rep, "reduction", "layernorm")
    assert len(ks) == 1, str(rep)
    assert not rep.fallbacks, str(rep)


def test_layer_norm_after_residual_add():
    ln = _layer_norm(8)
    m = Fn(lambda s, x, r: s.ln(x + r))
    m.ln = ln
    _, rep = run(m, torch.randn(2, 3, 8) * 2 + 1, torch.randn(2, 3, 8))
    ks = generated(rep, "reduction", "layernorm")
    assert len(ks) == 1, str(rep)
    assert "add" in ops_of(ks[0]) and not rep.fallbacks, str(rep)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_layer_norm_after_residual_add_dtypes(dtype, tol):
    m = Fn(lambda s, x, r: F.layer_norm(x + r, (8,), s.w, s.b, 1e-5),
           w=torch.randn(8, dtype=dtype), b=torch.randn(8, dtype=dtype))
    _, rep = run(m, torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype), tol=tol)
    assert generated(rep, "reduction", "layernorm"), str(rep)


def test_rmsnorm_by_hand():
    def rmsnorm(s, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + 1e-6) * s.w

    _, rep = run(Fn(rmsnorm, w=torch.randn(16)), torch.randn(2, 3, 16))
    ks = generated(rep, "reduction", "rmsnorm")
    assert len(ks) == 1, str(rep)
    assert {"pow", "mean", "rsqrt", "mul"} <= ops_of(ks[0])


def test_rmsnorm_fp16():
    def rmsnorm(s, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return s.w * h.to(torch.float16)

    m = Fn(rmsnorm, w=torch.randn(16, dtype=torch.float16))
    _, rep = run(m, torch.randn(2, 3, 16, dtype=torch.float16), tol=FP16)
    assert generated(rep, "reduction", "rmsnorm"), str(rep)


REDUCE = {"sum": lambda x: x.sum(-1), "mean": lambda x: x.mean(-1, keepdim=True),
          "amax": lambda x: x.amax(-1), "amin": lambda x: x.amin(-1)}


def _rows():
    x = torch.randn(3, 13)  # 13: the row is masked to a power-of-two block
    x[:, -1], x[:, -2] = 10.0, -10.0  # each row's max and min sit at its end
    return x
@pytest.mark.parametrize("op", list(REDUCE))
def test_last_dim_reduction_of_input(op):
    _, rep = run(Fn(lambda s, x: REDUCE[op](x)), _rows())
    assert len(generated(rep, "reduction")) == 1, str(rep)


@pytest.mark.parametrize("op", list(REDUCE))
def test_last_dim_reduction_with_prologue(op):
    _, rep = run(Fn(lambda s, x: REDUCE[op](x * 1.5 - 0.25)), _rows())
    ks = generated(rep, "reduction")
    assert len(ks) == 1 and {"mul", "sub"} <= ops_of(ks[0]), str(rep)


@pytest.mark.parametrize("op", ["sum", "amax"])
def test_last_dim_reduction_fp16(op):
    _, rep = run(Fn(lambda s, x: REDUCE[op](x * 1.0)), torch.randn(4, 40, dtype=torch.float16), tol=FP16)
    assert len(generated(rep, "reduction")) == 1, str(rep)


def test_integer_and_bool_sums():
    m = Fn(lambda s, x: ((x * 2).sum(-1), (x > 0).sum(-1) + 0))
    x = torch.randint(-9, 9, (4, 6))
    out, rep = run(m, x, tol=dict(rtol=0, atol=0))
    assert out[0].dtype == torch.int64 and out[1].dtype == torch.int64
    assert len(generated(rep, "reduction")) == 2, str(rep)
def test_reduction_with_epilogue_broadcast():
    m = Fn(lambda s, x: x - x.mean(-1, keepdim=True) * 0.5 + x.amax(-1, keepdim=True))
    _, rep = run(m, torch.randn(4, 9))
    assert generated(rep, "reduction") and not rep.fallbacks, str(rep)


def test_reduction_over_non_last_dim_falls_back():
    m = Fn(lambda s, x: x.sum(0) * 2)
    _, rep = run(m, torch.randn(4, 6))
    ext = [k for k in rep.fallbacks if "sum" in k.label]
    assert len(ext) == 1, str(rep)
    assert ext[0].kind == "extern"
    assert rep.refusal_of(ext[0].nodes[0]).code == "not-last-dim", rep.refusals
    assert str(rep.refusal_of(ext[0].nodes[0])) in ext[0].reason and ext[0].reason in str(rep)
    assert generated(rep, "pointwise"), str(rep)  # the * 2 still becomes a kernel


def test_reduction_over_middle_dim():
    m = Fn(lambda s, x: x.mean(1) + 1)
    _, rep = run(m, torch.randn(2, 5, 3))
    assert any(k.kind == "extern" and "mean" in k.label for k in rep.fallbacks), str(rep)


# ------------------------------------------------------------------ graph shape

def test_reduction_with_prologue_and_epilogue():
    m = Fn(lambda s, x: (x * 2) - (x * 2).mean(-1, keepdim=True) * 0.5 + (x * 2).amax(-1, keepdim=True))
    _, rep = run(m, torch.randn(4, 9))
    assert len(generated(rep, "reduction")) == 1, str(rep)


def test_multiple_outputs():
    m = Fn(lambda s, x: (x + 1, torch.softmax(x * 2, -1), (x * 3).sum(-1)))
    out, rep = run(m, torch.randn(3, 4))
    assert isinstance(out, tuple) and len(out) == 3
    assert {k.label for k in rep.generated} >= {"softmax", "elementwise"}, str(rep)


def test_output_does_not_alias_input():
    m = Fn(lambda s, x: x * 1.0 + 0.0)
    x = torch.randn(3, 4)
    compiled = turbofx.compile(m, (x,))
    out = compiled(x)
    assert out.data_ptr() != x.data_ptr()
    before = x.clone()
    out.add_(1)
    assert torch.equal(x, before)


def test_repeated_calls_with_new_data():
    m = Fn(lambda s, x: torch.softmax(x * 3, -1) * x)
    compiled = turbofx.compile(m, (torch.randn(2, 5),))
    for _ in range(3):
        x = torch.randn(2, 5)
        torch.testing.assert_close(compiled(x), torch.softmax(x * 3, -1) * x, **FP32)


def test_dynamic_pointwise_and_reduction():
    m = Fn(lambda s, x: torch.softmax(x * 2, -1) + 1)
    compiled = turbofx.compile(m, (torch.randn(3, 5),), dynamic=True)
    for shape in [(3, 5), (2, 9), (7, 3)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), torch.softmax(x * 2, -1) + 1, **FP32)


# ------------------------------------------------------------------ dumps

def test_dump_dir_writes_stages_and_kernels(tmp_path):
    def f(s, x):
        return torch.softmax(x * 2, -1) + 1

    d = tmp_path / "dump"
    compiled = turbofx.compile(Fn(f), (torch.randn(3, 5),), dump_dir=str(d))
    rep = turbofx.explain(compiled)
    stages = sorted(p.name for p in d.glob("*.py"))
    # 00_captured, then one file per pass, in the order (and with the names) of the pass records
    expected = ["00_captured.py"] + [f"{i:02d}_{p.name}.py" for i, p in enumerate(rep.passes, 1)]
    assert stages == expected, stages
    assert {"canonicalize", "fusion"} <= {p.name for p in rep.passes}
    for name in stages:
        text = (d / name).read_text()
        assert "aten" in text and "def forward" in text, name
    kernels = sorted(p.stem for p in (d / "kernels").glob("*.py"))
    assert kernels == sorted({k.name for k in rep.generated}), (kernels, rep.generated)
    for k in kernels:
        src = (d / "kernels" / f"{k}.py").read_text()
        assert "@triton.jit" in src and f"def {k}(" in src
    x = torch.randn(3, 5)
    torch.testing.assert_close(compiled(x), f(None, x), **FP32)


def test_turbofx_dump_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOFX_DUMP", str(tmp_path))
    compiled = turbofx.compile(Fn(lambda s, x: x * 3 + 1), (torch.randn(4),))
    assert (tmp_path / "00_captured.py").is_file() and len(list(tmp_path.glob("02_*.py"))) == 1
    names = {k.name for k in turbofx.explain(compiled).generated}
    assert names and {p.stem for p in (tmp_path / "kernels").glob("*.py")} == names


def test_kernel_cache_dir_is_used(turbofx_cache_dir):
    compiled = turbofx.compile(Fn(lambda s, x: x * 7 - 2), (torch.randn(4),))
    names = {k.name for k in turbofx.explain(compiled).generated}
    cached = os.listdir(os.path.join(turbofx_cache_dir, "kernels"))
    assert all(any(f.startswith(n + "_") for f in cached) for n in names), (names, cached)
