"""turbofx: a graph-level compiler for transformer models (torch.export -> FX passes -> Triton)."""
from __future__ import annotations

import os as _os
import sys as _sys


def _prepare_interpreter() -> None:
    """Without a GPU, Triton kernels run in Triton's interpreter, which must be switched on before
    triton is first imported (its standard library is built then). Never raises: torch imports
    turbofx through its backend registry; a bad ``TURBOFX_TARGET`` is refused when a target is chosen."""
    if "triton" in _sys.modules or _os.environ.get("TRITON_INTERPRET"):
        return
    forced = _os.environ.get("TURBOFX_TARGET", "").strip().lower()
    if forced in ("cpu", "cpu-interpret", "interpret"):
        _os.environ["TRITON_INTERPRET"] = "1"
        return
    if forced in ("cuda", "hip") or forced.startswith(("cuda:", "hip:")):
        # a GPU, or an architecture named for offline compiles: kernels are compiled by real
        # Triton, which the interpreter would replace
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_prepare_interpreter()

from turbofx.errors import (ArtifactError, CaptureError, GenerationError, InputMismatchError,  # noqa: F401
                            ModelLoadError, TurbofxError)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import turbofx` (done by torch's backend registry) stays cheap.
    if name in ("compile", "explain", "Options", "Report"):
        from turbofx.compiler import driver

        return getattr(driver, name)
    if name in ("export", "load"):
        from turbofx.compiler import artifact

        return getattr(artifact, name)
    if name == "bisect":
        from turbofx.compiler.bisect import bisect

        return bisect
    if name == "generate":
        from turbofx.compiler.generation import generate

        return generate
    if name in ("Engine", "EngineFull", "RequestHandle"):
        from turbofx.compiler import serving

        return getattr(serving, name)
    if name == "backend":
        from turbofx.compiler.backend import turbofx_backend

        return turbofx_backend
    raise AttributeError(f"module 'turbofx' has no attribute {name!r}")


def _register_backend() -> None:
    """Make backend="turbofx" work even when the package is not pip-installed (entry point)."""
    try:
        from torch._dynamo.backends.registry import _BACKENDS, register_backend
    except Exception:  # pragma: no cover - torch without dynamo
        return
    if "turbofx" not in _BACKENDS:
        from turbofx.compiler.backend import turbofx_backend

        register_backend(name="turbofx")(turbofx_backend)


_register_backend()
