"""benchmarks/structure.py: per-architecture counts are consistent with what they are derived from."""
from __future__ import annotations

import json

from benchmarks import structure


def _consistent(c: dict) -> None:
    # every working step has exactly one kind; extern matmuls are some of the extern steps
    assert sum(c["by_kind"].values()) == c["steps"], c
    assert c["extern_matmuls"] <= c["by_kind"].get("extern", 0), c
    assert sum(c["extern_ops"].values()) == c["by_kind"].get("extern", 0), c


def test_structure_counts_add_up(tmp_path):
    path = tmp_path / "structure.json"
    # the decode step only (3 compiles on meta, a few seconds); prefill is counted the same way
    rows = structure.main(["--archs", "llama", "--phases", "decode", "--check-layers", "--json", str(path)])
    data = json.loads(path.read_text())
    assert [(r["arch"], r["phase"], r["status"]) for r in data["rows"]] == [("llama", "decode", "ok")]
    for r, obj in zip(data["rows"], rows):
        assert r["device"] == "meta" and r["period"] == 1 and obj.total.steps == r["total"]["steps"]
        for c in (r["total"], r["per_layer"], r["rest"], *r["samples"].values()):
            _consistent(c)
        per, rest, layers = r["per_layer"], r["rest"], r["layers"]
        assert rest["steps"] + layers * per["steps"] == r["total"]["steps"]
        assert rest["extern_matmuls"] + layers * per["extern_matmuls"] == r["total"]["extern_matmuls"]
        for kind, n in r["total"]["by_kind"].items():
            assert rest["by_kind"].get(kind, 0) + layers * per["by_kind"].get(kind, 0) == n, kind
        # a decoder layer does work, and has its attention
        assert per["steps"] > 0 and per["by_kind"].get("attention") == 1
        # the 3-layer compile is exactly what the 1- and 2-layer ones predict
        check = r["linear_check"]
        assert check["ok"] and check["counted_steps"] == r["samples"]["3"]["steps"] == check["predicted_steps"]


def test_structure_reports_na_rather_than_crashing(capsys):
    rows = structure.main(["--archs", "bert", "--phases", "decode"])
    assert len(rows) == 1 and rows[0].status == "n/a" and "encoder" in rows[0].reason
    assert "| bert | decode | - |" in capsys.readouterr().out
