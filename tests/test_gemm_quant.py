"""Quantized B in the GEMM family (``GemmSpec.weight``): every storage, both batch regimes.

Numerics as tests/test_gemm.py: max |out - ref| <= 2 * max |torch_out - ref| + one ulp of max
|ref|, where ref dequantizes (and, for ``act``, quantizes A) in fp64 and torch_out is
``gemm_reference`` in the spec's dtypes (dequantized in fp32 and rounded, as the kernels do).
Shapes are ragged (N, K not multiples of any block; odd K for packed uint4). Tensors are made on the
CPU (seeded) and moved to ``DEVICE``: the GPU on a GPU machine (scripts/gpu_check.sh runs this file
there), else the CPU interpreter; ``gemm`` takes its target from the tensors' device.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import turbofx  # noqa: F401  (turns on the interpreter before triton is imported)
from turbofx.codegen.gemm import (GemmConfig, GemmInputError, GemmSpec, RmsNorm, WeightQuant, dequantize_weight, gemm,
                                  gemm_reference, label, quant_refusal, quantize_rows, render)
from turbofx.codegen.target import Target
from tests.helpers import kernel_device

DEVICE = kernel_device()

INT8 = WeightQuant("int8")
INT8_G = WeightQuant("int8", 32)  # GGUF Q8_0
U4_MIN = WeightQuant("uint4", 32, has_min=True)  # GGUF Q4_1, Int4WeightOnly
U4_ZERO = WeightQuant("uint4", 16, zero=8)  # GGUF Q4_0 (smaller groups: several per K tile)
W8A8 = WeightQuant("int8", act="int8")
FP8 = WeightQuant("fp8_e4m3")
FP8_DYN = WeightQuant("fp8_e4m3", act="fp8_e4m3")


def _stored(fmt: WeightQuant, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if fmt.storage == "uint4":
        q = torch.randint(0, 256, fmt.q_shape(n, k), dtype=torch.uint8, generator=g)
    elif fmt.storage == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    else:
        q = (torch.randn(n, k, generator=g) * 40).to(fmt.dtype)
    scale = torch.rand(fmt.scale_shape(n, k), generator=g) * 0.02 + 1e-3
    mins = torch.randn(fmt.scale_shape(n, k), generator=g) * 0.05 if fmt.has_min else None
    return q.to(DEVICE), scale.to(DEVICE), None if mins is None else mins.to(DEVICE)


def _ideal(spec: GemmSpec) -> GemmSpec:
    norm = spec.norm and replace(spec.norm, mid_dtype=None, out_dtype=None)
    return replace(spec, dtype=torch.float64, a_dtype=spec.a_type, out_dtype=None, norm=norm, eager_rounding=False)


def _check(fmt, m, dtype, n=38, k=75, config=None, **fields):
    q, scale, mins = _stored(fmt, n, k)
    spec = GemmSpec(dtype, b_dtype=fmt.dtype, weight=fmt, **fields)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).to(DEVICE, spec.a_type)
    n_out = n // 2 if spec.swiglu else n
    extra = {}
    if spec.has_bias:
        extra["bias"] = torch.randn(n, generator=g).to(DEVICE, dtype)
    if spec.residual:
        extra["residual"] = torch.randn(m, n_out, generator=g).to(DEVICE, dtype)
    if spec.norm is not None:
        extra["norm_weight"] = torch.randn(k, generator=g).to(DEVICE, dtype)
    out = gemm(a, q, spec, config=config, b_scale=scale, b_min=mins, **extra)
    wide = {name: t.double() for name, t in extra.items()}
    ideal = _ideal(spec)
    ref = gemm_reference(a if ideal.a_type != torch.float64 else a.double(), q, ideal, b_scale=scale.double(),
                         b_min=None if mins is None else mins.double(), **wide)
    torch_out = gemm_reference(a, q, spec, b_scale=scale, b_min=mins, **extra)
    assert out.dtype == spec.out_type and out.shape == ref.shape == (m, n_out)
    err = (out.double() - ref.double()).abs().max().item()
    torch_err = (torch_out.double() - ref.double()).abs().max().item()
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + floor, (err, torch_err, floor)
    return out


_SPLIT = GemmConfig("gemv", 16, 16, 16, split_k=3, num_warps=1, num_stages=1)  # K over 3 programs + reduce
_TILED = GemmConfig("tiled", 16, 16, 32, num_warps=1, num_stages=1)  # several K tiles in the tiled kernel
CASES = [  # (format, M, dtype, config, spec fields)
    (INT8, 1, torch.float32, None, {}),
    (INT8, 9, torch.bfloat16, _SPLIT, dict(has_bias=True, bias_in_matmul=True, eager_rounding=True)),
    (INT8, 40, torch.float16, _TILED, dict(swiglu=True, activation="silu")),
    (INT8_G, 3, torch.float16, None, dict(residual=True)),
    (INT8_G, 33, torch.float32, None, dict(has_bias=True)),
    (WeightQuant("int8", 24), 3, torch.float32, None, {}),  # groups that do not tile K: per-element scales
    (U4_MIN, 1, torch.float32, _SPLIT, dict(swiglu=True, activation="silu", residual=True)),
    (U4_MIN, 17, torch.bfloat16, _TILED, dict(eager_rounding=True)),
    (U4_MIN, 4, torch.float16, None, dict(norm=RmsNorm(1e-5, torch.float16, torch.float16))),
    (U4_ZERO, 2, torch.float16, None, dict(activation="gelu_tanh")),
    (U4_ZERO, 40, torch.float32, None, dict(norm=RmsNorm(1e-6), residual=True)),
    (W8A8, 1, torch.float32, None, {}),
    (W8A8, 9, torch.float16, _SPLIT, dict(swiglu=True, activation="silu")),
    (W8A8, 40, torch.bfloat16, _TILED, dict(has_bias=True, residual=True, eager_rounding=True)),
    (FP8, 3, torch.bfloat16, None, dict(has_bias=True)),
    (FP8, 40, torch.float32, _TILED, {}),
    (WeightQuant("fp8_e4m3", 32), 3, torch.bfloat16, None, dict(residual=True)),  # fp8 with group scales
    (FP8_DYN, 1, torch.float16, None, dict(residual=True)),
    (FP8_DYN, 33, torch.float32, _TILED, dict(swiglu=True, activation="silu")),
]


@pytest.mark.parametrize("fmt, m, dtype, config, fields", CASES,
                         ids=[f"{label(GemmSpec(d, b_dtype=f.dtype, weight=f))}-m{m}-{str(d)[6:]}"
                              for f, m, d, _, _ in CASES])
def test_quantized_gemm_matches_fp64_dequantized_reference(fmt, m, dtype, config, fields):
    _check(fmt, m, dtype, config=config, **fields)


def test_odd_k_packed_int4_and_partial_last_group():
    # K=41: 21 bytes per row (the last high nibble unused), 3 groups of 16 with the last 9 wide
    _check(U4_ZERO, 5, torch.float32, n=20, k=41)
    _check(U4_MIN, 20, torch.float32, n=20, k=41, config=GemmConfig("tiled", 16, 16, 16, num_warps=1, num_stages=1))


def test_dequantize_weight_formula():
    q = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # k: 1, 2, 0, 15
    fmt = WeightQuant("uint4", 2, zero=8, has_min=True)
    w = dequantize_weight(q, fmt, torch.tensor([[2.0, 0.5]]), torch.tensor([[1.0, -1.0]]), k=4, dtype=torch.float64)
    assert w.tolist() == [[(1 - 8) * 2 + 1, (2 - 8) * 2 + 1, (0 - 8) * 0.5 - 1, (15 - 8) * 0.5 - 1]]


def test_activation_quantization_rounds_half_away_and_keeps_zero_rows():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -63.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x, "int8", torch.float64)
    assert scale.tolist() == [1.0, 1.0]
    assert q.tolist() == [[127, 1, -1, 2, -64], [0, 0, 0, 0, 0]]


def test_all_zero_activation_row_gives_zero_not_nan():
    q, scale, _ = _stored(W8A8, 8, 32)
    a = torch.zeros(3, 32, device=DEVICE)
    a[1] = torch.randn(32, device=DEVICE)
    out = gemm(a, q, GemmSpec(torch.float32, b_dtype=torch.int8, weight=W8A8), b_scale=scale)
    assert out[0].eq(0).all() and out[2].eq(0).all() and out[1].ne(0).any()


@pytest.mark.parametrize("fmt", [INT8, U4_MIN, W8A8, FP8_DYN])
def test_kernel_source_is_one_per_format(fmt):
    src = render(GemmSpec(torch.float16, b_dtype=fmt.dtype, weight=fmt))
    assert "_load_b_nk" in src and "_load_b_kn" in src
    assert ("// 2" in src) == (fmt.storage == "uint4")  # packed nibbles are addressed by byte
    assert ("rows[:, None]" in src.split("def _scale_acc")[1].split("return acc")[0]) == (fmt.act is not None)


def test_fp8_refused_on_targets_without_fp8():
    for arch, ok in (("sm80", False), ("sm86", False), ("sm89", True), ("sm90", True), ("sm100", True)):
        t = Target(device=None, backend="cuda", arch=arch, warp_size=32, sm_count=100)
        assert (quant_refusal(FP8, t) is None) == ok, arch
    assert quant_refusal(INT8, Target(device=None, backend="cuda", arch="sm80", warp_size=32, sm_count=100)) is None
    mi300 = Target(device=None, backend="hip", arch="gfx942", warp_size=64, sm_count=304)
    assert quant_refusal(FP8, mi300).code == "fp8-target"
    assert quant_refusal(WeightQuant("fp8_e4m3fnuz"), mi300) is None


def test_bad_quantized_operands_are_clear_errors():
    q, scale, mins = _stored(U4_MIN, 8, 64)
    spec = GemmSpec(torch.float32, b_dtype=torch.uint8, weight=U4_MIN)
    a = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(GemmInputError, match="b_min"):
        gemm(a, q, spec, b_scale=scale)
    with pytest.raises(GemmInputError, match="shape"):
        gemm(a, q[:, :-1], spec, b_scale=scale, b_min=mins)
    with pytest.raises(GemmInputError, match="b_scale has shape"):
        gemm(a, q, spec, b_scale=scale[:, :1], b_min=mins)
    with pytest.raises(GemmInputError, match="b_dtype"):
        GemmSpec(torch.float32, weight=U4_MIN)
    with pytest.raises(GemmInputError, match="quantized storage"):
        GemmSpec(torch.float32, b_dtype=torch.int8)
    with pytest.raises(GemmInputError, match="group_size"):
        WeightQuant("int8", has_min=True)
    with pytest.raises(GemmInputError, match="act"):
        WeightQuant("uint4", 32, act="int8")
    with pytest.raises(GemmInputError, match="norm"):
        GemmSpec(torch.float32, b_dtype=torch.int8, weight=W8A8, norm=RmsNorm(1e-5))
    with pytest.raises(GemmInputError, match="not quantized"):
        gemm(a, torch.randn(8, 64, device=DEVICE), GemmSpec(torch.float32), b_scale=scale)
