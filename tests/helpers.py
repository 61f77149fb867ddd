"""Helpers shared by the turbofx tests."""
from __future__ import annotations

from typing import Any

import torch


def _is_model_output(x: Any) -> bool:
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover - transformers is a test dependency
        return False
    return isinstance(x, ModelOutput)


def assert_model_close(ref: Any, out: Any, rtol: float, atol: float, path: str = "output") -> None:
    """Compare a compiled model's output with the eager reference, leaf by leaf.

    ``ref`` and ``out`` must be of the same class at every level (a ``CausalLMOutputWithPast``
    stays one; tuples stay tuples); HF ``ModelOutput``s must hold the same keys, and every
    tensor leaf (``logits``, ``last_hidden_state``, ...) is compared with
    ``torch.testing.assert_close`` (dtype and shape included).
    """
    assert type(out) is type(ref), f"{path}: expected a {type(ref).__name__}, got a {type(out).__name__}"
    if _is_model_output(ref):
        assert list(out.keys()) == list(ref.keys()), f"{path}: keys {list(out.keys())} != {list(ref.keys())}"
        for k in ref.keys():
            assert_model_close(ref[k], out[k], rtol, atol, f"{path}.{k}")
    elif isinstance(ref, torch.Tensor):
        torch.testing.assert_close(out.detach(), ref.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{path}: {m}")
    elif isinstance(ref, (tuple, list)):
        assert len(out) == len(ref), f"{path}: length {len(out)} != {len(ref)}"
        for i, (r, o) in enumerate(zip(ref, out)):
            assert_model_close(r, o, rtol, atol, f"{path}[{i}]")
    elif isinstance(ref, dict):
        assert list(out.keys()) == list(ref.keys()), f"{path}: keys {list(out.keys())} != {list(ref.keys())}"
        for k in ref:
            assert_model_close(ref[k], out[k], rtol, atol, f"{path}[{k!r}]")
    else:
        assert out == ref, f"{path}: {out!r} != {ref!r}"


def tensor_leaves(x: Any) -> list[torch.Tensor]:
    """Every tensor in a ModelOutput / tuple / dict, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if _is_model_output(x) or isinstance(x, dict):
        return [t for v in x.values() for t in tensor_leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensor_leaves(v)]
    return []


class Fn(torch.nn.Module):
    """A function as a module (what turbofx.compile takes)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def kernel_device() -> torch.device:
    """Where a test that should also run on a GPU machine puts its tensors: the GPU when there is
    one and Triton's interpreter is off (CPU tensors need the interpreter, which ``import turbofx``
    switches on only without a GPU), else the CPU. Call after ``import turbofx``."""
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")
