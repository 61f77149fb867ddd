"""On-disk kernel cache keyed by (source, target, versions).

A cached file is trusted only if it holds the expected source (sha256 of its bytes); otherwise it
is rewritten. If the cache directory cannot be written (read-only, a file, no permission), the
process falls back to a private temporary cache, with one warning.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from turbofx.codegen.target import Target
from turbofx.runtime.kernels import SourceMismatch, load_kernel, source_digest

_fallback: Path | None = None  # the private cache used once the configured one proved unwritable


def versions_key() -> str:
    import torch
    import triton

    return f"torch{torch.__version__}-triton{triton.__version__}"


def cache_dir() -> Path:
    if _fallback is not None:
        return _fallback
    root = os.environ.get("TURBOFX_CACHE_DIR") or Path.home() / ".cache" / "turbofx"
    return Path(root) / "kernels"


def _use_fallback(failed: Path, err: OSError) -> Path:
    global _fallback
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="turbofx-kernels-"))
        atexit.register(shutil.rmtree, _fallback, ignore_errors=True)
        warnings.warn(f"turbofx: the kernel cache {failed} is not writable ({err.strerror or err}); using a private "
                      f"temporary cache {_fallback} for this process (set TURBOFX_CACHE_DIR to a writable "
                      "directory to keep kernels between runs)", RuntimeWarning, stacklevel=3)
    return _fallback


def _holds(path: Path, digest: str) -> bool:
    try:
        return path.is_file() and source_digest(path.read_bytes()) == digest
    except OSError:
        return False


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def kernel_path(name: str, source: str, target: Target) -> Path:
    """Return the path of a cache file holding exactly ``source``, (re)writing it atomically if
    it is missing or holds anything else."""
    key = hashlib.sha256(f"{source}\n{target.key}\n{versions_key()}".encode()).hexdigest()[:16]
    digest = source_digest(source)
    path = cache_dir() / f"{name}_{key}.py"
    if _holds(path, digest):
        return path
    try:
        _write(path, source)
    except OSError as e:
        path = _use_fallback(path.parent, e) / path.name
        if not _holds(path, digest):
            _write(path, source)
    return path


def load(name: str, source: str, target: Target) -> Callable:
    if target.offline:  # generated for a GPU this machine lacks: written to the cache, never launched
        kernel_path(name, source, target)
        return target.unrunnable(name)
    digest = source_digest(source)
    try:
        return load_kernel(kernel_path(name, source, target), name, target.interpret, sha256=digest)
    except SourceMismatch:  # changed between the check and the read (another writer): write it again once
        pass
    try:
        return load_kernel(kernel_path(name, source, target), name, target.interpret, sha256=digest)
    except SourceMismatch as e:
        from turbofx.errors import CodegenError

        raise CodegenError(f"the kernel cache file keeps changing under turbofx ({e}); is another program "
                           "writing TURBOFX_CACHE_DIR? Point it at a directory of its own") from None
