"""Quantized blocks a model's weights came with (GGUF), kept beside its parameters.

transformers dequantizes a GGUF file on load; ``attach_gguf(model, path)`` reads the file's raw
Q8_0 / Q4_0 / Q4_1 blocks (``turbofx.quant.gguf``) and attaches each to the parameter it
dequantizes to. ``GGUFNative`` quantization then takes a weight's attached blocks instead of
quantizing it (``native_of``). The layout pass joins attached blocks along with the weights they
belong to (``join_native``), so a joined QKV weight keeps its blocks. The registry holds tensors
weakly: blocks live as long as their parameters.
"""
from __future__ import annotations

import threading
import weakref

import torch

from turbofx.quant.weights import QuantizedWeight, cat_rows

_lock = threading.Lock()
_blocks: "weakref.WeakKeyDictionary[torch.Tensor, QuantizedWeight]" = weakref.WeakKeyDictionary()
# joins made from a first source tensor: (ids of all sources) -> the joined blocks
_joins: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def attach(tensor: torch.Tensor, qw: QuantizedWeight) -> None:
    """Record that ``tensor`` holds the dequantized values of ``qw``."""
    if tuple(tensor.shape) != tuple(qw.shape):
        from turbofx.errors import QuantizationError

        raise QuantizationError(f"attach: blocks of shape {tuple(qw.shape)} do not fit a weight of shape "
                                f"{tuple(tensor.shape)}")
    with _lock:
        _blocks[tensor] = qw


def native_of(tensor: torch.Tensor) -> QuantizedWeight | None:
    """The blocks attached to ``tensor`` (None: it has none)."""
    with _lock:
        return _blocks.get(tensor)


def join_native(sources: list[torch.Tensor], joined: torch.Tensor) -> None:
    """Attach to ``joined`` (``sources`` concatenated along rows) their blocks joined likewise,
    when every source has blocks of one format; a second join of the same sources reuses the first."""
    with _lock:
        parts = [_blocks.get(t) for t in sources]
        if not parts or any(p is None for p in parts) or len({p.fmt for p in parts}) != 1:
            return
        key = tuple(id(t) for t in sources)
        done = _joins.setdefault(sources[0], {})
        if key not in done:
            done[key] = cat_rows(parts)
        _blocks[joined] = done[key]


def attach_gguf(model: torch.nn.Module, path) -> list[str]:
    """Attach ``path``'s quantized linear-layer blocks to ``model``'s parameters (each verified to
    dequantize to the parameter exactly). Returns notes: tensors left dequantized, and why."""
    from turbofx.quant.gguf import gguf_linear_weights

    weights, notes = gguf_linear_weights(path, model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, qw in weights.items():
        attach(params[name], qw)
    return [f"{len(weights)} linear weights keep their GGUF blocks"] + list(notes)
