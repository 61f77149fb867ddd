"""Door 4: turbofx.generate, compiled prefill + decode over a static KV cache.

    python examples/generate.py

A tiny random-weight Llama (any HF causal LM works the same way); greedy tokens are compared
with the same loop run eagerly (compile=False).
"""
import torch

import turbofx  # before transformers: it imports triton, and without a GPU turbofx must switch on
# Triton's interpreter first (the other order is refused with a clear CodegenError)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 6))
    result = turbofx.generate(model, prompt, max_new_tokens=8)
    reference = turbofx.generate(model, prompt, max_new_tokens=8, compile=False)
    print(f"new tokens: {result.new_tokens.tolist()}")
    print(f"compile {result.compile_seconds:.1f}s, prefill {result.prefill_seconds:.2f}s, "
          f"{result.steps} decode steps in {result.decode_seconds:.2f}s")
    same = torch.equal(result.new_tokens, reference.new_tokens)
    print(f"matches eager: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
