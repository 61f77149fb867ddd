"""The torch.compile door: Dynamo -> AOTAutograd (inference) -> the same pipeline as export.

Registered as ``backend="turbofx"`` through the ``torch_dynamo_backends`` entry point (and on
``import turbofx``). Accepts the ``mode=`` / ``options=`` keywords torch and HF ``generate`` pass.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("turbofx.backend")

stats = {"graphs": 0, "calls": 0}
_reports: list = []


def reports_of(compiled) -> list:
    """Reports of the graphs compiled through the torch.compile door for ``compiled`` (an
    OptimizedModule or the module it wraps): matched by the parameter/buffer tensors the graphs
    took as inputs."""
    import torch

    module = getattr(compiled, "_orig_mod", compiled)
    if not isinstance(module, torch.nn.Module):
        return []
    ptrs = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    return [r for r in _reports if r.input_ptrs & ptrs]


def turbofx_backend(gm, example_inputs, mode: str | None = None, options: dict | None = None, **kwargs):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from turbofx.compiler.capture import capture_aot_graph, decomposition_table
    from turbofx.compiler.driver import Options, build

    import torch

    opts = Options.make(mode=mode, **dict(options or {}), **kwargs)
    input_ptrs = frozenset(t.data_ptr() for t in example_inputs
                           if isinstance(t, torch.Tensor) and t.device.type != "meta")
    if mode not in (None, "default"):
        log.info("mode=%r accepted; CUDA-graph replay arrives with the runtime issue", mode)

    def forward_compiler(fx_graph, inputs):
        t0 = time.perf_counter()
        captured = capture_aot_graph(fx_graph, inputs)
        program, report, _, _ = build(captured, opts, time.perf_counter() - t0)
        report.input_ptrs = input_ptrs
        _reports.append(report)
        stats["graphs"] += 1

        def run(*args):
            stats["calls"] += 1
            return program(list(args))

        return make_boxed_func(run)

    return aot_autograd(fw_compiler=forward_compiler, decompositions=decomposition_table(),
                        keep_inference_input_mutations=True)(gm, example_inputs)
