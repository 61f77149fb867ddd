"""The GEMM family's kernels compile for real GPU architectures without a GPU: both regimes and a
few epilogues, with the configs the family's table picks for each arch; no register spills to
memory and shared memory within the arch's limit. sm90 (the lent GPUs) runs by default; sm80,
sm100 and gfx942 take about a minute each and are marked slow."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = 8  # kernels gemm_offline_compile.py compiles per arch


def _compile(arch: str, tmp_path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, never a cached binary
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    script = Path(__file__).with_name("gemm_offline_compile.py")
    done = subprocess.run([sys.executable, str(script), arch], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("compiled ")]


def _check(rows: list[dict]) -> None:
    assert len(rows) == CASES, rows
    assert {r["kernel"] for r in rows} == {"tfx_gemm", "tfx_gemv", "tfx_gemm_reduce"}
    for r in rows:
        assert r["spilled"] == 0, r
        assert r["shared"] <= r["limit"], r


@pytest.mark.parametrize("arch", ["90", pytest.param("80", marks=pytest.mark.slow),
                                  pytest.param("100", marks=pytest.mark.slow)])
def test_gemm_kernels_compile_for_cuda(arch, tmp_path):
    _check(_compile(arch, tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.amd") is None, reason="no AMD backend in this Triton")
def test_gemm_kernels_compile_for_gfx942(tmp_path):
    _check(_compile("gfx942", tmp_path))
