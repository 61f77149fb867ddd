"""Rows longer than a kernel keeps in registers are walked in tiles: one pass per reduction,
softmax's max and sum in one online pass (running max, rescaled sum), then a writing pass."""
from __future__ import annotations

import pytest
import torch

import turbofx

from tests.helpers import Fn


@pytest.fixture(autouse=True)
def short_rows(monkeypatch):
    monkeypatch.setenv("TURBOFX_PERSISTENT_RMAX", "16")  # loop over 16-wide tiles


def _compile(fn, *xs):
    cm = turbofx.compile(Fn(fn), xs)
    src = "".join(cm._program.sources.values())
    assert "for roffset in range(0, rnumel, RBLOCK)" in src
    return cm, src


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_row_softmax_is_two_passes(dtype):
    x = (torch.randn(5, 100) * 4).to(dtype)
    x[1, :] = -float("inf")  # a fully masked row: NaN, as eager
    x[2, 3:] = -float("inf")
    cm, src = _compile(lambda t: torch.softmax(t.float() * 0.5, -1), x)
    assert src.count("for roffset") == 2  # online max+sum, then write: not three passes
    torch.testing.assert_close(cm(x), torch.softmax(x.float() * 0.5, -1), equal_nan=True, rtol=1e-5, atol=1e-6)


def test_long_row_log_softmax():
    x = torch.randn(3, 77) * 10
    cm, src = _compile(lambda t: torch.log_softmax(t, -1), x)
    assert src.count("for roffset") == 2
    torch.testing.assert_close(cm(x), torch.log_softmax(x, -1), rtol=1e-5, atol=1e-5)


def test_long_row_layer_norm_and_rmsnorm():
    x, w, b = torch.randn(4, 70), torch.randn(70), torch.randn(70)
    cm, _ = _compile(lambda t, w, b: torch.nn.functional.layer_norm(t + 1, (70,), w, b), x, w, b)
    torch.testing.assert_close(cm(x, w, b), torch.nn.functional.layer_norm(x + 1, (70,), w, b), rtol=1e-4, atol=1e-4)

    def rms(t, w):
        h = t * 2
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    cm, _ = _compile(rms, x, w)
    torch.testing.assert_close(cm(x, w), rms(x, w), rtol=1e-5, atol=1e-5)


def test_symbolic_row_length_loops():
    x = torch.randn(3, 40)
    monkey = pytest.MonkeyPatch()
    monkey.setenv("TURBOFX_PERSISTENT_RMAX", "100000")  # symbolic rows loop whatever the limit
    cm = turbofx.compile(Fn(lambda t: torch.softmax(t, -1) * t.amax(-1, keepdim=True)), (x,), dynamic=True)
    monkey.undo()
    for n in (40, 7, 129):
        y = torch.randn(3, n)
        torch.testing.assert_close(cm(y), torch.softmax(y, -1) * y.amax(-1, keepdim=True), rtol=1e-5, atol=1e-5)
