"""The eager reference of a quantized model: what a turbofx-compiled quantized model must equal.

``dequantized_model(model, cfg, layers)`` is a copy of ``model`` whose chosen linear layers hold
their weights quantized by ``cfg`` and dequantized back (the same numbers the kernels read), and
whose inputs to W8A8 / FP8-dynamic layers are fake-quantized per row as the kernels quantize
them. Nothing else changes, so it runs eagerly on any device.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch


def dequantized_model(model: torch.nn.Module, cfg, layers: Iterable[str]) -> torch.nn.Module:
    """A deep copy of ``model`` with ``layers`` (module paths of ``nn.Linear`` / ``nn.Embedding``
    layers, as ``Report.quantized`` names them, possibly under a wrapper's prefix) quantized by
    ``cfg`` and dequantized in place (weights tied to them, such as a LM head tied to the token
    table, see the same numbers). Raises ``QuantizationError`` for a name that is no such layer."""
    from turbofx.errors import QuantizationError
    from turbofx.quant.weights import dequantize
    from turbofx.runtime import ops as tfx_ops

    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name in layers:
        mod = _find(modules, name)
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            raise QuantizationError(f"dequantized_model: {name!r} is not a linear or embedding layer of "
                                    f"{type(model).__name__}")
        w = mod.weight
        with torch.no_grad():
            qw = cfg.quantize(w.detach())
            w.copy_(dequantize(qw, torch.float32).to(w.dtype))
        if qw.fmt.act is not None:  # every linear layer reading this weight sees fake-quantized rows
            act = qw.fmt.act
            for m in modules.values():
                if isinstance(m, torch.nn.Linear) and m.weight is w:
                    m.register_forward_pre_hook(lambda m, args, act=act: (tfx_ops.quantize_rows(args[0], act),
                                                                          *args[1:]))
    return ref


def _find(modules: dict, name: str):
    """The module called ``name``, or the one whose path ``name`` ends with / starts with a
    wrapper's prefix of (a StaticDecoder compiles ``model.<path>``)."""
    if name in modules:
        return modules[name]
    hits = [m for path, m in modules.items() if path and (name.endswith("." + path) or path.endswith("." + name))]
    return hits[0] if len(hits) == 1 else None
