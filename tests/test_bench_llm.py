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


def test_llm_benchmark_quantized_rows_on_cpu(tmp_path, capsys):
    # one scheme on the tiny model, decode and prefill, next to turbofx unquantized (eager: the reference)
    out = tmp_path / "q.json"
    rc = llm.main(["--device", "cpu", "--quick", "--json", str(out), "--config", TINY, "--batches", "1",
                   "--ctx", "16", "--prefill-len", "16", "--iters", "1", "--warmup", "0",
                   "--contestants", "eager,turbofx", "--quantize", "int4-g32"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["contestant"]): r for r in data["results"]}
    assert data["meta"]["quantize"] == ["int4-g32"]
    for w in ("decode b1 ctx16", "prefill 1x16"):
        base, q = rows[(w, "turbofx")], rows[(w, "turbofx[int4-g32]")]
        assert base["status"] == "ok" and q["status"] == "ok", q
        # checked against eager with the same quantized weights; quantization itself moved the logits
        assert q["rel_err"] < 1e-3 and q["max_abs_err_vs_unquantized"] > q["max_abs_err"]
        assert q["quantized"]["scheme"] == "int4-g32" and q["quantized"]["weights"] == 4  # qkv, o, gate+up, down
        assert q["quantized"]["quantized_bytes"] < 0.2 * q["quantized"]["full_bytes"]  # fp32 -> 4 bits + scales
        assert 0 < q["state_bytes"] < base["state_bytes"]
        assert q["time_vs_turbofx"] == q["ms"] / base["ms"]
    dq, db = rows[("decode b1 ctx16", "turbofx[int4-g32]")], rows[("decode b1 ctx16", "turbofx")]
    saved = dq["quantized"]["full_bytes"] - dq["quantized"]["quantized_bytes"]
    assert db["bytes_per_step"] - dq["bytes_per_step"] == saved  # decode reads the quantized weights
    text = capsys.readouterr().out
    assert "| decode b1 ctx16 | turbofx[int4-g32] |" in text and "<= 0.35x n/a (interpreter)" in text


def test_llm_benchmark_scheme_refusal_and_names():
    from turbofx.codegen.target import offline

    ampere, hopper = offline("cuda:sm80"), offline("cuda:sm90")
    assert "compute capability 8.9" in llm.scheme_refusal("fp8", ampere)  # a "refused" row, not a crash
    assert llm.scheme_refusal("int4", ampere) is None and llm.scheme_refusal("fp8", hopper) is None
    args = llm.parse_args(["--device", "cpu", "--quantize", "--contestants", "eager,turbofx,inductor"])
    assert args.quantize == llm.QUANT_DEFAULT.split(",")
    assert llm.contestant_names(args) == ["eager", "turbofx", *map(llm.quant_contestant, args.quantize), "inductor"]
    assert llm.scheme_of("turbofx[int4+emb]") == "int4+emb" and llm.scheme_of("turbofx") is None
    assert llm.decode_goal("int4-g64+emb") == 0.35 and llm.decode_goal("w8a8") is None
    assert llm.main(["--device", "cpu", "--quantize", "int3"]) == 2  # a misspelt scheme: before any model
