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
# id(tensor) -> (weak reference to it, its blocks). Tensors compare elementwise, so a
# WeakKeyDictionary cannot hold them; an entry counts only while its weak reference is alive.
_blocks: dict[int, tuple[weakref.ref, QuantizedWeight]] = {}
# joins: ids of all sources -> (weak references to them, the joined blocks)
_joins: dict[tuple[int, ...], tuple[list[weakref.ref], QuantizedWeight]] = {}


def _prune() -> None:
    for k in [k for k, (ref, _) in _blocks.items() if ref() is None]:
        del _blocks[k]
    for k in [k for k, (refs, _) in _joins.items() if any(r() is None for r in refs)]:
        del _joins[k]


def attach(tensor: torch.Tensor, qw: QuantizedWeight) -> None:
    """Record that ``tensor`` holds the dequantized values of ``qw``."""
    if tuple(tensor.shape) != tuple(qw.shape):
        from turbofx.errors import QuantizationError

        raise QuantizationError(f"attach: blocks of shape {tuple(qw.shape)} do not fit a weight of shape "
                                f"{tuple(tensor.shape)}")
    with _lock:
        _prune()
        _blocks[id(tensor)] = (weakref.ref(tensor), qw)


def _get(tensor: torch.Tensor) -> QuantizedWeight | None:
    entry = _blocks.get(id(tensor))
    return entry[1] if entry is not None and entry[0]() is tensor else None


def native_of(tensor: torch.Tensor) -> QuantizedWeight | None:
    """The blocks attached to ``tensor`` (None: it has none)."""
    with _lock:
        return _get(tensor)


def join_native(sources: list[torch.Tensor], joined: torch.Tensor) -> None:
    """Attach to ``joined`` (``sources`` concatenated along rows) their blocks joined likewise,
    when every source has blocks of one format; a second join of the same sources reuses the first."""
    with _lock:
        parts = [_get(t) for t in sources]
        if not parts or any(p is None for p in parts) or len({p.fmt for p in parts}) != 1:
            return
        key = tuple(id(t) for t in sources)
        done = _joins.get(key)
        if done is None or any(r() is not t for r, t in zip(done[0], sources)):
            done = _joins[key] = ([weakref.ref(t) for t in sources], cat_rows(parts))
            # each source's blocks become row views of the joined ones, so the blocks are held once
            # (as the layout pass re-points the weights themselves at rows of the joined weight)
            start = 0
            for t, p in zip(sources, parts):
                rows = p.shape[0]
                _blocks[id(t)] = (weakref.ref(t), _row_view(done[1], start, start + rows))
                start += rows
        _blocks[id(joined)] = (weakref.ref(joined), done[1])


def _row_view(qw: QuantizedWeight, start: int, end: int) -> QuantizedWeight:
    """Rows start:end of ``qw``, every tensor a view of qw's."""
    return QuantizedWeight(qw.fmt, qw.q[start:end], qw.scale[start:end],
                           qw.min[start:end] if qw.min is not None else None, (end - start, qw.shape[1]))


_notes: list[str] = []  # what the files attached so far left dequantized, and why (for explain)


def notes() -> list[str]:
    with _lock:
        return list(_notes)


def attach_gguf(model: torch.nn.Module, path) -> list[str]:
    """Attach ``path``'s quantized linear-layer blocks to ``model``'s parameters (each verified to
    dequantize to the parameter exactly). Returns notes: tensors left dequantized, and why (also
    listed by ``explain`` of programs compiled with ``quantize="gguf"``)."""
    import pathlib

    from turbofx.quant.gguf import gguf_linear_weights

    weights, left = gguf_linear_weights(path, model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, qw in weights.items():
        attach(params[name], qw)
    said = [f"{pathlib.Path(path).name}: {len(weights)} linear weights keep their GGUF blocks"] + \
        [f"{pathlib.Path(path).name}: {n}" for n in left]
    with _lock:
        _notes[:] = [n for n in _notes if n not in said] + said
    return said
