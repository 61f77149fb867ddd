"""GEMM kernel family: ``mm`` / ``addmm`` / ``bmm`` / ``linear`` as generated Triton kernels.

A ``GemmSpec`` says what one matmul computes: operand dtypes (a prologue casts each operand to the
matmul's dtype as it is loaded), B's layout (``"nk"``: [N, K] rows as ``nn.Linear`` stores weights,
``"kn"``: [K, N] as ``mm`` takes them), and what the epilogue applies to the fp32 accumulator: a
per-row scale (RMSNorm's 1/rms, with the norm's weight folded into B by ``fold_rmsnorm_weight``),
bias, an activation or a gated activation (SwiGLU: B holds [gate; up] along N), a residual add and
the cast to the output dtype. The prologue may also RMS-normalise A's rows (``RmsNorm``, HF
Llama's / Gemma's roundings): every program first sums its rows' squares over the whole K (no
partial statistics, so split-K needs nothing more), then normalises each A tile it loads. With
``eager_rounding`` the epilogue rounds to the matmul dtype after every step, as eager does op by op
(``bias_in_matmul``: addmm's bias rounds with the product, once). Prologue and epilogue are lists
of typed ops (``prologue_ops`` / ``epilogue_ops``); ``render`` turns them into Triton code around
fixed kernel bodies, and ``gemm_reference`` computes the same ops in torch (the eager reference,
meta tensors too). K = 0 with a norm gives what eager gives: the norm of an empty row is empty,
the product zeros (the kernels divide the sum of squares by max(K, 1) so no NaN is made).

Two regimes, chosen by M:

- GEMV / split-K (M <= ``GEMV_MAX_M``, decode): a program owns a BLOCK_N slice of outputs for all M
  rows, so each weight row is read once; K may be split over programs, each writing an fp32
  partial, and a second kernel sums the partials in a fixed order (deterministic, no atomics)
  and applies the epilogue. Up to 4 rows use FMA (a broadcast product summed over K), more use
  ``tl.dot`` with a 16-row tile.
- Tiled GEMM (prefill): ``tl.dot`` tiles in grouped order (GROUP_M row tiles share B tiles in L2),
  fp32 accumulation, the epilogue on the tile before it is stored.

Configs per target come from a table keyed by M / N·K buckets (``config_for``); ``gemm`` is the one
launcher that knows the kernels' arguments and grids. ``gemm_refusal`` says, as data, what the
family does not do, so lowering can keep those matmuls extern.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Union

import torch
import torch.fx as fx

from turbofx.codegen import family
from turbofx.codegen.ops import TL_DTYPE, _gelu, _sigmoid
from turbofx.codegen.target import Target, detect
from turbofx.errors import GemmInputError, TurbofxError  # noqa: F401  (GemmInputError re-exported: it lived here first)
from turbofx.refusal import Refusal
from turbofx.runtime import ops as _ops  # noqa: F401  (registers torch.ops.turbofx.*)

GEMM_OP = torch.ops.turbofx.gemm.default
GEMM = "tfx_gemm"
GEMV = "tfx_gemv"
REDUCE = "tfx_gemm_reduce"
GEMV_MAX_M = 16  # at most this many rows: the GEMV / split-K kernel
FMA_MAX_M = 4  # at most this many rows: GEMV by FMA (more rows: tl.dot on a 16-row tile)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("silu", "gelu_tanh", "relu")
# Shared memory one block may use (opt-in maximum), by arch; Target.shared_mem wins when known.
SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024,
                "sm100": 227 * 1024, "gfx942": 64 * 1024}


# ---------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class RmsNorm:
    """An RMSNorm of A's rows over K applied as A is loaded (the GEMM's prologue), in this order:
    xs = A.float(); rs = rsqrt(mean(xs², K) + eps); y = xs·rs; [y rounded to ``mid_dtype``];
    y = (norm_weight.float() + weight_offset)·y; [y rounded to ``out_dtype``]; then y is rounded
    to the matmul's dtype. Hugging Face's LlamaRMSNorm is mid_dtype = out_dtype = the model dtype;
    Gemma's is weight_offset=1.0, out_dtype = the model dtype."""
    eps: float
    mid_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    weight_offset: float = 0.0

    def __post_init__(self) -> None:
        for name in ("eps", "weight_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GemmInputError(f"RmsNorm.{name} must be a finite float, not {v!r}")
        if self.eps < 0:
            raise GemmInputError(f"RmsNorm.eps must be >= 0, not {self.eps!r}")
        for name in ("mid_dtype", "out_dtype"):
            v = getattr(self, name)
            if v is not None and v not in FLOATS:
                raise GemmInputError(f"RmsNorm.{name} must be None or one of {FLOATS}, not {v!r}")


WEIGHT_STORAGE = {"int8": torch.int8, "uint4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn,
                  "fp8_e4m3fnuz": torch.float8_e4m3fnuz}
ACT_QUANT = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
             "fp8_e4m3fnuz": (torch.float8_e4m3fnuz, 240.0)}  # storage dtype, largest value


@dataclass(frozen=True)
class WeightQuant:
    """How a quantized B ([N, K] layout) is stored and dequantized. Tensors (``turbofx.quant``):

    * q: ``storage`` "int8" -> int8 [N, K]; "uint4" -> uint8 [N, ceil(K/2)], two values per byte
      along K (k = 2j in the low nibble of byte j, k = 2j + 1 in the high one), values 0..15;
      "fp8_e4m3" / "fp8_e4m3fnuz" -> that float8 dtype [N, K];
    * scale: any float dtype; [N] when ``group_size`` is 0 (one scale per output row, applied to
      the accumulator), else [N, ceil(K / group_size)] (the last group may be partial);
    * min (iff ``has_min``): like scale.

    w[n, k] = (q[n, k] - zero) * scale[n, k // group_size] (+ min[n, k // group_size]), in fp32.
    ``act``: the activations are quantized too, per row and dynamically (W8A8 / FP8 dynamic):
    a_scale[m] = max|A[m, :]| / largest, qa = round-half-away(A / a_scale) clamped (int8) or cast
    (fp8), and the product qa @ q runs on the integer / fp8 tensor cores, scaled by a_scale[m] and
    scale[n] (``act`` needs ``group_size`` 0 and ``zero`` 0 and no min)."""
    storage: str
    group_size: int = 0
    zero: int = 0
    has_min: bool = False
    act: str | None = None

    def __post_init__(self) -> None:
        if self.storage not in WEIGHT_STORAGE:
            raise GemmInputError(f"WeightQuant.storage must be one of {sorted(WEIGHT_STORAGE)}, not {self.storage!r}")
        for name in ("group_size", "zero"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise GemmInputError(f"WeightQuant.{name} must be a whole number >= 0, not {v!r}")
        if self.has_min and not self.group_size:
            raise GemmInputError("WeightQuant(has_min=True) needs group_size > 0 (per-row scales are applied to the "
                                 "accumulator, where a per-row offset does not factor out)")
        if self.act is not None:
            if self.act not in ACT_QUANT:
                raise GemmInputError(f"WeightQuant.act must be None or one of {sorted(ACT_QUANT)}, not {self.act!r}")
            if self.group_size or self.zero or self.has_min:
                raise GemmInputError("WeightQuant.act (dynamic activation quantization) needs per-row weight scales "
                                     "(group_size=0), zero=0 and no min: the product runs on quantized values")

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of q."""
        return WEIGHT_STORAGE[self.storage]

    def q_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, (k + 1) // 2) if self.storage == "uint4" else (n, k)

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        return (n,) if self.group_size == 0 else (n, -(-k // self.group_size))


@dataclass(frozen=True)
class GemmSpec:
    dtype: torch.dtype  # the matmul's dtype: both operands are rounded to it as they are loaded
    a_dtype: torch.dtype | None = None  # stored dtype of A (None: dtype); differs = fused cast
    b_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None  # None: dtype
    b_layout: str = "nk"  # "nk": B is [N, K] (nn.Linear weight); "kn": B is [K, N] (mm, bmm)
    has_bias: bool = False
    activation: str | None = None  # None | "silu" | "gelu_tanh" | "relu"
    swiglu: bool = False  # B holds [gate; up] along N: out = activation(gate) * up, N / 2 columns
    residual: bool = False
    row_scale: bool = False  # accumulator row i times row_scale[i] (RMSNorm's 1/rms)
    batched: bool = False  # A [Bt, M, K], B [Bt, ...], out [Bt, M, N]
    allow_tf32: bool = False  # fp32 on a GPU: IEEE products unless allowed (torch's default)
    norm: RmsNorm | None = None  # A's rows RMS-normalised as they are loaded (needs norm_weight [K])
    # fp16/bf16: round to dtype after every epilogue step, as an eager model running op by op in
    # dtype does (the matmul's output, + bias, the activation, SwiGLU's act(gate) and its product
    # with up, + residual); False: fp32 from the accumulator to the store
    eager_rounding: bool = False
    # the bias belongs to the matmul op (addmm / linear): eager rounds matmul + bias once, so the
    # eager rounding skips the point between them (False: a separate add, rounded after each)
    bias_in_matmul: bool = False
    # B is stored quantized ([N, K] rows, b_dtype its storage dtype): dequantized in the prologue
    # (in registers), per-row scales applied to the accumulator; with ``weight.act`` A is quantized
    # per row too and the product runs on int8 / fp8 values
    weight: WeightQuant | None = None

    def __post_init__(self) -> None:
        for name in ("dtype", "a_dtype", "b_dtype", "out_dtype"):
            v = getattr(self, name)
            if not isinstance(v, torch.dtype) and (v is not None or name == "dtype"):
                raise GemmInputError(f"GemmSpec.{name} must be a torch.dtype (e.g. torch.float16), not {v!r}")
        if self.b_layout not in ("nk", "kn"):
            raise GemmInputError(f"GemmSpec.b_layout must be 'nk' ([N, K]) or 'kn' ([K, N]), not {self.b_layout!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise GemmInputError(f"GemmSpec.activation {self.activation!r} is not one of {ACTIVATIONS} (or None)")
        if self.swiglu and self.activation is None:
            raise GemmInputError("GemmSpec(swiglu=True) needs the gate's activation: activation='silu' for SwiGLU "
                                 "('gelu_tanh' for GeGLU)")
        if self.norm is not None and not isinstance(self.norm, RmsNorm):
            raise GemmInputError(f"GemmSpec.norm must be an RmsNorm(eps, ...) or None, not {self.norm!r}")
        if self.norm is not None and self.row_scale:
            raise GemmInputError("GemmSpec: norm and row_scale are two ways to fuse one RMSNorm; use norm=RmsNorm(...) "
                                 "(the prologue normalises A) or row_scale=True with fold_rmsnorm_weight, not both")
        if self.weight is not None:
            w = self.weight
            if not isinstance(w, WeightQuant):
                raise GemmInputError(f"GemmSpec.weight must be a WeightQuant or None, not {w!r}")
            if self.b_layout != "nk" or self.batched:
                raise GemmInputError("GemmSpec.weight: a quantized B is one [N, K] weight (b_layout='nk', not batched)")
            if self.b_type != w.dtype:
                raise GemmInputError(f"GemmSpec.weight stores B as {w.dtype}: set b_dtype={w.dtype} (now {self.b_type})")
            if w.act is not None and (self.norm is not None or self.row_scale):
                raise GemmInputError("GemmSpec: dynamic activation quantization (weight.act) quantizes A's rows as "
                                     "loaded; an RMSNorm prologue or row_scale on the same A is not supported: "
                                     "run the norm as its own kernel")
        elif self.b_dtype is not None and self.b_dtype not in FLOATS and self.b_dtype != torch.float64:
            raise GemmInputError(f"GemmSpec.b_dtype {self.b_dtype} is a quantized storage type: describe it with "
                                 "weight=WeightQuant(...)")
        if self.bias_in_matmul and self.row_scale and self.has_bias:
            raise GemmInputError("GemmSpec: bias_in_matmul (addmm's bias) with row_scale would scale the bias too; "
                                 "use norm=RmsNorm(...) instead of row_scale")

    @property
    def a_type(self) -> torch.dtype:
        return self.a_dtype or self.dtype

    @property
    def b_type(self) -> torch.dtype:
        return self.b_dtype or self.dtype

    @property
    def out_type(self) -> torch.dtype:
        return self.out_dtype or self.dtype

    @property
    def round_type(self) -> torch.dtype | None:
        """What the epilogue rounds to after each step (None: it does not)."""
        return self.dtype if self.eager_rounding and self.dtype in (torch.float16, torch.bfloat16) else None


# Prologue / epilogue ops: what is done, not how Triton spells it (``_emit_*`` does that).
@dataclass(frozen=True)
class NormRows:
    """A's rows RMS-normalised over the whole K (``RmsNorm``'s semantics): each program first sums
    its rows' squares over K, then normalises every A tile it loads. Comes before A's cast."""
    eps: float
    mid_dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    weight_offset: float
    operand = "a"  # class constant (not a field): the operand it applies to, as CastOperand.operand


@dataclass(frozen=True)
class CastOperand:
    operand: str  # "a" | "b"
    dtype: torch.dtype  # rounded to this as it is loaded


@dataclass(frozen=True)
class DequantB:
    """B's tile loaded from its quantized storage and dequantized in registers (WeightQuant's
    formula in fp32, then rounded to ``dtype``); with per-row scales (group_size 0) the scale waits
    for the accumulator (``ScaleAcc``) and q itself is the operand; with ``act`` q stays int8 / fp8."""
    fmt: WeightQuant
    dtype: torch.dtype
    operand = "b"


@dataclass(frozen=True)
class QuantizeRows:
    """A's rows quantized as loaded (dynamic, per row): the row pre-pass finds max|A[m, :]|, each
    tile is divided by its row's scale, rounded half away from zero and clamped (int8) or cast (fp8)."""
    act: str
    operand = "a"


@dataclass(frozen=True)
class ScaleAcc:
    """The dequantization scales that factor out of the K sum, applied to the accumulator right
    after the K loop (before a split-K partial is stored): weight rows' scales and A rows' scales."""
    column_scale: bool
    row_scale: bool


@dataclass(frozen=True)
class RowScale:
    pass


@dataclass(frozen=True)
class AddBias:
    pass


@dataclass(frozen=True)
class Activation:
    kind: str


@dataclass(frozen=True)
class GatedActivation:  # activation(gate) * up
    kind: str
    gate_dtype: torch.dtype | None = None  # activation(gate) rounded to this before the product (eager)


@dataclass(frozen=True)
class AddResidual:
    pass


@dataclass(frozen=True)
class Round:
    dtype: torch.dtype  # every live value (acc; SwiGLU's up too until the product) rounded to this


@dataclass(frozen=True)
class Store:
    dtype: torch.dtype


PrologueOp = Union[NormRows, QuantizeRows, CastOperand, DequantB]
EpilogueOp = Union[RowScale, AddBias, Activation, GatedActivation, AddResidual, Round, Store]


def prologue_ops(spec: GemmSpec) -> tuple[PrologueOp, ...]:
    """In the order they apply per operand. With a norm, A is always cast afterwards: the
    normalised row is fp32."""
    ops: list[PrologueOp] = []
    if spec.norm is not None:
        n = spec.norm
        ops += [NormRows(float(n.eps), n.mid_dtype, n.out_dtype, float(n.weight_offset)), CastOperand("a", spec.dtype)]
    elif spec.weight is not None and spec.weight.act is not None:
        ops.append(QuantizeRows(spec.weight.act))
    elif spec.a_type != spec.dtype:
        ops.append(CastOperand("a", spec.dtype))
    if spec.weight is not None:
        ops.append(DequantB(spec.weight, spec.dtype))
    elif spec.b_type != spec.dtype:
        ops.append(CastOperand("b", spec.dtype))
    return tuple(ops)


def scale_acc_op(spec: GemmSpec) -> ScaleAcc | None:
    """What the accumulator is scaled by after the K loop (None: nothing)."""
    w = spec.weight
    if w is None or w.group_size:
        return None
    return ScaleAcc(column_scale=True, row_scale=w.act is not None)


def epilogue_ops(spec: GemmSpec) -> tuple[EpilogueOp, ...]:
    """In the order they apply: the row scale belongs to the matmul itself ((x·rs) @ W' = rs·(x @ W')),
    so it comes before the bias; the residual is added to the activated value. With eager
    rounding a ``Round`` follows the matmul and every step (SwiGLU's act(gate) rounds inside
    ``GatedActivation``)."""
    r = spec.round_type
    ops: list[EpilogueOp] = []

    def step(*new: EpilogueOp) -> None:
        ops.extend(new)
        if r is not None:
            ops.append(Round(r))

    if spec.has_bias and spec.bias_in_matmul:
        step(AddBias())  # addmm: the matmul's output already holds the bias (one rounding)
    else:
        step()  # the matmul's output
        if spec.row_scale:
            step(RowScale())
        if spec.has_bias:
            step(AddBias())
    if spec.swiglu:
        step(GatedActivation(spec.activation, r))
    elif spec.activation:
        step(Activation(spec.activation))
    if spec.residual:
        step(AddResidual())
    ops.append(Store(spec.out_type))
    return tuple(ops)


def fold_rmsnorm_weight(weight: torch.Tensor, norm_weight: torch.Tensor, layout: str = "nk") -> torch.Tensor:
    """B with RMSNorm's weight g folded into its K axis: rmsnorm(x) @ W^T = rs · (x @ (W·g)^T),
    rs the per-row 1/rms (``rmsnorm_row_scale``), so the norm becomes the GEMM's row scale."""
    k_dim = 1 if layout == "nk" else 0
    if weight.dim() != 2 or norm_weight.dim() != 1 or norm_weight.shape[0] != weight.shape[k_dim]:
        raise GemmInputError(f"fold_rmsnorm_weight: weight {tuple(weight.shape)} (layout {layout!r}) and norm weight "
                             f"{tuple(norm_weight.shape)} do not share K: the norm weight must have one value per "
                             "input feature")
    g = norm_weight.to(torch.float32)
    g = g[None, :] if layout == "nk" else g[:, None]
    return (weight.to(torch.float32) * g).to(weight.dtype)


def rmsnorm_row_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row 1 / rms(x) in fp32 over the last dim (what RMSNorm multiplies each row by)."""
    return torch.rsqrt(x.to(torch.float32).pow(2).mean(-1) + eps)


# ------------------------------------------------------------------------------------ refusals


def _unit_stride(shape, stride) -> bool:
    """Row- or column-major in the last two dims (size-1 dims count as either)."""
    (r, c), (sr, sc) = shape[-2:], stride[-2:]
    return sc == 1 or sr == 1 or c == 1 or r == 1


def gemm_refusal(spec: GemmSpec, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> Refusal | None:
    """Why the family does not generate this matmul (None: it does). Lowering keeps refused
    matmuls extern."""
    operands = (("matmul", spec.dtype), ("A", spec.a_type), ("output", spec.out_type))
    for what, t in operands + ((("B", spec.b_type),) if spec.weight is None else ()):
        if t not in FLOATS:
            return Refusal("dtype", f"{what} dtype {t} (the template does fp16, bf16 and fp32; integer, fp64 and "
                                    "fp8 matmuls stay extern)")
    if a is None or b is None:
        return None
    for name, t in (("A", a), ("B", b)):
        if t.dim() >= 2 and not _unit_stride(t.shape, t.stride()):
            return Refusal("strides", f"{name} has strides {t.stride()}: neither row- nor column-major, so "
                                      "its tiles would be gathers")
    if spec.batched and a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        return Refusal("batch-broadcast", f"batch sizes {a.shape[0]} and {b.shape[0]} differ (broadcast bmm)")
    if spec.swiglu and b.dim() >= 2 and _n_of(spec, b) % 2:
        return Refusal("swiglu-odd-n", f"B has {_n_of(spec, b)} output columns: [gate; up] needs an even number")
    return None


def _n_of(spec: GemmSpec, b: torch.Tensor) -> int:
    return b.shape[-2] if spec.b_layout == "nk" else b.shape[-1]


def _k_of(spec: GemmSpec, b: torch.Tensor) -> int:
    return b.shape[-1] if spec.b_layout == "nk" else b.shape[-2]


# --------------------------------------------------------------------------------------- source

TEMPLATE = '''

@triton.jit
def _tile_dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # a [BM, BK] @ b [BK, BN] in fp32. The interpreter computes bf16 dots wrongly: fp32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.int8:  # W8A8: int8 tensor cores, exact int32 sums per tile
        return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def tfx_gemm(A, B, O, BIAS, RES, RS, NW, QS, QM, M, N_OUT, K, sab, sam, sak, sbb, sbn, sbk, sob, som, son,
             srb, srm, srn, srsb, sqn, sqk, GROUPS_M,
             SWIGLU: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, GROUP_M: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Tiled GEMM: one program per [BLOCK_M, BLOCK_N] output tile, tiles in grouped order: GROUP_M
    # consecutive programs walk down a column of row tiles, so they share B tiles while cached.
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot tiles are at least 16 wide")
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    group = GROUP_M * n_tiles
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(GROUPS_M - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N_OUT
    # Rows and columns past the end read row / column 0 instead (their results are never stored),
    # so only K needs a mask; the pointers advance by one K tile per step.
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = A + bid * sab + (offs_m % M)[:, None] * sam
    a_ptrs = a_rows + offs_k[None, :] * sak
    cols = offs_n % N_OUT
    b_ptrs = B + bid * sbb + cols[None, :] * sbn + offs_k[:, None] * sbk
    rows = _prologue_a_rows(a_rows, m_ok, K, sak, BLOCK_M, BLOCK_K)  # a row norm's pre-pass over K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = _prologue_a(tl.load(a_ptrs, mask=k_ok[None, :], other=0.0), rows, NW + k0 + offs_k, k_ok)
        b = _load_b_kn(b_ptrs, B + bid * sbb, QS, QM, cols, k0, k0 + offs_k, k_ok, K, sbn, sbk, sqn, sqk, BLOCK_K)
        acc += _tile_dot(a, b, UPCAST, IEEE)
        if SWIGLU:  # the up half of B: columns N_OUT.. of the same rows
            b = _load_b_kn(b_ptrs + N_OUT * sbn, B + bid * sbb, QS, QM, cols + N_OUT, k0, k0 + offs_k, k_ok, K, sbn,
                           sbk, sqn, sqk, BLOCK_K)
            acc_up += _tile_dot(a, b, UPCAST, IEEE)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    acc = _scale_acc(acc, rows, cols, n_ok, QS, sqn)
    if SWIGLU:
        acc_up = _scale_acc(acc_up, rows, cols + N_OUT, n_ok, QS, sqn)
    _epilogue(acc, acc_up, offs_m, offs_n, m_ok, n_ok, O + bid * sob, BIAS, RES + bid * srb, RS + bid * srsb,
              N_OUT, som, son, srm, srn)


@triton.jit
def _gemv_step(a, w, DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # a [BM, BK] times w [BN, BK] (weight rows, K-contiguous) summed over K: [BM, BN] in fp32
    if DOT:
        return _tile_dot(a, tl.trans(w), UPCAST, IEEE)
    else:
        return tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)


@triton.jit
def tfx_gemv(A, B, O, P, BIAS, RES, RS, NW, QS, QM, M, N_OUT, K, k_chunk, n_splits, sab, sam, sak, sbb, sbn, sbk,
             sob, som, son, srb, srm, srn, srsb, sqn, sqk,
             SWIGLU: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Few rows (decode): a program owns BLOCK_N outputs of every row (M <= BLOCK_M) over one chunk
    # of K, so each weight row is read once. SPLIT: the fp32 partial goes to P[batch, split] and
    # tfx_gemm_reduce finishes; else the epilogue runs here.
    tl.static_assert(DOT or BLOCK_M * BLOCK_N * BLOCK_K <= 65536, "FMA GEMV tile too large for registers")
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N_OUT
    k_lo = split * k_chunk
    k_hi = tl.minimum(K, k_lo + k_chunk)
    a_rows = A + bid * sab + offs_m[:, None] * sam
    w_rows = B + bid * sbb + offs_n[:, None] * sbn
    # a row norm's pre-pass: every split reads its rows' whole K, so no partial statistics
    rows = _prologue_a_rows(a_rows, m_ok, K, sak, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        a = _prologue_a(tl.load(a_rows + offs_k[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0),
                        rows, NW + offs_k, k_ok)
        w = _load_b_nk(w_rows + offs_k[None, :] * sbk, B + bid * sbb, QS, QM, offs_n, k0, offs_k, n_ok, k_ok, k_hi,
                       sbn, sbk, sqn, sqk, BLOCK_K)
        acc += _gemv_step(a, w, DOT, UPCAST, IEEE)
        if SWIGLU:
            w = _load_b_nk(w_rows + N_OUT * sbn + offs_k[None, :] * sbk, B + bid * sbb, QS, QM, offs_n + N_OUT, k0,
                           offs_k, n_ok, k_ok, k_hi, sbn, sbk, sqn, sqk, BLOCK_K)
            acc_up += _gemv_step(a, w, DOT, UPCAST, IEEE)
    acc = _scale_acc(acc, rows, offs_n, n_ok, QS, sqn)
    if SWIGLU:
        acc_up = _scale_acc(acc_up, rows, offs_n + N_OUT, n_ok, QS, sqn)
    if SPLIT:  # partials laid out [batch, split, M, N_OUT * (2 if SWIGLU)]
        width = N_OUT * 2 if SWIGLU else N_OUT
        part = P + ((bid * n_splits + split) * M + offs_m[:, None]) * width + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        tl.store(part, acc, mask=ok)
        if SWIGLU:
            tl.store(part + N_OUT, acc_up, mask=ok)
    else:
        _epilogue(acc, acc_up, offs_m, offs_n, m_ok, n_ok, O + bid * sob, BIAS, RES + bid * srb, RS + bid * srsb,
                  N_OUT, som, son, srm, srn)


@triton.jit
def tfx_gemm_reduce(P, O, BIAS, RES, RS, M, N_OUT, n_splits, sob, som, son, srb, srm, srn, srsb,
                    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Second pass of split-K: the partials summed in split order (deterministic), then the epilogue.
    pid_n = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N_OUT
    ok = m_ok[:, None] & n_ok[None, :]
    width = N_OUT * 2 if SWIGLU else N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(0, n_splits):
        part = P + ((bid * n_splits + s) * M + offs_m[:, None]) * width + offs_n[None, :]
        acc += tl.load(part, mask=ok, other=0.0)
        if SWIGLU:
            acc_up += tl.load(part + N_OUT, mask=ok, other=0.0)
    _epilogue(acc, acc_up, offs_m, offs_n, m_ok, n_ok, O + bid * sob, BIAS, RES + bid * srb, RS + bid * srsb,
              N_OUT, som, son, srm, srn)
'''


def _activation(kind: str, x: str) -> str:
    if kind == "silu":
        return f"({x} * {_sigmoid(x)})"
    if kind == "gelu_tanh":
        return _gelu(x, "tanh")
    if kind == "relu":  # NaN stays NaN, as torch.relu (tl.maximum would drop it)
        return f"tl.where({x} != {x}, {x}, tl.maximum({x}, 0.0))"
    raise AssertionError(f"turbofx bug: activation {kind!r} has no emitter (please report it)")


# Triton's interpreter (3.9) truncates fp32 -> bf16 casts where GPUs round to nearest even; on the
# interpreter the source spells that rounding out, so CPU results round as eager and GPUs do.
RNE_BF16 = """
@triton.jit
def _rne_bf16(x):
    # fp32 to bf16, rounded to nearest even: the low 16 bits rounded into the high ones
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)
"""


# Triton's interpreter (3.9) also rounds fp32 -> fp8 wrongly where the mantissa carries into the
# exponent (127.6 -> 64, not 128): the source rounds to the fp8 grid first (nearest even: 3 mantissa
# bits for normals; a fixed step for subnormals, by adding and removing a power of two), so the
# cast itself is exact.
RNE_FP8 = """
@triton.jit
def _rne_fp8(x, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < MIN_NORMAL, (x + SUB_MAGIC) - SUB_MAGIC, normal)
"""
# storage dtype -> (smallest normal, 2^23 x the subnormal step)
FP8_GRID = {torch.float8_e4m3fn: (2.0 ** -6, 2.0 ** 14), torch.float8_e4m3fnuz: (2.0 ** -7, 2.0 ** 13)}


def _cast(x: str, dtype: torch.dtype, interpret: bool) -> str:
    """x (any float) cast to dtype, rounded to nearest even."""
    if dtype == torch.bfloat16 and interpret:
        return f"_rne_bf16(({x}).to(tl.float32))"
    if dtype in FP8_GRID and interpret:
        lo, magic = FP8_GRID[dtype]
        return f"_rne_fp8(({x}).to(tl.float32), {lo!r}, {magic!r}).to({TL_DTYPE[dtype]})"
    return f"{x}.to({TL_DTYPE[dtype]})"


def _round(x: str, dtype: torch.dtype | None, interpret: bool) -> str:
    """x (fp32) rounded to dtype and back: eager's rounding of an intermediate (none for fp32)."""
    if dtype is None or dtype == torch.float32:
        return x
    return f"{_cast(x, dtype, interpret)}.to(tl.float32)"


def _emit_row_prepass(ops: tuple[PrologueOp, ...]) -> list[str]:
    """``_prologue_a_rows``: what A's prologue needs of each whole row before the K loop (the
    norm's 1/rms, [BM] fp32; rows past M get 0, so they stay finite). a_rows: [BM, 1] row
    pointers. Without a row op it returns a dummy the kernel never reads (compiled out)."""
    lines = ["def _prologue_a_rows(a_rows, row_ok, K, sak, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):"]
    norms = [op for op in ops if isinstance(op, NormRows)]
    quant = [op for op in ops if isinstance(op, QuantizeRows)]
    if quant:  # the row's scale: max |x| / the storage's largest value (an all-zero row: 1)
        largest = ACT_QUANT[quant[0].act][1]
        return lines + ["    offs_k = tl.arange(0, BLOCK_K)",
                        "    amax = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)",
                        "    for k0 in range(0, K, BLOCK_K):",
                        "        k_ok = offs_k < K - k0",
                        "        x = tl.load(a_rows + (k0 + offs_k)[None, :] * sak, mask=row_ok[:, None] & k_ok[None, :],",
                        "                    other=0.0).to(tl.float32)",
                        "        amax = tl.maximum(amax, tl.abs(x))",
                        "    amax = tl.max(amax, 1)",
                        f"    return tl.where(amax > 0.0, amax / {largest!r}, 1.0)"]
    if not norms:
        return lines + ["    return tl.zeros([BLOCK_M], tl.float32)"]
    assert len(norms) == 1, norms
    lines += ["    offs_k = tl.arange(0, BLOCK_K)",
              "    squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)",
              "    for k0 in range(0, K, BLOCK_K):",
              "        k_ok = offs_k < K - k0",
              "        x = tl.load(a_rows + (k0 + offs_k)[None, :] * sak, mask=row_ok[:, None] & k_ok[None, :],",
              "                    other=0.0).to(tl.float32)",
              "        squares += x * x",
              # K = 0: the mean is never used (no K tile is loaded), so divide by 1 rather than make a NaN
              f"    mean = tl.sum(squares, 1) / tl.maximum(K, 1).to(tl.float32)",
              f"    return tl.where(row_ok, 1.0 / tl.sqrt(mean + {norms[0].eps!r}), 0.0)"]
    return lines


def _emit_prologue(ops: tuple[PrologueOp, ...], operand: str, interpret: bool) -> list[str]:
    """``_prologue_a(x, rows, nw_ptrs, k_ok)`` / ``_prologue_b(x)``: a loaded tile to the matmul's
    operand. For A, rows is ``_prologue_a_rows``'s result and nw_ptrs / k_ok address the norm
    weight's slice for this K tile ([BK])."""
    lines = ["def _prologue_a(x, rows, nw_ptrs, k_ok):" if operand == "a" else "def _prologue_b(x):"]
    for op in ops:
        if op.operand != operand:
            continue
        if isinstance(op, NormRows):
            # the order of RmsNorm's docstring; the weight's masked lanes are 0, as are x's
            g = "tl.load(nw_ptrs, mask=k_ok, other=0.0).to(tl.float32)"
            if op.weight_offset != 0.0:  # an added 0.0 would turn a -0.0 weight into +0.0
                g = f"({g} + {op.weight_offset!r})"
            lines += ["    x = x.to(tl.float32) * rows[:, None]",
                      *([f"    x = {_round('x', op.mid_dtype, interpret)}"] if op.mid_dtype else []),
                      f"    x = {g}[None, :] * x",
                      *([f"    x = {_round('x', op.out_dtype, interpret)}"] if op.out_dtype else [])]
        elif isinstance(op, QuantizeRows):
            lines.append("    x = x.to(tl.float32) / rows[:, None]")
            largest = ACT_QUANT[op.act][1]
            if op.act == "int8":  # half away from zero, exactly (floor(x + 0.5) rounds 0.49999997 up)
                lines += ["    t = tl.where(x >= 0.0, tl.floor(x), tl.ceil(x))",
                          "    x = tl.where(tl.abs(x - t) >= 0.5, t + tl.where(x >= 0.0, 1.0, -1.0), t)",
                          "    x = tl.minimum(tl.maximum(x, -127.0), 127.0).to(tl.int8)"]
            else:
                lines += [f"    x = tl.minimum(tl.maximum(x, {-largest!r}), {largest!r})",
                          f"    x = {_cast('x', ACT_QUANT[op.act][0], interpret)}"]
        elif isinstance(op, CastOperand):
            lines.append(f"    x = {_cast('x', op.dtype, interpret)}")
        elif isinstance(op, DequantB):
            continue  # in _load_b_*: it needs the tile's indices, not just its values
        else:
            raise AssertionError(f"turbofx bug: prologue op {op!r} has no emitter (please report it)")
    lines.append("    return x")
    return lines


def _emit_load_b(ops: tuple[PrologueOp, ...], layout: str, interpret: bool) -> list[str]:
    """``_load_b_nk`` ([BN, BK] tiles: the GEMV's weight rows) or ``_load_b_kn`` ([BK, BN]: the tiled
    kernel's): B's tile as the matmul's operand. Unquantized: the load at ``ptrs`` and the operand
    prologue. Quantized (``DequantB``): q is addressed by indices (uint4: byte k // 2, nibble k % 2;
    bytes shared by two lanes are read from cache), dequantized in fp32 by WeightQuant's formula
    and rounded to the matmul dtype; with per-row scales q - zero is the operand (``_scale_acc``
    scales the accumulator) and with ``act`` q itself. uint4: the tile's BLOCK_K / 2 bytes are loaded
    (contiguous, so vectorised) and split into nibbles joined back in K order (``tl.join`` puts
    each byte's low and high nibble side by side: k = 2j, 2j + 1). k0: the tile's first k (even);
    k_end: where K (this program's chunk of it) ends."""
    sig = "n_idx, k0, k_idx, n_ok, k_ok" if layout == "nk" else "n_idx, k0, k_idx, k_ok"
    head = f"def _load_b_{layout}(ptrs, Bq, QS, QM, {sig}, k_end, sbn, sbk, sqn, sqk, BLOCK_K: tl.constexpr):"
    if layout == "nk":
        n_, k_, mask = "n_idx[:, None]", "k_idx[None, :]", "n_ok[:, None] & k_ok[None, :]"
    else:
        n_, k_, mask = "n_idx[None, :]", "k_idx[:, None]", "k_ok[:, None]"
    deq = next((op for op in ops if isinstance(op, DequantB)), None)
    if deq is None:
        return [head, f"    return _prologue_b(tl.load(ptrs, mask={mask}, other=0.0))"]
    f = deq.fmt
    other = "0.0" if f.storage.startswith("fp8") else "0"
    lines = [head, f"    mask = {mask}"]
    if f.storage == "uint4":
        kb = "kb[None, :]" if layout == "nk" else "kb[:, None]"
        b_mask = "n_ok[:, None] & kb_ok[None, :]" if layout == "nk" else "kb_ok[:, None]"
        lines += ["    tl.static_assert(BLOCK_K % 2 == 0, 'packed int4 tiles hold whole bytes')",
                  "    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)",
                  "    kb_ok = kb < (k_end + 1) // 2",
                  f"    q = tl.load(Bq + {n_} * sbn + {kb} * sbk, mask={b_mask}, other=0)",
                  "    lo = (q & 15).to(tl.float32)",
                  "    hi = (q >> 4).to(tl.float32)"]
        if layout == "nk":  # [BN, BK/2, 2] -> [BN, BK]
            lines.append("    x = tl.reshape(tl.join(lo, hi), (lo.shape[0], BLOCK_K))")
        else:  # [BK/2, BN, 2] -> [BK/2, 2, BN] -> [BK, BN]
            lines.append("    x = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, lo.shape[1]))")
    else:
        lines.append(f"    q = tl.load(Bq + {n_} * sbn + {k_} * sbk, mask=mask, other={other})")
        if f.act is not None:
            return lines + ["    return q"]
        lines.append("    x = q.to(tl.float32)")
    if f.zero:
        lines.append(f"    x = x - {float(f.zero)!r}")
    if f.group_size:
        lines += _emit_group_scales(f, layout)
    return lines + [f"    return {_cast('x', deq.dtype, interpret)}"]


def _emit_group_scales(f: WeightQuant, layout: str) -> list[str]:
    """x (the tile, fp32) times its groups' scales, plus their mins. Tiles start on a multiple of
    BLOCK_K, so when BLOCK_K and the group size divide one another (powers of two: every config)
    a tile holds whole groups or lies inside one: one scale per (row, group) is loaded and
    broadcast. Otherwise every element gathers its own (cached) scale."""
    g = f.group_size
    nk = layout == "nk"
    n_ = "n_idx[:, None]" if nk else "n_idx[None, :]"
    n_ok = "n_ok[:, None]" if nk else "True"
    # whole groups: [BN, BK/G] ([BK/G, BN]) scales against x viewed [BN, BK/G, G] ([BK/G, G, BN])
    kg = "kg[None, :]" if nk else "kg[:, None]"
    view, bcast, back = (("(x.shape[0], BLOCK_K // G, G)", "[:, :, None]", "(x.shape[0], BLOCK_K)") if nk else
                         ("(BLOCK_K // G, G, x.shape[1])", "[:, None, :]", "(BLOCK_K, x.shape[2])"))
    one = "[:, None]" if nk else "[None, :]"
    lines = ["    if BLOCK_K % G == 0:",
             "        kg = k0 // G + tl.arange(0, BLOCK_K // G)",
             f"        g_ok = {n_ok} & ({kg} * G < k_end)",
             f"        at = {n_} * sqn + {kg} * sqk",
             f"        x = tl.reshape(x, {view}) * tl.load(QS + at, mask=g_ok, other=0.0).to(tl.float32){bcast}"]
    if f.has_min:
        lines.append(f"        x = x + tl.load(QM + at, mask=g_ok, other=0.0).to(tl.float32){bcast}")
    lines += [f"        x = tl.reshape(x, {back})",
              "    elif G % BLOCK_K == 0:",
              "        at = n_idx * sqn + (k0 // G) * sqk",
              f"        x = x * tl.load(QS + at, mask={'n_ok' if nk else 'n_idx >= 0'}, other=0.0).to(tl.float32){one}"]
    if f.has_min:
        lines.append(f"        x = x + tl.load(QM + at, mask={'n_ok' if nk else 'n_idx >= 0'}, other=0.0).to(tl.float32){one}")
    k_ = "k_idx[None, :]" if nk else "k_idx[:, None]"
    lines += ["    else:",
              f"        at = {n_} * sqn + ({k_} // G) * sqk",
              "        x = x * tl.load(QS + at, mask=mask, other=0.0).to(tl.float32)"]
    if f.has_min:
        lines.append("        x = x + tl.load(QM + at, mask=mask, other=0.0).to(tl.float32)")
    # G written as the literal group size (no local constexpr assignment: older Tritons lack it)
    return [re.sub(r"\bG\b", str(g), line) for line in lines]


def _emit_scale_acc(op: ScaleAcc | None) -> list[str]:
    """``_scale_acc(acc, rows, n_idx, n_ok, QS, sqn)``: the accumulator [BM, BN] times the weight
    rows' scales (per output column n) and A's row scales (``rows``: the row pre-pass's result)."""
    lines = ["def _scale_acc(acc, rows, n_idx, n_ok, QS, sqn):"]
    if op is not None and op.column_scale:
        lines.append("    acc = acc * tl.load(QS + n_idx * sqn, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
    if op is not None and op.row_scale:
        lines.append("    acc = acc * rows[:, None]")
    return lines + ["    return acc"]


def _emit_epilogue(ops: tuple[EpilogueOp, ...], swiglu: bool, interpret: bool) -> list[str]:
    """The epilogue as one jit helper: acc (and acc_up, SwiGLU's up half) [BM, BN] in fp32 to the
    stored output tile."""
    body: list[str] = []
    live = ["acc", "acc_up"] if swiglu else ["acc"]
    for op in ops:
        if isinstance(op, RowScale):
            body.append("rs = tl.load(RS + offs_m, mask=m_ok, other=0.0).to(tl.float32)")
            body += [f"{v} = {v} * rs[:, None]" for v in live]
        elif isinstance(op, AddBias):
            body.append("acc = acc + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
            if swiglu:
                body.append("acc_up = acc_up + tl.load(BIAS + N_OUT + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
        elif isinstance(op, Activation):
            body.append(f"acc = {_activation(op.kind, 'acc')}")
        elif isinstance(op, GatedActivation):
            body.append(f"acc = {_round(_activation(op.kind, 'acc'), op.gate_dtype, interpret)} * acc_up")
            live = ["acc"]
        elif isinstance(op, Round):
            body += [f"{v} = {_round(v, op.dtype, interpret)}" for v in live]
        elif isinstance(op, AddResidual):
            body.append("acc = acc + tl.load(RES + offs_m[:, None] * srm + offs_n[None, :] * srn, "
                        "mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)")
        elif isinstance(op, Store):
            stored = _cast("acc", op.dtype, interpret)
            body.append(f"tl.store(O + offs_m[:, None] * som + offs_n[None, :] * son, {stored}, "
                        "mask=m_ok[:, None] & n_ok[None, :])")
        else:
            raise AssertionError(f"turbofx bug: epilogue op {op!r} has no emitter (please report it)")
    return ["def _epilogue(acc, acc_up, offs_m, offs_n, m_ok, n_ok, O, BIAS, RES, RS, N_OUT, som, son, srm, srn):",
            *("    " + line for line in body)]


@functools.lru_cache(maxsize=None)
def render(spec: GemmSpec, interpret: bool = False) -> str:
    """The family's Triton source for ``spec`` (all three kernels; a GPU target only changes
    constexpr arguments, so one source serves every GPU). ``interpret``: the CPU interpreter's
    source, which spells out bf16 rounding (``RNE_BF16``)."""
    pro = prologue_ops(spec)
    parts = ["import triton", "import triton.language as tl", RNE_BF16 if interpret else "",
             RNE_FP8 if interpret else "", "",
             "@triton.jit", *_emit_row_prepass(pro), "", "",
             "@triton.jit", *_emit_prologue(pro, "a", interpret), "", "",
             "@triton.jit", *_emit_prologue(pro, "b", interpret), "", "",
             "@triton.jit", *_emit_load_b(pro, "nk", interpret), "", "",
             "@triton.jit", *_emit_load_b(pro, "kn", interpret), "", "",
             "@triton.jit", *_emit_scale_acc(scale_acc_op(spec)), "", "",
             "@triton.jit", *_emit_epilogue(epilogue_ops(spec), spec.swiglu, interpret)]
    return "\n".join(parts) + TEMPLATE


# --------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    regime: str  # "gemv" (few rows, split-K) | "tiled" (tl.dot tiles)
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    split_k: int = 1  # gemv: the most K chunks (the launcher uses fewer when N fills the GPU)
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8

    def __post_init__(self) -> None:
        if self.regime not in ("gemv", "tiled"):
            raise GemmInputError(f"GemmConfig.regime must be 'gemv' or 'tiled', not {self.regime!r}")
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise GemmInputError(f"GemmConfig.{name}={v} must be a power of two")
        if self.regime == "tiled" and min(self.BLOCK_M, self.BLOCK_N, self.BLOCK_K) < 16:
            raise GemmInputError("a tiled GemmConfig needs BLOCK_M, BLOCK_N, BLOCK_K >= 16 (tl.dot)")
        if self.split_k < 1 or self.GROUP_M < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise GemmInputError(f"GemmConfig {self}: split_k, GROUP_M, num_warps and num_stages must be >= 1")


def m_bucket(m: int) -> str:
    if m <= FMA_MAX_M:
        return "decode"
    if m <= GEMV_MAX_M:
        return "few"
    return "mid" if m <= 128 else "large"


def nk_bucket(n: int, k: int) -> str:
    return "large" if n * k >= 1 << 22 else "small"


_G, _T = "gemv", "tiled"
# (M bucket, N·K bucket) -> config, per arch family. fp16/bf16 numbers; fp32 and SwiGLU are fitted
# to the target by _fit. The decode FMA tile keeps BLOCK_M·BLOCK_N·BLOCK_K / threads <= 64.
CONFIGS: dict[str, dict[tuple[str, str], GemmConfig]] = {
    "sm80": {
        ("decode", "small"): GemmConfig(_G, 4, 16, 128, split_k=4, num_warps=4, num_stages=2),
        ("decode", "large"): GemmConfig(_G, 4, 16, 128, split_k=8, num_warps=4, num_stages=2),
        ("few", "small"): GemmConfig(_G, 16, 64, 64, split_k=4, num_warps=4, num_stages=3),
        ("few", "large"): GemmConfig(_G, 16, 64, 128, split_k=8, num_warps=4, num_stages=3),
        ("mid", "small"): GemmConfig(_T, 64, 64, 32, num_warps=4, num_stages=4),
        ("mid", "large"): GemmConfig(_T, 64, 128, 32, num_warps=4, num_stages=4),
        ("large", "small"): GemmConfig(_T, 128, 64, 32, num_warps=4, num_stages=4),
        ("large", "large"): GemmConfig(_T, 128, 128, 32, num_warps=8, num_stages=4),
    },
    "sm90": {
        ("decode", "small"): GemmConfig(_G, 4, 16, 128, split_k=4, num_warps=4, num_stages=2),
        ("decode", "large"): GemmConfig(_G, 4, 16, 128, split_k=8, num_warps=4, num_stages=2),
        ("few", "small"): GemmConfig(_G, 16, 64, 64, split_k=4, num_warps=4, num_stages=3),
        ("few", "large"): GemmConfig(_G, 16, 64, 128, split_k=8, num_warps=4, num_stages=4),
        ("mid", "small"): GemmConfig(_T, 64, 64, 64, num_warps=4, num_stages=4),
        ("mid", "large"): GemmConfig(_T, 64, 128, 64, num_warps=4, num_stages=4),
        ("large", "small"): GemmConfig(_T, 128, 64, 64, num_warps=4, num_stages=4),
        ("large", "large"): GemmConfig(_T, 128, 128, 64, num_warps=8, num_stages=3),
    },
    "gfx942": {  # 64-wide wavefronts, 64 KiB LDS: fewer stages
        ("decode", "small"): GemmConfig(_G, 4, 16, 128, split_k=4, num_warps=4, num_stages=1),
        ("decode", "large"): GemmConfig(_G, 4, 16, 128, split_k=8, num_warps=4, num_stages=1),
        ("few", "small"): GemmConfig(_G, 16, 64, 64, split_k=4, num_warps=4, num_stages=2),
        ("few", "large"): GemmConfig(_G, 16, 64, 128, split_k=8, num_warps=4, num_stages=2),
        ("mid", "small"): GemmConfig(_T, 64, 64, 64, num_warps=4, num_stages=2),
        ("mid", "large"): GemmConfig(_T, 64, 128, 32, num_warps=4, num_stages=2),
        ("large", "small"): GemmConfig(_T, 128, 64, 32, num_warps=4, num_stages=2),
        ("large", "large"): GemmConfig(_T, 128, 128, 32, num_warps=8, num_stages=2),
    },
    # The interpreter runs programs one by one in Python: few, large ones; no K split.
    "cpu": {
        # Each interpreted op costs about the same whatever its size: wide tiles, and decode rows on
        # the 16-row tl.dot (a numpy matmul) rather than FMA (SmolLM2's LM head: 8.7 s -> 1.5 s a token).
        ("decode", "small"): GemmConfig(_G, 16, 1024, 256, num_warps=1, num_stages=1),
        ("few", "small"): GemmConfig(_G, 16, 1024, 256, num_warps=1, num_stages=1),
        ("mid", "small"): GemmConfig(_T, 64, 512, 256, num_warps=1, num_stages=1, GROUP_M=4),
        ("large", "small"): GemmConfig(_T, 128, 512, 256, num_warps=1, num_stages=1, GROUP_M=4),
    },
}
CONFIGS["sm100"] = CONFIGS["sm90"]  # until tuned on a B200: Hopper's tiles fit its 227 KiB


def _table(target: Target) -> dict[tuple[str, str], GemmConfig]:
    if target.interpret:
        return CONFIGS["cpu"]
    if target.arch in CONFIGS:
        return CONFIGS[target.arch]
    if target.backend == "hip":
        return CONFIGS["gfx942"]
    cc = int(target.arch[2:]) if target.arch[2:].isdigit() else 80
    return CONFIGS["sm90"] if cc >= 90 else CONFIGS["sm80"]


def shared_limit(target: Target) -> int:
    if target.shared_mem:
        return target.shared_mem
    if target.interpret:
        return 1 << 30
    return SHARED_LIMIT.get(target.arch, 99 * 1024 if target.backend == "cuda" else 64 * 1024)


SHARED_SLACK = 1024  # pipeline barriers (16 bytes seen on sm100) and small re-layouts (the norm's: 256 on sm90)


def shared_estimate(cfg: GemmConfig, spec: GemmSpec) -> int:
    """Bytes of shared memory the pipelined operand tiles take (an upper bound: every stage
    holds an A and a B tile, two B tiles for SwiGLU; plus ``SHARED_SLACK``). Measured offline
    (tests/gemm_offline_compile.py) the K loop's loads are pipelined when the launch's pointers
    and strides are 16-aligned, as torch's contiguous tensors of hidden sizes are."""
    ea, eb = spec.a_type.itemsize, spec.b_type.itemsize
    b_tiles = 2 if spec.swiglu else 1
    return cfg.num_stages * (cfg.BLOCK_M * cfg.BLOCK_K * ea + b_tiles * cfg.BLOCK_K * cfg.BLOCK_N * eb) + SHARED_SLACK


def _fit(cfg: GemmConfig, spec: GemmSpec, target: Target) -> GemmConfig:
    """The table's fp16 config adapted: SwiGLU keeps two accumulators (half the tile width),
    4-byte operands halve BLOCK_K, then stages / BLOCK_K shrink until shared memory fits."""
    if target.interpret:
        return cfg
    if spec.swiglu and cfg.BLOCK_N >= 32 and (cfg.regime == "tiled" or cfg.BLOCK_M > FMA_MAX_M):
        cfg = replace(cfg, BLOCK_N=cfg.BLOCK_N // 2)
    if max(spec.a_type.itemsize, spec.b_type.itemsize) == 4 and cfg.BLOCK_K > 32:
        cfg = replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
    if spec.weight is not None and spec.swiglu and cfg.regime == "gemv" and cfg.BLOCK_M <= FMA_MAX_M \
            and cfg.BLOCK_K > 64:
        # the FMA GEMV dequantizes two [BN, BK] weight tiles (gate, up) in fp32 registers per step:
        # at BLOCK_K 128 sm80's ptxas spills (12 bytes, int4 + RMSNorm), so half the K tile
        cfg = replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
    # An epilogue that loads a whole tile (the residual) holds its 64-bit addresses next to the
    # accumulator: keep at most 32 accumulator values per thread then (more warps), else 64.
    per_thread = 32 if spec.residual else 64
    tile = cfg.BLOCK_M * cfg.BLOCK_N * (2 if spec.swiglu else 1)
    while cfg.regime == "tiled" and tile > per_thread * target.warp_size * cfg.num_warps and cfg.num_warps < 8:
        cfg = replace(cfg, num_warps=cfg.num_warps * 2)
    limit = shared_limit(target)
    while shared_estimate(cfg, spec) > limit and cfg.num_stages > 1:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while shared_estimate(cfg, spec) > limit and cfg.BLOCK_K > 16:
        cfg = replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
    return cfg


def config_for(target: Target, spec: GemmSpec, m: int, n: int, k: int) -> GemmConfig:
    """The config for an [M, K] x [K, N] matmul (N: output columns) on ``target``."""
    table = _table(target)
    mb = m_bucket(m)
    cfg = table.get((mb, nk_bucket(n, k))) or table[(mb, "small")]
    return _fit(cfg, spec, target)


def split_k_for(cfg: GemmConfig, target: Target, programs: int, k: int) -> int:
    """K chunks for the GEMV kernel: only when its N-slices (``programs``) cannot fill the GPU
    twice over, at most ``cfg.split_k``, each chunk at least one BLOCK_K tile."""
    tiles = -(-k // cfg.BLOCK_K)
    if cfg.split_k == 1 or tiles <= 1:
        return 1
    if not target.interpret and programs >= 2 * target.sm_count:
        return 1
    want = cfg.split_k if target.interpret else -(-2 * target.sm_count // max(programs, 1))
    return max(1, min(cfg.split_k, tiles, want))


# -------------------------------------------------------------------------------------- launcher


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def kernel_sources(spec: GemmSpec, interpret: bool = False) -> tuple[list[str], str]:
    """The names a program calls this spec's three kernels by (unique per spec: a program may hold
    many specs) and the one source that defines them all."""
    import hashlib

    source = render(spec, interpret)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    names = [f"{base}_{digest}" for base in (GEMM, GEMV, REDUCE)]
    aliases = "".join(f"\n{name} = {base}" for name, base in zip(names, (GEMM, GEMV, REDUCE)))
    return names, source + aliases + "\n"


# A representative M per bucket of ``m_bucket`` (programs choose a config by M at run time).
M_BUCKETS = {"decode": 1, "few": GEMV_MAX_M, "mid": 128, "large": 1024}


def label(spec: GemmSpec) -> str:
    """What one GEMM computes, for reports: matmul and its fused work."""
    w = spec.weight
    if w is None:
        parts = ["matmul"]
    else:
        parts = [f"matmul[{w.storage}{f'-g{w.group_size}' if w.group_size else ''}"
                 f"{f' x {w.act} rows' if w.act else ''}]"]
    if spec.norm is not None:
        parts.insert(0, "rmsnorm")
    if spec.has_bias:
        parts.append("bias")
    if spec.swiglu:
        parts.append(f"{spec.activation}-glu")
    elif spec.activation:
        parts.append(spec.activation)
    if spec.residual:
        parts.append("residual")
    return "+".join(parts)


def _kernels(spec: GemmSpec, target: Target):
    from turbofx.codegen import cache

    names, source = kernel_sources(spec, target.interpret)
    return tuple(cache.load(name, source, target) for name in names)


def _check_tensor(where: str, name: str, t, dims: int, dtype: torch.dtype | None, device: torch.device,
                  floats: tuple[torch.dtype, ...] = FLOATS) -> None:
    if not isinstance(t, torch.Tensor):
        raise GemmInputError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise GemmInputError(f"{where}: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise GemmInputError(f"{where}: {name} is {t.dtype} but the spec says {dtype}: build the GemmSpec from the "
                             "tensors' dtypes (or cast them)")
    if dtype is None and t.dtype not in floats:
        raise GemmInputError(f"{where}: {name} is {t.dtype}; it must be one of {floats}")
    if t.device != device:
        raise GemmInputError(f"{where}: {name} is on {t.device} but A is on {device}: put every tensor on one device")


@dataclass(frozen=True)
class _Shapes:
    batch: int
    m: int
    n: int  # B's output columns (SwiGLU: gate's and up's)
    n_out: int
    k: int
    out: tuple[int, ...]


def _check_operands(where: str, a, b, spec: GemmSpec, bias, residual, row_scale, norm_weight,
                    floats: tuple[torch.dtype, ...] = FLOATS, b_scale=None, b_min=None) -> _Shapes:
    """What ``gemm`` and ``gemm_reference`` both require of their tensors: dims, dtypes, one device,
    matching K, and each optional operand given iff the spec has it, with its shape."""
    if not isinstance(spec, GemmSpec):
        raise GemmInputError(f"{where}: spec must be a GemmSpec, got {type(spec).__name__}")
    dims = 3 if spec.batched else 2
    if not isinstance(a, torch.Tensor):
        raise GemmInputError(f"{where}: A must be a torch.Tensor, got {type(a).__name__}")
    device = a.device
    _check_tensor(where, "A", a, dims, spec.a_type, device)
    _check_tensor(where, "B", b, dims, spec.b_type, device)
    batch = a.shape[0] if spec.batched else 1
    if spec.batched and b.shape[0] != batch:
        raise GemmInputError(f"{where}: A has batch {batch} but B has {b.shape[0]}")
    m, k = a.shape[-2:]
    n, kb = _n_of(spec, b), _k_of(spec, b)
    w = spec.weight
    if w is not None:  # B is q: its shape follows the storage; K is A's
        if tuple(b.shape) != w.q_shape(n, k):
            raise GemmInputError(f"{where}: quantized B ({w.storage}) for K={k} must have shape {w.q_shape(n, k)}, "
                                 f"got {tuple(b.shape)}")
        kb = k
        for name, t, flag in (("b_scale", b_scale, True), ("b_min", b_min, w.has_min)):
            if flag != (t is not None):
                raise GemmInputError(f"{where}: the spec's WeightQuant {'needs' if flag else 'has no'} {name} but it "
                                     f"was {'not given' if flag else 'given'}")
            if t is not None:
                _check_tensor(where, name, t, len(w.scale_shape(n, k)), None, device, floats)
                if tuple(t.shape) != w.scale_shape(n, k):
                    raise GemmInputError(f"{where}: {name} has shape {tuple(t.shape)}, expected {w.scale_shape(n, k)}")
    elif b_scale is not None or b_min is not None:
        raise GemmInputError(f"{where}: b_scale / b_min were given but the spec's B is not quantized "
                             "(set GemmSpec(weight=WeightQuant(...)))")
    if kb != k:
        layout = "[N, K]" if spec.b_layout == "nk" else "[K, N]"
        raise GemmInputError(f"{where}: A {tuple(a.shape)} has K={k} but B {tuple(b.shape)} (layout {layout}) "
                             f"has K={kb}")
    if spec.swiglu and n % 2:
        raise GemmInputError(f"{where}: B has {n} output columns: SwiGLU's [gate; up] needs an even number")
    n_out = n // 2 if spec.swiglu else n
    out_shape = (batch, m, n_out) if spec.batched else (m, n_out)
    for name, t, want, flag in (("bias", bias, (n,), spec.has_bias), ("residual", residual, out_shape, spec.residual),
                                ("row_scale", row_scale, out_shape[:-1], spec.row_scale),
                                ("norm_weight", norm_weight, (k,), spec.norm is not None)):
        if flag != (t is not None):
            raise GemmInputError(f"{where}: the spec {'needs' if flag else 'has no'} {name} but it was "
                                 f"{'not given' if flag else 'given'}: set GemmSpec({_flag_name(name)}) to match")
        if t is not None:
            _check_tensor(where, name, t, len(want), None, device, floats)
            if tuple(t.shape) != want:
                raise GemmInputError(f"{where}: {name} has shape {tuple(t.shape)}, expected {want}")
    return _Shapes(batch, m, n, n_out, k, out_shape)


def gemm(a: torch.Tensor, b: torch.Tensor, spec: GemmSpec, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, row_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
         target: Target | None = None, config: GemmConfig | None = None, *,
         norm_weight: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
         b_min: torch.Tensor | None = None, kernels: tuple | None = None) -> torch.Tensor:
    """out = epilogue(prologue(A) @ prologue(B)) as ``spec`` says (``gemm_reference`` in torch).

    A: [M, K] ([Bt, M, K] batched). B: [N, K] (``b_layout="nk"``) or [K, N] ("kn"), batched with a
    leading Bt. bias: [N] (SwiGLU: [2·N_out], gate's then up's). residual and out: [M, N_out]
    (batched [Bt, M, N_out]). row_scale: [M] ([Bt, M]). norm_weight: [K], any float dtype (iff
    ``spec.norm``). Any strides. ``config`` forces a config. A quantized B (``spec.weight``): B is q,
    b_scale / b_min its scales / mins (shapes: ``WeightQuant``).
    """
    shapes = _check_operands("gemm", a, b, spec, bias, residual, row_scale, norm_weight, b_scale=b_scale, b_min=b_min)
    device = a.device
    target = target or detect(device)
    if spec.weight is not None:
        why = quant_refusal(spec.weight, target)
        if why is not None:
            raise GemmInputError(f"gemm: {why.detail}")
    # (a Program passes its own kernels: on an offline target they refuse to run, or record launches)
    if kernels is None and (device.type == "cpu") != target.interpret:
        raise GemmInputError(f"gemm: tensors on {device} cannot run on target {target.describe()}: the CPU runs "
                             "kernels in the interpreter (target cpu-interpret), GPUs need their tensors on the GPU")
    refusal = gemm_refusal(spec, a, b)
    if refusal is not None:
        raise GemmInputError(f"gemm: the GEMM template does not do this matmul ({refusal.code}: {refusal.detail}); "
                             "use torch's matmul for it")
    m, n_out, k, out_shape = shapes.m, shapes.n_out, shapes.k, shapes.out
    if out is None:
        out = torch.empty(out_shape, dtype=spec.out_type, device=device)
    else:
        _check_tensor("gemm", "out", out, len(out_shape), spec.out_type, device)
        if tuple(out.shape) != out_shape:
            raise GemmInputError(f"gemm: out has shape {tuple(out.shape)}, expected {out_shape}")
        # out may be the residual itself (x += linear(...)): each element is read, then written, by
        # the program that owns it. Any other sharing could read what another program wrote.
        same = residual is not None and _same_view(out, residual)
        if _overlaps(out, a, b, bias, None if same else residual, row_scale, norm_weight, b_scale, b_min):
            raise GemmInputError("gemm: out shares memory with an input; tiles would read what others wrote. "
                                 "Pass a separate out tensor")
    if out.numel() == 0:
        return out
    cfg = config or config_for(target, spec, m, n_out, k)
    if cfg.regime == "gemv" and m > cfg.BLOCK_M:
        raise GemmInputError(f"gemm: a GEMV config covers at most BLOCK_M={cfg.BLOCK_M} rows; M={m}")
    if norm_weight is not None and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()  # [K]: the kernels index it with unit stride
    _launch(a, b, spec, bias, residual, row_scale, norm_weight, out, target, cfg, shapes.batch, m, n_out, k, kernels,
            b_scale, b_min)
    return out


def quant_refusal(fmt: WeightQuant, target: Target) -> Refusal | None:
    """Why ``target`` cannot run a quantized B stored as ``fmt`` (None: it can). FP8 needs FP8
    conversions (and tensor cores for ``act``): NVIDIA sm89 and newer (e4m3), AMD gfx942 (e4m3fnuz,
    MI300's own variant) and gfx950; the interpreter emulates both."""
    if not fmt.storage.startswith("fp8") or target.interpret:
        return None
    if target.backend == "cuda":
        cc = int(target.arch[2:]) if target.arch[2:].isdigit() else 0
        if fmt.storage == "fp8_e4m3" and cc >= 89:
            return None
        return Refusal("fp8-target", f"{fmt.storage} weights need an NVIDIA GPU of compute capability 8.9 or newer "
                                     f"(Ada, Hopper, Blackwell); target {target.describe()} has none: use int8 or "
                                     "int4 quantization there")
    if (fmt.storage == "fp8_e4m3fnuz" and target.arch == "gfx942") or (fmt.storage == "fp8_e4m3" and
                                                                        target.arch == "gfx950"):
        return None
    return Refusal("fp8-target", f"{fmt.storage} weights cannot run on {target.describe()}: AMD MI300 (gfx942) "
                                 "takes fp8_e4m3fnuz, MI350 (gfx950) fp8_e4m3; use int8 or int4 elsewhere")


_ACTIVATION_TORCH = {"silu": torch.nn.functional.silu, "relu": torch.relu,
                     "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def dequantize_weight(q: torch.Tensor, fmt: WeightQuant, scale: torch.Tensor, min: torch.Tensor | None, k: int,
                      dtype: torch.dtype = torch.float32, with_row_scale: bool = True) -> torch.Tensor:
    """WeightQuant's formula: w [N, K] in ``dtype`` (fp32: the kernels' registers and gguf's own
    ``d * q + m``; fp64: exact, every product of a <= 8-bit q and an fp16/fp32 scale is).
    ``with_row_scale=False`` leaves per-row scales out (what the kernels multiply by q before
    scaling the accumulator). ``turbofx.quant.dequantize`` is this for a ``QuantizedWeight``."""
    x = (unpack_uint4(q, k) if fmt.storage == "uint4" else q).to(dtype)
    if fmt.zero:
        x = x - fmt.zero
    if not fmt.group_size:
        return x * scale.to(dtype)[:, None] if with_row_scale else x
    # [N, G, group] view, each group times its own scale (+ min); a ragged K is padded
    n, g = x.shape[0], fmt.group_size
    groups = -(-k // g)
    x = torch.nn.functional.pad(x, (0, groups * g - k)).reshape(n, groups, g) * scale.to(dtype)[:, :, None]
    if min is not None:
        x = x + min.to(dtype)[:, :, None]
    return x.reshape(n, groups * g)[:, :k]


def unpack_uint4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/2)] uint8 -> [N, K] uint8 values 0..15 (k = 2j low nibble of byte j, 2j+1 high)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])[:, :k]


def quantize_rows(x: torch.Tensor, act: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of the kernels' dynamic per-row activation quantization over the last dim,
    computed in ``dtype`` as they compute it in fp32: scale = max|x| / largest (1 for an all-zero
    row), v = x / scale (a division), q = v rounded half away from zero (exactly: v - trunc(v) is
    exact) and clamped to +-127 (int8), or v clamped to +-largest and cast (fp8, nearest even).
    q is returned in ``dtype``; ``turbofx.quant.quantize_activations`` wraps this."""
    storage, largest = ACT_QUANT[act]
    xs = x.to(dtype)
    amax = xs.abs().amax(dim=-1, keepdim=True) if xs.shape[-1] else xs.new_zeros(xs.shape[:-1] + (1,))
    scale = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
    y = xs / scale
    if act == "int8":
        t = torch.trunc(y)
        q = torch.where((y - t).abs() >= 0.5, t + torch.sign(y), t).clamp(-127, 127)
    else:
        q = y.clamp(-largest, largest).to(torch.float32).to(storage).to(dtype)
    return q, scale[..., 0]


def gemm_reference(a: torch.Tensor, b: torch.Tensor, spec: GemmSpec, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                   norm_weight: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                   b_min: torch.Tensor | None = None) -> torch.Tensor:
    """What ``gemm`` computes, op by op in torch, as an eager model would: the prologue (the norm in
    fp32 with its rounding points, operands rounded to ``spec.dtype``), ``torch.matmul`` in
    ``spec.dtype``, then ``epilogue_ops(spec)`` in fp32 with their ``Round`` points, stored as
    ``spec.out_type``. Same arguments and shapes as ``gemm`` (any strides, any device, meta too).
    A float64 spec computes everything in float64 (an exact reference for tests). A quantized B is
    dequantized by ``dequantize_weight`` (in fp32, rounded to ``spec.dtype``, as the kernels do;
    per-row scales multiply the product), A quantized by ``quantize_rows`` when ``weight.act``."""
    shapes = _check_operands("gemm_reference", a, b, spec, bias, residual, row_scale, norm_weight,
                             FLOATS + (torch.float64,), b_scale=b_scale, b_min=b_min)
    wide = torch.float64 if spec.dtype == torch.float64 else torch.float32  # the kernels' fp32 registers
    if spec.norm is not None:
        n = spec.norm
        xs = a.to(wide)
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + n.eps)
        if n.mid_dtype is not None:
            y = y.to(n.mid_dtype).to(wide)
        g = norm_weight.to(wide)
        y = (g + n.weight_offset if n.weight_offset != 0.0 else g) * y
        if n.out_dtype is not None:
            y = y.to(n.out_dtype).to(wide)
        a = y
    w = spec.weight
    row_factor = None  # what the product is scaled by (quantized B with per-row scales; A's row scales)
    if w is not None and w.act is not None:
        qa, a_scale = quantize_rows(a, w.act, wide)
        lhs = qa
        rhs = dequantize_weight(b, w, b_scale, b_min, shapes.k, wide, with_row_scale=False).t()
        row_factor = a_scale[:, None] * b_scale.to(wide)[None, :]
    elif w is not None:
        lhs = a.to(spec.dtype)
        rhs = dequantize_weight(b, w, b_scale, b_min, shapes.k, wide, with_row_scale=False).to(spec.dtype).t()
        row_factor = None if w.group_size else b_scale.to(wide)[None, :]
    else:
        lhs = a.to(spec.dtype)
        rhs = b.to(spec.dtype)
        if spec.b_layout == "nk":
            rhs = rhs.transpose(-1, -2)
    ops = epilogue_ops(spec)
    if spec.has_bias and spec.bias_in_matmul and row_factor is None:  # eager's addmm / baddbmm: one rounding
        full = (torch.baddbmm if spec.batched else torch.addmm)(bias.to(spec.dtype), lhs, rhs).to(wide)
        assert isinstance(ops[0], AddBias), ops
        ops = ops[1:]
    else:
        full = torch.matmul(lhs, rhs).to(wide)
    if row_factor is not None:
        full = full * row_factor
    n_out = shapes.n_out
    acc, up = (full[..., :n_out], full[..., n_out:]) if spec.swiglu else (full, None)
    for op in ops:
        if isinstance(op, RowScale):
            s = row_scale.to(wide)[..., None]
            acc, up = acc * s, (up * s if up is not None else None)
        elif isinstance(op, AddBias):
            bias_w = bias.to(wide)
            acc, up = acc + bias_w[:n_out], (up + bias_w[n_out:] if up is not None else None)
        elif isinstance(op, Activation):
            acc = _ACTIVATION_TORCH[op.kind](acc)
        elif isinstance(op, GatedActivation):
            gate = _ACTIVATION_TORCH[op.kind](acc)
            if op.gate_dtype is not None:
                gate = gate.to(op.gate_dtype).to(wide)
            acc, up = gate * up, None
        elif isinstance(op, AddResidual):
            acc = acc + residual.to(wide)
        elif isinstance(op, Round):
            acc = acc.to(op.dtype).to(wide)
            up = up.to(op.dtype).to(wide) if up is not None else None
        elif isinstance(op, Store):
            return acc.to(op.dtype)
        else:
            raise AssertionError(f"turbofx bug: epilogue op {op!r} has no reference (please report it)")
    raise AssertionError("turbofx bug: epilogue_ops has no Store (please report it)")


def _flag_name(name: str) -> str:
    return {"bias": "has_bias=...", "norm_weight": "norm=RmsNorm(eps, ...)"}.get(name, name + "=...")


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()


def _overlaps(out: torch.Tensor, *inputs) -> bool:
    for t in inputs:
        if t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            return True
    return False


def _strides3(t: torch.Tensor | None, batched: bool) -> tuple[int, int, int]:
    """(batch, row, column) strides; batch 0 when unbatched."""
    if t is None:
        return 0, 0, 0
    return (t.stride(0), t.stride(1), t.stride(2)) if batched else (0, t.stride(0), t.stride(1))


def _launch(a, b, spec: GemmSpec, bias, residual, row_scale, norm_weight, out, target: Target, cfg: GemmConfig,
            batch: int, m: int, n_out: int, k: int, kernels: tuple | None = None, b_scale=None, b_min=None) -> None:
    gemm_fn, gemv_fn, reduce_fn = kernels or _kernels(spec, target)
    bt = spec.batched
    sab, sam, sak = _strides3(a, bt)
    sbb, sr, sc = _strides3(b, bt)
    sbn, sbk = (sr, sc) if spec.b_layout == "nk" else (sc, sr)
    sob, som, son = _strides3(out, bt)
    srb, srm, srn = _strides3(residual, bt)
    srsb = row_scale.stride(0) if (row_scale is not None and bt) else 0
    if row_scale is not None and row_scale.stride(-1) != 1:
        row_scale = row_scale.contiguous()
        srsb = row_scale.stride(0) if bt else 0
    # absent operands: any valid pointer (their loads are compiled out)
    bias_t, res_t, rs_t, nw_t = (bias if bias is not None else out, residual if residual is not None else out,
                                 row_scale if row_scale is not None else out,
                                 norm_weight if norm_weight is not None else out)
    if b_min is not None and b_min.stride() != b_scale.stride():
        b_scale, b_min = b_scale.contiguous(), b_min.contiguous()  # the kernels address both with one stride
    qs_t, qm_t = (b_scale if b_scale is not None else out, b_min if b_min is not None else out)
    sqn = b_scale.stride(0) if b_scale is not None else 0
    sqk = b_scale.stride(1) if b_scale is not None and b_scale.dim() == 2 else 0
    upcast = target.interpret
    ieee = spec.dtype == torch.float32 and not spec.allow_tf32 and not target.interpret
    common = dict(SWIGLU=spec.swiglu, num_warps=cfg.num_warps)
    if cfg.regime == "tiled":
        groups_m = -(-m // cfg.BLOCK_M)
        grid = (groups_m * -(-n_out // cfg.BLOCK_N), batch)
        gemm_fn[grid](a, b, out, bias_t, res_t, rs_t, nw_t, qs_t, qm_t, m, n_out, k, sab, sam, sak, sbb, sbn, sbk,
                      sob, som, son, srb, srm, srn, srsb, sqn, sqk, groups_m, UPCAST=upcast, IEEE=ieee, GROUP_M=cfg.GROUP_M,
                      BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_stages=cfg.num_stages,
                      **common)
        return
    dot = cfg.BLOCK_M >= 16  # a 16-row tl.dot tile; fewer rows: FMA on just the rows there are
    block_m = max(16, _pow2(m)) if dot else _pow2(m)
    n_tiles = -(-n_out // cfg.BLOCK_N)
    splits = split_k_for(cfg, target, n_tiles * batch, k)
    k_chunk = -(-(-(-k // cfg.BLOCK_K)) // splits) * cfg.BLOCK_K
    splits = max(1, -(-k // k_chunk)) if k else 1  # no empty chunk
    k_chunk = k_chunk if k else 0
    width = n_out * 2 if spec.swiglu else n_out
    part = torch.empty((batch, splits, m, width), dtype=torch.float32, device=out.device) if splits > 1 else out
    gemv_fn[(n_tiles, splits, batch)](a, b, out, part, bias_t, res_t, rs_t, nw_t, qs_t, qm_t, m, n_out, k, k_chunk,
                                      splits, sab, sam, sak, sbb, sbn, sbk, sob, som, son, srb, srm, srn, srsb,
                                      sqn, sqk,
                                      SPLIT=splits > 1, DOT=dot, UPCAST=upcast, IEEE=ieee, BLOCK_M=block_m,
                                      BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_stages=cfg.num_stages, **common)
    if splits > 1:
        reduce_fn[(n_tiles, batch)](part, out, bias_t, res_t, rs_t, m, n_out, splits, sob, som, son, srb, srm, srn,
                                    srsb, BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, **common)


# ---------------------------------------------------------------- the family: lowering, launcher, cost
# turbofx::gemm nodes (the matmul pass makes them), steps of type "gemm".

OPTIONAL_OPERANDS = ("bias", "residual", "norm_weight", "b_scale", "b_min")  # step keys: slots or None


class GemmFamily(family.Family):
    step_types = ("gemm",)

    def claims(self, unit) -> bool:
        return isinstance(unit, fx.Node) and unit.target is GEMM_OP

    def lower(self, n: fx.Node, lc: family.LowerContext) -> dict:
        """The spec, operand slots, the output's layout and the target's config per M bucket (M
        may be symbolic: the config is chosen at run time)."""
        from dataclasses import asdict

        from turbofx.codegen import indexing as ix
        from turbofx.codegen.lower import val_int
        from turbofx.runtime.ops import gemm_spec_of

        from turbofx.runtime.op_args import GemmArgs

        args = GemmArgs.of(n)
        a, b, bias, residual, norm_weight = args.a, args.b, args.bias, args.residual, args.norm_weight
        operands = {"bias": bias, "residual": residual, "norm_weight": norm_weight, "b_scale": args.b_scale,
                    "b_min": args.b_min}
        spec = gemm_spec_of(args.spec)
        names, source = kernel_sources(spec, lc.target.interpret)
        for name in names:
            lc.add_source(name, source)
        ov, bv = n.meta["val"], b.meta["val"]
        k = val_int(a.meta["val"].shape[-1])  # B's may be packed (uint4: two per byte)
        n_out = val_int(ov.shape[-1])
        target = lc.target
        slot = lc.slot
        step = {
            "type": "gemm", "kernels": names, "spec": args.spec,
            "a": slot[a], "b": slot[b], **{k: slot[x] if x is not None else None for k, x in operands.items()},
            "out": slot[n],
            "shape": [ix.pyexpr(e) for e in ix.shape_of(n)], "stride": [ix.pyexpr(e) for e in ix.strides_of(n)],
            "configs": {bucket: asdict(config_for(target, spec, m, n_out, k)) for bucket, m in M_BUCKETS.items()},
            "target": {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size,
                       "sm_count": target.sm_count, "shared_mem": target.shared_mem},
            "node": n.name}
        lc.define(n, [x for x in (a, b, *operands.values()) if x is not None])
        lc.records.append(family.KernelRecord(names[0], "gemm", label(spec), [n.name] + n.meta.get("turbofx_fused", [])))
        return step

    def runner(self, s: dict, kernels: dict):
        """The config for this call's M (decode rows: GEMV / split-K; more: tiled), the fused
        prologue and epilogue as the spec says."""
        from turbofx.runtime.exprs import _compile_expr, _eval
        from turbofx.runtime.ops import gemm_spec_of

        spec = gemm_spec_of(s["spec"])
        target = Target(device=None, **s["target"])
        configs = {k: GemmConfig(**c) for k, c in s["configs"].items()}
        fns = tuple(kernels[k] for k in s["kernels"])
        shape = [_compile_expr(e) for e in s["shape"]]
        stride = [_compile_expr(e) for e in s["stride"]]
        ai, bi, oi = s["a"], s["b"], s["out"]
        extra = {k: s[k] for k in OPTIONAL_OPERANDS if s.get(k) is not None}
        dtype = spec.out_type

        def run(values: list, env: dict) -> None:
            a = values[ai]
            out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                      dtype=dtype, device=a.device)
            values[oi] = out
            if out.numel() == 0:
                return
            operands = {k: values[i] for k, i in extra.items()}
            if not spec.batched:  # leading dims are rows: [*, K] -> [M, K] (a view when strides allow)
                rows = out.numel() // out.shape[-1]
                a = a.reshape(rows, a.shape[-1])
                out = out.view(rows, out.shape[-1])
                if "residual" in operands:
                    operands["residual"] = operands["residual"].reshape(rows, out.shape[-1])
            if a.dim() >= 2 and not _unit_stride(a.shape, a.stride()):
                a = a.contiguous()  # a caller's input strided unlike the example: tiles need a unit stride
            gemm(a, values[bi], spec, out=out, target=target, config=configs[m_bucket(a.shape[-2])], kernels=fns,
                 **operands)

        return family.bind(run, s, self)

    def reads(self, s: dict) -> list[int]:
        return [s[k] for k in ("a", "b", *OPTIONAL_OPERANDS) if s.get(k) is not None]

    def writes(self, s: dict) -> list[int]:
        return [s["out"]]

    def checkable(self, s: dict) -> bool:
        return True

    def cost(self, s: dict, values: list, env: dict, ledger):
        """Operands read once each (tiles re-read from cache are not traffic), the output written,
        2·M·N·K FLOPs (SwiGLU: both halves), a second launch when the GEMV splits K."""
        from turbofx.compiler.roofline import StepCost, _footprint, meta_output
        from turbofx.runtime.ops import gemm_spec_of

        spec = gemm_spec_of(s["spec"])
        a, b = values[s["a"]], values[s["b"]]
        out = meta_output(s, env, spec.out_type)
        values[s["out"]] = out
        batch = a.shape[0] if spec.batched else 1
        m, k = (a.shape[-2] if spec.batched else a.numel() // max(a.shape[-1], 1)), a.shape[-1]
        n = b.shape[-2] if spec.b_layout == "nk" else b.shape[-1]
        cfg = GemmConfig(**s["configs"][m_bucket(m)])
        launches = 1 if out.numel() else 0
        if cfg.regime == "gemv" and out.numel():
            n_tiles = -(-out.shape[-1] // cfg.BLOCK_N)
            launches += split_k_for(cfg, Target(device=None, **s["target"]), n_tiles * batch, k) > 1
        return StepCost(s["kernels"][0], "gemm", ledger.reads([values[i] for i in self.reads(s)]), _footprint(out),
                        2 * batch * m * n * k, launches)


family.register(GemmFamily())
