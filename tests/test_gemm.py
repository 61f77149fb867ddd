"""GEMM kernel family (turbofx/codegen/gemm.py): both regimes, every fused prologue/epilogue.

Numerics: max |out - ref| <= 2 * max |torch_out - ref| + one ulp of max |ref|, where ref is the
fp64 computation and torch_out the same computation done by PyTorch op by op in the test dtype.
Shapes are small with ragged tails (N, K not multiples of any block) so the interpreter is quick.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import turbofx  # noqa: F401  (turns on the interpreter before triton is imported)
from turbofx.codegen.gemm import (CONFIGS, GemmConfig, GemmInputError, GemmSpec, Refusal, RmsNorm, config_for,
                                  epilogue_ops, fold_rmsnorm_weight, gemm, gemm_reference, gemm_refusal,
                                  prologue_ops, render, rmsnorm_row_scale, shared_estimate, shared_limit, AddBias,
                                  AddResidual, CastOperand, GatedActivation, NormRows, Round, RowScale, Store)
from turbofx.errors import GemmInputError as GemmInputErrorFromErrors
from turbofx.codegen.target import Target

ACT = {"silu": F.silu, "relu": torch.relu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def _compose(spec: GemmSpec, a, b, bias, residual, rs, dtype):
    """The matmul and its epilogue op by op in ``dtype`` (each op rounds, as eager does)."""
    A = a.to(spec.dtype).to(dtype)
    B = b.to(spec.dtype).to(dtype)
    if spec.b_layout == "nk":
        B = B.transpose(-1, -2)
    acc = A @ B
    if rs is not None:
        acc = acc * rs.to(dtype)[..., None]
    if bias is not None:
        acc = acc + bias.to(dtype)
    if spec.swiglu:
        gate, up = acc.chunk(2, dim=-1)
        acc = ACT[spec.activation](gate) * up
    elif spec.activation:
        acc = ACT[spec.activation](acc)
    if residual is not None:
        acc = acc + residual.to(dtype)
    return acc


def _assert_rule(out, ref, torch_out):
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    floor = torch.finfo(out.dtype).eps * ref.abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + floor, (err, torch_err, floor)


def _check(spec, a, b, bias=None, residual=None, rs=None, config=None):
    out = gemm(a, b, spec, bias=bias, residual=residual, row_scale=rs, config=config)
    ref = _compose(spec, a, b, bias, residual, rs, torch.float64)
    torch_out = _compose(spec, a, b, bias, residual, rs, spec.dtype).to(spec.out_type)
    assert out.dtype == spec.out_type and out.shape == ref.shape
    _assert_rule(out, ref, torch_out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 128])
def test_plain_matmul_every_regime(dtype, m):
    # M <= 4: FMA GEMV; 5..16: tl.dot GEMV; more: tiled GEMM. N=50, K=70: ragged everywhere.
    _check(GemmSpec(dtype), _rand(m, 70, dtype=dtype), _rand(50, 70, dtype=dtype))


@pytest.mark.parametrize("m", [2, 33])
def test_mm_layout_kn(m):
    _check(GemmSpec(torch.float16, b_layout="kn"), _rand(m, 45, dtype=torch.float16),
           _rand(45, 61, dtype=torch.float16))


# (spec fields, M): each epilogue, spread over both regimes and both dtypes
EPILOGUES = [
    (dict(has_bias=True), 1),
    (dict(has_bias=True), 17),
    (dict(activation="relu"), 3),
    (dict(activation="silu"), 128),
    (dict(activation="gelu_tanh", has_bias=True), 16),
    (dict(residual=True), 1),
    (dict(has_bias=True, activation="gelu_tanh", residual=True), 40),
    (dict(out_dtype=torch.float32), 17),  # output cast: fp16 matmul, fp32 out
    (dict(a_dtype=torch.float32), 3),  # prologue cast: fp32 activations rounded to fp16 on load
    (dict(a_dtype=torch.float32, out_dtype=torch.float32, has_bias=True), 64),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("fields, m", EPILOGUES)
def test_epilogue(fields, m, dtype):
    spec = GemmSpec(dtype, **fields)
    if spec.dtype == torch.float32 and fields.get("a_dtype") == torch.float32:
        spec = GemmSpec(torch.float16, **fields)  # a cast needs a narrower matmul dtype
    n, k = 56, 72
    a = _rand(m, k, dtype=spec.a_type)
    b = _rand(n, k, dtype=spec.b_type, scale=k ** -0.5)
    bias = _rand(n, dtype=spec.dtype) if spec.has_bias else None
    res = _rand(m, n, dtype=spec.out_type) if spec.residual else None
    _check(spec, a, b, bias, res)


@pytest.mark.parametrize("m, dtype", [(1, torch.float16), (16, torch.float32), (17, torch.float16),
                                      (128, torch.float32)])
def test_swiglu_from_concatenated_weight(m, dtype):
    n_out, k = 40, 66
    spec = GemmSpec(dtype, swiglu=True, activation="silu", has_bias=True)
    b = torch.cat([_rand(n_out, k, scale=k ** -0.5), _rand(n_out, k, scale=k ** -0.5)]).to(dtype)  # [gate; up]
    out = _check(spec, _rand(m, k, dtype=dtype), b, _rand(2 * n_out, dtype=dtype))
    assert out.shape == (m, n_out)
    assert GatedActivation("silu") in epilogue_ops(spec)


def _rmsnorm(x, g, eps, dtype):
    """HF's RMSNorm in ``dtype``: fp32 statistics, normalised row rounded, then times the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return g.to(dtype) * h.to(dtype)


@pytest.mark.parametrize("m, dtype", [(3, torch.float16), (128, torch.float16), (17, torch.float32)])
def test_rmsnorm_folded_into_weight_equals_norm_then_linear(m, dtype):
    k, n, eps = 64, 48, 1e-6
    x = _rand(m, k, dtype=dtype, scale=3.0)
    g = (1 + 0.3 * torch.randn(k)).to(dtype)
    w = _rand(n, k, dtype=dtype, scale=k ** -0.5)
    bias = _rand(n, dtype=dtype)
    spec = GemmSpec(dtype, row_scale=True, has_bias=True)
    assert epilogue_ops(spec)[:2] == (RowScale(), AddBias())  # the scale belongs to the product
    out = gemm(x, fold_rmsnorm_weight(w, g), spec, bias=bias, row_scale=rmsnorm_row_scale(x, eps))
    ref = F.linear(_rmsnorm(x.double(), g.double(), eps, torch.float64), w.double(), bias.double())
    torch_out = F.linear(_rmsnorm(x, g, eps, dtype), w, bias)
    _assert_rule(out, ref, torch_out)


@pytest.mark.parametrize("m", [1, 17])
def test_bmm_with_residual(m):
    spec = GemmSpec(torch.float16, b_layout="kn", batched=True, residual=True)
    a, b = _rand(3, m, 40, dtype=torch.float16), _rand(3, 40, 36, dtype=torch.float16)
    _check(spec, a, b, residual=_rand(3, m, 36, dtype=torch.float16))


@pytest.mark.parametrize("m, fields", [(1, dict(has_bias=True)), (3, dict(swiglu=True, activation="silu",
                                                                            has_bias=True, row_scale=True)),
                                       (12, dict(residual=True, activation="relu"))])
def test_split_k_two_pass_is_right_and_deterministic(m, fields):
    # K=150 over 16-wide tiles: 10 tiles in 3 chunks (4, 4, 2); the reduce pass runs the epilogue
    dtype = torch.float32
    spec = GemmSpec(dtype, **fields)
    n, k = 64 if spec.swiglu else 37, 150
    cfg = GemmConfig("gemv", 16 if m > 4 else 4, 16, 16, split_k=3, num_warps=1, num_stages=1)
    a, b = _rand(m, k), _rand(n, k, scale=k ** -0.5)
    bias = _rand(n) if spec.has_bias else None
    res = _rand(m, n) if spec.residual else None
    rs = torch.rand(m) + 0.5 if spec.row_scale else None
    out = _check(spec, a, b, bias, res, rs, config=cfg)
    again = gemm(a, b, spec, bias=bias, residual=res, row_scale=rs, config=cfg)
    assert torch.equal(out, again)


def test_grouped_tile_order_with_ragged_groups():
    # 9 row tiles in groups of 4 (last group of 1), 3 column tiles: every tile written exactly once
    cfg = GemmConfig("tiled", 16, 16, 32, GROUP_M=4, num_warps=1, num_stages=1)
    _check(GemmSpec(torch.float32, has_bias=True), _rand(130, 40), _rand(45, 40), _rand(45), config=cfg)


def test_tiled_kernel_for_few_rows_and_gemv_dot_for_one_row():
    spec = GemmSpec(torch.float16)
    a, b = _rand(3, 50, dtype=torch.float16), _rand(30, 50, dtype=torch.float16)
    _check(spec, a, b, config=GemmConfig("tiled", 16, 32, 16, num_warps=1, num_stages=1))
    _check(spec, a[:1], b, config=GemmConfig("gemv", 16, 32, 16, num_warps=1, num_stages=1))


def test_bf16_in_the_interpreter_upcasts_dot_operands():
    # the interpreter computes bf16 tl.dot wrongly; the launcher upcasts there
    spec = GemmSpec(torch.bfloat16, has_bias=True)
    _check(spec, _rand(20, 48, dtype=torch.bfloat16), _rand(24, 48, dtype=torch.bfloat16),
           _rand(24, dtype=torch.bfloat16))


def test_any_strides_and_given_out():
    base = _rand(70, 5)
    a = base.t()  # [5, 70] column-major
    w = _rand(70, 33).t()  # [33, 70] column-major weight
    out = torch.full((33, 5), float("nan")).t()  # [5, 33] with strides (1, 5)
    got = gemm(a, w, GemmSpec(torch.float32), out=out)
    assert got is out
    ref = a.double() @ w.double().t()
    _assert_rule(out, ref, a @ w.t())


def test_empty_and_k_zero():
    spec = GemmSpec(torch.float32, has_bias=True)
    bias = _rand(7)
    out = gemm(torch.empty(4, 0), torch.empty(7, 0), spec, bias=bias)  # K = 0: just the bias
    assert torch.equal(out, bias.expand(4, 7))
    assert gemm(torch.empty(0, 5), _rand(7, 5), spec, bias=bias).shape == (0, 7)
    assert gemm(_rand(3, 5), torch.empty(0, 5), GemmSpec(torch.float32)).shape == (3, 0)


@pytest.mark.parametrize("m", [2, 20])
def test_nan_and_inf_stay_in_their_rows(m):
    a, b = _rand(m, 30), _rand(9, 30)
    a[1, 3] = float("nan")
    a[0, 4] = float("inf")
    out = gemm(a, b, GemmSpec(torch.float32, activation="relu"))
    eager = torch.relu(a @ b.t())
    assert torch.equal(torch.isnan(out), torch.isnan(eager))
    assert torch.equal(torch.isinf(out), torch.isinf(eager))
    fin = torch.isfinite(eager)
    torch.testing.assert_close(out[fin], eager[fin])


# ------------------------------------------------------------------- RMSNorm prologue, eager rounding


def _ideal(spec: GemmSpec) -> GemmSpec:
    """The spec computed exactly: float64 throughout, no intermediate rounding."""
    norm = spec.norm and replace(spec.norm, mid_dtype=None, out_dtype=None)
    return replace(spec, dtype=torch.float64, a_dtype=None, b_dtype=None, out_dtype=None, norm=norm,
                   eager_rounding=False)


def _check_against_reference(spec, a, b, bias=None, residual=None, norm_weight=None, config=None):
    """gemm vs float64 within twice gemm_reference's own error (the reference in spec's dtypes is what
    eager torch computes)."""
    out = gemm(a, b, spec, bias=bias, residual=residual, config=config, norm_weight=norm_weight)
    wide = [t if t is None else t.double() for t in (a, b, bias, residual, norm_weight)]
    ref = gemm_reference(*wide[:2], _ideal(spec), bias=wide[2], residual=wide[3], norm_weight=wide[4])
    torch_out = gemm_reference(a, b, spec, bias=bias, residual=residual, norm_weight=norm_weight)
    assert out.dtype == torch_out.dtype == spec.out_type and out.shape == torch_out.shape == ref.shape
    _assert_rule(out, ref, torch_out)
    return out


_F16, _F32, _BF16 = torch.float16, torch.float32, torch.bfloat16
_SWIGLU = dict(swiglu=True, activation="silu")
# (M, dtype, spec fields, forced config): every regime; small forced blocks give several K tiles
# (K=70 over 16: a ragged last tile) in the norm's pre-pass and in the main loop
NORM_CASES = [
    (1, _F16, dict(has_bias=True), None),  # FMA GEMV, one K tile
    (3, _F32, dict(_SWIGLU, has_bias=True), GemmConfig("gemv", 4, 16, 16, split_k=3, num_warps=1, num_stages=1)),
    (3, _F16, dict(a_dtype=_F32, residual=True), None),  # fp32 activations, fp16 matmul
    (16, _F16, dict(residual=True), GemmConfig("gemv", 16, 16, 16, split_k=3, num_warps=1, num_stages=1)),
    (17, _F32, dict(_SWIGLU), GemmConfig("tiled", 16, 16, 16, num_warps=1, num_stages=1)),
    (128, _F16, dict(_SWIGLU, residual=True, has_bias=True), None),
    (128, _F32, dict(activation="gelu_tanh"), GemmConfig("tiled", 32, 32, 16, num_warps=1, num_stages=1)),
    (17, _BF16, dict(_SWIGLU, residual=True, eager_rounding=True), None),
    (1, _F16, dict(has_bias=True, bias_in_matmul=True, eager_rounding=True), None),
    (16, _F16, dict(_SWIGLU, has_bias=True, residual=True, eager_rounding=True),
     GemmConfig("gemv", 16, 16, 16, split_k=2, num_warps=1, num_stages=1)),
]


@pytest.mark.parametrize("m, dtype, fields, config", NORM_CASES)
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_rmsnorm_prologue(m, dtype, fields, config, style):
    n_out, k = 50, 70
    model = fields.get("a_dtype", dtype)  # the dtype the norm runs in
    norm = (RmsNorm(1e-6, mid_dtype=model, out_dtype=model) if style == "llama"
            else RmsNorm(1e-6, out_dtype=model, weight_offset=1.0))
    spec = GemmSpec(dtype, norm=norm, **fields)
    n = 2 * n_out if spec.swiglu else n_out
    a = _rand(m, k, dtype=spec.a_type, scale=3.0)
    g = (0.3 * torch.randn(k) + (0.0 if style == "gemma" else 1.0)).to(model)
    b = _rand(n, k, dtype=dtype, scale=k ** -0.5)
    bias = _rand(n, dtype=dtype) if spec.has_bias else None
    res = _rand(m, n_out, dtype=dtype) if spec.residual else None
    out = _check_against_reference(spec, a, b, bias, res, g, config)
    assert out.shape == (m, n_out)


def test_rmsnorm_prologue_batched_kn():
    spec = GemmSpec(_F16, b_layout="kn", batched=True, norm=RmsNorm(1e-5, _F16, _F16))
    a, b = _rand(2, 5, 40, dtype=_F16), _rand(2, 40, 24, dtype=_F16, scale=0.2)
    _check_against_reference(spec, a, b, norm_weight=_rand(40, dtype=_F32))  # an fp32 norm weight


def test_rmsnorm_prologue_nan_stays_in_its_row_and_k_zero():
    # eps=0: an all-zero row is 0 * inf = NaN in eager; the rows past M (masked) stay finite
    spec = GemmSpec(_F32, norm=RmsNorm(0.0))
    a, b, g = _rand(3, 20), _rand(9, 20), _rand(20)
    a[1] = 0.0
    out = gemm(a, b, spec, norm_weight=g)
    eager = gemm_reference(a, b, spec, norm_weight=g)
    assert torch.isnan(out[1]).all() and torch.isnan(eager[1]).all()
    torch.testing.assert_close(out[[0, 2]], eager[[0, 2]])
    # K = 0: eager normalises empty rows (nothing) and multiplies by nothing: just the bias
    spec = GemmSpec(_F32, norm=RmsNorm(1e-6), has_bias=True)
    bias = _rand(7)
    for m in (2, 20):
        args = (torch.empty(m, 0), torch.empty(7, 0), spec)
        assert torch.equal(gemm(*args, bias=bias, norm_weight=torch.empty(0)), bias.expand(m, 7))
        assert torch.equal(gemm_reference(*args, bias=bias, norm_weight=torch.empty(0)), bias.expand(m, 7))


@pytest.mark.parametrize("m", [1, 17])
def test_eager_rounding_rounds_the_matmul_output(m):
    # acc = 1 + 2^-11 is a tie in fp16 (rounds to 1), so acc - 1 is 0 rounded, 2^-11 in fp32
    a = torch.ones(m, 2, dtype=_F16)
    b = torch.tensor([[1.0, 2.0 ** -11]], dtype=_F16)
    res = torch.full((m, 1), -1.0, dtype=_F16)
    for eager, want in ((True, 0.0), (False, 2.0 ** -11)):
        spec = GemmSpec(_F16, residual=True, eager_rounding=eager)
        assert torch.equal(gemm(a, b, spec, residual=res), torch.full((m, 1), want, dtype=_F16))
    assert torch.equal(gemm_reference(a, b, GemmSpec(_F16, residual=True, eager_rounding=True), residual=res),
                       torch.zeros(m, 1, dtype=_F16))


def test_norm_and_rounding_ops_are_data():
    bf = _BF16
    spec = GemmSpec(bf, norm=RmsNorm(1e-6, bf, bf), has_bias=True, residual=True, eager_rounding=True, **_SWIGLU)
    assert prologue_ops(spec) == (NormRows(1e-6, bf, bf, 0.0), CastOperand("a", bf))
    assert epilogue_ops(spec) == (Round(bf), AddBias(), Round(bf), GatedActivation("silu", bf), Round(bf),
                                  AddResidual(), Round(bf), Store(bf))
    assert epilogue_ops(replace(spec, bias_in_matmul=True))[:2] == (AddBias(), Round(bf))
    assert not any(isinstance(op, Round) for op in epilogue_ops(replace(spec, dtype=_F32)))  # fp32: nothing to do
    assert "_prologue_a_rows" in render(spec) and render(spec) != render(replace(spec, eager_rounding=False))


class _LlamaRMSNorm(torch.nn.Module):
    """Hugging Face's LlamaRMSNorm, as written there."""

    def __init__(self, k, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(k))
        self.eps = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class _GemmaRMSNorm(_LlamaRMSNorm):
    """Gemma's: (1 + weight) in fp32, one rounding at the end."""

    def forward(self, x):
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def _ulps(x, y):
    """Elementwise distance in units in the last place of two fp16/bf16 tensors."""
    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -(i & 0x7FFF))
    return (ordered(x) - ordered(y)).abs()


@pytest.mark.parametrize("dtype", [_BF16, _F16])
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_reference_is_eager_norm_then_linear(dtype, style):
    # gemm_reference with eager rounding vs an eager decoder's norm + q projection (nn.Linear with
    # bias: addmm) and norm + SwiGLU MLP's gate/up (separate Linears) + residual
    k, n, m, eps = 96, 40, 9, 1e-6
    norm = (_LlamaRMSNorm if style == "llama" else _GemmaRMSNorm)(k, eps).to(dtype)
    spec_norm = RmsNorm(eps, dtype, dtype) if style == "llama" else RmsNorm(eps, None, dtype, 1.0)
    q, gate, up = (torch.nn.Linear(k, n, bias=bias).to(dtype) for bias in (True, False, False))
    x, res = _rand(m, k, dtype=dtype, scale=2.0), _rand(m, n, dtype=dtype)
    with torch.no_grad():
        h = norm(x)
        want_q = q(h)
        want_mlp = F.silu(gate(h)) * up(h) + res
        got_q = gemm_reference(x, q.weight, GemmSpec(dtype, norm=spec_norm, has_bias=True, bias_in_matmul=True,
                                                     eager_rounding=True), bias=q.bias, norm_weight=norm.weight)
        got_mlp = gemm_reference(x, torch.cat([gate.weight, up.weight]),
                                 GemmSpec(dtype, norm=spec_norm, residual=True, eager_rounding=True, **_SWIGLU),
                                 residual=res, norm_weight=norm.weight)
    assert got_q.dtype == got_mlp.dtype == dtype
    assert _ulps(got_q, want_q).max() <= 1 and _ulps(got_mlp, want_mlp).max() <= 1


def test_reference_on_meta_tensors():
    spec = GemmSpec(_BF16, norm=RmsNorm(1e-6, _BF16, _BF16), batched=True, has_bias=True, residual=True,
                    out_dtype=_F32, **_SWIGLU)
    meta = dict(device="meta")
    out = gemm_reference(torch.empty(2, 5, 16, dtype=_BF16, **meta), torch.empty(2, 12, 16, dtype=_BF16, **meta),
                         spec, bias=torch.empty(12, dtype=_BF16, **meta),
                         residual=torch.empty(2, 5, 6, dtype=_F32, **meta),
                         norm_weight=torch.empty(16, dtype=_BF16, **meta))
    assert out.device.type == "meta" and out.shape == (2, 5, 6) and out.dtype == _F32


# ---------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("call, words", [
    (lambda: gemm(_rand(3, 8), _rand(5, 9), GemmSpec(torch.float32)), "K=8"),
    (lambda: gemm(_rand(3, 8, dtype=torch.float16), _rand(5, 8), GemmSpec(torch.float32)), "spec says"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, has_bias=True)), "needs bias"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32), bias=_rand(5)), "has_bias"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, has_bias=True), bias=_rand(4)), "bias has shape"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, residual=True), residual=_rand(5, 3)),
     "residual has shape"),
    (lambda: gemm(_rand(2, 3, 8), _rand(5, 8), GemmSpec(torch.float32)), "2 dims"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8, dtype=torch.float16).to("meta"), GemmSpec(torch.float32,
                                                                                     b_dtype=torch.float16)), "device"),
    (lambda: gemm(torch.ones(3, 8, dtype=torch.int32), torch.ones(5, 8, dtype=torch.int32), GemmSpec(torch.int32)),
     "dtype"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, swiglu=True, activation="silu")), "even"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), "fp32"), "GemmSpec"),
    (lambda: gemm([[1.0]], _rand(5, 8), GemmSpec(torch.float32)), "torch.Tensor"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32), out=torch.empty(3, 5, dtype=torch.float16)),
     "out is"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32), out=torch.empty(5, 3)), "out has shape"),
    (lambda: gemm(_rand(20, 8), _rand(5, 8), GemmSpec(torch.float32), config=GemmConfig("gemv", 16, 16, 16)),
     "BLOCK_M"),
    (lambda: gemm(_rand(2, 3, 8), _rand(4, 8, 5), GemmSpec(torch.float32, b_layout="kn", batched=True)),
     "batch"),
    (lambda: GemmSpec(torch.float16, activation="tanh"), "activation"),
    (lambda: GemmSpec(torch.float16, swiglu=True), "activation='silu'"),
    (lambda: GemmSpec(torch.float16, b_layout="nn"), "b_layout"),
    (lambda: GemmSpec("float16"), "torch.dtype"),
    (lambda: gemm(_rand(3, 4), _rand(5, 4), GemmSpec(torch.float32, row_scale=True),
                  row_scale=torch.ones(3, dtype=torch.int64)), "row_scale is torch.int64"),
    (lambda: gemm(_rand(3, 4), _rand(5, 4), GemmSpec(torch.float32),
                  target=Target("cuda", "sm90", "cuda:0")), "cannot run on target"),
    (lambda: GemmConfig("tiled", 8, 16, 16), ">= 16"),
    (lambda: GemmConfig("gemv", 4, 24, 16), "power of two"),
    (lambda: fold_rmsnorm_weight(_rand(5, 8), _rand(5)), "share K"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, norm=RmsNorm(1e-6))), "needs norm_weight"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32), norm_weight=_rand(8)), "norm=RmsNorm"),
    (lambda: gemm(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, norm=RmsNorm(1e-6)), norm_weight=_rand(5)),
     r"norm_weight has shape \(5,\), expected \(8,\)"),
    (lambda: gemm_reference(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, norm=RmsNorm(1e-6)),
                            norm_weight=torch.ones(8, dtype=torch.int64)), "norm_weight is torch.int64"),
    (lambda: GemmSpec(torch.float16, norm=RmsNorm(1e-6), row_scale=True), "not both"),
    (lambda: GemmSpec(torch.float16, norm=1e-6), "RmsNorm"),
    (lambda: RmsNorm(-1.0), "eps"),
    (lambda: RmsNorm(float("nan")), "finite"),
    (lambda: RmsNorm(1e-6, mid_dtype=torch.int8), "mid_dtype"),
    (lambda: GemmSpec(torch.float16, has_bias=True, row_scale=True, bias_in_matmul=True), "row_scale"),
    (lambda: gemm_reference(_rand(3, 8), _rand(5, 8), GemmSpec(torch.float32, swiglu=True, activation="silu")),
     "even"),
])
def test_misuse_is_a_clear_error(call, words):
    with pytest.raises(GemmInputError, match=words):
        call()


def test_gemm_input_error_lives_in_errors():
    assert GemmInputError is GemmInputErrorFromErrors


def test_out_aliasing_an_input_is_refused():
    a = _rand(4, 4)
    with pytest.raises(GemmInputError, match="shares memory"):
        gemm(a, _rand(4, 4), GemmSpec(torch.float32), out=a)


@pytest.mark.parametrize("m", [2, 20])
def test_out_may_be_the_residual_in_place(m):
    # x += linear(h): the epilogue reads each residual element before it writes that element
    x, h, w = _rand(m, 24), _rand(m, 30), _rand(24, 30)
    want = x + h @ w.t()
    cfg = GemmConfig("gemv", 16, 16, 16, split_k=2, num_warps=1, num_stages=1) if m <= 16 else None
    got = gemm(h, w, GemmSpec(torch.float32, residual=True), residual=x, out=x, config=cfg)
    assert got is x
    torch.testing.assert_close(x, want)


def test_refusals_are_data():
    assert gemm_refusal(GemmSpec(torch.float16)) is None
    r = gemm_refusal(GemmSpec(torch.int8))
    assert isinstance(r, Refusal) and r.code == "dtype"
    assert gemm_refusal(GemmSpec(torch.float64)).code == "dtype"
    gathered = _rand(8, 16)[::2, ::2]  # strides (32, 2): neither row- nor column-major
    assert gemm_refusal(GemmSpec(torch.float32), gathered, _rand(4, 8)).code == "strides"
    assert gemm_refusal(GemmSpec(torch.float32, batched=True, b_layout="kn"), _rand(2, 3, 4),
                        _rand(1, 4, 5)).code == "batch-broadcast"
    with pytest.raises(GemmInputError, match="strides"):
        gemm(gathered, _rand(4, 8), GemmSpec(torch.float32))


def test_epilogue_ops_are_ordered_data():
    spec = GemmSpec(torch.float16, has_bias=True, activation="silu", swiglu=True, row_scale=True,
                    out_dtype=torch.float32)
    ops = epilogue_ops(spec)
    assert ops[0] == RowScale() and ops[-1] == Store(torch.float32)


# ------------------------------------------------------------------------------- config table

ARCH_TARGETS = [Target("cuda", "sm80", "cuda:0", sm_count=108), Target("cuda", "sm90", "cuda:0", sm_count=132),
                Target("cuda", "sm100", "cuda:0", sm_count=148),
                Target("hip", "gfx942", "cuda:0", warp_size=64, sm_count=304)]


@pytest.mark.parametrize("target", ARCH_TARGETS, ids=lambda t: t.arch)
def test_config_table_fits_every_target(target):
    seen = set()
    for dtype in (torch.float16, torch.float32):
        for fields in (dict(), dict(swiglu=True, activation="silu")):
            spec = GemmSpec(dtype, **fields)
            for m in (1, 4, 5, 16, 17, 128, 129, 4096):
                for n, k in ((256, 256), (4096, 4096), (14336, 4096)):
                    cfg = config_for(target, spec, m, n, k)
                    seen.add(cfg.regime)
                    assert (cfg.regime == "gemv") == (m <= 16), (m, cfg)
                    assert shared_estimate(cfg, spec) <= shared_limit(target), (cfg, spec)
    assert seen == {"gemv", "tiled"}
    assert set(CONFIGS) >= {"sm80", "sm90", "sm100", "gfx942", "cpu"}


# ------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 128, 300])
@pytest.mark.parametrize("fields", [dict(), dict(has_bias=True, activation="gelu_tanh", residual=True),
                                    dict(swiglu=True, activation="silu", row_scale=True)])
def test_table_configs_on_gpu(dtype, m, fields):
    # the per-arch table's configs (split-K included) on real shapes with ragged tails
    spec = GemmSpec(dtype, **fields)
    n, k = (1000, 1500) if spec.swiglu else (1000, 1700)
    dev = "cuda"
    a = _rand(m, k, dtype=dtype).to(dev)
    b = _rand(n, k, dtype=dtype, scale=k ** -0.5).to(dev)
    n_out = n // 2 if spec.swiglu else n
    bias = _rand(n, dtype=dtype).to(dev) if spec.has_bias else None
    res = _rand(m, n_out, dtype=dtype).to(dev) if spec.residual else None
    rs = (torch.rand(m) + 0.5).to(dev) if spec.row_scale else None
    _check(spec, a, b, bias, res, rs)
