"""The real default model: SmolLM2-135M-Instruct (GGUF weights) generates eager's greedy tokens."""
from __future__ import annotations

import pytest
import torch

import turbofx
from turbofx.errors import ModelLoadError


@pytest.fixture(scope="module")
def smollm2():
    from turbofx.compiler.models import load_smollm2

    try:
        return load_smollm2(torch.float32)
    except ModelLoadError as e:  # scripts/setup.sh installs it; say so rather than fail obscurely
        pytest.skip(str(e))


def test_greedy_tokens_equal_eager(smollm2):
    """turbofx.generate (compiled prefill + decode over the static KV cache) reproduces
    transformers' eager greedy generation on the real model."""
    model, tok = smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "Name a primary colour."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    out = turbofx.generate(model, ids, 3)
    assert torch.equal(out.sequences, ref), (tok.decode(out.new_tokens[0]), tok.decode(ref[0, ids.shape[1]:]))
    labels = {k.label for k in out.reports["decode"].generated}
    # a decoder layer: QKV with its RMSNorm | attention with RoPE and the cache write | O + residual |
    # RMSNorm + gate/up + SwiGLU | down + residual
    assert {"rmsnorm+matmul", "attention+rope+cache write", "matmul+residual", "rmsnorm+matmul+silu-glu"} <= labels


def test_gguf_native_blocks_equal_transformers_dequantized_model(smollm2):
    """quantize="gguf": the kernels read the file's own Q4_1 blocks (4-bit, never dequantized in
    memory), and the logits equal transformers' model, which holds the same numbers dequantized."""
    from turbofx.quant.native import attach_gguf

    model, tok = smollm2
    notes = attach_gguf(model, model._turbofx_gguf_file)
    assert notes[0].endswith(": 210 linear weights keep their GGUF blocks")
    assert any("token_embd.weight (Q8_0)" in n for n in notes)  # the tied table: not a linear layer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        cm = turbofx.compile(model, (ids,), {"use_cache": False}, quantize="gguf")
        out = cm(ids, use_cache=False).logits
    rep = turbofx.explain(cm)
    assert len(rep.quantized) == 4 * model.config.num_hidden_layers  # QKV, O, gate+up, down: joined blocks
    assert "token_embd.weight (Q8_0)" in str(rep)  # explain says what stayed dequantized, and why
    assert {q.scheme for q in rep.quantized} == {"uint4-g32"}
    assert all(k.label.startswith(("matmul[uint4-g32]", "rmsnorm+matmul[uint4-g32]")) or k.label == "rmsnorm+matmul"
               for k in rep.generated if k.kind == "gemm")  # the LM head (tied to the Q8_0 table) stays dense
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)
    linear_bytes = sum(q.quantized_bytes for q in rep.quantized)
    assert linear_bytes == sum(q.full_bytes for q in rep.quantized) * 5 // 32  # Q4_1: 5 bits per weight
