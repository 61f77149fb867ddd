"""Load generated Triton kernel sources (from the cache or an artifact) as callables."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

_loaded: dict[str, Callable] = {}


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


def load_kernel(path: Path, name: str, interpret: bool) -> Callable:
    """Import ``path`` and return its ``name`` (a triton.jit function, interpreted on CPU)."""
    if interpret and not _interpreter_ready():
        from turbofx.errors import CodegenError

        raise CodegenError("the CPU target runs kernels in Triton's interpreter, which must be enabled before "
                           "triton is imported: set TRITON_INTERPRET=1, or import turbofx before triton")
    key = f"{path}:{name}:{interpret}"
    if key not in _loaded:
        modname = f"turbofx_kernels.{name}_{'i' if interpret else 'c'}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        with _interpreter(interpret):
            spec.loader.exec_module(mod)
        sys.modules[modname] = mod
        _loaded[key] = getattr(mod, name)
    return _loaded[key]
