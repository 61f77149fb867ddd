"""Every kernel family compiles for real GPU architectures (Triton + ptxas / AMD backend, no GPU
needed): no compile failure, no register spill beyond tests/offline_compile.py's KNOWN_SPILLS, shared
memory within the target's limit. The kernels come from small graphs through the normal pipeline
for an offline target (``cuda:sm90``), launched by the Program's own launchers into recorders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAMILIES = ["tfx_activation", "tfx_softmax", "tfx_reduction", "tfx_pointwise", "tfx_attention_fwd",
            "tfx_attention_combine", "tfx_kv_write", "tfx_attention_varlen", "tfx_paged_attention",
            "tfx_gemv ", "tfx_gemm_reduce ", "tfx_gemm "]  # GEMV, split-K reduce, tiled GEMM


def _run(tmp_path, *args: str, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TURBOFX_TARGET")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, never a cached binary
    env["TURBOFX_CACHE_DIR"] = str(tmp_path / "turbofx")
    script = Path(__file__).with_name("offline_compile.py")
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done.stdout


def test_every_family_compiles_for_sm90(tmp_path):
    out = _run(tmp_path, "--arch", "cuda:sm90", "--quick", timeout=600)
    compiled = [line for line in out.splitlines() if line.startswith("compiled cuda:sm90 ")]
    for family in FAMILIES:
        assert any(f" {family}" in line for line in compiled), (family, out)
    assert "0 problems" in out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TURBOFX_SLOW"), reason="minutes of compiling: set TURBOFX_SLOW=1")
def test_every_family_compiles_for_every_arch(tmp_path):
    """sm80, sm90, sm100 and gfx942 over every graph (minutes: run by hand or in a slow job)."""
    out = _run(tmp_path, timeout=1800)
    for arch in ("cuda:sm80", "cuda:sm90", "cuda:sm100", "hip:gfx942"):
        assert f"{arch}: " in out and f"{arch}: 0 kernels" not in out, out
    assert out.count(" 0 problems") == 4, out
