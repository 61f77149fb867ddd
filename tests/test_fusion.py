"""Fusion partition: producer regions merge when one kernel can hold them, never into a cycle."""
from __future__ import annotations

import torch

import turbofx


class _Diamond(torch.nn.Module):
    """Two producers of one add: x*2 -> cumsum -> relu, and x*2 directly. Merging the x*2 region
    with the relu region would put the cumsum both before and after one kernel."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        q = x * 2
        r = torch.relu(torch.cumsum(q, -1))  # cumsum has no template: an extern step between regions
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
    assert any(r.code == "would-cycle" for r in fusion.refused), fusion.refused
    assert len(_generated(cm)) == 2


def test_independent_producers_merge_into_one_kernel():
    m, x, y = _TwoBranches(), torch.randn(4, 8), torch.randn(4, 8)
    cm = turbofx.compile(m, (x, y))
    torch.testing.assert_close(cm(x, y), m(x, y))
    kernels = _generated(cm)
    assert len(kernels) == 1, [k.nodes for k in kernels]
    assert {"sigmoid", "tanh", "add"} <= {n.rstrip("_0123456789") for n in kernels[0].nodes}


class _Rope(torch.nn.Module):
    """rotate_half as HF writes it: slices, neg, cat; then q*cos + rot(q)*sin."""

    def forward(self, q, cos, sin):
        half = q.shape[-1] // 2
        rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * cos + rot * sin


def test_cat_is_generated_and_fuses_with_its_consumers():
    q, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    m = _Rope()
    cm = turbofx.compile(m, (q.transpose(1, 2).contiguous().transpose(1, 2), cos, sin))
    torch.testing.assert_close(cm(q, cos, sin), m(q, cos, sin))
    kernels = _generated(cm)
    cat_kernel = [k for k in kernels if any(n.startswith("cat") for n in k.nodes)]
    assert len(cat_kernel) == 1 and any(n.startswith("add") for n in cat_kernel[0].nodes), [k.nodes for k in kernels]
    assert not [k for k in turbofx.explain(cm).fallbacks if "cat" in k.label]


def test_cat_with_empty_and_symbolic_pieces():
    class M(torch.nn.Module):
        def forward(self, a, b, e):
            return torch.cat([a * 2, e, b], dim=1) + 1

    a, b, e = torch.randn(3, 4), torch.randn(3, 6), torch.randn(3, 0)
    cm = turbofx.compile(M(), (a, b, e), dynamic=True)
    torch.testing.assert_close(cm(a, b, e), M()(a, b, e))
    a2, b2 = torch.randn(3, 7), torch.randn(3, 2)
    torch.testing.assert_close(cm(a2, b2, e), M()(a2, b2, e))


def test_cat_of_the_same_tensor_twice():
    class M(torch.nn.Module):  # rotary tables: emb = cat((freqs, freqs), -1)
        def forward(self, f):
            return torch.cat((f, f), dim=-1).cos()

    f = torch.randn(5, 4)
    cm = turbofx.compile(M(), (f,))
    torch.testing.assert_close(cm(f), M()(f))
    assert not turbofx.explain(cm).fallbacks


def test_row_value_broadcast_along_columns_is_not_merged_into_its_reduction():
    """Fuzz-found silent wrong result: amax(s, -1) has shape [R]; where(m > s, m, s) broadcasts it
    along the *columns* of s [R, C]. With R == C the shapes coincide, and merging the where's region
    into the reduction's made the kernel read the row maximum per row."""
    class M(torch.nn.Module):
        def forward(self, x):
            s = x.sin()
            m = s.amax(-1)
            return torch.where(m > s, m, s).sqrt()

    x = torch.randn(4, 4)
    torch.testing.assert_close(turbofx.compile(M(), (x,))(x), M()(x), equal_nan=True)
