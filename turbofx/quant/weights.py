"""Quantized weights: the stored record, the exact dequantization reference, and the quantizers.

A ``QuantizedWeight`` holds one nn.Linear weight [N, K] in the form ``WeightQuant`` describes
(``turbofx/codegen/gemm.py``): q (int8 / packed uint4 / fp8), scale, optional min.
``dequantize`` is the reference every kernel is checked against:

    w[n, k] = (q[n, k] - zero) * scale[n, k // group_size] (+ min[n, k // group_size])

The quantizers here are pure torch and run on the weight's own device. Each refuses (with
``QuantizationError``) a weight that is not a finite 2-D floating-point tensor, and each gives
finite scales and exact zeros for an all-zero row or group.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from turbofx.codegen.gemm import ACT_QUANT, WeightQuant, dequantize_weight, unpack_uint4  # noqa: F401 (unpack: re-exported)
from turbofx.errors import QuantizationError

INT8_MAX = 127
UINT4_MAX = 15
# the largest finite value of each fp8 storage: the per-row scale maps |w|max onto it
FP8_LARGEST = {"fp8_e4m3": 448.0, "fp8_e4m3fnuz": 240.0}
# range-shrink ratios tried per group by the int4 search (1.0 first: the round-to-nearest
# candidate, so the search never ends worse than RTN)
INT4_SEARCH_RATIOS = (1.0, 0.9, 0.8)
INT4_SEARCH_REFITS = 2  # least-squares refit + re-round steps per candidate
# elements per chunk of the int4 quantizer: bounds its temporaries (a few x-sized tensors)
_SEARCH_CHUNK_ELEMENTS = 1 << 20


@dataclass
class QuantizedWeight:
    """One quantized [N, K] weight in ``fmt``'s stored form.

    Invariants (checked on construction): q has ``fmt.dtype`` and shape ``fmt.q_shape(N, K)``;
    scale (and min, present iff ``fmt.has_min``) has shape ``fmt.scale_shape(N, K)`` and a float
    dtype; every tensor is on the same device. ``shape`` is the full-precision [N, K]."""
    fmt: WeightQuant
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, WeightQuant):
            raise QuantizationError(f"QuantizedWeight.fmt must be a WeightQuant, not {type(self.fmt).__name__}")
        shape = tuple(self.shape)
        if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise QuantizationError(f"QuantizedWeight.shape must be the full-precision [N, K], not {self.shape!r}")
        self.shape = (shape[0], shape[1])
        n, k = self.shape
        fmt = self.fmt
        if self.q.dtype != fmt.dtype or tuple(self.q.shape) != fmt.q_shape(n, k):
            raise QuantizationError(f"QuantizedWeight.q is {self.q.dtype} {list(self.q.shape)}; {fmt.storage} "
                                    f"storage of a [{n}, {k}] weight needs {fmt.dtype} {list(fmt.q_shape(n, k))}")
        for name in ("scale", "min"):
            t = getattr(self, name)
            if t is None:
                if name == "scale" or fmt.has_min:
                    raise QuantizationError(f"QuantizedWeight.{name} is missing ({fmt})")
                continue
            if name == "min" and not fmt.has_min:
                raise QuantizationError(f"QuantizedWeight has a min tensor but {fmt} has has_min=False")
            if not t.dtype.is_floating_point or tuple(t.shape) != fmt.scale_shape(n, k):
                raise QuantizationError(f"QuantizedWeight.{name} is {t.dtype} {list(t.shape)}; {fmt} needs a float "
                                        f"tensor of shape {list(fmt.scale_shape(n, k))}")
            if t.device != self.q.device:
                raise QuantizationError(f"QuantizedWeight.{name} is on {t.device} but q is on {self.q.device}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name: "q", "scale", and "min" when present."""
        out = {"q": self.q, "scale": self.scale}
        if self.min is not None:
            out["min"] = self.min
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (the same object's tensors if already there)."""
        return QuantizedWeight(self.fmt, self.q.to(device), self.scale.to(device),
                               None if self.min is None else self.min.to(device), self.shape)

    def select_rows(self, index: torch.Tensor | Sequence[int]) -> QuantizedWeight:
        """Rows ``index`` (a permutation or subset of 0..N-1, in that order) of every tensor:
        dequantize(result) == dequantize(self)[index]. Rows are independent in every format."""
        idx = torch.as_tensor(index, dtype=torch.long).to(self.q.device)
        if idx.dim() != 1:
            raise QuantizationError(f"select_rows needs a 1-D row index, not shape {list(idx.shape)}")
        n = self.shape[0]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise QuantizationError(f"select_rows: row index out of range 0..{n - 1}")
        return QuantizedWeight(self.fmt, self.q[idx], self.scale[idx],
                               None if self.min is None else self.min[idx], (idx.numel(), self.shape[1]))


def cat_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Join weights along N (e.g. q, k, v -> one QKV weight): dequantize(result) ==
    cat([dequantize(w) for w in weights]). All must share fmt, K, scale/min dtypes and device."""
    ws = list(weights)
    if not ws:
        raise QuantizationError("cat_rows needs at least one QuantizedWeight")
    first = ws[0]
    for w in ws[1:]:
        if w.fmt != first.fmt or w.shape[1] != first.shape[1]:
            raise QuantizationError(f"cat_rows: cannot join {w.fmt} [{w.shape[0]}, {w.shape[1]}] with "
                                    f"{first.fmt} [{first.shape[0]}, {first.shape[1]}]: fmt and K must match")
        if w.scale.dtype != first.scale.dtype or (w.min is not None and w.min.dtype != first.min.dtype):
            raise QuantizationError(f"cat_rows: scale dtypes differ ({w.scale.dtype} vs {first.scale.dtype})")
        if w.device != first.device:
            raise QuantizationError(f"cat_rows: weights on different devices ({w.device} vs {first.device})")
    mins = None if first.min is None else torch.cat([w.min for w in ws])
    return QuantizedWeight(first.fmt, torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]), mins,
                           (sum(w.shape[0] for w in ws), first.shape[1]))


# -- the reference ----------------------------------------------------------------------------------

def pack_uint4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers 0..15 -> [N, ceil(K/2)] uint8; an odd K's last high nibble is 0."""
    v = values.to(torch.uint8)
    if v.shape[1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    return v[:, 0::2] | (v[:, 1::2] << 4)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The weight [N, K] that ``qw`` stands for, computed in ``dtype`` by WeightQuant's formula.

    float64 is the exact reference (every q * scale product of a <= 8-bit q and an fp32 / fp16
    scale is exact in fp64); float32 rounds like the kernels' fp32 dequantization and like gguf's
    own numpy dequantization (``d * q + m`` in fp32), so a GGUF weight compares bit-exactly."""
    if not dtype.is_floating_point:
        raise QuantizationError(f"dequantize needs a floating-point dtype, not {dtype}")
    return dequantize_weight(qw.q, qw.fmt, qw.scale, qw.min, qw.shape[1], dtype)  # the kernels' own formula


# -- quantizers -------------------------------------------------------------------------------------

def _check_weight(w: object, what: str = "weight") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"can only quantize a torch.Tensor {what}, not {type(w).__name__}")
    if w.dim() != 2:
        raise QuantizationError(f"can only quantize a 2-D [N, K] {what} (an nn.Linear weight), "
                                f"not one of shape {list(w.shape)}")
    if not w.dtype.is_floating_point or w.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz,
                                                    torch.float8_e5m2, torch.float8_e5m2fnuz):
        raise QuantizationError(f"can only quantize a float16/bfloat16/float32/float64 {what}, not {w.dtype}")
    if w.is_meta:
        raise QuantizationError(f"cannot quantize a {what} on the meta device: load the real weights first")
    if w.numel() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizationError(f"the {what} [{w.shape[0]}, {w.shape[1]}] has {bad} NaN/inf values: "
                                "a quantized form of it would be meaningless; fix the weights first")
    return w


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    """fp64 weights are quantized in fp64, all others in fp32 (scales are stored in fp32)."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _safe_scale(absmax: torch.Tensor, largest: float) -> torch.Tensor:
    """absmax / largest as fp32, 1.0 where the row is all zeros (q is then 0: exact zeros), and
    never a zero from fp32 underflow of a tiny absmax (which would divide by zero)."""
    scale = (absmax / largest).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(w: torch.Tensor, act: str | None = None) -> QuantizedWeight:
    """Per-row symmetric int8: scale[n] = max|w[n, :]| / 127 (fp32), q = round(w / scale) clamped
    to +-127 (round-half-even, torch.round). |dequantize - w| <= scale / 2 per element.
    ``act="int8"``: the same weight, marked for W8A8 (dynamic int8 activations)."""
    w = _check_weight(w)
    cdt = _compute_dtype(w)
    x = w.to(cdt)
    scale = _safe_scale(x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0]), INT8_MAX)
    q = torch.round(x / scale.to(cdt)[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(WeightQuant("int8", act=act), q, scale, None, (w.shape[0], w.shape[1]))


def quantize_fp8(w: torch.Tensor, storage: str = "fp8_e4m3", act: str | None = None,
                 group_size: int = 0) -> QuantizedWeight:
    """Per-row fp8: scale[n] = max|w[n, :]| / largest (448 e4m3fn, 240 e4m3fnuz), q = (w / scale)
    cast to the fp8 dtype (round-to-nearest-even; clamped first so a rounding of w / scale just
    past largest cannot become NaN). Relative error <= 2^-4 for normal fp8 values.
    ``act``: the activation format for FP8 dynamic (must equal ``storage``). ``group_size`` > 0:
    one scale per group of that many columns instead (weight-only: the scales vary along K)."""
    if group_size:
        if act is not None:
            raise QuantizationError("fp8 with group scales is weight-only: dynamic activations need per-row "
                                    "weight scales (group_size=0)")
        return _quantize_fp8_groups(w, storage, group_size)
    if storage not in FP8_LARGEST:
        raise QuantizationError(f"fp8 storage must be one of {sorted(FP8_LARGEST)}, not {storage!r}")
    if act is not None and act != storage:
        raise QuantizationError(f"fp8 dynamic quantization needs act == storage ({storage!r}), not {act!r}")
    w = _check_weight(w)
    largest = FP8_LARGEST[storage]
    cdt = _compute_dtype(w)
    x = w.to(cdt)
    scale = _safe_scale(x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0]), largest)
    fmt = WeightQuant(storage, act=act)
    q = (x / scale.to(cdt)[:, None]).clamp_(-largest, largest).to(fmt.dtype)
    return QuantizedWeight(fmt, q, scale, None, (w.shape[0], w.shape[1]))


def _quantize_fp8_groups(w: torch.Tensor, storage: str, group_size: int) -> QuantizedWeight:
    if storage not in FP8_LARGEST:
        raise QuantizationError(f"fp8 storage must be one of {sorted(FP8_LARGEST)}, not {storage!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuantizationError(f"fp8 group_size must be a whole number >= 1, not {group_size!r}")
    w = _check_weight(w)
    n, k = w.shape
    largest = FP8_LARGEST[storage]
    fmt = WeightQuant(storage, group_size=group_size)
    x = w.to(_compute_dtype(w))
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(x, (0, groups * group_size - k)).reshape(n, groups, group_size)
    scale = _safe_scale(padded.abs().amax(dim=-1) if k else x.new_zeros(n, 0), largest)
    q = (padded / scale.to(x.dtype)[..., None]).clamp_(-largest, largest).reshape(n, -1)[:, :k].to(fmt.dtype)
    return QuantizedWeight(fmt, q.contiguous(), scale, None, (n, k))


def _int4_candidate(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Round-to-nearest uint4 of the groups x [R, G, L] on the ranges [lo, hi] [R, G]: (q as x's
    dtype, scale fp32, min fp32). scale = (hi - lo) / 15, computed as hi/15 - lo/15 so a huge
    range cannot overflow; a zero range (a constant group) gets scale 1 and q = 0, so the group
    dequantizes to exactly its value."""
    scale = (hi / UINT4_MAX - lo / UINT4_MAX).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    mn = lo.to(torch.float32)
    return _round_to_grid(x, scale, mn), scale, mn


def _round_to_grid(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """q = clamp(round((x - min) / scale), 0, 15): the nearest of the 16 levels for each value."""
    q = (x - mn.to(x.dtype)[..., None]).div_(scale.to(x.dtype)[..., None])
    return q.round_().clamp_(0, UINT4_MAX)


def _group_sq_error(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """[R, G]: sum over each group of (q * scale + min - x)^2, in ``dtype`` (``dequantize``'s
    arithmetic in that dtype)."""
    d = (q.to(dtype) * scale.to(dtype)[..., None]).add_(mn.to(dtype)[..., None]).sub_(x.to(dtype))
    return torch.linalg.vecdot(d, d)


def _refit(x: torch.Tensor, q: torch.Tensor, x_sum: torch.Tensor, scale: torch.Tensor,
           mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares (scale, min) of x ~ q * scale + min for fixed q (a line fit per group,
    group sums in fp64). Groups with a constant q (no slope to fit) or a non-positive or
    non-finite slope keep their (scale, min)."""
    n = x.shape[-1]
    q_sum = q.sum(dim=-1).double()
    qq = torch.linalg.vecdot(q, q).double()
    qx = torch.linalg.vecdot(q, x).double()
    var = qq - q_sum * q_sum / n
    cov = qx - q_sum * x_sum / n
    slope = cov / torch.where(var > 0, var, torch.ones_like(var))
    new_min = (x_sum - slope * q_sum) / n
    slope32, min32 = slope.to(torch.float32), new_min.to(torch.float32)
    ok = (var > 0) & (slope32 > 0) & torch.isfinite(slope32) & torch.isfinite(min32)
    return torch.where(ok, slope32, scale), torch.where(ok, min32, mn)


def _int4_groups(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint4 of the groups x [R, G, L] (all of length L): (q [R, G, L], scale [R, G], min [R, G])."""
    lo = x.amin(dim=-1)
    hi = x.amax(dim=-1)
    rtn = _int4_candidate(x, lo, hi)
    if not search:
        return rtn
    # Candidates: the range shrunk about its centre by each ratio (clipping the tails buys a finer
    # step for the bulk), each improved by alternating least-squares refits of (scale, min) and
    # re-rounding to the new grid (a Lloyd step: neither half can raise the error). Each group
    # keeps its lowest squared error, judged in fp32; a last comparison with round-to-nearest in
    # fp64 (the reference's arithmetic) keeps RTN wherever the search did not beat it.
    centre = lo * 0.5 + hi * 0.5
    half = hi * 0.5 - lo * 0.5
    x_sum = x.sum(dim=-1, dtype=torch.float64)
    best_err = _group_sq_error(x, *rtn, torch.float32)
    best_q, best_s, best_m = rtn
    for ratio in INT4_SEARCH_RATIOS:
        q, s, m = rtn if ratio == 1.0 else _int4_candidate(x, centre - half * ratio, centre + half * ratio)
        for step in range(INT4_SEARCH_REFITS + 1):
            if step:
                s, m = _refit(x, q, x_sum, s, m)
                q = _round_to_grid(x, s, m)
            elif ratio == 1.0:
                continue  # RTN's error is best_err already
            err = _group_sq_error(x, q, s, m, torch.float32)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[..., None], q, best_q)
            best_s = torch.where(better, s, best_s)
            best_m = torch.where(better, m, best_m)
    keep_rtn = _group_sq_error(x, *rtn, torch.float64) <= _group_sq_error(x, best_q, best_s, best_m, torch.float64)
    return (torch.where(keep_rtn[..., None], rtn[0], best_q), torch.where(keep_rtn, rtn[1], best_s),
            torch.where(keep_rtn, rtn[2], best_m))


def quantize_int4(w: torch.Tensor, group_size: int = 128, search: bool = True) -> QuantizedWeight:
    """Group-wise asymmetric uint4 with a min: for each group of ``group_size`` columns of a row
    (the last may be partial), w ~ q * scale + min, q in 0..15 (zero = 0, has_min), scale and min
    fp32. ``search=False``: round-to-nearest on [min, max] (|error| <= scale / 2 per element).
    ``search=True``: per group, the best by squared error of a few shrunk ranges each refined by
    least-squares refits (no calibration data); never worse than round-to-nearest in any group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise QuantizationError(f"int4 group_size must be an even whole number >= 2, not {group_size!r}")
    w = _check_weight(w)
    n, k = w.shape
    fmt = WeightQuant("uint4", group_size=group_size, has_min=True)
    if n == 0 or k == 0:
        z = torch.zeros(fmt.scale_shape(n, k), dtype=torch.float32, device=w.device)
        return QuantizedWeight(fmt, torch.zeros(fmt.q_shape(n, k), dtype=torch.uint8, device=w.device),
                               z, z.clone(), (n, k))
    x = w.to(_compute_dtype(w))
    full = k // group_size * group_size
    # the full groups and the ragged tail group (K % group_size columns) are two batches of
    # equal-length groups: no padding, no masks
    parts = [x[:, :full].reshape(n, -1, group_size)] if full else []
    if full < k:
        parts.append(x[:, full:].reshape(n, 1, k - full))
    qs, scales, mins = [], [], []
    for part in parts:
        rows = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, part[0].numel()))
        for start in range(0, n, rows):
            q, s, m = _int4_groups(part[start:start + rows], search)
            qs.append((start, q.to(torch.uint8).reshape(q.shape[0], -1)))
            scales.append((start, s))
            mins.append((start, m))
    return QuantizedWeight(fmt, pack_uint4(_join(qs, len(parts))), _join(scales, len(parts)),
                           _join(mins, len(parts)), (n, k))


def _join(chunks: list[tuple[int, torch.Tensor]], n_parts: int) -> torch.Tensor:
    """Row chunks of each part (full groups, then the tail) -> one [N, ...] tensor: the chunks of a
    part are stacked along rows, the parts joined along columns."""
    per_part: list[list[torch.Tensor]] = [[] for _ in range(n_parts)]
    part = -1
    for start, t in chunks:
        if start == 0:
            part += 1
        per_part[part].append(t)
    return torch.cat([torch.cat(p) for p in per_part], dim=1)


def quantize_activations(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the kernels' dynamic per-row activation quantization (W8A8 / FP8 dynamic).

    For each row m of x [..., K], in fp32, exactly as written (a division, not a reciprocal):
    a_scale[m] = max|x[m, :]| / largest (127 int8, 448 fp8_e4m3, 240 fp8_e4m3fnuz; 1.0 for an
    all-zero row); int8: qx = round-half-away-from-zero(x / a_scale) clamped to +-127; fp8:
    qx = (x / a_scale) cast to the fp8 dtype (round-to-nearest-even). Returns (qx, a_scale [...])."""
    if act not in ACT_QUANT:
        raise QuantizationError(f"activation quantization must be one of {sorted(ACT_QUANT)}, not {act!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.dtype.is_floating_point:
        raise QuantizationError("quantize_activations needs a floating-point tensor [..., K]")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise QuantizationError("quantize_activations: the activations hold NaN/inf; a per-row scale of them "
                                "is meaningless")
    from turbofx.codegen.gemm import quantize_rows  # the one definition the kernels follow

    q, a_scale = quantize_rows(x, act, torch.float32)
    return q.to(ACT_QUANT[act][0]), a_scale
