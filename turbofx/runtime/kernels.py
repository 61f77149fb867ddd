"""Load generated Triton kernel sources (from the cache or an artifact) as callables."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

_loaded: dict[tuple[str, str, bool], Callable] = {}  # (sha256 of the source, name, interpret) -> kernel


class SourceMismatch(Exception):
    """The file holds another source than the caller expects (internal: callers turn it into
    their own error or regenerate the file)."""


def source_digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@contextlib.contextmanager
def _interpreter(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _interpreter_ready() -> bool:
    """Triton's standard library (tl.sum, ...) is built for the interpreter only when
    TRITON_INTERPRET was set before triton was first imported."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def load_kernel(path: Path, name: str, interpret: bool, sha256: str | None = None) -> Callable:
    """Import ``path`` and return its ``name`` (a triton.jit function, interpreted on CPU).

    The bytes executed are the bytes read once here (no bytecode cache: a stale ``.pyc`` could
    run other code than the file holds); with ``sha256`` they must have that digest, else
    ``SourceMismatch``. Loaded kernels are reused by content, so a file rewritten under the same
    path is executed afresh."""
    if interpret and not _interpreter_ready():
        from turbofx.errors import CodegenError

        raise CodegenError("the CPU target runs kernels in Triton's interpreter, which must be enabled before "
                           "triton is imported: set TRITON_INTERPRET=1, or import turbofx before triton")
    data = Path(path).read_bytes()
    digest = source_digest(data)
    if sha256 is not None and digest != sha256:
        raise SourceMismatch(f"{path} has sha256 {digest[:12]}..., expected {sha256[:12]}...")
    key = (digest, name, interpret)
    if key not in _loaded:
        modname = f"turbofx_kernels.{name}_{digest[:16]}_{'i' if interpret else 'c'}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        # Triton reads the function's source back through inspect (the file at ``path``), which
        # the callers have just verified; the code object comes from the same verified bytes.
        code = compile(data, str(path), "exec")
        with _interpreter(interpret):
            exec(code, mod.__dict__)
        sys.modules[modname] = mod
        _loaded[key] = getattr(mod, name)
    return _loaded[key]
