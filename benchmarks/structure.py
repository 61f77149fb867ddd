"""Program structure per architecture: steps, steps per decoder layer, extern matmuls, kernels by kind.

    python -m benchmarks.structure [--json PATH] [--archs llama,gpt2,...] [--dtype bf16|fp16|fp32]
        [--target cpu-interpret] [--prompt-len N] [--cache-len N] [--check-layers]

For every architecture the tests exercise (``turbofx.compiler.models.TINY_CONFIGS`` plus the falcon
config of tests/test_generate_validation.py), two programs are compiled and counted:

  decode   the one-token step over a static KV cache (``StaticDecoder``, as turbofx.generate and
           benchmarks/decode_structure.py compile it), batch 1
  prefill  the model's own forward over a short prompt (``use_cache=False``; encoders: the forward
           with an attention mask)

Each is compiled on the *meta* device when it can be (shapes only: no weights are allocated and no
kernel runs, so it takes seconds); an architecture that fails there is compiled with its tiny real
weights on the CPU instead (nothing runs either way: compile only), and the row says so.

Counts come from the public report only (``turbofx.explain(cm).steps`` / ``.counts()``), so they
stay meaningful when lowering changes: a step's ``kind`` is counted whatever it is (``extern`` today
for matmuls; a generated GEMM kind later), and "extern matmuls" are extern steps whose label is an
ATen matmul op.

Steps per layer: the program is compiled at ``p`` and ``2p`` decoder layers, where ``p`` is the
period of the config's layer pattern (1 for most; 2 for gemma2's sliding/full alternation, 6 for
gemma3), so the difference is whole periods of identical layers; per layer = that difference / p,
rest (embedding, final norm, head, mask building) = count at p layers - p x per layer. The total
is the count at the tiny config's own depth. ``--check-layers`` also compiles 3p layers and checks
that rest + 3p x per layer equals what it counts (the extrapolation is exact or it says not).
A phase that cannot be compiled is a row with status "n/a" and the reason; the table never stops.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: switches Triton's interpreter on before triton is imported)

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

MATMUL_OPS = frozenset({"aten::mm.default", "aten::addmm.default", "aten::bmm.default", "aten::baddbmm.default",
                        "aten::linear.default", "aten::matmul.default"})
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHASES = ("decode", "prefill")


def _falcon_config():
    # the multi-query falcon of tests/test_generate_validation.py
    from transformers import FalconConfig

    return FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        multi_query=True)


def architectures() -> dict[str, Callable]:
    """Name -> config factory, in the order of the table."""
    from turbofx.compiler.models import TINY_CONFIGS

    return {**TINY_CONFIGS, "falcon": _falcon_config}


def _is_encoder(name: str) -> bool:
    from turbofx.compiler.models import ENCODER_MODELS

    return name in ENCODER_MODELS


# ------------------------------------------------------------------------------------ counting


@dataclass
class Counts:
    """What one compiled program holds (working steps: views and tuple elements are free aliases)."""

    steps: int = 0
    extern_matmuls: int = 0
    by_kind: dict[str, float] = field(default_factory=dict)  # step kind -> count
    extern_ops: dict[str, float] = field(default_factory=dict)  # extern step label (ATen op) -> count

    @classmethod
    def of(cls, report) -> "Counts":
        steps = report.steps
        externs: dict[str, float] = {}
        for k in steps:
            if k.kind == "extern":
                externs[k.label] = externs.get(k.label, 0) + 1
        return cls(steps=len(steps), extern_matmuls=sum(n for op, n in externs.items() if op in MATMUL_OPS),
                   by_kind=dict(sorted(report.counts().items())), extern_ops=dict(sorted(externs.items())))

    def combine(self, other: "Counts", scale: float) -> "Counts":
        """self + scale * other, field by field (kinds missing on one side count 0)."""
        def merge(a: dict, b: dict) -> dict:
            keys = sorted(set(a) | set(b))
            return {k: _num(a.get(k, 0) + scale * b.get(k, 0)) for k in keys if a.get(k, 0) + scale * b.get(k, 0)}

        return Counts(steps=_num(self.steps + scale * other.steps),
                      extern_matmuls=_num(self.extern_matmuls + scale * other.extern_matmuls),
                      by_kind=merge(self.by_kind, other.by_kind), extern_ops=merge(self.extern_ops, other.extern_ops))


def _num(x: float):
    """Integers stay integers in the JSON; a fractional per-layer count (mixed layer pattern) stays a float."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


@dataclass
class PhaseStructure:
    arch: str
    phase: str  # decode | prefill
    status: str  # ok | n/a
    reason: str = ""  # why n/a, or why not on meta
    device: str = ""  # meta | cpu (what the model was built on)
    layers: int = 0  # the tiny config's depth
    period: int = 1  # layers in one repeat of the layer pattern
    total: Counts | None = None  # at the config's depth
    per_layer: Counts | None = None
    rest: Counts | None = None  # total - layers x per_layer when the depth is whole periods
    samples: dict[int, Counts] = field(default_factory=dict)  # layers -> counts as compiled
    linear_check: dict | None = None  # --check-layers: {"layers", "predicted_steps", "counted_steps", "ok"}
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- model building


def _layers_key(cfg) -> str:
    return getattr(cfg, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def config_with_layers(cfg, n: int):
    """``cfg`` rebuilt with ``n`` decoder layers: the config class recomputes what depends on the depth
    (gemma2/3 ``layer_types``) the way it would for a model of that depth."""
    d = cfg.to_dict()
    d.pop("layer_types", None)
    d[_layers_key(cfg)] = n
    return type(cfg)(**d)


def layer_period(cfg) -> int:
    """The smallest p such that the layer pattern (``layer_types``) of a deep model repeats every p layers."""
    deep = getattr(config_with_layers(cfg, 24), "layer_types", None)
    if not deep:
        return 1
    for p in range(1, 13):
        if all(deep[i] == deep[i % p] for i in range(len(deep))):
            return p
    return 1


def _build(name: str, cfg, dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if _is_encoder(name) else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = auto.from_config(cfg, dtype=dtype)
    return model.eval()


def _compile_decode(model, device: str, cache_len: int, target: str):
    from turbofx.compiler.generation import StaticDecoder

    dec = StaticDecoder(model, 1, cache_len).eval()
    dev = torch.device(device)
    args = (torch.zeros(1, 1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
            torch.ones(1, cache_len, dtype=torch.long, device=dev), torch.zeros(1, 1, dtype=torch.long, device=dev))
    return turbofx.compile(dec, args, target=target, cudagraphs=False)


def _compile_prefill(name: str, model, device: str, prompt_len: int, target: str):
    dev = torch.device(device)
    ids = torch.ones(1, prompt_len, dtype=torch.long, device=dev)
    if _is_encoder(name):
        kwargs = {"attention_mask": torch.ones(1, prompt_len, dtype=torch.long, device=dev)}
    else:
        kwargs = {"use_cache": False}
    return turbofx.compile(model, (ids,), kwargs, target=target, cudagraphs=False)


def count_program(name: str, cfg, layers: int, phase: str, device: str, a) -> Counts:
    """Build the model with ``layers`` layers on ``device``, compile ``phase``, count its steps."""
    model = _build(name, config_with_layers(cfg, layers), DTYPES[a.dtype], device)
    with torch.no_grad():
        if phase == "decode":
            cm = _compile_decode(model, device, a.cache_len, a.target)
        else:
            cm = _compile_prefill(name, model, device, a.prompt_len, a.target)
    return Counts.of(turbofx.explain(cm))


def _reason(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def phase_structure(name: str, phase: str, a) -> PhaseStructure:
    t0 = time.perf_counter()
    cfg = architectures()[name]()
    depth = getattr(cfg, "num_hidden_layers")
    row = PhaseStructure(arch=name, phase=phase, status="n/a", layers=depth)
    if phase == "decode" and _is_encoder(name):
        row.reason = "encoder (no causal LM head, no KV cache): no decode step"
        return row
    try:
        row.period = layer_period(cfg)
    except Exception as e:  # noqa: BLE001  (a config that cannot be rebuilt: one period assumed)
        row.reason = f"layer pattern unknown ({_reason(e)}); period 1 assumed. "
    p = row.period
    wanted = sorted({p, 2 * p, depth} | ({3 * p} if a.check_layers else set()))
    failures = []
    for device in ("meta", "cpu"):
        try:
            row.samples = {n: count_program(name, cfg, n, phase, device, a) for n in wanted}
            row.device = device
            break
        except Exception as e:  # noqa: BLE001  (a failure is a row, not a crash)
            failures.append(f"on {device}: {_reason(e)}")
    if not row.samples:
        row.reason += "; ".join(failures)
        row.seconds = time.perf_counter() - t0
        return row
    if failures:
        row.reason += f"not on meta ({failures[0][:160]}): built with tiny real weights on the CPU"
    row.status = "ok"
    one, two = row.samples[p], row.samples[2 * p]
    row.per_layer = Counts().combine(two.combine(one, -1), 1 / p)
    row.rest = one.combine(row.per_layer, -p)
    row.total = row.samples[depth]
    if a.check_layers:
        n = 3 * p
        predicted = row.rest.combine(row.per_layer, n)
        row.linear_check = {"layers": n, "predicted_steps": predicted.steps, "counted_steps": row.samples[n].steps,
                            "ok": predicted == row.samples[n]}
    row.seconds = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------------------------------- output


def _kinds(c: Counts | None) -> str:
    if c is None:
        return "-"
    return ", ".join(f"{_fmt(n)} {k}" for k, n in c.by_kind.items()) or "-"


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def table(rows: list[PhaseStructure]) -> str:
    lines = ["| arch | phase | built on | layers | steps | steps/layer | rest | extern mm | extern mm/layer "
             "| kinds per layer | kinds total | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.arch} | {r.phase} | - | {r.layers} | n/a | | | | | | | {r.reason.replace('|', '/')} |")
            continue
        note = [r.reason] if r.reason else []
        if r.period > 1:
            note.append(f"layer pattern repeats every {r.period} layers (per layer = per period / {r.period})")
            if r.layers % r.period:
                note.append(f"the tiny depth {r.layers} is not whole periods: total != rest + layers x per layer")
        if r.linear_check:
            c = r.linear_check
            note.append(f"{c['layers']} layers: counted {c['counted_steps']}, predicted {_fmt(c['predicted_steps'])}"
                        f" -> {'exact' if c['ok'] else 'NOT LINEAR'}")
        lines.append(f"| {r.arch} | {r.phase} | {r.device} | {r.layers} | {r.total.steps} | {_fmt(r.per_layer.steps)} "
                     f"| {_fmt(r.rest.steps)} | {r.total.extern_matmuls} | {_fmt(r.per_layer.extern_matmuls)} "
                     f"| {_kinds(r.per_layer)} | {_kinds(r.total)} | {'; '.join(note).replace('|', '/')} |")
    lines += ["", "extern steps per decoder layer (ATen op: count):"]
    lines += [f"  {r.arch} {r.phase}: " + (", ".join(f"{op} {_fmt(n)}" for op, n in r.per_layer.extern_ops.items())
                                          or "none") for r in rows if r.status == "ok"]
    return "\n".join(lines)


def _dump(path: str, a, rows: list[PhaseStructure]) -> None:
    data = {"target": a.target, "dtype": a.dtype, "batch": 1, "prompt_len": a.prompt_len, "cache_len": a.cache_len,
            "turbofx": turbofx.__version__, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main(argv=None) -> list[PhaseStructure]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON (rewritten after every row)")
    ap.add_argument("--archs", help=f"comma-separated subset (default: all); known: {','.join(architectures())}")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--target", default="cpu-interpret", help="compile target (counts can depend on it)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--cache-len", type=int, default=32)
    ap.add_argument("--check-layers", action="store_true", help="also compile 3 periods of layers and check the "
                                                                 "per-layer extrapolation against the count")
    a = ap.parse_args(argv)
    known = architectures()
    archs = a.archs.split(",") if a.archs else list(known)
    unknown = [x for x in archs if x not in known]
    if unknown:
        ap.error(f"unknown architectures {unknown}; known: {list(known)}")
    phases = a.phases.split(",")
    if set(phases) - set(PHASES):
        ap.error(f"--phases: expected some of {PHASES}")
    print(f"program structure per architecture: tiny configs, {a.dtype}, target {a.target}, batch 1, "
          f"prefill {a.prompt_len} tokens, decode over a {a.cache_len}-slot static cache; counts are "
          "working steps from turbofx.explain (compile only, nothing timed)", flush=True)
    rows = []
    for name in archs:
        for phase in phases:
            rows.append(phase_structure(name, phase, a))
            r = rows[-1]
            print(f"[{r.arch} {r.phase}] {r.status} {r.total.steps if r.total else ''} steps "
                  f"({r.seconds:.1f} s) {r.reason}", file=sys.stderr, flush=True)
            if a.json:
                _dump(a.json, a, rows)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
