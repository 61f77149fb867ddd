"""Every generated op has eager's semantics on special values: NaN and inf propagate, -0, huge and
tiny values, integer and bool arithmetic, fp16 rounding after each op. Each test compiles one
module holding several ops (one compile each: the interpreter is slow) and compares every output
with eager, NaN positions included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import turbofx

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 1e-4, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30,
           float("inf"), float("-inf"), float("nan"), 7.0]


class Fn(torch.nn.Module):
    def __init__(self, fns):
        super().__init__()
        self.fns = fns

    def forward(self, *xs):
        return tuple(f(*xs) for f in self.fns.values())


def check(fns: dict, *xs, rtol=1e-5, atol=1e-5, expect_generated=True, elementwise=False):
    """Compile every function of ``fns`` in one module; each output equals eager (NaN where eager
    has NaN, same dtype). ``elementwise``: eager runs on one element at a time (its scalar path:
    torch's vectorised CPU kernels can differ from it on special values, e.g. AVX-512 gelu(inf) is
    NaN while the scalar gelu(inf) is inf)."""
    m = Fn(fns)
    with torch.no_grad():
        if elementwise:
            ref = [torch.cat(parts) for parts in zip(*(m(*(x[i:i + 1] for x in xs)) for i in range(len(xs[0]))))]
        else:
            ref = m(*xs)
    cm = turbofx.compile(m, xs)
    out = cm(*xs)
    if expect_generated:
        assert turbofx.explain(cm).generated, "nothing was generated: the test would test ATen"
    for name, r, o in zip(fns, ref, out):
        assert o.dtype == r.dtype, (name, o.dtype, r.dtype)
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
    "abs": torch.abs, "neg": torch.neg, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "pow0": lambda a: a ** 0, "pow2": lambda a: a ** 2, "pow3": lambda a: a ** 3, "pow_half": lambda a: a ** 0.5,
    "pow_mhalf": lambda a: a ** -0.5, "pow_m1": lambda a: a ** -1, "pow_m2": lambda a: a ** -2,
    "clamp": lambda a: a.clamp(-1, 2), "clamp_min": lambda a: a.clamp(min=0.0), "div0": lambda a: a / 0.0,
    "to_half": lambda a: a.half(), "to_bool": lambda a: a.bool(), "isnan_like": lambda a: a != a,
    "eq_inf": lambda a: a == float("inf"), "lt_nan": lambda a: a < float("nan"),
}


def test_unary_ops_on_special_values():
    x = torch.tensor(SPECIAL)
    check(UNARY, x, elementwise=True)


BINARY = {
    "maximum": torch.maximum, "minimum": torch.minimum, "add": torch.add, "sub": torch.sub, "mul": torch.mul,
    "div": torch.div, "where": lambda a, b: torch.where(a > b, a, b), "eq": torch.eq, "ne": torch.ne,
    "le": torch.le, "clamp_tensor": lambda a, b: a.clamp(b, b + 1), "add_alpha": lambda a, b: torch.add(a, b, alpha=0.5),
}


def test_binary_ops_on_special_values():
    x = torch.tensor(SPECIAL)
    check(BINARY, x, x.flip(0).contiguous())


# rows: plain, a NaN, all -inf, +inf, -inf, +inf and -inf
ROWS = [[0.0, -0.0, 1.0, -1.0, 0.5, -2.5], [1.0, float("nan"), 2.0, 3.0, 4.0, 5.0], [float("-inf")] * 6,
        [1.0, float("inf"), 2.0, 3.0, 4.0, 5.0], [1.0, float("-inf"), 2.0, 3.0, 4.0, 5.0],
        [float("inf"), float("-inf"), 2.0, 3.0, 4.0, 5.0], [float("nan")] + [float("-inf")] * 5]

REDUCTIONS = {
    "amax": lambda a: a.amax(-1), "amin": lambda a: a.amin(-1), "sum": lambda a: a.sum(-1),
    "mean": lambda a: a.mean(-1, keepdim=True), "softmax": lambda a: a.softmax(-1),
    "log_softmax": lambda a: a.log_softmax(-1),
    # softmax's max and sum fused (an online pass when looped); the max itself is an output too
    "max_and_sum": lambda a: torch.exp(a - a.amax(-1, keepdim=True)).sum(-1) + a.amax(-1) * 0,
    "amax_out": lambda a: a.amax(-1, keepdim=True) + torch.exp(a - a.amax(-1, keepdim=True)).sum(-1, keepdim=True),
    "manual_lse": lambda a: torch.log(torch.exp(a - a.amax(-1, keepdim=True)).sum(-1)),
}


@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_reductions_propagate_nan_and_inf(looped, monkeypatch):
    """torch.amax/amin propagate NaN (Triton's tl.max drops it); an all -inf row gives NaN softmax
    and NaN sum(exp(x - max)), in the one-row-in-registers kernel and in the tiled loop."""
    if looped:
        monkeypatch.setenv("TURBOFX_PERSISTENT_RMAX", "4")  # rows of 6 walk 4-wide tiles
    check(REDUCTIONS, torch.tensor(ROWS))


def test_fp16_rounds_after_every_op_as_eager():
    """Eager fp16 rounds each op's result: (h * 1000) * 1000 overflows to inf in the middle and
    (h*1000 + 1) - h*1000 loses the 1; a fused kernel computing in fp32 must round the same way."""
    h = torch.tensor([1.0, 2.0, 60.0, -70.0, 0.1, 3.0], dtype=torch.float16)
    check({
        "overflow_mid": lambda a: (a * 1000.0) * 1000.0 / 1e6,
        "cancel": lambda a: (a * 1000.0 + 1.0) - a * 1000.0,
        "sum_mid": lambda a: (a.view(2, 3).sum(-1) * 4000.0) / 4000.0,
        "eq_scalar": lambda a: a == 0.1,  # the scalar is converted to fp16 first
        "lt_scalar": lambda a: a < 0.1,
        "clamp_scalar": lambda a: a.clamp(0.15),
    }, h, rtol=1e-3, atol=1e-3)


def test_integer_and_bool_ops():
    i = torch.tensor([[2 ** 30, 2 ** 30, 2 ** 30, 7], [-5, 3, -7, 2]], dtype=torch.int32)
    j = torch.tensor([[3, -2, 7, 0], [2, 2, -3, 0]], dtype=torch.int32)
    b = torch.tensor([[True, False, True, False], [True, True, False, False]])
    check({
        "int32_sum_to_int64": lambda a, c, d: a.sum(-1),  # eager accumulates in int64
        "true_div_by_zero": lambda a, c, d: a / c,
        "abs_neg": lambda a, c, d: a.abs() - (-a),
        "pow": lambda a, c, d: c ** 2 + c ** 0,
        "relu_clamp": lambda a, c, d: torch.relu(c) + c.clamp(-1, 1),
        "maximum": lambda a, c, d: torch.maximum(a, c),
        "bool_add_is_or": lambda a, c, d: d + d.flip(0),
        "bool_mul_is_and": lambda a, c, d: d * d.flip(0),
        "bool_sum": lambda a, c, d: d.sum(-1),
        "bool_to_float": lambda a, c, d: d.float() * 2,
        "int_wraps": lambda a, c, d: a * 4,
        "int_eq_float": lambda a, c, d: c == 2.5,
    }, i, j, b)


def test_narrow_int_types():
    check({"uint8_neg": lambda u, s: -u, "int8_abs": lambda u, s: s.abs(), "int8_add_wraps": lambda u, s: s + s},
          torch.tensor([1, 2, 250], dtype=torch.uint8), torch.tensor([-128, 5, -3], dtype=torch.int8))


def test_casts_float_to_int_truncate_and_int_to_half_saturates():
    check({"to_int": lambda f, i: f.to(torch.int32), "to_half": lambda f, i: i.half()},
          torch.tensor([1.5, -1.5, 2.7, -2.7, 0.0]), torch.tensor([70000, 2049, -3, 0, 1], dtype=torch.int32))
