"""Compile turbofx's attention kernels for a GPU architecture without a GPU (Triton + ptxas only).

    python tests/offline_compile.py ARCH      (e.g. 90 for sm90, 80 for sm80)

The interpreter runs kernels as Python, so it misses what only the compiler checks: loop-carried
types, constexpr specialisation of integer arguments equal to 1, shared-memory limits. Run in a
process of its own: importing turbofx without a GPU switches Triton to the interpreter.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "M": "*i1", "O": "*bf16", "PO": "*fp32", "PL": "*fp32",
            "KN": "*bf16", "VN": "*bf16", "POS": "*i64", "C": "*bf16", "S": "*bf16"}
FLOATS = {"scale", "softcap"}
BASE = dict(MASK_BOOL=True, SOFTCAP=False, UPCAST=False, IEEE=False, BLOCK_N=64, BLOCK_D=128)
# (constexpr flags, integer arguments Triton specialises to 1 at decode)
CASES = [
    (dict(HAS_MASK=True, CAUSAL=False, WINDOW=False, SPLIT=True, ROPE_Q=True, ROPE_K=True, WRITE_KV=True, BLOCK_M=16),
     {"SQ": 1, "S_NEW": 1}),
    (dict(HAS_MASK=False, CAUSAL=True, WINDOW=False, SPLIT=False, ROPE_Q=False, ROPE_K=False, WRITE_KV=False,
          BLOCK_M=128), {}),
    (dict(HAS_MASK=False, CAUSAL=True, WINDOW=True, SPLIT=False, ROPE_Q=False, ROPE_K=False, WRITE_KV=False,
          BLOCK_M=128), {}),
    (dict(HAS_MASK=True, CAUSAL=False, WINDOW=False, SPLIT=False, ROPE_Q=True, ROPE_K=True, WRITE_KV=False,
          BLOCK_M=128), {}),
    (dict(HAS_MASK=False, CAUSAL=False, WINDOW=False, SPLIT=True, ROPE_Q=False, ROPE_K=False, WRITE_KV=False,
          BLOCK_M=16), {"SQ": 1}),
]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signature(fn, constexprs: dict) -> dict:
    return {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n in FLOATS else "i32")
            for n in fn.arg_names}


def main(arch: int) -> list[str]:
    assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    template = _load("tfx_attention_template", ROOT / "turbofx" / "codegen" / "attention.py")
    with tempfile.TemporaryDirectory() as d:  # triton.jit needs the kernels in a file of their own
        path = Path(d) / "tfx_attention_kernels.py"
        path.write_text(template.SOURCE)
        kernels = _load("tfx_attention_kernels", path)
        target = GPUTarget("cuda", arch, 32)
        results = []
        for flags, ones in CASES:
            constexprs = {**BASE, **flags, **ones}
            fn = kernels.tfx_attention_fwd
            out = triton.compile(ASTSource(fn, _signature(fn, constexprs), constexprs), target=target,
                                 options={"num_warps": 8 if flags["BLOCK_M"] == 128 else 4})
            results.append(f"tfx_attention_fwd {flags} ones={ones}: shared {out.metadata.shared} B")
        constexprs = dict(ROPE_K=True, BLOCK_N=64, BLOCK_D=128)
        fn = kernels.tfx_kv_write
        out = triton.compile(ASTSource(fn, _signature(fn, constexprs), constexprs), target=target,
                             options={"num_warps": 4})
        results.append(f"tfx_kv_write: shared {out.metadata.shared} B")
    return results


if __name__ == "__main__":
    for line in main(int(sys.argv[1])):
        print("compiled", line)
