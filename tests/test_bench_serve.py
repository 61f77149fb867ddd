"""benchmarks/serve.py runs on CPU: every contestant serves the whole trace with HF's greedy tokens."""
from __future__ import annotations

import json
import math

from benchmarks import serve

TINY = 'llama-tiny:{"num_hidden_layers": 1, "vocab_size": 128}'


def test_serve_benchmark_on_cpu(tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = serve.main(["--device", "cpu", "--config", TINY, "--requests", "5", "--rate", "20", "--prompt-len", "3,20",
                     "--output-len", "2,5", "--max-batch", "4", "--page-size", "4", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["contestant"]: r for r in data["results"]}
    assert set(rows) == set(serve.CONTESTANTS)
    assert rows["hf-inductor"]["status"] == "skipped" and "CUDA" in rows["hf-inductor"]["reason"]
    trace = serve.make_trace(5, 20.0, (3, 20), (2, 5), 128, 0)
    want = sum(r.output_len for r in trace)
    for name in ("engine", "static", "hf"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["tokens_match"] == 5, r  # greedy tokens equal HF generate's, request by request
        assert r["output_tokens"] == want
        assert r["tokens_per_s"] > 0 and math.isfinite(r["ttft_p50_ms"]) and r["ttft_p99_ms"] >= r["ttft_p50_ms"]
        assert 0.0 <= r["padding_waste"] < 1.0
    assert rows["hf"]["padding_waste"] == 0.0
    assert rows["static"]["padding_waste"] > rows["engine"]["padding_waste"]  # left padding + batch rows
    assert "pages not freed" not in rows["engine"]["notes"]
    assert "| engine |" in capsys.readouterr().out


def test_trace_is_poisson_and_seeded():
    a = serve.make_trace(200, 5.0, (1, 8), (1, 4), 64, 3)
    assert a == serve.make_trace(200, 5.0, (1, 8), (1, 4), 64, 3)
    gaps = [y.arrival - x.arrival for x, y in zip(a, a[1:])]
    assert all(g >= 0 for g in gaps) and 0.15 < sum(gaps) / len(gaps) < 0.25  # mean 1/rate
    assert all(1 <= len(r.prompt) <= 8 and 1 <= r.output_len <= 4 for r in a)
    assert serve.percentile([1.0, 2.0, 3.0], 50) == 2.0 and math.isnan(serve.percentile([], 50))
