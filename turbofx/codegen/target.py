"""Targets: what a kernel is generated for. One code path; targets differ by data.

A target name (``target=`` / ``--target`` / ``TURBOFX_TARGET``) is one of

- ``cpu`` (also ``cpu-interpret``, ``interpret``): Triton's interpreter on the CPU;
- ``cuda`` / ``hip``: the GPU of this machine (an error when there is none);
- ``cuda:smNN`` / ``hip:gfxNNN`` (e.g. ``cuda:sm90``, ``hip:gfx942``): that architecture. On a
  machine whose GPU is that architecture this is the GPU; anywhere else it is an *offline* target:
  kernels are generated (and can be compiled by real Triton, see tests/offline_compile.py) but a
  program built for it cannot run here;
- ``auto`` or nothing: the first GPU when the model is on one, else the CPU interpreter.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

import torch

from turbofx.errors import TargetError


@dataclass(frozen=True)
class ArchInfo:
    """What block choices need to know of an architecture when there is no device to ask."""
    shared_mem: int  # bytes of shared memory (LDS) one block may use (opt-in maximum)
    sm_count: int  # SMs / CUs of the usual part (H100 SXM, MI300X, ...): sizes split-KV grids
    features: tuple[str, ...] = ()


# The architectures an offline target may name, with their usual parts' numbers.
ARCHS: dict[str, ArchInfo] = {
    "sm80": ArchInfo(166912, 108),  # A100
    "sm86": ArchInfo(101376, 84),  # A40 / RTX 30xx
    "sm89": ArchInfo(101376, 142, ("fp8",)),  # L40S / RTX 40xx
    "sm90": ArchInfo(232448, 132, ("fp8", "tma", "wgmma")),  # H100 / H200
    "sm100": ArchInfo(232448, 148, ("fp8", "tma")),  # B200
    "sm120": ArchInfo(101376, 170, ("fp8", "tma")),  # RTX 50xx
    "gfx90a": ArchInfo(65536, 110),  # MI210 / MI250X (per GCD)
    "gfx942": ArchInfo(65536, 304, ("fp8",)),  # MI300X
    "gfx950": ArchInfo(163840, 256, ("fp8",)),  # MI355X
}
_CPU_NAMES = ("cpu", "cpu-interpret", "interpret")
_ARCH_FORM = re.compile(r"^(cuda|hip):(sm\d+|gfx[0-9a-f]+)$")
VALID_FORMS = ("auto, cpu (or cpu-interpret, interpret), cuda, hip, cuda:smNN or hip:gfxNNN "
               f"(known architectures: {', '.join(ARCHS)})")


@dataclass(frozen=True)
class Target:
    backend: str  # "cuda" | "hip" | "cpu-interpret"
    arch: str  # "sm90", "gfx942", "cpu"
    device: str | None  # torch device the kernels run on; None: an offline target (compile only)
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

    @property
    def offline(self) -> bool:
        """Kernels are generated for this architecture but there is no such device to run them on."""
        return self.device is None

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
        if self.interpret:
            return f"{self.backend} {self.arch} (Triton interpreter)"
        where = " (offline: compile only, no such device here)" if self.offline else ""
        return f"{self.backend} {self.arch}, {self.sm_count} SMs{where}"

    def unrunnable(self, kernel: str) -> "OfflineKernel":
        return OfflineKernel(kernel, self)


class OfflineKernel:
    """Stands in for a kernel of an offline target: launching it says why it cannot run."""

    def __init__(self, name: str, target: Target) -> None:
        self.name, self.target = name, target

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise TargetError(f"this program was compiled for {self.target.backend} {self.target.arch} offline "
                          f"(kernel {self.name}): there is no such device here, so it cannot run. Export it and "
                          "run it on that GPU, or compile with target='cpu' (or the default) to run it here")


def check_name(name: str | None) -> str:
    """The normalised target name (``""`` for auto); TargetError for anything else."""
    if name is None:
        return ""
    if not isinstance(name, str):
        raise TargetError(f"target must be a string, got {type(name).__name__} {name!r}; valid: {VALID_FORMS}")
    n = name.strip().lower()
    if n in ("", "auto"):
        return ""
    if n in _CPU_NAMES:
        return "cpu"
    if n in ("cuda", "hip"):
        return n
    m = _ARCH_FORM.match(n)
    if m and m.group(2) in ARCHS and m.group(2).startswith("sm" if m.group(1) == "cuda" else "gfx"):
        return n
    if m:
        raise TargetError(f"target {name!r}: unknown {m.group(1)} architecture {m.group(2)!r}; valid: {VALID_FORMS}")
    raise TargetError(f"unknown target {name!r}; valid: {VALID_FORMS}")


def cli_target(name: str) -> str:
    """argparse ``type=`` for ``--target``: refuse a bad name, or a GPU this machine lacks, before any
    model is loaded."""
    try:
        detect(None, name)  # the name, and a GPU for "cuda"/"hip"
    except TargetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def offline(name: str) -> Target:
    """The Target an architecture name (``cuda:sm90``, ``hip:gfx942``) describes, without a device."""
    backend, arch = check_name(name).split(":")
    info = ARCHS[arch]
    return Target(backend, arch, None, warp_size=64 if backend == "hip" else 32, sm_count=info.sm_count,
                  shared_mem=info.shared_mem, features=info.features)


def _gpu_backend() -> str | None:
    if not torch.cuda.is_available():
        return None
    return "hip" if torch.version.hip else "cuda"


def _gpu(idx: int) -> Target:
    props = torch.cuda.get_device_properties(idx)
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        return Target("hip", arch, f"cuda:{idx}", warp_size=64, sm_count=props.multi_processor_count,
                      shared_mem=getattr(props, "shared_memory_per_block_optin", 65536),
                      features=("fp8",) if arch.startswith("gfx94") else ())
    cc = props.major * 10 + props.minor
    feats = tuple(f for f, ok in (("fp8", cc >= 89), ("tma", cc >= 90), ("wgmma", cc == 90)) if ok)
    return Target("cuda", f"sm{cc}", f"cuda:{idx}", warp_size=32, sm_count=props.multi_processor_count,
                  shared_mem=getattr(props, "shared_memory_per_block_optin", 0), features=feats)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def check_interpreter_versions(triton_version: str, numpy_version: str) -> None:
    """Triton < 3.7's interpreter breaks on numpy >= 2.3: refuse that pair instead of failing inside it."""
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 3):
        raise TargetError(f"Triton {triton_version}'s CPU interpreter needs numpy < 2.3, found numpy {numpy_version}: "
                          "pip install 'numpy<2.3' (or pip install -e '.[triton36]'), or use Triton >= 3.7")


def _cpu() -> Target:
    import numpy
    import triton

    check_interpreter_versions(triton.__version__, numpy.__version__)
    return Target("cpu-interpret", "cpu", "cpu")


def detect(device: torch.device | str | None = None, name: str | None = None) -> Target:
    """The target for a model on ``device`` (default: the first GPU, else the CPU interpreter).
    ``name`` (else ``TURBOFX_TARGET``) chooses one; see the module docstring for the names. A GPU
    name without that GPU, or with the model's tensors elsewhere, is a TargetError, never a quiet
    CPU compile."""
    from_env = name is None
    n = check_name(os.environ.get("TURBOFX_TARGET") if from_env else name)
    said = f"TURBOFX_TARGET={os.environ.get('TURBOFX_TARGET')!r}" if from_env else f"target={name!r}"
    dev = torch.device(device) if device is not None else None
    gpu = _gpu_backend()
    if n == "cpu" or (not n and (gpu is None or (dev is not None and dev.type != "cuda"))):
        return _cpu()
    idx = dev.index if dev is not None and dev.type == "cuda" and dev.index is not None else 0
    if ":" in n:  # an architecture: this machine's GPU when it is that one, else offline
        here = _gpu(idx) if gpu is not None and (dev is None or dev.type == "cuda") else None
        return here if here is not None and f"{here.backend}:{here.arch}" == n else offline(n)
    if n:  # "cuda" | "hip": this machine's GPU
        if gpu is None:
            raise TargetError(f"{said} asks for a GPU, but torch sees none (torch.cuda.is_available() is False). "
                              "Run on a machine with that GPU, use target='cpu' for the interpreter, or name an "
                              "architecture (e.g. 'cuda:sm90') to generate kernels offline")
        if gpu != n:
            raise TargetError(f"{said}, but this machine's GPU is {gpu}: use target={gpu!r} (or leave it unset)")
        if dev is not None and dev.type != "cuda":
            raise TargetError(f"{said}, but the model's tensors are on {dev}: move the model and its inputs to the "
                              "GPU (model.to('cuda')), or use target='cpu'")
    return _gpu(idx)
