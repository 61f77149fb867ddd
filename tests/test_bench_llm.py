"""benchmarks/llm.py runs on CPU: a row per contestant and workload, turbofx decode ok, CUDA graphs skipped."""
from __future__ import annotations

import json
import math

import torch

from benchmarks import llm

TINY = 'llama-tiny:{"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 128}'


def test_llm_benchmark_on_cpu(tmp_path, capsys):
    out = tmp_path / "llm.json"
    rc = llm.main(["--device", "cpu", "--quick", "--json", str(out), "--config", TINY, "--batches", "1",
                   "--ctx", "16", "--prefill-len", "16", "--iters", "1", "--warmup", "0"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["contestant"]): r for r in data["results"]}
    workloads = ["decode b1 ctx16", "prefill 1x16"]
    assert {w for w, _ in rows} == set(workloads)
    for w in workloads:
        for c in llm.CONTESTANTS:
            assert rows[(w, c)]["status"], (w, c)
    for c in ("eager", "turbofx", "inductor"):
        assert rows[(workloads[0], c)]["status"] == "ok", rows[(workloads[0], c)]
    tfx = rows[(workloads[0], "turbofx")]
    assert math.isfinite(tfx["ms"]) and tfx["ms"] > 0
    assert tfx["tokens_per_s"] > 0 and tfx["roofline_pct"] > 0 and tfx["max_abs_err"] < 1e-3
    for w in workloads:
        for c in llm.NEEDS_CUDA:
            assert rows[(w, c)]["status"] == "skipped" and "CUDA" in rows[(w, c)]["reason"], rows[(w, c)]
    meta = data["meta"]
    assert meta["probes"]["copy_gbps"] > 0 and meta["probes"]["mm_tflops"] > 0
    assert meta["compile"]["turbofx"]["warm_s"] > 0 and "quick" in meta["compile"]["inductor"]["note"]
    assert rows[(workloads[1], "eager")]["tflops"] > 0
    text = capsys.readouterr().out
    assert "| decode b1 ctx16 | turbofx |" in text and (tmp_path / "llm.md").exists()
    assert torch.is_grad_enabled()  # main leaves global state as it found it
