"""Differential fuzzing: hypothesis draws random small graphs (tests/fuzzgen.py: pointwise chains,
broadcasts, last/other-dim reductions, softmax, views, casts; dims of 0 and 1; transposed, sliced
and stride-0 inputs; NaN/inf; fp32/fp16; static and dynamic sizes), turbofx compiles them and
every result must equal eager. A clean TurbofxError is an acceptable refusal; a raw exception or a
wrong result fails. TURBOFX_FUZZ_EXAMPLES sets the example count (CI default: 25); longer runs:
scripts/fuzz.py."""
from __future__ import annotations

import os
import random
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzgen import Case, Input, gen_case, run_case

import torch

import turbofx

EXAMPLES = int(os.environ.get("TURBOFX_FUZZ_EXAMPLES", "25"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_random_graphs_match_eager(rng):
    warnings.filterwarnings("ignore")
    case = gen_case(random.Random(rng.getrandbits(64)))
    o = run_case(case)
    assert not o.is_bug, f"{o.status}\n{case.describe()}\n{o.detail}"


# Regressions the fuzzer found (each failed before its fix).

def _case(shape, layout, steps, dynamic=False, dtype=torch.float32, specials=()):
    n = len(steps) + 1
    return Case(dtype, [Input(shape, layout, list(specials), 0)], steps, [n - 1], dynamic)


def test_slice_of_symbolic_dim_prints_floor_division():
    """x[..., ::2] of a dynamic dim has size (s + 1) // 2 (torch's FloorDiv) in the kernel's index."""
    o = run_case(_case((7, 7), "contiguous", [("unary", "shift", -1), ("view", "slice", 0), ("unary", "abs", -1)],
                       dynamic=True))
    assert o.status == "ok", o.detail


def test_cat_with_constant_index_masks_with_a_tensor():
    """softmax over an empty last dim pads with a -inf column (cat of an empty piece and a full);
    the piece mask compared a constant index, a Python bool the interpreter refused as a mask."""
    o = run_case(_case((1, 1, 0), "expanded", [("reduce", "softmax", -1, False, True), ("binary", "minimum", -1, 0)]))
    assert o.status == "ok", o.detail
    o = run_case(_case((1, 0, 1), "contiguous", [("reduce", "log_softmax", 1, True, False), ("reduce", "sum", 0, True, False)]))
    assert o.status == "ok", o.detail


def test_reshape_of_empty_tensor_in_a_kernel():
    """A flatten of a (0, 5) value inside a pointwise kernel divided by a zero size product."""
    o = run_case(_case((0, 5), "expanded", [("binary", "mul", -1, 0), ("view", "flatten", 0), ("view", "permute", 1),
                                            ("binary", "where_gt", -1, 0)], dtype=torch.float16))
    assert o.status == "ok", o.detail


def test_tanh_keeps_the_sign_of_zero():
    """tanh(-0) is -0 in eager (1/tanh(-0) = -inf); 2*sigmoid(2x) - 1 gave +0."""
    o = run_case(_case((3,), "contiguous", [("unary", "tanh", -1), ("unary", "reciprocal", -1)],
                       specials=[(0, -0.0), (1, 1e-3)]))
    assert o.status == "ok", o.detail


def test_empty_input_with_odd_strides_compiles_dynamic():
    """Fuzz-found: a tensor with no elements counts as contiguous whatever its strides, so capture
    kept a sliced (7, 0, 2) input's strides, export traced them as a new symbol no input binds,
    and lowering refused the graph. Capture now gives such inputs standard strides."""
    class M(torch.nn.Module):
        def forward(self, x):
            d = x / x
            return d, d.sin()

    x = torch.randn(7, 4, 4)[:, :0, ::2]
    assert x.shape == (7, 0, 2) and x.stride() != (2, 2, 1)
    cm = turbofx.compile(M(), (x,), dynamic=True)
    for got, want in zip(cm(x), M()(x)):
        assert got.shape == want.shape and got.dtype == want.dtype
    y = torch.randn(5, 0, 3)
    assert cm(y)[1].shape == (5, 0, 3)
