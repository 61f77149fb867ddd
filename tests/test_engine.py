"""turbofx.Engine: continuous batching over a paged KV cache.

Every request's greedy tokens must equal HF eager ``generate`` on that prompt alone — with requests
arriving at different steps, prompts longer than the step's token budget (chunked prefill) and too
few pages (forced preemption) — and after every scenario the allocator holds every page again.
The scheduler is checked over the eager model (fast) and once through the compiled program.
"""
from __future__ import annotations

import threading

import pytest
import torch

import turbofx
from turbofx.errors import GenerationError
from turbofx.runtime.paged import PageAllocator, SequencePages


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _requests(n: int, seed: int = 1, max_prompt: int = 20, max_new: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(1, max_prompt, (1,), generator=g))
        k = int(torch.randint(1, max_new, (1,), generator=g))
        out.append((torch.randint(0, 128, (p,), generator=g).tolist(), k))
    return out


def _hf_greedy(model, prompt, k):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=k, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _serve_staggered(engine, reqs):
    """Submit one request per step (arrivals at different steps), then run to the end."""
    handles = []
    for prompt, k in reqs:
        handles.append(engine.submit(prompt, max_new_tokens=k))
        engine.step()
    engine.run_until_done()
    return handles


def _assert_no_leak(engine):
    engine.allocator.check()
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert not engine.has_work


@pytest.mark.parametrize("num_pages", [40, 8], ids=["enough-pages", "forced-preemption"])
def test_scheduler_matches_hf_generate(num_pages):
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=4, max_num_tokens=16, page_size=4, num_pages=num_pages,
                            max_seq_len=64, compile=False)
    reqs = _requests(16)
    assert max(len(p) for p, _ in reqs) > 16  # some prompts need chunked prefill
    handles = _serve_staggered(engine, reqs)
    for (prompt, k), h in zip(reqs, handles):
        assert h.finished and h.finish_reason == "length"
        assert h.tokens == _hf_greedy(model, prompt, k), (len(prompt), k)
    if num_pages == 8:
        assert engine.stats.preemptions > 0
    _assert_no_leak(engine)


def test_compiled_engine_matches_hf_generate_with_chunks_and_preemption():
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=4, max_num_tokens=16, page_size=4, num_pages=8,
                            max_seq_len=64)
    assert engine.program is not engine.decoder  # a turbofx program, compiled before serving
    paged = [r for r in turbofx.explain(engine.program).kernels if "paged" in r.label]
    assert len(paged) == 2 and all(r.kind == "attention" for r in paged), paged  # one kernel per layer
    reqs = _requests(16)
    handles = _serve_staggered(engine, reqs)
    for (prompt, k), h in zip(reqs, handles):
        assert h.tokens == _hf_greedy(model, prompt, k), (len(prompt), k)
    assert engine.stats.preemptions > 0 and engine.stats.prefill_tokens > sum(len(p) for p, _ in reqs)
    _assert_no_leak(engine)


def test_eos_cancel_and_streaming_thread():
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=2, max_num_tokens=8, page_size=4, max_seq_len=64, compile=False)
    prompt = [3, 5, 7, 9]
    ref = _hf_greedy(model, prompt, 6)
    stop = engine.submit(prompt, max_new_tokens=6, eos_token_id=ref[2])
    engine.run_until_done()
    assert stop.finish_reason == "stop" and stop.tokens == ref[:3]

    seen = []
    engine.start()
    try:
        h = engine.submit(prompt, max_new_tokens=6, on_token=lambda hd, t: seen.append(t))
        assert list(h) == ref and h.result(timeout=30) == ref
        assert seen == ref + [None]  # one callback per token, then None at the end
        long = engine.submit(prompt, max_new_tokens=50)
        next(iter(long))
        long.cancel()
        assert long.result(timeout=30) == long.tokens  # what was generated before the cancel
        assert long.finish_reason == "cancelled" and len(long.tokens) < 50
    finally:
        engine.shutdown(drain=True, timeout=30)
    _assert_no_leak(engine)
    with pytest.raises(turbofx.EngineFull, match="shutting down"):
        engine.submit(prompt)


def test_seeded_sampling_is_reproducible_per_request():
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=4, page_size=4, max_seq_len=64, compile=False)
    a = engine.submit([1, 2, 3], max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    other = engine.submit([4, 5], max_new_tokens=8, temperature=1.0, seed=3)  # shares the steps
    engine.run_until_done()
    b = engine.submit([1, 2, 3], max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    engine.run_until_done()
    assert a.tokens == b.tokens and len(a.tokens) == 8 and other.finished
    _assert_no_leak(engine)


def test_bad_requests_are_refused_with_what_to_do():
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=2, page_size=4, num_pages=4, max_seq_len=32, max_waiting=1,
                            compile=False)
    for bad, match in (([], "empty"), ([1, 500], "outside the vocabulary"), ("hi", "list of token ids"),
                       (torch.ones(2, 2, dtype=torch.long), "1-D")):
        with pytest.raises(GenerationError, match=match):
            engine.submit(bad)
    with pytest.raises(GenerationError, match="max_seq_len"):
        engine.submit([1] * 30, max_new_tokens=5)
    with pytest.raises(GenerationError, match="num_pages"):
        engine.submit([1] * 10, max_new_tokens=10)  # 20 tokens > 4 pages of 4
    with pytest.raises(GenerationError, match="temperature"):
        engine.submit([1], max_new_tokens=2, temperature=-1.0)
    engine.submit([1, 2], max_new_tokens=2)
    with pytest.raises(turbofx.EngineFull, match="max_waiting"):
        engine.submit([1, 2], max_new_tokens=2)
    engine.run_until_done()
    _assert_no_leak(engine)
    with pytest.raises(GenerationError, match="max_batch_size"):
        turbofx.Engine(model, max_batch_size=0, compile=False)


def test_allocator_accounting():
    alloc = PageAllocator(num_pages=5, page_size=4)
    a, b = SequencePages(1), SequencePages(2)
    a.ensure(alloc, 9)  # 3 pages
    b.ensure(alloc, 4)
    assert alloc.num_free == 1 and 0 not in a.pages + b.pages  # page 0 is scratch, never handed out
    with pytest.raises(turbofx.TurbofxError, match="free"):
        b.ensure(alloc, 12)
    assert len(b.pages) == 1 and alloc.num_free == 1  # a failed ensure takes nothing
    assert a.slot(5, 4) == a.pages[1] * 4 + 1
    a.release(alloc)
    b.release(alloc)
    alloc.check()
    assert alloc.num_free == 5


def test_concurrent_submitters():
    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=4, page_size=4, max_seq_len=64, compile=False)
    engine.start()
    results = {}
    try:
        def client(i):
            results[i] = engine.submit([i + 1, i + 2], max_new_tokens=3).result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.shutdown(timeout=30)
    assert all(results[i] == _hf_greedy(model, [i + 1, i + 2], 3) for i in range(8))
    _assert_no_leak(engine)


def test_quantized_engine_matches_the_dequantized_model():
    from turbofx.quant import parse
    from turbofx.quant.reference import dequantized_model

    model = _tiny_llama()
    engine = turbofx.Engine(model, max_batch_size=4, max_num_tokens=16, page_size=4, max_seq_len=64,
                            quantize="int8")
    quantized = engine.program.turbofx_report.quantized
    assert quantized  # the projections run on int8 weights
    ref = dequantized_model(model, parse("int8"), [name for q in quantized for name in q.layers])
    reqs = _requests(6, seed=4)
    handles = _serve_staggered(engine, reqs)
    for (prompt, k), h in zip(reqs, handles):
        assert h.tokens == _hf_greedy(ref, prompt, k), (len(prompt), k)
    _assert_no_leak(engine)
