"""A Program: ordered kernel launches and extern ATen calls over planned buffers.

A Program is plain data (JSON-serialisable): value slots, steps, size symbols bound from input
shapes, and which slot holds each output. Each step's kernel family (``turbofx.codegen.family``)
turns it into a launcher; kernel outputs are allocated with the strides the graph promised, and a
planned output may reuse the tensor of a dead buffer with the same shape, strides and dtype.
Running is one tight loop.
"""
from __future__ import annotations

import logging
from typing import Callable

from turbofx.runtime.exprs import _resolve, decode_arg

log = logging.getLogger("turbofx.runtime")


class Program:
    def __init__(self, d: dict, kernels: dict[str, Callable]):
        self.d = d
        self.n_values = d["n_values"]
        self.inputs: list[int] = d["inputs"]
        self.bindings = d["bindings"]  # [symbol, input position, dim or None]
        self.outputs = [decode_arg(o) for o in d["outputs"]]
        self.frees: list[list[int]] = d["frees"]
        from turbofx.codegen import family  # the families' launchers (codegen imports the runtime's ops)

        # each step's family builds its launcher (run.step: the step's record, run.family)
        self.steps = [family.for_step(s["type"]).runner(s, kernels) for s in d["steps"]]

    def bind(self, flat_inputs: list) -> dict:
        env: dict[str, int] = {}
        for sym, pos, dim in self.bindings:
            x = flat_inputs[pos]
            env[sym] = int(x) if dim is None else x.shape[dim]
        return env

    def __call__(self, flat_inputs: list) -> list:
        values: list = [None] * self.n_values
        for slot, x in zip(self.inputs, flat_inputs):
            values[slot] = x
        env = self.bind(flat_inputs)
        frees = self.frees
        for i, step in enumerate(self.steps):
            step(values, env)
            for v in frees[i]:
                values[v] = None
        return [_resolve(o, values, env) for o in self.outputs]
