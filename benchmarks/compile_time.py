"""Compile-time benchmark: capture / passes / codegen seconds for a Llama-3-8B-shaped model
(32 layers) built on the meta device, so no weights are allocated.

    python -m benchmarks.compile_time [--layers 32] [--seq 128] [--json out.json]
Goal: passes + codegen take no longer than the export (capture) itself.
"""
from __future__ import annotations

import argparse
import json
import time

import turbofx  # noqa: F401  (before triton: the CPU target needs the interpreter switched on first)


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from turbofx.compiler.capture import capture_module
    from turbofx.compiler.driver import Options, build

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.zeros(1, a.seq, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    with torch.no_grad():
        captured = capture_module(model, (ids,), {"use_cache": False}, dynamic=a.dynamic)
    capture_s = time.perf_counter() - t0
    _, report, lowered, target = build(captured, Options(), capture_s)
    s = report.stage_seconds
    nodes = len(captured.gm.graph.nodes)
    row = {"model": f"llama-3-8b shape, {a.layers} layers, seq {a.seq}, bf16, meta tensors", "nodes": nodes,
           "capture_s": s["capture"], "passes_s": s["passes"], "codegen_s": s["codegen"],
           "kernels": report.counts(), "target": target.describe(),
           "goal_met": s["passes"] + s["codegen"] <= s["capture"]}
    print("| stage | seconds |\n|---|---:|")
    for k in ("capture", "passes", "codegen"):
        print(f"| {k} | {s[k]:.2f} |")
    print(f"\n{nodes} graph nodes; steps {report.counts()}; passes+codegen <= capture: {row['goal_met']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
