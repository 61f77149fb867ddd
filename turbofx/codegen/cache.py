"""On-disk kernel cache keyed by (source, target, versions)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from turbofx.codegen.target import Target
from turbofx.runtime.kernels import load_kernel


def versions_key() -> str:
    import torch
    import triton

    return f"torch{torch.__version__}-triton{triton.__version__}"


def cache_dir() -> Path:
    root = os.environ.get("TURBOFX_CACHE_DIR") or Path.home() / ".cache" / "turbofx"
    return Path(root) / "kernels"


def kernel_path(name: str, source: str, target: Target) -> Path:
    """Write ``source`` into the cache (once, atomically) and return its path."""
    digest = hashlib.sha256(f"{source}\n{target.key}\n{versions_key()}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}_{digest}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


def load(name: str, source: str, target: Target) -> Callable:
    if target.offline:  # generated for a GPU this machine lacks: written to the cache, never launched
        kernel_path(name, source, target)
        return target.unrunnable(name)
    return load_kernel(kernel_path(name, source, target), name, target.interpret)
