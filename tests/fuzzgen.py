"""Random small graphs for differential testing of turbofx against eager.

A case is data (``Case``): input tensors (shapes with 0 and 1 sized dims, transposed, sliced and
stride-0 expanded layouts, NaN/inf sprinkled in, fp32/fp16) and a program of steps over a value
list (pointwise ops, broadcasts against reduced values, last/other-dim reductions with keepdim,
softmax, views, casts). ``run_case`` compiles it and returns an ``Outcome``: ``ok``, ``refused``
(a clean TurbofxError, acceptable), ``eager_error`` (the case is invalid for eager too), or a bug
(``crash``: any other exception; ``mismatch``: a result differs from eager).
Both tests/test_fuzz.py (hypothesis) and scripts/fuzz.py (long runs) use it.
"""
from __future__ import annotations

import random
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import turbofx
from turbofx.errors import TurbofxError

UNARY = ["exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "neg", "abs", "silu", "gelu",
         "reciprocal", "square", "scale", "shift", "clamp", "erf", "sin"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "where_gt"]
REDUCE = ["sum", "mean", "amax", "amin", "softmax", "log_softmax"]
VIEWS = ["transpose", "permute", "slice", "flatten", "unsqueeze", "expand"]
# -0.0 is left out: eager itself disagrees on its sign (CPU gelu(-0) is -0 for a scalar, +0 in a
# vector), and 1/±0 then turns that into ±inf; tests/test_semantics.py checks -0 per op.
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, 1e4, -1e4]


@dataclass
class Input:
    shape: tuple[int, ...]
    layout: str  # contiguous | transposed | sliced | expanded
    specials: list[tuple[int, float]]  # (flat position mod numel, value)
    seed: int


@dataclass
class Case:
    dtype: torch.dtype
    inputs: list[Input]
    steps: list[tuple]  # (op, *params); each appends one value
    outputs: list[int]  # value indices returned
    dynamic: bool = False

    def describe(self) -> str:
        return (f"dtype={self.dtype} dynamic={self.dynamic}\n  inputs="
                + "; ".join(f"{i.shape} {i.layout} specials={i.specials}" for i in self.inputs)
                + "\n  steps=" + "; ".join(map(str, self.steps)) + f"\n  outputs={self.outputs}")


def _with_specials(t: torch.Tensor, specials: list[tuple[int, float]]) -> torch.Tensor:
    flat = t.reshape(-1)  # t is contiguous: a view
    for pos, v in specials:
        if flat.numel():
            flat[pos % flat.numel()] = v
    return t


def make_input(inp: Input, dtype: torch.dtype) -> torch.Tensor:
    """The input tensor in its layout: a transposed or strided slice of a bigger buffer, or a
    stride-0 expand (every element of a row aliases one value)."""
    g = torch.Generator().manual_seed(inp.seed)
    shape = inp.shape

    def base(*s):
        return _with_specials((torch.randn(*s, generator=g) * 2).to(dtype), inp.specials)

    if inp.layout == "transposed" and len(shape) >= 2:
        return base(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if inp.layout == "sliced" and len(shape) >= 1:
        return base(*shape[:-1], shape[-1] * 2)[..., ::2]
    if inp.layout == "expanded" and len(shape) >= 1:
        return base(*shape[:-1], 1).expand(shape)
    return base(*shape)


def gen_case(rng: random.Random) -> Case:
    dtype = rng.choice([torch.float32, torch.float32, torch.float16])
    rank = rng.randint(1, 3)
    shape = tuple(rng.choice([0, 1, 1, 2, 3, 3, 4, 5, 7]) if rng.random() < 0.15 else rng.choice([1, 2, 3, 4, 5, 7])
                  for _ in range(rank))
    n_in = rng.randint(1, 2)
    inputs = []
    for _ in range(n_in):
        s = shape
        if rng.random() < 0.3 and rank >= 2:  # a broadcast operand
            s = tuple(1 if rng.random() < 0.5 else d for d in shape)
        layout = rng.choice(["contiguous", "contiguous", "transposed", "sliced", "expanded"])
        specials = [(rng.randrange(64), rng.choice(SPECIAL)) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
        inputs.append(Input(s, layout, specials, rng.randrange(1 << 30)))
    steps = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["unary", "unary", "binary", "binary", "reduce", "view", "cast"])
        if kind == "unary":
            steps.append(("unary", rng.choice(UNARY), -1))
        elif kind == "binary":
            steps.append(("binary", rng.choice(BINARY), -1, rng.randrange(1 << 16)))
        elif kind == "reduce":
            steps.append(("reduce", rng.choice(REDUCE), rng.choice([-1, -1, 0, 1]), rng.random() < 0.6,
                          rng.random() < 0.5))
        elif kind == "view":
            steps.append(("view", rng.choice(VIEWS), rng.randrange(1 << 16)))
        else:
            steps.append(("cast", rng.choice([torch.float16, torch.float32])))
    n_vals = n_in + len(steps)
    outputs = sorted({n_vals - 1} | ({rng.randrange(n_in, n_vals)} if rng.random() < 0.3 else set()))
    return Case(dtype, inputs, steps, outputs, dynamic=rng.random() < 0.25)


def _unary(op: str, x: torch.Tensor) -> torch.Tensor:
    return {
        "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh,
        "sigmoid": torch.sigmoid, "relu": torch.relu, "neg": torch.neg, "abs": torch.abs, "silu": F.silu,
        "gelu": F.gelu, "reciprocal": torch.reciprocal, "square": lambda t: t * t,
        "scale": lambda t: t * 0.5, "shift": lambda t: t + 1.5, "clamp": lambda t: t.clamp(-1.0, 2.0),
        "erf": torch.erf, "sin": torch.sin,
    }[op](x)


def _broadcastable(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
        return True
    except RuntimeError:
        return False


def _binary(op: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if op == "where_gt":
        return torch.where(x > y, x, y)
    return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
            "maximum": torch.maximum, "minimum": torch.minimum}[op](x, y)


def _reduce(op: str, x: torch.Tensor, dim: int, keepdim: bool, twice: bool) -> torch.Tensor:
    if x.dim() == 0:
        return x
    d = dim % x.dim()
    if op in ("softmax", "log_softmax"):
        return getattr(torch, op)(x, d)
    r = getattr(torch, op)(x, d, keepdim=keepdim)
    if twice and keepdim:  # a normalization: x against its own reduced row (broadcast back)
        r = x - r
    return r


def _view(op: str, x: torch.Tensor, k: int) -> torch.Tensor:
    if op == "transpose" and x.dim() >= 2:
        return x.transpose(0, -1)
    if op == "permute" and x.dim() >= 2:
        p = list(range(x.dim()))
        random.Random(k).shuffle(p)
        return x.permute(p)
    if op == "slice" and x.dim() >= 1 and x.shape[-1] >= 2:
        return x[..., 1:] if k % 2 else x[..., ::2]
    if op == "flatten" and x.dim() >= 2:
        return x.flatten(-2)
    if op == "unsqueeze":
        return x.unsqueeze(k % (x.dim() + 1))
    if op == "expand" and x.dim() >= 1 and x.shape[0] == 1:
        return x.expand(3, *x.shape[1:])
    return x


class Program(torch.nn.Module):
    """Interprets a Case's steps; torch.export traces the ops it runs."""

    def __init__(self, case: Case, wide: bool = False):
        super().__init__()
        self.case = case
        self.wide = wide  # float64 reference: casts round to their type and come back to float64

    def forward(self, *xs):
        vals = list(xs)
        for st in self.case.steps:
            x = vals[-1]
            if st[0] == "unary":
                vals.append(_unary(st[1], x))
            elif st[0] == "binary":
                cands = [v for v in vals[:-1] if _broadcastable(x, v)] or [x]
                vals.append(_binary(st[1], x, cands[st[3] % len(cands)]))
            elif st[0] == "reduce":
                vals.append(_reduce(st[1], x, st[2], st[3], st[4]))
            elif st[0] == "view":
                vals.append(_view(st[1], x, st[2]))
            else:
                vals.append(x.to(st[1]).double() if self.wide else x.to(st[1]))
        return tuple(vals[i] for i in self.case.outputs)


@dataclass
class Outcome:
    status: str  # ok | refused | eager_error | crash | mismatch
    detail: str = ""
    graphs: int = 0  # compiled graphs checked (static and dynamic count separately)
    notes: list[str] = field(default_factory=list)

    @property
    def is_bug(self) -> bool:
        return self.status in ("crash", "mismatch")


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _tolerance_dtype(case: "Case", out_dtype: torch.dtype) -> torch.dtype:
    """The narrowest float type a value passed through: an fp32 output of a chain that went through
    fp16 carries fp16 rounding (a tie rounded the other way is one fp16 ulp, not an fp32 one)."""
    dtypes = {case.dtype, out_dtype} | {s[1] for s in case.steps if s and s[0] == "cast"}
    return torch.float16 if dtypes & {torch.float16, torch.bfloat16} else out_dtype


def run_case(case: Case) -> Outcome:
    xs = tuple(make_input(i, case.dtype) for i in case.inputs)
    m = Program(case)
    try:
        with torch.no_grad():
            ref = m(*xs)
    except Exception as e:  # noqa: BLE001 - invalid for eager too (e.g. amax of an empty dim)
        return Outcome("eager_error", f"{type(e).__name__}: {e}")
    with torch.no_grad():
        ref64 = Program(case, wide=True)(*(x.double() for x in xs))
    try:
        cm = turbofx.compile(m, xs, dynamic=case.dynamic)
        out = cm(*xs)
    except TurbofxError as e:
        return Outcome("refused", f"{type(e).__name__}: {str(e)[:300]}", graphs=1)
    except Exception as e:  # noqa: BLE001 - a raw exception from our code is a bug
        return Outcome("crash", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}", graphs=1)
    for k, (r, o) in enumerate(zip(ref, out)):
        if o.shape != r.shape or o.dtype != r.dtype:
            return Outcome("mismatch", f"output {k}: {o.shape} {o.dtype} vs eager {r.shape} {r.dtype}", graphs=1)
        try:
            torch.testing.assert_close(o, r, equal_nan=True, **tolerance(_tolerance_dtype(case, r.dtype)))
        except AssertionError as e:
            if not _as_accurate_as_eager(o, r, ref64[k], _tolerance_dtype(case, r.dtype)):
                return Outcome("mismatch", f"output {k}: {e}\n eager={r}\n turbofx={o}", graphs=1)
    return Outcome("ok", graphs=1)


def _as_accurate_as_eager(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                          tol_dtype: torch.dtype | None = None) -> bool:
    """Ill-conditioned graphs (rsqrt of a cancellation) magnify one-ulp differences past any fixed
    tolerance: accept ``out`` where it is at most twice as far from the float64 result as eager is
    (FlashAttention's rule), plus the dtype's tolerance. Non-finite values must agree exactly."""
    o, e, r = out.double(), eager.double(), ref64.to(eager.dtype).double()
    special = ~torch.isfinite(o) | ~torch.isfinite(e)
    if not torch.equal(o[special].nan_to_num(), e[special].nan_to_num()) or not torch.equal(o[special].isnan(), e[special].isnan()):
        return False
    t = tolerance(tol_dtype or eager.dtype)
    fin = ~special & torch.isfinite(r)
    bound = 2 * (e - r).abs() + t["atol"] + t["rtol"] * r.abs()
    return bool(((o - r).abs()[fin] <= bound[fin]).all()) and bool((~special & ~torch.isfinite(r) & (o != e)).sum() == 0)
