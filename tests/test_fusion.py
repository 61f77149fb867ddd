"""Fusion partition: producer regions merge when one kernel can hold them, never into a cycle."""
from __future__ import annotations

import torch

import turbofx


class _Diamond(torch.nn.Module):
    """Two producers of one add: x*2 -> matmul -> relu, and x*2 directly. Merging the x*2 region
    with the relu region would put the matmul both before and after one kernel."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        q = x * 2
        r = torch.relu(q @ self.w)
        return q + r


class _TwoBranches(torch.nn.Module):
    def forward(self, x, y):
        return torch.sigmoid(x) * 3 + torch.tanh(y)  # two independent producer chains, one kernel


def _generated(cm):
    return [k for k in turbofx.explain(cm).kernels if k.kind != "extern"]


def test_merge_refused_when_it_would_create_a_cycle():
    m, x = _Diamond(), torch.randn(4, 8)
    cm = turbofx.compile(m, (x,))
    torch.testing.assert_close(cm(x), m(x))
    fusion = [p for p in turbofx.explain(cm).passes if p.name == "fusion"][0]
    assert any("would create a cycle" in why for _, why in fusion.refused)
    assert len(_generated(cm)) == 2


def test_independent_producers_merge_into_one_kernel():
    m, x, y = _TwoBranches(), torch.randn(4, 8), torch.randn(4, 8)
    cm = turbofx.compile(m, (x, y))
    torch.testing.assert_close(cm(x, y), m(x, y))
    kernels = _generated(cm)
    assert len(kernels) == 1, [k.nodes for k in kernels]
    assert {"sigmoid", "tanh", "add"} <= {n.rstrip("_0123456789") for n in kernels[0].nodes}
