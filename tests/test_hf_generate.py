"""HF generate with a static cache, compiled through backend="turbofx" (the decode step)."""
from __future__ import annotations

import pytest
import torch

import turbofx  # noqa: F401  (registers the backend)
from turbofx.compiler import backend
from turbofx.compiler.models import make_tiny_model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hf_generate_compile_config_equals_eager(name):
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = make_tiny_model(name)
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    config = CompileConfig(backend="turbofx")  # HF passes mode="reduce-overhead" to the backend
    config._compile_all_devices = True  # HF compiles on CPU only when asked
    before = dict(backend.stats)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                             compile_config=config)
    assert torch.equal(out, ref), (out, ref)
    assert backend.stats["graphs"] > before["graphs"]  # the backend compiled the decode step
    # SDPA stayed whole through AOTAutograd; rope and the cache write fold into it, in place
    attention = [k for r in backend.reports_of(model) for k in r.kernels if k.kind == "attention"]
    assert attention and all(k.label == "attention+rope+cache write" and "in place" in k.reason for k in attention)
    assert backend.stats["calls"] >= before["calls"] + 3  # and ran it for the new tokens
    torch._dynamo.reset()
