"""Compile turbofx's GEMM family for a GPU architecture without a GPU (Triton + ptxas / ROCm's lld).

    python tests/gemm_offline_compile.py ARCH      (80, 90, 100 for sm80/sm90/sm100; gfx942)

Prints one JSON line per compiled kernel: name, case, shared bytes, registers per thread and
spilled bytes (ptxas -v for CUDA, the AMDGPU metadata for HIP) and the arch's shared-memory limit. The configs
are the ones the family's table picks for that arch. Run in a process of its own: importing
turbofx without a GPU switches Triton to the interpreter, so this script loads gemm.py alone.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cases(g, target):
    """(label, spec, kernel, M, N_out, K): both regimes x a few epilogues x dtypes."""
    import torch

    S, bf16, fp16, fp32 = g.GemmSpec, torch.bfloat16, torch.float16, torch.float32
    llama = g.RmsNorm(1e-6, mid_dtype=bf16, out_dtype=bf16)
    return [
        ("tiled fp16 large", S(fp16), g.GEMM, 4096, 4096, 4096),
        ("tiled bf16 mid rmsnorm+bias+gelu+residual", S(bf16, row_scale=True, has_bias=True, activation="gelu_tanh",
                                                      residual=True), g.GEMM, 128, 4096, 4096),
        ("tiled fp32 large ieee", S(fp32, has_bias=True), g.GEMM, 4096, 4096, 4096),
        ("tiled bf16 swiglu", S(bf16, swiglu=True, activation="silu"), g.GEMM, 4096, 14336, 4096),
        ("gemv bf16 decode split bias", S(bf16, has_bias=True), g.GEMV, 1, 4096, 4096),
        ("gemv fp16 few swiglu rmsnorm", S(fp16, swiglu=True, activation="silu", row_scale=True), g.GEMV, 16, 14336,
         4096),
        ("gemv fp32 decode cast-in", S(fp16, a_dtype=fp32, out_dtype=fp32), g.GEMV, 3, 1024, 1024),
        ("reduce bf16 swiglu+bias+residual", S(bf16, swiglu=True, activation="silu", has_bias=True, residual=True),
         g.REDUCE, 1, 14336, 4096),
        # the RMSNorm prologue (HF Llama's roundings) with eager rounding in the epilogue
        ("tiled bf16 norm+swiglu", S(bf16, norm=llama, swiglu=True, activation="silu", eager_rounding=True), g.GEMM,
         4096, 14336, 4096),
        ("tiled bf16 norm+residual", S(bf16, norm=llama, residual=True, eager_rounding=True), g.GEMM, 512, 4096, 4096),
        ("gemv bf16 decode norm+swiglu split", S(bf16, norm=llama, swiglu=True, activation="silu", eager_rounding=True),
         g.GEMV, 1, 14336, 4096),
        ("gemv fp16 few norm+residual+bias", S(fp16, norm=g.RmsNorm(1e-6, out_dtype=fp16, weight_offset=1.0),
                                               residual=True, has_bias=True, bias_in_matmul=True,
                                               eager_rounding=True), g.GEMV, 16, 4096, 4096),
    ] + _quant_cases(g, target)


def _quant_cases(g, target):
    """Quantized weights (turbofx.quant's formats) in both regimes; FP8 where the target has it."""
    import torch

    bf16 = torch.bfloat16
    W = g.WeightQuant

    def q(fmt, **fields):
        return g.GemmSpec(bf16, b_dtype=fmt.dtype, weight=fmt, eager_rounding=True, **fields)

    int4, q4_1, int8, w8a8 = W("uint4", 128, has_min=True), W("uint4", 32, has_min=True), W("int8"), W("int8", act="int8")
    llama = g.RmsNorm(1e-6, mid_dtype=bf16, out_dtype=bf16)
    cases = [
        ("gemv bf16 decode int4-g128 norm+swiglu", q(int4, norm=llama, swiglu=True, activation="silu"), g.GEMV, 1,
         14336, 4096),
        ("gemv bf16 decode q4_1 residual", q(q4_1, residual=True), g.GEMV, 1, 4096, 4096),
        ("tiled bf16 int4-g128 prefill", q(int4), g.GEMM, 512, 4096, 4096),
        ("gemv bf16 decode int8", q(int8), g.GEMV, 1, 4096, 4096),
        ("tiled bf16 int8 swiglu", q(int8, swiglu=True, activation="silu"), g.GEMM, 512, 14336, 4096),
        ("gemv bf16 decode w8a8", q(w8a8), g.GEMV, 1, 4096, 4096),
        ("tiled bf16 w8a8 residual", q(w8a8, residual=True), g.GEMM, 512, 4096, 4096),
    ]
    fp8 = "fp8_e4m3fnuz" if target.arch == "gfx942" else "fp8_e4m3"
    if g.quant_refusal(W(fp8), target) is None:
        cases += [("gemv bf16 decode fp8", q(W(fp8)), g.GEMV, 1, 4096, 4096),
                  ("tiled bf16 fp8-dynamic", q(W(fp8, act=fp8)), g.GEMM, 512, 4096, 4096)]
    return cases


POINTERS = ("A", "B", "O", "P", "BIAS", "RES", "RS", "NW", "QS", "QM")


def _launch_ints(spec, cfg, m: int, n_out: int, k: int, splits: int) -> dict[str, int]:
    """The integer arguments ``gemm._launch`` passes for contiguous 2-D operands of these sizes."""
    n = 2 * n_out if spec.swiglu else n_out
    k_chunk = -(-(-(-k // cfg.BLOCK_K)) // splits) * cfg.BLOCK_K
    sbn, sbk = (k, 1) if spec.b_layout == "nk" else (1, n)
    if spec.weight is not None:  # q's row: its storage's length
        sbn = spec.weight.q_shape(n, k)[1]
    return dict(M=m, N_OUT=n_out, K=k, k_chunk=k_chunk, n_splits=splits, GROUPS_M=-(-m // cfg.BLOCK_M),
                sab=0, sam=k, sak=1, sbb=0, sbn=sbn, sbk=sbk, sob=0, som=n_out, son=1,
                srb=0, srm=n_out if spec.residual else 0, srn=1 if spec.residual else 0, srsb=0,
                sqn=_groups(spec, k), sqk=1 if spec.weight is not None and spec.weight.group_size else 0)


def _groups(spec, k: int) -> int:
    """b_scale's row stride: its groups per row (1 for one scale per row; 0 when unquantized)."""
    if spec.weight is None:
        return 0
    g = spec.weight.group_size
    return -(-k // g) if g else 1


def _tl(t) -> str:
    import torch

    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
            torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e4m3fnuz: "*fp8e4b8"}[t]


def main(arch: str) -> list[dict]:
    assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from turbofx.codegen import gemm as g  # triton is imported first: turbofx leaves the interpreter off
    from turbofx.codegen.target import Target

    hip = arch.startswith("gfx")
    target = (Target("hip", arch, "cuda:0", warp_size=64, sm_count=304) if hip
              else Target("cuda", f"sm{arch}", "cuda:0", sm_count=132))
    gpu = GPUTarget("hip", arch, 64) if hip else GPUTarget("cuda", int(arch), 32)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for i, (label, spec, kernel, m, n_out, k) in enumerate(_cases(g, target)):
            path = Path(d) / f"tfx_gemm_case{i}.py"  # triton.jit needs the kernels in a file of their own
            path.write_text(g.render(spec))
            fn = getattr(_load(f"tfx_gemm_case{i}", path), kernel)
            cfg = g.config_for(target, spec, m, n_out, k)
            dot = cfg.BLOCK_M >= 16
            block_m = (max(16, 1 << (m - 1).bit_length()) if dot else max(1, 1 << (m - 1).bit_length()))
            n_tiles = -(-n_out // cfg.BLOCK_N)
            splits = g.split_k_for(cfg, target, n_tiles, k) if kernel != g.GEMM else 1
            flags = dict(SWIGLU=spec.swiglu, UPCAST=False, IEEE=spec.dtype.itemsize == 4, BLOCK_N=cfg.BLOCK_N)
            if kernel == g.GEMM:
                flags.update(GROUP_M=cfg.GROUP_M, BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K)
            elif kernel == g.GEMV:
                flags.update(SPLIT=splits > 1, DOT=dot, BLOCK_M=block_m, BLOCK_K=cfg.BLOCK_K)
            else:
                splits = max(splits, 2)  # the reduce kernel runs only after a split
                flags = dict(SWIGLU=spec.swiglu, BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N)
            # Integer arguments as a launch specialises them (Triton's rule: == 1 becomes a constant,
            # a multiple of 16 is marked divisible by 16; pointers from torch are 16-byte aligned).
            # Without the divisibility marks no load is provably 16-byte aligned, so nothing is
            # software-pipelined (cp.async needs it) and shared memory / registers are not the real ones.
            values = _launch_ints(spec, cfg, m, n_out, k, splits)
            unknown = set(fn.arg_names) - set(values) - set(flags) - set(POINTERS)
            assert not unknown, f"{kernel}: no launch value for {unknown}"
            ones = {n: 1 for n in fn.arg_names if values.get(n) == 1}
            constexprs = {**flags, **ones}
            pointers = {"A": _tl(spec.a_type), "B": _tl(spec.b_type), "O": _tl(spec.out_type), "P": "*fp32",
                        "BIAS": _tl(spec.dtype), "RES": _tl(spec.out_type), "RS": "*fp32", "NW": _tl(spec.a_type),
                        "QS": "*fp32", "QM": "*fp32"}
            sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
            aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                       if n not in constexprs and (n in POINTERS or values[n] % 16 == 0)}
            out = triton.compile(ASTSource(fn, sig, constexprs, aligned), target=gpu,
                                 options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            regs, spilled = _amd_usage(out) if hip else _ptxas_usage(out, int(arch))
            results.append({"kernel": kernel, "case": label, "config": str(cfg), "shared": out.metadata.shared,
                            "regs": regs, "spilled": spilled, "limit": g.shared_limit(target),
                            "async_copies": _async_copies(out)})
    return results


def _async_copies(out) -> int:
    """Asynchronous global -> shared copies in the TTGIR: how many loads the software pipeliner
    turned into prefetches (0: the K loop is not pipelined, whatever num_stages says)."""
    ttgir = out.asm["ttgir"]
    return sum(ttgir.count(op) for op in ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local",
                                          "amdgpu.buffer_load_to_local"))


def _ptxas_usage(out, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of spill stores + loads ptxas reports for the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(out.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(d) / "k.o")], capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.findall(r"Used (\d+) registers", log)
    assert found and regs, log
    return max(int(r) for r in regs), sum(int(s) + int(l) for s, l in found)


def _amd_usage(out) -> tuple[int, int]:
    text = out.asm["amdgcn"]
    regs = [int(v) for v in re.findall(r"\.vgpr_count:\s+(\d+)", text)]
    # VGPR spills go to scratch memory; SGPR spills into VGPR lanes (cheap) are not counted
    return max(regs, default=0), sum(int(v) for v in re.findall(r"\.vgpr_spill_count:\s+(\d+)", text))


if __name__ == "__main__":
    for row in main(sys.argv[1]):
        print("compiled", json.dumps(row))
