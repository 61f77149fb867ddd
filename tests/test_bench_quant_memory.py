"""benchmarks/quant_memory.py --quick: the tiny random Llama.

Real claims checked: quantizing shrinks what the program holds (int4 < int8 < unquantized) and the
artifact's weights file; the "own" state is part of the state; a scheme the model cannot have (gguf
without a GGUF file) is a row that says why. The rows are measured in this process (--in-process: a
fresh process per row costs ~10 s of imports on 2 cores); one row also through the benchmark's own path,
a fresh worker process, which must measure the same bytes, and RSS numbers of a process that loaded a
model. And the shortcut the benchmark takes (save the measured program instead of exporting, which
would compile again) writes the same weights file as ``turbofx.export``.
"""
from __future__ import annotations

import json

import torch

import turbofx
from benchmarks import quant_memory


def test_quick_rows(tmp_path, capsys):
    path = tmp_path / "qmem.json"
    result = quant_memory.main(["--quick", "--in-process", "--dtype", "bf16", "--schemes", "none,int8,int4,gguf",
                                "--json", str(path)])
    rows = {r.scheme: r for r in result.rows}
    for scheme in ("none", "int8", "int4"):
        r = rows[scheme]
        assert r.status == "ok", (scheme, r.reason)
        # the program holds the model's unquantized tensors (shared, joined ones included) and the quantized
        # weights, nothing else: no full-precision copy of a quantized weight, no second copy of a joined one
        assert r.own_state_bytes == r.quantized_bytes
        assert r.state_beyond_expected == 0
        assert r.weights_file_bytes >= r.state_bytes  # the file holds every state tensor (plus a header)
        assert r.artifact_bytes > r.weights_file_bytes
    none, int8, int4 = rows["none"], rows["int8"], rows["int4"]
    assert int4.state_bytes < int8.state_bytes < none.state_bytes
    assert int4.weights_file_bytes < none.weights_file_bytes
    assert none.own_state_bytes == 0 and none.state_bytes == none.model_bytes
    assert none.quantized_layers == 0 and int8.quantized_layers == int4.quantized_layers > 0
    assert int4.quantized_bytes < int8.quantized_bytes < int8.quantized_full_bytes
    assert result.ratio(none) == 1.0 and result.weights_ratio(int4) < 1.0
    gguf = rows["gguf"]
    assert gguf.status == "not available" and "GGUF" in gguf.reason
    data = json.loads(path.read_text())
    assert [r["scheme"] for r in data["rows"]] == ["none", "int8", "int4", "gguf"]
    assert data["rows"][2]["weights_vs_bf16"] == result.weights_ratio(int4)
    assert "| bf16  | int4 " in capsys.readouterr().out

    fresh = quant_memory.run_row("llama", "bf16", "int4", timeout=300)  # the default path: its own process
    assert fresh.status == "ok", fresh.reason
    assert (fresh.state_bytes, fresh.own_state_bytes, fresh.weights_file_bytes) == \
        (int4.state_bytes, int4.own_state_bytes, int4.weights_file_bytes)
    assert fresh.rss_compiled > fresh.rss_loaded > fresh.rss_start > 0
    assert fresh.peak_compile >= fresh.rss_compiled * 0.99 and fresh.ru_maxrss >= fresh.peak_load

    model = quant_memory.load("llama", torch.bfloat16)
    out = turbofx.export(model, (quant_memory.example_ids(model),), {"use_cache": False},
                         output_dir=tmp_path / "a", quantize="int4")
    assert (out / "weights.safetensors").stat().st_size == int4.weights_file_bytes


def test_fingerprint_in_chunks_equals_one_pass():
    """The quantize pass's weight fingerprint is taken in chunks (bounded temporaries: one pass cost ~40
    bytes per element of peak memory, +680 MB for SmolLM2's embedding); the value must not change."""
    from turbofx.passes.quantize import _fingerprint

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        t = (torch.randn(37, 29, generator=gen) * 3).to(dtype)
        bits = t.view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
        one_pass = int((bits.to(torch.int64) * (torch.arange(bits.numel()) % 65521 + 1)).sum())
        assert _fingerprint(t, chunk=100) == _fingerprint(t, chunk=7) == _fingerprint(t) == one_pass
    t = torch.randn(8, 8, generator=gen)
    u = t.clone()
    u[3, 5] = torch.nextafter(u[3, 5], torch.tensor(float("inf")))  # one bit of one value
    assert _fingerprint(t, chunk=5) != _fingerprint(u, chunk=5)
