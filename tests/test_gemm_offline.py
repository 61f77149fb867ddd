"""The GEMM family's kernels compile for real GPU architectures without a GPU: both regimes and a
few epilogues, the RMSNorm prologue, quantized weights (int4, Q4_1, int8, W8A8; FP8 on sm90+ / gfx942), with the configs the family's table picks for each arch; no register spills to
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

CASES = 12 + 7  # kernels gemm_offline_compile.py compiles per arch: plain, quantized (+ 2 FP8 where the arch has it)
FP8_ARCHS = ("90", "100", "gfx942")


def _compile(arch: str, tmp_path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, never a cached binary
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    script = Path(__file__).with_name("gemm_offline_compile.py")
    done = subprocess.run([sys.executable, str(script), arch], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("compiled ")]


def _check(rows: list[dict], arch: str, cuda: bool = True) -> None:
    assert len(rows) == CASES + 2 * (arch in FP8_ARCHS), rows
    assert {r["kernel"] for r in rows} == {"tfx_gemm", "tfx_gemv", "tfx_gemm_reduce"}
    for r in rows:
        assert r["spilled"] == 0, r
        assert r["shared"] <= r["limit"], r
        if cuda and r["kernel"] == "tfx_gemm" and "stages=1" not in r["config"]:
            # the tiled K loop is software-pipelined: its operand loads became cp.async copies
            # (AMD's stream pipeliner keeps register loads + shared stores: nothing to count there)
            assert r["async_copies"] > 0, r


@pytest.mark.parametrize("arch", ["90", pytest.param("80", marks=pytest.mark.slow),
                                  pytest.param("100", marks=pytest.mark.slow)])
def test_gemm_kernels_compile_for_cuda(arch, tmp_path):
    _check(_compile(arch, tmp_path), arch)


def _has_amd_backend() -> bool:
    # find_spec("triton.backends.amd") would import triton here, before turbofx turns the interpreter on
    triton = importlib.util.find_spec("triton")
    return triton is not None and any((Path(p) / "backends" / "amd").is_dir()
                                      for p in triton.submodule_search_locations or ())


@pytest.mark.slow
@pytest.mark.skipif(not _has_amd_backend(), reason="no AMD backend in this Triton")
def test_gemm_kernels_compile_for_gfx942(tmp_path):
    _check(_compile("gfx942", tmp_path), "gfx942", cuda=False)
