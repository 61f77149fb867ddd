"""The paged attention kernel (turbofx/codegen/paged_attention.py) against the op's reference.

One packed step mixes what the serving engine sends: prefill chunks that start mid-sequence,
decode rows, a sequence ending exactly on a page boundary, an unused slot (n = 0, seq_len 0) and
padding rows past query_start[S]; pages are scrambled. Compiled through the normal pipeline
(the kernel must be what lowering picks), checked against the fp64 reference with a tolerance of
2 × (the reference in the test dtype's error) + a small floor.
"""
from __future__ import annotations

import pytest
import torch

import turbofx
from turbofx.runtime.ops import paged_attention_reference


class Paged(torch.nn.Module):
    def __init__(self, scale, window=0, softcap=0.0):
        super().__init__()
        self.args = (scale, window, softcap)

    def forward(self, q, k_cache, v_cache, block_table, query_start, seq_lens):
        return torch.ops.turbofx.paged_attention(q, k_cache, v_cache, block_table, query_start, seq_lens, *self.args)


PAGE = 4
# (query rows this step, keys after the step): prefill chunk mid-sequence, decode, a sequence
# ending on a page boundary (12 = 3 pages), an unused slot, a full prefill from position 0
SEQS = [(5, 11), (1, 9), (3, 12), (0, 0), (6, 6), (1, 1)]
PAD_ROWS = 3


def _step(h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-keys // PAGE) for _, keys in SEQS)
    n_pages = sum(-(-keys // PAGE) for _, keys in SEQS) + 3
    order = torch.randperm(n_pages, generator=g)  # scrambled pages; a few never used
    block_table = torch.zeros(len(SEQS), width, dtype=torch.int32)
    used = 0
    for s, (_, keys) in enumerate(SEQS):
        p = -(-keys // PAGE)
        block_table[s, :p] = order[used:used + p].to(torch.int32)
        used += p
    t = sum(n for n, _ in SEQS) + PAD_ROWS
    query_start = torch.tensor([0] + list(torch.tensor([n for n, _ in SEQS]).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor([keys for _, keys in SEQS], dtype=torch.int32)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(t, h, d), mk(n_pages, PAGE, hkv, d), mk(n_pages, PAGE, hkv, d), block_table, query_start, seq_lens


def _check(h, hkv, d, dtype, window=0, softcap=0.0):
    args = _step(h, hkv, d, dtype)
    scale = d ** -0.5
    cm = turbofx.compile(Paged(scale, window, softcap), args)
    kinds = [(r.kind, r.label) for r in turbofx.explain(cm).generated]
    assert len(kinds) == 1 and kinds[0][0] == "attention" and "paged" in kinds[0][1], kinds
    out = cm(*args)
    q, k, v, *meta = args
    ref = paged_attention_reference(q.double(), k.double(), v.double(), *meta, scale, window, softcap,
                                    compute_dtype=torch.float64)
    torch_out = paged_attention_reference(q, k, v, *meta, scale, window, softcap, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))  # padding rows
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_step_gqa(dtype):
    _check(4, 2, 16, dtype)


def test_window_and_softcap():
    _check(4, 2, 8, torch.float32, window=3, softcap=5.0)


def test_group_not_a_power_of_two():
    _check(6, 2, 16, torch.float32)  # group 3 (SmolLM2's 9 / 3 heads): tiles of 16 rows hold 5 tokens


def test_multi_query_group_fills_tile():
    _check(8, 1, 16, torch.float16)  # group 8: decode rows are 8 heads of one KV head


def test_fallback_records_reason():
    """A case the kernel does not take (V head dim differs from K's) runs the reference, with a reason."""
    q, k, _, bt, qs, sl = _step(2, 2, 16, torch.float32)
    v = torch.randn(k.shape[:-1] + (8,))
    cm = turbofx.compile(Paged(0.25), (q, k, v, bt, qs, sl))
    report = turbofx.explain(cm)
    assert not report.generated
    reasons = [r.reason for r in report.kernels if r.kind == "extern"]
    assert any("head dim" in r for r in reasons), reasons
    ref = paged_attention_reference(q, k, v, bt, qs, sl, 0.25, 0, 0.0)
    torch.testing.assert_close(cm(q, k, v, bt, qs, sl), ref)


@pytest.mark.parametrize("page", [4, 32])  # a key tile spans several pages / a page several tiles
def test_small_tiles_window_over_many_tiles(page):
    """The kernel launched directly with 16-row, 16-key tiles: sequences span many key tiles and
    query tiles, the window starts past the first tiles, pages are scrambled."""
    from turbofx.codegen import paged_attention as pa
    from turbofx.codegen.cache import kernel_path
    from turbofx.codegen.target import detect
    from turbofx.runtime.kernels import load_kernel

    g = torch.Generator().manual_seed(3)
    seqs = [(20, 70), (1, 53), (0, 0), (9, 9)]
    h, hkv, d, window, softcap = 4, 2, 16, 20, 0.0
    width = max(-(-keys // page) for _, keys in seqs)
    n_pages = len(seqs) * width + 1
    block_table = torch.randperm(n_pages, generator=g)[:len(seqs) * width].view(len(seqs), width).to(torch.int32)
    query_start = torch.tensor([0] + list(torch.tensor([n for n, _ in seqs]).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor([keys for _, keys in seqs], dtype=torch.int32)
    t = int(query_start[-1]) + 2
    q, k, v = (torch.randn(*s, generator=g) for s in ((t, h, d), (n_pages, page, hkv, d), (n_pages, page, hkv, d)))
    step = {"q": 0, "k_cache": 1, "v_cache": 2, "block_table": 3, "query_start": 4, "seq_lens": 5, "out": 6,
            "kernel": pa.NAME, "scale": d ** -0.5, "window": window, "softcap": softcap,
            "shape": [str(x) for x in q.shape], "stride": [str(x) for x in q.stride()],
            "blocks": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "UPCAST": True, "IEEE": False,
                       "num_warps": 1, "sm_count": 1, "interpret": True}}
    target = detect("cpu")
    fn = load_kernel(kernel_path(pa.NAME, pa.SOURCE, target), pa.NAME, True)
    values = [q, k, v, block_table, query_start, seq_lens, None]
    pa.PagedAttentionFamily().runner(step, {pa.NAME: fn})(values, {})
    ref = paged_attention_reference(q.double(), k.double(), v.double(), block_table, query_start, seq_lens,
                                    d ** -0.5, window, softcap, compute_dtype=torch.float64)
    torch.testing.assert_close(values[6].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(values[6][-2:], torch.zeros(2, h, d))
