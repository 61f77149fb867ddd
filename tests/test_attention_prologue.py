"""The attention prologue: RoPE and the KV-cache write fused into the attention kernel.

A decoder step written the way HF models write it (rope on q/k, ``index_copy_`` into cache
buffers, SDPA over the whole cache with GQA) must compile to one attention step per layer and
give what eager gives, under FlashAttention's rule against an fp64 run of the same module: for
the output and for the caches it leaves behind.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import turbofx


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CachedStep(torch.nn.Module):
    """One attention step over a static KV cache held in buffers (stale rows are random, so a row
    the kernel forgot to write shows up)."""

    def __init__(self, b=2, h=4, hkv=2, cache_len=96, d=16, rope=True, write_back=True, same_positions=True,
                 rotary_dims=None):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("k_cache", torch.randn(b, hkv, cache_len, d, generator=g))
        self.register_buffer("v_cache", torch.randn(b, hkv, cache_len, d, generator=g))
        self.groups = h // hkv
        self.rope, self.write_back, self.same_positions = rope, write_back, same_positions
        self.rotary_dims = rotary_dims

    def forward(self, q, k, v, positions, cos, sin, mask):
        if self.rope and self.rotary_dims:  # partial rotary, as phi3 / gpt-neox write it
            r = self.rotary_dims
            cos, sin = cos[..., :r].unsqueeze(1), sin[..., :r].unsqueeze(1)
            q = torch.cat([q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
            k = torch.cat([k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        elif self.rope:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        v_positions = positions if self.same_positions else positions.flip(0)
        if self.write_back:  # HF's StaticCache: in place on the buffers
            keys = self.k_cache.index_copy_(2, positions, k)
            values = self.v_cache.index_copy_(2, v_positions, v)
        else:
            keys = self.k_cache.index_copy(2, positions, k)
            values = self.v_cache.index_copy(2, v_positions, v)
        keys = keys.repeat_interleave(self.groups, dim=1)
        values = values.repeat_interleave(self.groups, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _inputs(b, h, hkv, d, positions, cache_len, dtype, causal_mask=True):
    g = torch.Generator().manual_seed(0)
    s = len(positions)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    pos = torch.tensor(positions)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)
    cos, sin = freqs.cos()[None].expand(b, s, d).to(dtype), freqs.sin()[None].expand(b, s, d).to(dtype)
    keys = torch.arange(cache_len)
    mask = (keys[None, :] <= pos[:, None]) if causal_mask else torch.ones(s, cache_len, dtype=torch.bool)
    mask = mask[None, None].expand(b, 1, s, cache_len).clone()
    return mk(b, h, s, d), mk(b, hkv, s, d), mk(b, hkv, s, d), pos, cos, sin, mask


def _run(step, args, dtype):
    """(compiled outputs, fp64 eager, eager in dtype), each as (out, k cache, v cache)."""
    def eager(module, cast):
        m = copy.deepcopy(module).to(cast)
        a = [x.to(cast) if x.is_floating_point() else x for x in args]
        with torch.no_grad():
            out = m(*a)
        return out, m.k_cache, m.v_cache

    ref, torch_out = eager(step, torch.float64), eager(step, dtype)
    m = copy.deepcopy(step).to(dtype)
    cm = turbofx.compile(m, args)
    out = cm(*args)
    return cm, (out, m.k_cache, m.v_cache), ref, torch_out


def _assert_flash_rule(got, ref, torch_out):
    for name, a, r, t in zip(("out", "k cache", "v cache"), got, ref, torch_out):
        err = (a.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, (name, err, torch_err)


def _fused(cm):
    return [k for k in turbofx.explain(cm).kernels if k.kind == "attention"]


@pytest.mark.parametrize("splits", ["1", "3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_step_fuses_rope_and_cache_write(monkeypatch, splits, dtype):
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", splits)  # each key chunk writes the rows it reads
    step = CachedStep()
    args = _inputs(2, 4, 2, 16, [40], 96, dtype)
    cm, got, ref, torch_out = _run(step, args, dtype)
    _assert_flash_rule(got, ref, torch_out)
    fused = _fused(cm)
    assert [(k.label, "in place" in k.reason) for k in fused] == [("attention+rope+cache write", True)]
    steps = turbofx.explain(cm).steps
    assert not any("index_put" in k.label or "index_copy" in k.label for k in steps)
    assert not turbofx.explain(cm).generated[1:]  # rope left no pointwise kernel behind


def test_prefill_over_several_query_tiles_writes_the_cache_once(monkeypatch):
    # 70 new rows: two query tiles on the interpreter, so the write runs as its own kernel first
    step = CachedStep(b=1, h=2, hkv=1, cache_len=80)
    args = _inputs(1, 2, 1, 16, list(range(70)), 80, torch.float16)
    cm, got, ref, torch_out = _run(step, args, torch.float16)
    _assert_flash_rule(got, ref, torch_out)
    assert len(_fused(cm)) == 1


def test_partial_rotary():
    step = CachedStep(rotary_dims=8)
    args = _inputs(2, 4, 2, 16, [40, 41], 96, torch.float16)
    cm, got, ref, torch_out = _run(step, args, torch.float16)
    _assert_flash_rule(got, ref, torch_out)
    assert [k.label for k in _fused(cm)] == ["attention+rope+cache write"]


def test_scattered_positions_and_no_rope():
    step = CachedStep(rope=False)
    args = _inputs(2, 4, 2, 16, [7, 3, 50], 96, torch.float32, causal_mask=False)
    cm, got, ref, torch_out = _run(step, args, torch.float32)
    _assert_flash_rule(got, ref, torch_out)
    assert [k.label for k in _fused(cm)] == ["attention+cache write"]


def test_functional_update_leaves_the_buffers_alone():
    step = CachedStep(write_back=False)
    args = _inputs(2, 4, 2, 16, [40], 96, torch.float32)
    before = step.k_cache.clone(), step.v_cache.clone()
    cm, got, ref, torch_out = _run(step, args, torch.float32)
    _assert_flash_rule(got[:1], ref[:1], torch_out[:1])
    assert torch.equal(got[1], before[0]) and torch.equal(got[2], before[1])
    assert "into copies" in _fused(cm)[0].reason


def test_different_positions_for_k_and_v_are_refused_with_a_reason():
    step = CachedStep(same_positions=False, rope=False)
    args = _inputs(2, 4, 2, 16, [7, 3], 96, torch.float32, causal_mask=False)
    cm, got, ref, torch_out = _run(step, args, torch.float32)
    _assert_flash_rule(got, ref, torch_out)
    rec = next(p for p in turbofx.explain(cm).passes if p.name == "attention_prologue")
    assert not rec.matched
    assert [r.code for r in rec.refused] == ["positions-differ"], rec.refused


@pytest.mark.gpu
@pytest.mark.parametrize("positions", [[1000], list(range(300))], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_attention_on_gpu(positions, dtype):
    """Real Triton compilation: the decode prologue (write, barrier, read) and the prefill write
    kernel, llama-sized heads (D 128, GQA 4) over a 2048-slot cache."""
    step = CachedStep(b=2, h=8, hkv=2, cache_len=2048, d=128).cuda()
    args = [a.cuda() for a in _inputs(2, 8, 2, 128, positions, 2048, dtype)]
    cm, got, ref, torch_out = _run(step, args, dtype)
    _assert_flash_rule(got, ref, torch_out)
    assert [k.label for k in _fused(cm)] == ["attention+rope+cache write"]


def test_disabling_the_pass_keeps_rope_and_cache_updates_apart():
    step = CachedStep()
    args = _inputs(2, 4, 2, 16, [40], 96, torch.float32)
    m = copy.deepcopy(step)
    cm = turbofx.compile(m, args, disable="attention_prologue")
    report = turbofx.explain(cm)
    assert [k.label for k in report.kernels if k.kind == "attention"] == ["attention"]
    assert sum("index_put" in k.label for k in report.kernels) == 2
    fused = copy.deepcopy(step)
    torch.testing.assert_close(cm(*args), turbofx.compile(fused, args)(*args), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.k_cache, fused.k_cache, rtol=1e-6, atol=1e-6)
    with pytest.raises(turbofx.TurbofxError, match="unknown pass"):
        turbofx.compile(step, args, disable=["attention_prolog"])
