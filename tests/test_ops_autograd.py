"""turbofx's own ops differentiate like the ATen code they stand for (training graphs may reach them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import turbofx  # noqa: F401  (registers torch.ops.turbofx)
from turbofx.runtime.ops import attention_reference


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad(out, xs, g)


def test_sdpa_op_gradients_equal_aten():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.randn(1, 1, 5, 7)
    ours = _grads(lambda a, b, c: torch.ops.turbofx.sdpa(a, b, c, mask, 0.0, False, 0.3, True), q, k, v)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=0.3, enable_gqa=True),
                 q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_attention_op_gradients_equal_its_reference_and_aten():
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    ours = _grads(lambda a, b, c: torch.ops.turbofx.attention(a, b, c, None, 0.35, True, 0, 0.0), q, k, v)
    ref = _grads(lambda a, b, c: attention_reference(a, b, c, None, 0.35, True, 0, 0.0), q, k, v)
    aten = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.35), q, k, v)
    for a, b, c in zip(ours, ref, aten):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_cached_attention_op_gradients_reach_q_and_the_new_rows():
    q, kn, vn = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    kc, vc = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    pos = torch.tensor([3])

    def ours(a, b, c):
        return torch.ops.turbofx.cached_attention(a, b, c, kc, vc, pos, None, None, None, 0.35, False, 0, 0.0,
                                                  False, False)[0]

    def ref(a, b, c):
        k, v = kc.index_copy(2, pos, b), vc.index_copy(2, pos, c)
        return F.scaled_dot_product_attention(a, k, v, scale=0.35)

    for a, b in zip(_grads(ours, q, kn, vn), _grads(ref, q, kn, vn)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
