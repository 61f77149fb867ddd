"""Perplexity benchmark: SmolLM2-135M (real weights, fp32) on a public-domain text, eager vs turbofx programs.

    python -m benchmarks.quality [--quick] [--json PATH] [--device cuda|cpu] [--window 256] [--tokens N]
        [--quantize int8,int4,w8a8,fp8,gguf] [--text PATH]

The text (tests/data/public_domain.txt, see tests/data/README.md) is tokenized once with SmolLM2's tokenizer
(no special tokens) and cut into fixed, non-overlapping windows of --window tokens; a tail shorter than a
window is not scored (every row sees the same windows, and a program is compiled for one window shape).
Within a window, token t+1 is predicted from tokens 0..t, so a window scores window - 1 tokens.
Perplexity = exp(total negative log-likelihood / tokens scored), accumulated in fp64.
Rows:
  eager fp32     transformers' own forward with labels (it shifts them by one itself): the reference
  turbofx fp32   turbofx.compile(model, (window_ids,), {"use_cache": False}); logits from the program
  turbofx <q>    the same with quantize=<q>, one row per --quantize scheme; a scheme turbofx cannot
                 compile (yet) is a row "not available: <error>", and the table goes on
Columns: ppl; dppl% = 100 * (ppl / eager ppl - 1); weight bytes (resident weights of the compiled program,
``compiled.state_bytes()`` where it exists, else n/a; eager: the model's unique parameters and buffers);
s/window (scoring time, compile excluded); compile s.
--tokens caps the tokens read from the start of the text (0 = all of it); fewer tokens than --window make
one window of --tokens. The default is the whole text on a GPU. On CPU, where kernels run in Triton's
interpreter and one SmolLM2 forward took (2 shared cores, compile excluded) 13-54 s for 64 tokens, 31-87 s for
128 and 54-107 s for 256, it is 64 tokens, so that all six turbofx rows finish in under 10 minutes (quantized kernels in the
interpreter not yet timed: they did not exist when this was written).
The full text on CPU (53 windows of 256: ~50-95 min per turbofx row):
    python -m benchmarks.quality --tokens 0 [--quantize int8]
--quick: one window of 64 tokens on any device (CI). --quantize "" (or none): only eager and turbofx fp32.
"""
from __future__ import annotations

import turbofx  # noqa: F401  (first: on CPU it switches Triton's interpreter on before triton is imported)

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from turbofx.errors import TurbofxError
from turbofx.quant import GGUFNative

TEXT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "public_domain.txt"
DEFAULT_SCHEMES = "int8,int4,int4-search,w8a8,fp8,fp8-dynamic,gguf"
CPU_DEFAULT_TOKENS = 64  # one interpreter window that every row can afford (see the module docstring)
QUICK_TOKENS = 64


@dataclass
class Row:
    """One line of the table. Invariant: status "ok" rows have ppl, delta_pct and seconds set; other rows
    have reason set and no ppl."""
    name: str
    scheme: str | None  # the quantize= value; None for eager and turbofx fp32
    status: str = "ok"  # "ok" | "not available" (turbofx refused the scheme) | "error" (anything else)
    ppl: float | None = None
    delta_pct: float | None = None  # vs eager fp32
    weight_bytes: int | None = None  # None: the compiled program cannot say (no state_bytes())
    seconds: float | None = None  # scoring all windows, compile excluded
    seconds_per_window: float | None = None
    compile_seconds: float | None = None
    reason: str | None = None


@dataclass
class Windows:
    """The scored token windows: ids [n_windows, window] taken from the text's first tokens."""
    ids: torch.Tensor
    text_tokens: int  # tokens in the whole text
    used_tokens: int  # tokens covered by the windows (a multiple of the window)

    @property
    def window(self) -> int:
        return self.ids.shape[1]

    @property
    def scored(self) -> int:
        return self.ids.shape[0] * (self.window - 1)


@dataclass
class Result:
    meta: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


def make_windows(all_ids: torch.Tensor, window: int, tokens: int) -> Windows:
    """Non-overlapping windows over the first ``tokens`` tokens (0: all); a window never exceeds ``tokens``."""
    total = all_ids.numel()
    limit = total if tokens <= 0 else min(tokens, total)
    window = min(window, limit)
    if window < 2:
        raise SystemExit(f"a window must hold at least 2 tokens (window {window}, {limit} tokens)")
    n = limit // window
    return Windows(all_ids[: n * window].reshape(n, window), total, n * window)


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of ids[1:] given logits[:-1] (one window, batch 1), in fp64."""
    return F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()


def eager_ppl(model, windows: Windows, device) -> tuple[float, float]:
    """Perplexity from transformers' forward with labels (its own shift), and the seconds it took
    (after one untimed warm-up forward: the first call in a process pays one-off setup)."""
    model(windows.ids[:1].to(device), use_cache=False)
    nll, t0 = 0.0, time.perf_counter()
    for w in windows.ids:
        ids = w[None].to(device)
        # .loss is the mean over the window's window - 1 predicted tokens
        nll += model(ids, labels=ids, use_cache=False).loss.double().item() * (windows.window - 1)
    return math.exp(nll / windows.scored), time.perf_counter() - t0


def program_ppl(compiled, windows: Windows, device) -> tuple[float, float]:
    """Perplexity from the compiled program's logits, and the seconds it took. On a GPU one untimed call
    first (kernel JIT, CUDA graph capture); in the interpreter a first call costs what any call does."""
    if device.type == "cuda":
        compiled(windows.ids[:1].to(device), use_cache=False)
    nll, t0 = 0.0, time.perf_counter()
    for w in windows.ids:
        ids = w[None].to(device)
        nll += window_nll(logits_of(compiled(ids, use_cache=False)), ids)
    return math.exp(nll / windows.scored), time.perf_counter() - t0


def model_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weights_checksum(model) -> float:
    return float(sum(p.double().sum().item() for p in model.parameters()))


def state_bytes(compiled) -> int | None:
    fn = getattr(compiled, "state_bytes", None)
    return int(fn()) if callable(fn) else None


def short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


def turbofx_row(model, windows: Windows, device, scheme: str | None, reference: float) -> Row:
    """Compile for one window and score every window; a failure becomes the row's status, never a raise."""
    row = Row("turbofx fp32" if scheme is None else f"turbofx {scheme}", scheme)
    before = weights_checksum(model)
    example = windows.ids[:1].to(device)
    try:
        options = {} if scheme is None else {"quantize": scheme}
        if scheme is not None and isinstance(parse(scheme), GGUFNative):  # the file's own blocks, kept
            from turbofx.quant.native import attach_gguf

            attach_gguf(model, getattr(model, "_turbofx_gguf_file", None) or "(model not loaded from a GGUF file)")
        t0 = time.perf_counter()
        compiled = turbofx.compile(model, (example,), {"use_cache": False}, **options)
        row.compile_seconds = time.perf_counter() - t0
    except (TurbofxError, TypeError) as e:  # the scheme (or the quantize keyword) is refused
        row.status, row.reason = "not available", short(e)
        return row
    except Exception as e:  # noqa: BLE001  (a failure is a result row, not a crash)
        row.status, row.reason = "error", f"compile: {short(e)}"
        return row
    if weights_checksum(model) != before:  # later rows (and eager) must see the original weights
        row.status, row.reason = "error", "compiling changed the eager model's weights"
        return row
    try:
        row.ppl, row.seconds = program_ppl(compiled, windows, device)
    except Exception as e:  # noqa: BLE001
        row.status, row.reason = "error", f"run: {short(e)}"
        return row
    row.seconds_per_window = row.seconds / len(windows.ids)
    row.delta_pct = 100.0 * (row.ppl / reference - 1.0)
    row.weight_bytes = state_bytes(compiled)
    return row


def parse(scheme: str):
    from turbofx.quant import parse as parse_quant

    return parse_quant(scheme)


def load_model():
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32 (tests replace this with a tiny model)."""
    from turbofx.compiler.models import load_smollm2

    return load_smollm2(torch.float32)


def schemes_of(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    return [] if names == ["none"] else names


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"one window of {QUICK_TOKENS} tokens")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=None,
                    help=f"tokens from the text's start (0 = all; default all on GPU, {CPU_DEFAULT_TOKENS} on CPU)")
    ap.add_argument("--quantize", default=DEFAULT_SCHEMES,
                    help='comma-separated quantize= schemes, one row each ("" or none: no scheme rows)')
    ap.add_argument("--text", default=str(TEXT))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    window, tokens = a.window, a.tokens
    if a.quick:
        window, tokens = QUICK_TOKENS, QUICK_TOKENS
    elif tokens is None:
        tokens = 0 if device.type == "cuda" else CPU_DEFAULT_TOKENS

    t0 = time.perf_counter()
    model, tokenizer = load_model()
    model = model.to(device).eval()
    load_seconds = time.perf_counter() - t0
    text = pathlib.Path(a.text).read_text(encoding="utf-8")
    all_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = make_windows(all_ids, window, tokens)
    result = Result(meta={
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "text": a.text, "text_tokens": windows.text_tokens, "window": windows.window,
        "windows": len(windows.ids), "tokens_scored": windows.scored, "load_seconds": load_seconds})
    print(f"# {pathlib.Path(a.text).name}: {windows.text_tokens} tokens; scoring {len(windows.ids)} window(s) of "
          f"{windows.window} ({windows.scored} predictions) on {result.meta['device_name']}", flush=True)
    print(HEADER, flush=True)

    def emit(row: Row) -> None:
        result.rows.append(row)
        print(line(row), flush=True)
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(dataclasses.asdict(result), indent=1))

    with torch.no_grad():
        reference, seconds = eager_ppl(model, windows, device)
        emit(Row("eager fp32", None, ppl=reference, delta_pct=0.0, weight_bytes=model_bytes(model),
                 seconds=seconds, seconds_per_window=seconds / len(windows.ids)))
        for scheme in [None, *schemes_of(a.quantize)]:
            emit(turbofx_row(model, windows, device, scheme, reference))
    return result.rows


HEADER = (f"| {'row':16s} | {'ppl':>10s} | {'dppl %':>8s} | {'weight bytes':>12s} | {'s/window':>8s} | "
          f"{'compile s':>9s} | status |\n|{'-' * 18}|{'-' * 12}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 11}|--------|")


def line(r: Row) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    if r.status != "ok":
        return f"| {r.name:16s} | {'':>10s} | {'':>8s} | {'':>12s} | {'':>8s} | {num(r.compile_seconds, '.1f'):>9s} | " \
               f"{r.status}: {r.reason} |"
    return (f"| {r.name:16s} | {r.ppl:10.4f} | {r.delta_pct:+8.3f} | {num(r.weight_bytes, ','):>12s} | "
            f"{r.seconds_per_window:8.2f} | {num(r.compile_seconds, '.1f'):>9s} | ok |")


if __name__ == "__main__":
    main(sys.argv[1:])
