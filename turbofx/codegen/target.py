"""Targets: what a kernel is generated for. One code path; targets differ by data.

``TURBOFX_TARGET`` (cuda | hip | cpu-interpret) overrides detection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    backend: str  # "cuda" | "hip" | "cpu-interpret"
    arch: str  # "sm90", "gfx942", "cpu"
    device: str  # torch device the kernels run on
    warp_size: int = 32
    sm_count: int = 1
    shared_mem: int = 0
    features: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.arch}-w{self.warp_size}"

    @property
    def interpret(self) -> bool:
        return self.backend == "cpu-interpret"

    # Block policy. The interpreter runs one program instance at a time in Python, so it wants
    # few, large programs; GPUs want enough programs to fill the SMs.
    @property
    def xblock_max(self) -> int:
        return 1 << 16 if self.interpret else 1024

    @property
    def rblock_budget(self) -> int:
        return 1 << 16 if self.interpret else 4096

    @property
    def persistent_rmax(self) -> int:
        """Longest row a reduction keeps whole in registers; longer (or symbolic) rows loop over
        RBLOCK tiles. ``TURBOFX_PERSISTENT_RMAX`` overrides (tests use it to exercise loops)."""
        forced = os.environ.get("TURBOFX_PERSISTENT_RMAX")
        return int(forced) if forced else (1 << 14 if self.interpret else 8192)

    @property
    def loop_rblock(self) -> int:
        """Tile length of a looped reduction."""
        return min(self.persistent_rmax, 4096 if self.interpret else 1024)

    def num_warps(self, reduction: bool) -> int:
        if self.interpret:
            return 1
        return 8 if reduction else 4

    def describe(self) -> str:
        extra = f", {self.sm_count} SMs" if not self.interpret else " (Triton interpreter)"
        return f"{self.backend} {self.arch}{extra}"


def detect(device: torch.device | str | None = None, name: str | None = None) -> Target:
    """The target for ``device`` (default: the first GPU, else the CPU interpreter); ``name``
    (or ``TURBOFX_TARGET``: cuda | hip | cpu-interpret) forces the backend."""
    forced = (name or os.environ.get("TURBOFX_TARGET", "")).strip().lower()
    dev = torch.device(device) if device is not None else None
    want_gpu = forced in ("cuda", "hip") or (not forced and (dev is None or dev.type == "cuda") and torch.cuda.is_available())
    if forced in ("cpu", "cpu-interpret", "interpret") or not want_gpu or (dev is not None and dev.type == "cpu"):
        return Target("cpu-interpret", "cpu", "cpu")
    props = torch.cuda.get_device_properties(dev if dev is not None and dev.index is not None else 0)
    idx = dev.index if dev is not None and dev.index is not None else 0
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        return Target("hip", arch, f"cuda:{idx}", warp_size=64, sm_count=props.multi_processor_count,
                      shared_mem=getattr(props, "shared_memory_per_block_optin", 65536),
                      features=("fp8",) if arch.startswith("gfx94") else ())
    cc = props.major * 10 + props.minor
    feats = tuple(f for f, ok in (("fp8", cc >= 89), ("tma", cc >= 90), ("wgmma", cc == 90)) if ok)
    return Target("cuda", f"sm{cc}", f"cuda:{idx}", warp_size=32, sm_count=props.multi_processor_count,
                  shared_mem=getattr(props, "shared_memory_per_block_optin", 0), features=feats)
