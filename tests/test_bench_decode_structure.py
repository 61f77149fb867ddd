"""benchmarks/decode_structure.py --quantize: modelled decode traffic and time of quantized weights."""
from __future__ import annotations

import json

import pytest

from benchmarks import decode_structure
from turbofx.compiler import roofline
from turbofx.errors import QuantizationError


def test_quantized_decode_is_modelled_from_the_quantized_gemms(tmp_path, capsys):
    path = tmp_path / "ds.json"
    (base,) = decode_structure.main(["--quick", "--quantize", "int8,int4,int4+emb", "--json", str(path)])
    int8, int4, emb = decode_structure.main.quantized
    assert (int8.scheme, int4.scheme, emb.scheme) == ("int8", "int4-g128", "int4-g128+emb")
    layers = decode_structure.TINY["num_hidden_layers"]
    assert emb.weights_quantized == 4 * layers + 1  # + the token table, which the LM head is tied to
    for q in (int8, int4, emb):
        assert q.weights_quantized == 4 * layers + (q is emb)  # qkv, o, gate+up, down per layer
        # the unquantized numbers are the meta-device Row's: both compiles model the same step
        assert q.base_bytes_total == base.bytes_total and q.base_predicted_ms == base.predicted_ms
        assert q.bytes_total < q.base_bytes_total and not q.refused_on
        assert all(0 < ms for ms in q.predicted_ms.values())
    # bf16 weights: the GEMMs of a decoder layer read int8 (+ a scale per row) and 4-bit (+ scale and min
    # per group) weights in their prologue; activations are a few hundred bytes of a layer's traffic
    assert int4.layer_gemm_ratio < 0.4 < int8.layer_gemm_ratio < 0.6
    assert int4.linear_quantized_bytes < 0.32 * int4.linear_full_bytes  # K=64 < 128: a scale + min per row
    assert int4.bytes_total < int8.bytes_total
    # +emb: the LM head reads the 4-bit table and the token lookup only its one row, so the step saves
    # what quantizing the table saved (a gather costed as reading the whole table would save far less)
    table_saved = (emb.linear_full_bytes - int4.linear_full_bytes) - (emb.linear_quantized_bytes -
                                                                      int4.linear_quantized_bytes)
    assert int4.bytes_total - emb.bytes_total >= 0.95 * table_saved > 0
    saved = json.loads(path.read_text())["quantized_modelled"]
    assert [r["scheme"] for r in saved] == ["int8", "int4-g128", "int4-g128+emb"] and saved[1]["layer_gemm_ratio"] < 0.4
    text = capsys.readouterr().out
    assert "MODELLED" in text and "| int4-g128 | 8 |" in text


def test_quantized_decode_refusals_and_bad_scheme():
    assert set(decode_structure.GPU_ARCH) == set(roofline.GPUS)
    assert list(decode_structure.refusals("fp8")) == ["MI300X"]  # MI300 takes fp8_e4m3fnuz
    assert decode_structure.refusals("int4") == {}
    with pytest.raises(QuantizationError, match="unknown quantization"):
        decode_structure.main(["--quick", "--quantize", "int3"])
