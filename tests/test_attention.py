"""Streaming attention kernel and the attention pass.

Numerics follow FlashAttention's rule: max |out - ref| <= 2 * max |torch_out - ref| (+ a small
floor for exact cases), where ref is the fp64 reference and torch_out the same computation done
by PyTorch in the test dtype.
"""
from __future__ import annotations

import pytest
import torch

import turbofx
from turbofx.compiler.models import example_inputs, make_tiny_model
from turbofx.runtime.ops import attention_reference


class Attn(torch.nn.Module):
    def __init__(self, scale, causal=False, window=0, softcap=0.0):
        super().__init__()
        self.args = (scale, causal, window, softcap)

    def forward(self, q, k, v, mask=None):
        return torch.ops.turbofx.attention(q, k, v, mask, *self.args)


def _check(q, k, v, mask=None, causal=False, window=0, softcap=0.0):
    scale = q.shape[-1] ** -0.5
    m = Attn(scale, causal, window, softcap)
    args = (q, k, v) if mask is None else (q, k, v, mask)
    cm = turbofx.compile(m, args)
    assert [r.kind for r in turbofx.explain(cm).generated] == ["attention"]
    out = cm(*args)
    ref = attention_reference(q.double(), k.double(), v.double(), None if mask is None else
                              (mask if mask.dtype == torch.bool else mask.double()), scale, causal, window, softcap,
                              compute_dtype=torch.float64)
    torch_out = attention_reference(q, k, v, mask, scale, causal, window, softcap, compute_dtype=q.dtype)
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    return out


def _qkv(b, h, hkv, sq, sk, d, dtype):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(b, h, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill(dtype, causal):
    _check(*_qkv(2, 2, 2, 37, 37, 16, dtype), causal=causal)


def test_gqa_and_decode_shapes():
    _check(*_qkv(1, 4, 2, 3, 70, 8, torch.float32), causal=True)  # few queries over a longer cache
    _check(*_qkv(1, 4, 1, 1, 130, 8, torch.float32))  # multi-query, single token


def test_sliding_window_and_softcap():
    _check(*_qkv(1, 2, 2, 40, 40, 16, torch.float32), causal=True, window=7)
    _check(*_qkv(1, 2, 2, 20, 20, 16, torch.float32) , softcap=5.0)


@pytest.mark.parametrize("sq, sk, causal, window", [(200, 200, True, 70), (150, 200, True, 0), (3, 150, False, 0),
                                                  (130, 130, False, 100)])
def test_band_edges_over_many_tiles(sq, sk, causal, window):
    # several 64-key tiles: some fully inside the visible band (no masks computed), some on its
    # edges (the causal diagonal, the window's lower edge, the end of the keys)
    _check(*_qkv(1, 1, 1, sq, sk, 16, torch.float16), causal=causal, window=window)


def test_bool_padding_mask_and_additive_bias():
    q, k, v = _qkv(2, 2, 2, 9, 9, 16, torch.float32)
    pad = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    pad[1, ..., 6:] = False  # second sequence: 3 padded keys
    _check(q, k, v, pad)
    bias = torch.randn(1, 2, 9, 9)  # ALiBi-like per-head bias
    _check(q, k, v, bias, causal=True)


def test_fully_masked_rows_give_zeros():
    q, k, v = _qkv(1, 1, 1, 4, 6, 16, torch.float32)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = _check(q, k, v, mask)
    assert torch.equal(out[0, 0, 2], torch.zeros(16))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "phi3", "bert", "mistral"])
def test_pass_finds_attention_in_models(name):
    model = make_tiny_model(name)
    args, kwargs = example_inputs(name, batch=2, seq=8)
    cm = turbofx.compile(model, args, kwargs)
    report = turbofx.explain(cm)
    assert sum(k.kind == "attention" for k in report.kernels) == model.config.num_hidden_layers
    assert not any("scaled_dot_product" in k.label for k in report.kernels)
    with torch.no_grad():
        ref, out = model(*args, **kwargs), cm(*args, **kwargs)
    key = "last_hidden_state" if name == "bert" else "logits"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-3)
    if name in ("llama", "qwen2", "mistral", "phi3"):  # repeat_kv read through: no KV copy kernels
        rec = [p for p in report.passes if p.name == "attention"][0]
        assert all("kv groups 2" in m for m in rec.matched), rec.matched


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_torch_compile_door_keeps_sdpa_whole(name):
    """AOTAutograd decomposes SDPA (math form on CPU, a flash/efficient kernel picked at trace time
    on GPUs); the backend routes it through turbofx::sdpa so the attention pass still sees it."""
    torch._dynamo.reset()
    model = make_tiny_model(name)
    args, kwargs = example_inputs(name, batch=2, seq=8)
    compiled = torch.compile(model, backend="turbofx")
    with torch.no_grad():
        ref, out = model(*args, **kwargs), compiled(*args, **kwargs)
    key = "last_hidden_state" if name == "bert" else "logits"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-3)
    report = turbofx.explain(compiled)
    assert sum(k.kind == "attention" for k in report.kernels) == model.config.num_hidden_layers
    assert not any("sdpa" in k.label or "scaled_dot_product" in k.label for k in report.kernels)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "gemma2"])
def test_pass_finds_decomposed_attention(name):
    """matmul -> scale -> [softcap] -> mask add -> softmax -> matmul, as eager attention writes it."""
    model = make_tiny_model(name, attn_implementation="eager")
    args, kwargs = example_inputs(name, batch=2, seq=8)
    cm = turbofx.compile(model, args, kwargs)
    report = turbofx.explain(cm)
    assert sum(k.kind == "attention" for k in report.kernels) == model.config.num_hidden_layers
    rec = [p for p in report.passes if p.name == "attention"][0]
    assert all("matmul-softmax-matmul" in m for m in rec.matched)
    if name == "gemma2":
        assert all("softcap 50" in m for m in rec.matched), rec.matched
    with torch.no_grad():
        ref, out = model(*args, **kwargs), cm(*args, **kwargs)
    key = "last_hidden_state" if name == "bert" else "logits"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("splits", ["1", "3", "8"])
def test_split_kv_results_do_not_depend_on_splits(monkeypatch, splits):
    """Flash-decoding: chunks of the keys combined by log-sum-exp give the same answer."""
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", splits)
    q, k, v = _qkv(2, 4, 2, 2, 300, 16, torch.float32)
    out = _check(q, k, v, causal=True)
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", "1")
    single = turbofx.compile(Attn(16 ** -0.5, True), (q, k, v))(q, k, v)
    torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", ["1", "3"])
def test_packed_query_heads_read_their_own_mask_rows(monkeypatch, splits):
    """Decode-like GQA shapes pack a KV head's query heads into one program: each packed row must
    use its own head's bias row and query position."""
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", splits)
    q, k, v = _qkv(2, 6, 2, 2, 150, 16, torch.float32)  # 3 query heads per KV head, 2 queries each
    bias = torch.randn(2, 6, 2, 150, generator=torch.Generator().manual_seed(3))
    _check(q, k, v, bias, causal=True)
    pad = torch.ones(2, 1, 1, 150, dtype=torch.bool)
    pad[1, ..., :20] = False  # left padding on the second sequence
    _check(q, k, v, pad, window=90)


@pytest.mark.parametrize("splits", ["1", "3"])
def test_mask_extent_bounds_the_key_loop(monkeypatch, splits):
    """A static cache masks its unwritten slots: the kernel reads only the keys some row can see.
    Results equal the reference whether the mask is bool or additive -inf, and a finfo.min
    additive mask (not -inf) is honoured as a finite bias."""
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", splits)
    q, k, v = _qkv(1, 4, 2, 3, 300, 16, torch.float32)
    keep = torch.zeros(1, 1, 3, 300, dtype=torch.bool)
    keep[..., 70:140] = True
    keep[..., 0, 139] = False  # the rows see different extents
    _check(q, k, v, keep)
    _check(q, k, v, torch.zeros(keep.shape).masked_fill(~keep, float("-inf")))
    _check(q, k, v, torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min))


def test_sdpa_is_causal_with_fewer_queries_than_keys_stays_sdpa():
    """SDPA's is_causal aligns the mask top-left when Sq != Sk; the kernel's causal flag is the KV
    cache's bottom-right convention, so the pass refuses (with the reason) rather than change results."""
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = _qkv(1, 2, 2, 3, 10, 16, torch.float32)
    cm = turbofx.compile(M(), (q, k, v))
    torch.testing.assert_close(cm(q, k, v), M()(q, k, v))
    rec = next(p for p in turbofx.explain(cm).passes if p.name == "attention")
    assert not rec.matched and [r.code for r in rec.refused] == ["causal-top-left"], rec.refused


def test_split_kv_with_masked_chunks(monkeypatch):
    """A chunk whose keys are all masked contributes nothing (its log-sum-exp is -inf)."""
    monkeypatch.setenv("TURBOFX_ATTENTION_SPLITS", "4")
    q, k, v = _qkv(1, 2, 2, 1, 256, 16, torch.float32)
    mask = torch.zeros(1, 1, 1, 256, dtype=torch.bool)
    mask[..., 10:40] = True  # only keys in the first chunk are visible
    _check(q, k, v, mask)
    mask[...] = False  # nothing visible: zeros
    out = _check(q, k, v, mask)
    assert torch.equal(out, torch.zeros_like(out))


def test_split_choice():
    from turbofx.codegen.attention import attention_splits

    assert attention_splits(132, 32, 4096, 64) > 1  # batch 1 decode on an H100: split
    assert attention_splits(132, 32 * 64, 4096, 64) == 1  # enough programs already
    assert attention_splits(132, 32, 256, 64) == 1  # short cache
    assert attention_splits(1, 1, 4096, 64, interpret=True) == 1


class Varlen(torch.nn.Module):
    def __init__(self, scale, causal):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v, cu):
        return torch.ops.turbofx.varlen_attention(q, k, v, cu, self.scale, self.causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_packed_batch(causal, dtype):
    """Mixed lengths, packed with no padding (short sequences share tiles), GQA, an empty one."""
    from turbofx.runtime.ops import varlen_reference

    lengths = [70, 3, 1, 0, 17, 5, 33]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, 4, 16, generator=g).to(dtype)
    k = torch.randn(t, 2, 16, generator=g).to(dtype)
    v = torch.randn(t, 2, 16, generator=g).to(dtype)
    m = Varlen(0.25, causal)
    cm = turbofx.compile(m, (q, k, v, cu))
    assert [r.label for r in turbofx.explain(cm).generated] == ["varlen_attention"]
    out = cm(q, k, v, cu)
    ref = varlen_reference(q.double(), k.double(), v.double(), cu, 0.25, causal, compute_dtype=torch.float64)
    torch_out = varlen_reference(q, k, v, cu, 0.25, causal, compute_dtype=dtype)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (torch_out.double() - ref).abs().max().item() + 1e-5
    # the same sequences run one by one through the padded kernel agree
    a, b = int(cu[4]), int(cu[5])
    alone = _check(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                   causal=causal) if dtype == torch.float32 else None
    if alone is not None:
        torch.testing.assert_close(out[a:b], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mistral_sliding_window(impl):
    """A sliding window shorter than the sequence: the window arrives as a mask and is kept."""
    from transformers import AutoModelForCausalLM

    from turbofx.compiler.models import TINY_CONFIGS

    config = TINY_CONFIGS["mistral"]()
    config.sliding_window = 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    args, kwargs = example_inputs("mistral", batch=2, seq=10)
    cm = turbofx.compile(model, args, kwargs)
    assert sum(k.kind == "attention" for k in turbofx.explain(cm).kernels) == config.num_hidden_layers
    with torch.no_grad():
        ref, out = model(*args, **kwargs).logits, cm(*args, **kwargs).logits
        full = AutoModelForCausalLM.from_config(TINY_CONFIGS["mistral"](), attn_implementation=impl)
        full.load_state_dict(model.state_dict())
        assert not torch.allclose(full.eval()(*args, **kwargs).logits, ref, atol=1e-4)  # the window matters
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
