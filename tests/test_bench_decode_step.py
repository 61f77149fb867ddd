"""benchmarks/decode_step.py runs end to end (CPU smoke configuration); timings are not asserted."""
from __future__ import annotations

import json

from benchmarks import decode_step


def test_decode_step_benchmark_on_cpu(tmp_path):
    path = tmp_path / "decode_step.json"
    rows = decode_step.main(["--device", "cpu", "--json", str(path)])
    assert [r["contestant"] for r in rows] == ["eager", "turbofx", "turbofx-unfused"]
    assert all(r["status"] == "ok" and r["us"] > 0 for r in rows), rows
    assert all(r["err"] < 1e-4 for r in rows)  # every contestant computed the same step
    assert json.loads(path.read_text())["rows"] == rows
