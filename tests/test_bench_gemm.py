"""benchmarks/gemm.py runs on CPU (tiny shapes in Triton's interpreter): every row computed and checked."""
from __future__ import annotations

import json

from benchmarks import gemm


def test_gemm_benchmark_smoke_on_cpu(tmp_path, capsys):
    path = tmp_path / "gemm.json"
    rows = gemm.main(["--quick", "--json", str(path), "--device", "cpu"])
    data = json.loads(path.read_text())
    assert data["rows"] == [r.__dict__ for r in rows]
    ops = {op for op, *_ in gemm.layer_ops(gemm.TINY)}
    got = {(r["op"], r["m"], r["contestant"]) for r in data["rows"]}
    want = {(op, m, c) for op in ops for m in gemm.CPU_DECODE_M + gemm.CPU_PREFILL_M for c in gemm.CONTESTANTS}
    assert got == want
    assert {r["epilogue"] for r in data["rows"]} == {"none", "swiglu", "residual"}
    for r in data["rows"]:
        assert r["status"] == "ok", r
        assert r["us"] is None and "not a speed measurement" in r["timing"]  # nothing timed in the interpreter
        assert r["err"] is not None and r["err"] < 1e-4, r  # fp32: turbofx equals the fp32 reference
    out = capsys.readouterr().out
    assert "interpreter: not a speed measurement" in out and "| tiny gate_up M16 N256 K64 | swiglu | turbofx |" in out
